"""Scratch folders: one per stage invocation; what a killed one leaves is removed by the next."""

from __future__ import annotations

import signal
import subprocess
import sys
import tempfile

from gppy_stage import scratch


def _holder(base, label: str) -> subprocess.Popen:
    """A process inside an invocation, with a tool's temporary folder in it, waiting to be killed."""
    code = ("import tempfile, time; from gppy_stage import scratch\n"
            f"with scratch.invocation({label!r}) as folder:\n"
            "    tempfile.mkdtemp(prefix='gppy-swarp-')\n"
            "    print(folder, flush=True); time.sleep(120)\n")
    return subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True,
                            env={"GPPY_SCRATCH": str(base), "PATH": "/usr/bin:/bin"})


def test_a_killed_invocations_folder_is_removed_by_the_next_and_a_live_one_kept(tmp_path, monkeypatch):
    base = tmp_path / "scratch"
    monkeypatch.setenv("GPPY_SCRATCH", str(base))
    dead, live = _holder(base, "stack"), _holder(base, "reduce")
    try:
        dead_folder, live_folder = (p.stdout.readline().strip() for p in (dead, live))
        assert any(n.startswith("gppy-swarp-") for n in __import__("os").listdir(dead_folder))
        dead.send_signal(signal.SIGKILL)
        dead.wait()
        with scratch.invocation("detect") as mine:
            assert tempfile.gettempdir() == str(mine)  # every TemporaryDirectory of the tools lands here
            assert sorted(p.name for p in base.iterdir()) == sorted([mine.name, live_folder.rsplit("/", 1)[1]])
        assert [p.name for p in base.iterdir()] == [live_folder.rsplit("/", 1)[1]]
    finally:
        live.kill()
        live.wait()
    assert tempfile.gettempdir() != str(base)


def test_owners_of_other_hosts_or_unreadable_names_are_never_judged_dead():
    assert not scratch.owner_is_dead("otherhost.1.2.reduce-x")
    assert not scratch.owner_is_dead("not-an-owner")
    assert not scratch.owner_is_dead(scratch.owner() + ".reduce-x")  # this very process
    pid_gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                              text=True).stdout.strip()
    assert scratch.owner_is_dead(f"{scratch.owner().split('.')[0]}.{pid_gone}.1.reduce-x")
