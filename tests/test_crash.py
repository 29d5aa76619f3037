"""Crash safety: a night run killed with SIGKILL in each stage, then run again without --force,
ends with the products of a clean run, nothing broken under a final name and no leftovers.

The kill is the real thing, with no hook in the code: the night runs as a user runs it (a
``gppy night run`` subprocess, its own process group), and the test watches the scratch root for
the stage's invocation folder (named after the stage) and for the first sign of a write (a file
in that folder, or a product's temporary file in the root), then kills the whole group.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from products import SIZE, assert_opens, differences, leftovers, product_files

from gppy_stage.sim import simulate_night

UNIT, NIGHT = "7DT01", "2025-01-01_gain2750"
STAGES = ("masters", "reduce", "astrometry", "photometry", "stack", "subtract", "detect", "completeness", "curate")


def _night_run(root: Path, scratch: Path, log: Path, env: dict | None = None) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "gppy_stage.cli", "night", "run", "--root", str(root), "--obs", UNIT,
           "--night", NIGHT, "--workers", "1"]  # one process: a rerun that skips is cheap
    return subprocess.Popen(cmd, stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True,
                            env={**os.environ, "GPPY_SCRATCH": str(scratch), **(env or {})})


def _finish(proc: subprocess.Popen, log: Path) -> str:
    assert proc.wait(timeout=600) == 0, log.read_text()[-4000:]
    return log.read_text()


def _writing(scratch: Path, root: Path, stage: str) -> bool:
    """True once an invocation of ``stage`` has begun to write (in its scratch folder or the root)."""
    try:
        folders = [d for d in scratch.iterdir() if d.name.split(".", 3)[-1].startswith(stage + "-")]
        return any(any(d.iterdir()) for d in folders) or (bool(folders) and bool(leftovers(root)))
    except FileNotFoundError:  # a folder removed as we looked: look again
        return False


def _kill_in(stage: str, root: Path, scratch: Path, log: Path) -> bool:
    """Run the night and SIGKILL it (all its processes) once ``stage`` writes; False when the
    night finished before that could be seen."""
    proc = _night_run(root, scratch, log)
    while proc.poll() is None:
        if _writing(scratch, root, stage):
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            time.sleep(0.2)  # let the killed workers go
            return True
        time.sleep(0.002)
    assert proc.returncode == 0, log.read_text()[-4000:]
    return False


@pytest.fixture(scope="module")
def nights(tmp_path_factory):
    base = tmp_path_factory.mktemp("crash")
    raw = base / "raw"
    simulate_night(raw, unit=UNIT, filters=("m425",), size=SIZE, seed=3, n_science=2)
    clean = base / "clean"
    shutil.copytree(raw, clean)
    out = _finish(_night_run(clean, base / "scratch-clean", base / "clean.log"), base / "clean.log")
    assert "failed: 0" in out, out[-3000:]
    return base, raw, clean


def test_killed_in_every_stage_then_rerun_gives_the_clean_products(nights):
    base, raw, clean = nights
    root, scratch = base / "crashed", base / "scratch"
    shutil.copytree(raw, root)
    killed = []
    for stage in STAGES:
        if _kill_in(stage, root, scratch, base / f"kill-{stage}.log"):
            killed.append(stage)
            for rel in product_files(root):  # whatever is under a final name is whole
                assert_opens(root / rel)
    # curate writes one small report in milliseconds, and detect on this small night takes a few
    # seconds: each is killed when the poll is quick enough; every longer stage must have been
    assert set(STAGES) - set(killed) <= {"detect", "curate"}, killed
    out = _finish(_night_run(root, scratch, base / "rerun.log"), base / "rerun.log")
    assert "failed: 0" in out and "quarantined: 0" in out, out[-3000:]
    assert differences(clean, root) == []
    assert leftovers(root) == [] and list(scratch.iterdir()) == []
    print(f"killed in {len(killed)} stages: {', '.join(killed)}; {len(product_files(root))} products identical")


def test_a_night_whose_stack_fails_exits_non_zero_and_says_how_many(nights, tmp_path):
    """A tool that fails (SWarp, on the one stack): the night goes on to the end, then exits with
    the failure's code (69) rather than 0, and the summary counts the failures."""
    base, raw, _ = nights
    root = tmp_path / "root"
    shutil.copytree(raw, root)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    real = shutil.which("SWarp") or shutil.which("swarp")
    for name in ("SWarp", "swarp"):
        fake = bin_dir / name
        # the real SWarp answers the version query (provenance); the co-add itself fails
        fake.write_text(f'#!/bin/sh\ncase "$1" in -v|-dd) exec {real} "$@";; esac\n'
                        'echo "swarp: simulated failure" >&2\nexit 1\n')
        fake.chmod(0o755)
    log = tmp_path / "night.log"
    proc = _night_run(root, tmp_path / "scratch", log, env={"PATH": f"{bin_dir}:{os.environ['PATH']}"})
    assert proc.wait(timeout=600) == 69, log.read_text()[-4000:]
    out = log.read_text()
    assert "science out: 2" in out and "failed: 1" in out and "1 stage run(s) failed: exit 69" in out, out[-3000:]
    assert "swarp: simulated failure" in out and "Traceback" not in out
