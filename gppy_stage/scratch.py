"""Scratch space: one folder per stage invocation, under a root that survives crashes cleanly.

The external tools each work in a temporary folder (SWarp's are tens of MB). A process killed
with SIGKILL (out of memory, a pod evicted) cannot remove them, and a pod restarted over and over
would fill its node. So every stage invocation works in its own folder under the scratch root
(``GPPY_SCRATCH``, default ``$TMPDIR/gppy-scratch``), named after the process that owns it, and the
next invocation removes the folders of owners that are gone. A live owner's folder is never
touched.

An owner is ``<host>.<pid>.<start>``: the start time (clock ticks since boot, from /proc) tells a
dead process from a new one that got the same pid, as happens to pid 1 when a container restarts.
Folders of other hosts (a scratch root on a shared disk) are left to their own host.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import tempfile
from pathlib import Path
from typing import Iterator

from .errors import ConfigError


def _start_ticks(pid: int) -> int | None:
    """The process's start time in clock ticks since boot; None where it is not running."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return None
    except OSError:
        return 0
    # the command name (field 2) may hold spaces and parentheses: count from the last ')'
    return int(stat.rsplit(")", 1)[1].split()[19])


def _host() -> str:
    return socket.gethostname().replace(".", "_") or "localhost"


def owner() -> str:
    """This process as an owner of scratch and temporary files: ``<host>.<pid>.<start>``."""
    pid = os.getpid()
    return f"{_host()}.{pid}.{_start_ticks(pid) or 0}"


def owner_is_dead(name: str) -> bool:
    """True only when ``name`` begins with an owner of this host whose process is gone."""
    parts = name.split(".")
    if len(parts) < 3 or parts[0] != _host() or not parts[1].isdigit() or not parts[2].isdigit():
        return False  # not ours to judge
    pid, start = int(parts[1]), int(parts[2])
    if not Path("/proc").is_dir():
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            return False
        return False
    ticks = _start_ticks(pid)
    return ticks is None or (start != 0 and ticks not in (0, start))


def root() -> Path:
    """The scratch root (created on first use)."""
    configured = os.environ.get("GPPY_SCRATCH")
    base = Path(configured) if configured else Path(_system_tmp()) / "gppy-scratch"
    try:
        base.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"cannot make the scratch folder ({exc.strerror}): set GPPY_SCRATCH to a writable folder",
                          path=str(base)) from None
    return base


def _system_tmp() -> str:
    # not tempfile.gettempdir(): inside an invocation that is the invocation's own folder
    saved, tempfile.tempdir = tempfile.tempdir, None
    try:
        return tempfile.gettempdir()
    finally:
        tempfile.tempdir = saved


def clean(base: Path | None = None) -> list[Path]:
    """Remove the folders of dead owners under the scratch root; the ones removed."""
    base = base or root()
    removed = []
    for entry in sorted(base.iterdir()):
        if entry.is_dir() and owner_is_dead(entry.name):
            shutil.rmtree(entry, ignore_errors=True)
            removed.append(entry)
    return removed


@contextlib.contextmanager
def invocation(label: str) -> Iterator[Path]:
    """A fresh folder for one stage invocation, where every temporary file of the process goes
    (``tempfile`` is pointed at it) until the invocation ends; then it is removed."""
    base = root()
    clean(base)
    folder = Path(tempfile.mkdtemp(prefix=f"{owner()}.{label}-", dir=base))
    saved, tempfile.tempdir = tempfile.tempdir, str(folder)
    try:
        yield folder
    finally:
        tempfile.tempdir = saved
        shutil.rmtree(folder, ignore_errors=True)
