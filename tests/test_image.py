"""The pipeline image builds from nothing but Debian's mirror and PyPI, and runs a real stage.

Slow (minutes): marked ``container``; CI runs it. The base is a local debootstrap of bookworm
(no registry needed), cached per day under /var/tmp by images/build.sh, so a second local run
only rebuilds the layers that changed. HOTPANTS (GitHub) and the astrometry.net index files
(hundreds of MB) are left out here.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TAG = "localhost/gppy-stage:test"
# what works inside an unprivileged CI container: runc, and limits no higher than the container's
# own hard limits (podman's defaults exceed them and runc then fails with "error setting rlimit")
RUN = ["podman", "run", "--rm", "--runtime", "runc", "--ulimit", "nofile=20000:20000", "--ulimit", "nproc=20000:20000"]

pytestmark = [
    pytest.mark.container,
    pytest.mark.slow,
    pytest.mark.skipif(
        not all(shutil.which(t) for t in ("podman", "debootstrap", "runc")),
        reason="needs podman, runc and debootstrap (apt-get install podman runc debootstrap)",
    ),
]


@pytest.fixture(scope="module")
def image() -> str:
    env = {**os.environ, "TAG": TAG, "INDEX_PACKAGES": "", "WITH_HOTPANTS": "0"}
    out = subprocess.run([str(REPO / "images" / "build.sh"), "cpu"], env=env, capture_output=True, text=True,
                         timeout=25 * 60)
    if out.returncode != 0:
        pytest.fail(f"image build failed:\n{out.stdout[-4000:]}\n{out.stderr[-4000:]}")
    return TAG


def _run(image: str, *args: str, entrypoint: str | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    cmd = RUN + (["--entrypoint", entrypoint] if entrypoint else []) + [image, *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)


def test_gppy_and_the_tools_are_there(image):
    version = next(line.split('"')[1] for line in (REPO / "pyproject.toml").read_text().splitlines()
                   if line.startswith("version"))
    r = _run(image, "--version")
    assert r.returncode == 0 and version in r.stdout, r.stdout + r.stderr
    r = _run(image, "--version", entrypoint="source-extractor")
    assert r.returncode == 0 and "Source Extractor version" in (r.stdout + r.stderr), r.stdout + r.stderr
    for tool in ("scamp", "swarp", "missfits", "solve-field"):
        r = _run(image, "-c", f"command -v {tool}", entrypoint="sh")
        assert r.returncode == 0 and r.stdout.strip(), f"{tool} missing"


def test_runs_as_non_root_with_its_config(image):
    r = _run(image, "-c", 'id -u; echo "$GPPY_CONFIG"; ls "$GPPY_CONFIG"', entrypoint="sh")
    uid, config, *files = r.stdout.split()
    assert uid == "10001" and config == "/opt/gppy/config" and "instruments.csv" in files


def test_a_real_stage_runs_inside(image):
    script = (
        "set -e; gppy sim night --out /tmp/n --unit 7DT01 --size small; "
        # --night '': exactly how the workflow calls plan when no night is given (the latest night)
        "gppy stage plan --root /tmp/n --obs 7DT01 --night '' --outputs-dir /tmp/o; "
        "cat /tmp/o/night; echo; cat /tmp/o/frames.json"
    )
    r = _run(image, "-c", script, entrypoint="sh", timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    lines = r.stdout.strip().splitlines()
    frames = json.loads(lines[-1])
    assert lines[-2].startswith("2025-01-01") and len(frames) > 0
