"""S3 faults: a night over a flaky object store ends with the products of a clean one.

Between gppy and the moto endpoint sits a fault-injecting proxy (tests/faultproxy.py) on a seeded
schedule: dropped connections, 500s, 503 SlowDown, latency, bodies cut short or damaged. The night
made again (--force) must give the same products as through a clean proxy, with bounded retries and no
half-written object; with the endpoint gone for good a stage exits 75 within its timeouts.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from faultproxy import FaultProxy
from products import SIZE, assert_opens, differences, product_files

from gppy_stage import storage
from gppy_stage.sim import simulate_night

UNIT, NIGHT = "7DT01", "2025-01-01_gain2750"


def _gppy(*args: str, endpoint: str, timeout: float = 600, **env) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "gppy_stage.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "AWS_ENDPOINT_URL": endpoint, **env})


def _bucket_with_night(raw: Path) -> str:
    import boto3

    bucket = f"faults-{uuid.uuid4().hex[:10]}"
    boto3.client("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL"]).create_bucket(Bucket=bucket)
    storage._local.__dict__.clear()
    root = f"s3://{bucket}/root"
    for tree in ("obsdata", "ref_cat", "ref_frame"):
        storage.copy_tree(str(raw / tree), storage.join(root, tree), allow_raw=True)
    return root


def _night_through(proxy: FaultProxy, root: str, tmp: Path, *flags: str) -> subprocess.CompletedProcess:
    return _gppy("night", "run", "--root", root, "--obs", UNIT, "--night", NIGHT, "--workers", "1", *flags,
                 endpoint=proxy.url, GPPY_SCRATCH=str(tmp / "scratch"))


def _download(root: str, dest: Path) -> Path:
    for tree in ("master_frame", "processed"):
        storage.copy_tree(storage.join(root, tree), str(dest / tree))
    return dest


@pytest.fixture(scope="module")
def raw_night(tmp_path_factory):
    raw = tmp_path_factory.mktemp("s3faults") / "raw"
    simulate_night(raw, unit=UNIT, filters=("m425",), size=SIZE, seed=3, n_science=2)
    return raw


def test_a_night_through_faults_gives_the_clean_products(raw_night, s3_endpoint, tmp_path):
    # one bucket for both runs: the subtraction's hash records the reference's upload time
    root = _bucket_with_night(raw_night)
    with FaultProxy(s3_endpoint, rate=0.0) as clean_proxy:
        clean = _night_through(clean_proxy, root, tmp_path / "clean")
    assert clean.returncode == 0, clean.stdout[-3000:] + clean.stderr[-3000:]
    clean_dir = _download(root, tmp_path / "c")
    with FaultProxy(s3_endpoint, rate=0.08, seed=14, max_in_a_row=2, latency_s=0.3) as proxy:
        faulty = _night_through(proxy, root, tmp_path / "faulty", "--force")  # every product made again
    assert faulty.returncode == 0, faulty.stdout[-3000:] + faulty.stderr[-3000:]
    assert "failed: 0" in faulty.stdout and "quarantined: 0" in faulty.stdout, faulty.stdout[-3000:]
    assert set(proxy.injected) == {"drop", "drop_after", "500", "503", "latency", "truncate", "corrupt"}, \
        proxy.injected
    # bounded: each fault costs at most a few requests more than the clean night made
    extra = proxy.requests - clean_proxy.requests
    assert extra <= 3 * sum(proxy.injected.values()), (proxy.requests, clean_proxy.requests, proxy.injected)
    faulty_dir = _download(root, tmp_path / "f")
    for rel in product_files(faulty_dir):  # nothing half-written under a final name
        assert_opens(faulty_dir / rel)
    assert differences(clean_dir, faulty_dir) == []
    client = storage._client()
    assert "Uploads" not in client.list_multipart_uploads(Bucket=root.split("/")[2])
    print(f"{proxy.requests} requests ({clean_proxy.requests} clean), faults {dict(proxy.injected)}, "
          f"{len(product_files(faulty_dir))} products identical")


@pytest.fixture
def silent_endpoint():
    """An endpoint that takes connections and never answers: the worst way for a store to be gone."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(64)
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"


def _closed_port() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{sock.getsockname()[1]}"  # closed again when this returns


@pytest.mark.parametrize("gone, args", [
    ("refused", ("stage", "plan")),
    ("silent", ("stage", "reduce", "--frame", "7DT01_20250102_004000_T10779_m425_1x1_100.0s_0001"))])
def test_an_endpoint_gone_for_good_is_exit_75_within_the_timeouts(gone, args, request):
    endpoint = _closed_port() if gone == "refused" else request.getfixturevalue("silent_endpoint")
    bounded = {"GPPY_S3_CONNECT_TIMEOUT": "1", "GPPY_S3_READ_TIMEOUT": "1", "GPPY_S3_RETRIES": "2",
               "AWS_ACCESS_KEY_ID": "x", "AWS_SECRET_ACCESS_KEY": "x", "AWS_DEFAULT_REGION": "us-east-1"}
    t0 = time.monotonic()
    proc = _gppy(*args, "--root", "s3://gone/root", "--obs", UNIT, "--night", NIGHT, endpoint=endpoint,
                 timeout=120, **bounded)  # the subprocess timeout is the bound
    assert proc.returncode == 75, (args, proc.stdout[-2000:], proc.stderr[-2000:])
    assert "Traceback" not in proc.stdout + proc.stderr
    print(f"{gone} {args[1]}: exit 75 after {time.monotonic() - t0:.1f} s")
