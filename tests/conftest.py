"""Shared fixtures: a real S3 endpoint (moto_server on 127.0.0.1), simulated nights, real frames."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

REAL = Path(__file__).resolve().parent / "data" / "real"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def s3_endpoint():
    """A moto S3 server on loopback for the whole session; its URL."""
    exe = shutil.which("moto_server")
    cmd = [exe] if exe else [sys.executable, "-m", "moto.server"]
    port = _free_port()
    proc = subprocess.Popen(cmd + ["-H", "127.0.0.1", "-p", str(port)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 30
    while time.time() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                break
        except OSError:
            time.sleep(0.1)
    else:
        proc.kill()
        pytest.fail("moto_server did not start")
    env = {"AWS_ENDPOINT_URL": url, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
           "AWS_DEFAULT_REGION": "us-east-1"}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    yield url
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    proc.terminate()
    proc.wait(timeout=10)


@pytest.fixture
def s3_root(s3_endpoint):
    """A fresh bucket on the moto endpoint; the storage root URL ``s3://<bucket>/root``."""
    import boto3

    from gppy_stage import storage

    bucket = f"test-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=s3_endpoint).create_bucket(Bucket=bucket)
    storage._local.__dict__.clear()  # clients made before the endpoint was set point elsewhere
    return f"s3://{bucket}/root"


@pytest.fixture(scope="session")
def real_dir() -> Path:
    return REAL


# The longest modules go to the xdist workers first (make test passes --no-loadscope-reorder, which
# keeps this order instead of xdist's most-tests-first): with --dist loadfile a module is one unit
# of work, and the full-size night (test_memory, about a third of the run) started last was the
# whole run's tail. The rest keep their alphabetical order.
LONGEST_FIRST = ("test_memory.py", "test_imsng_night.py")


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(LONGEST_FIRST)))
