"""The command line as a user (and Argo) calls it: help everywhere, stage commands, exit codes."""

from __future__ import annotations

import json
import subprocess
import sys

import click
import pytest
import typer

from gppy_stage import graph
from gppy_stage.cli import app
from gppy_stage.sim import simulate_night
from gppy_stage.stages.base import StageResult


def _gppy(*args, timeout=600):
    return subprocess.run([sys.executable, "-m", "gppy_stage.cli", *args], capture_output=True, text=True,
                          timeout=timeout)


def _commands(group: click.Group, prefix=()):
    for name, cmd in group.commands.items():
        yield prefix + (name,), cmd
        if isinstance(cmd, click.Group):
            yield from _commands(cmd, prefix + (name,))


def _printed_is_saved(proc, root, stage: str, item: str) -> dict:
    """The JSON line a stage command printed, checked against the record it saved (what Argo's log
    and the night report each read)."""
    printed = json.loads(proc.stdout.strip().splitlines()[-1])
    saved = root / "runs" / "7DT01" / "2025-01-01_gain2750" / "results" / stage / f"{item}.json"
    assert printed == json.loads(StageResult.from_dict(json.loads(saved.read_text())).log_line())
    return printed


def test_every_command_has_help_text():
    root = typer.main.get_command(app)
    missing = [" ".join(path) for path, cmd in _commands(root) if not (cmd.help or "").strip()]
    assert not missing, f"commands without help: {missing}"
    for path, cmd in _commands(root):
        for param in cmd.params:
            if isinstance(param, click.Option) and param.name != "help":
                assert (param.help or "").strip(), f"gppy {' '.join(path)} {param.opts[0]} has no help"


def test_every_stage_is_a_command_with_the_graph_arguments():
    stage_group = typer.main.get_command(app).commands["stage"]
    for stage in graph.STAGES:
        cmd = stage_group.commands[stage.name]
        opts = {o for p in cmd.params for o in getattr(p, "opts", [])}
        assert set(stage.args) <= opts, (stage.name, stage.args, opts)


@pytest.fixture(scope="module")
def small_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli") / "root"
    simulate_night(root, filters=("m475",), seed=21, n_science=1, reference=False)
    return root


def test_stage_commands_as_argo_calls_them(small_root, tmp_path):
    out = tmp_path / "outputs"
    proc = _gppy("stage", "plan", "--root", str(small_root), "--obs", "7DT01", "--outputs-dir", str(out))
    assert proc.returncode == 0, proc.stderr
    assert (out / "night").read_text() == "2025-01-01_gain2750"  # latest complete night, no --night given
    calsets = json.loads((out / "calsets.json").read_text())
    frames = json.loads((out / "frames.json").read_text())
    assert len(calsets) == 1 and len(frames) == 1 and json.loads((out / "stacks.json").read_text())
    night = ("--root", str(small_root), "--obs", "7DT01", "--night", "2025-01-01_gain2750")
    proc = _gppy("stage", "masters", *night, "--calset", calsets[0])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    proc = _gppy("stage", "reduce", *night, "--frame", frames[0])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    result = _printed_is_saved(proc, small_root, "reduce", frames[0])
    assert result["status"] == "done" and (small_root / result["result"]["output"]).is_file()
    again = _printed_is_saved(_gppy("stage", "reduce", *night, "--frame", frames[0]), small_root, "reduce", frames[0])
    assert again["status"] == "skipped" and again["error"] is None


def test_exit_codes_say_what_went_wrong(small_root, tmp_path):
    night = ("--root", str(small_root), "--obs", "7DT01", "--night", "2025-01-01_gain2750")
    proc = _gppy("stage", "reduce", *night, "--frame", "no-such-frame")
    if proc.returncode == 78:  # the plan test has not run first: plan now
        assert _gppy("stage", "plan", *night).returncode == 0
        proc = _gppy("stage", "reduce", *night, "--frame", "no-such-frame")
    assert proc.returncode == 65 and "no-such-frame" in proc.stdout
    assert _printed_is_saved(proc, small_root, "reduce", "no-such-frame")["status"] == "quarantined"
    proc = _gppy("stage", "reduce", "--root", str(tmp_path), "--obs", "7DT01", "--night", "2025-01-01_gain2750",
                 "--frame", "x")
    assert proc.returncode == 78 and "gppy stage plan" in proc.stdout
    failed = _printed_is_saved(proc, tmp_path, "reduce", "x")
    assert failed["status"] == "failed" and failed["result"] is None and failed["error"]["kind"] == "config"
    proc = _gppy("night", "run", "--root", str(tmp_path), "--obs", "7DT99")
    assert proc.returncode == 78 and "7DT99" in proc.stderr and "Traceback" not in proc.stderr


def test_version():
    proc = _gppy("--version")
    assert proc.returncode == 0 and proc.stdout.startswith("gppy-stage ")
