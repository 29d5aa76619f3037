"""Storage by URL: the same cases on a local folder and on a real S3 endpoint (moto_server)."""

from __future__ import annotations

import threading

import pytest

from gppy_stage import storage
from gppy_stage.errors import ConfigError


@pytest.fixture(params=["local", "s3"])
def root(request, tmp_path):
    if request.param == "local":
        return str(tmp_path / "root")
    return request.getfixturevalue("s3_root")


def test_put_get_exists_list(root):
    url = storage.join(root, "processed", "T1", "a.txt")
    assert not storage.exists(url)
    storage.put_bytes(url, b"hello")
    storage.put_bytes(storage.join(root, "processed", "T1", "sub", "b.txt"), b"xy")
    assert storage.exists(url)
    assert storage.get_bytes(url) == b"hello"
    assert storage.get_head(url, 3) == b"hel"
    listing = storage.list_objects(storage.join(root, "processed"))
    assert [(o.key, o.size) for o in listing] == [("T1/a.txt", 5), ("T1/sub/b.txt", 2)]
    assert all(o.mtime > 1e9 for o in listing)
    assert storage.list_prefixes(storage.join(root, "processed", "T1")) == ["sub"]
    assert storage.list_objects(storage.join(root, "nothing-here")) == []


def test_copy_and_local_copy(root, tmp_path):
    src = storage.join(root, "a", "x.bin")
    storage.put_bytes(src, bytes(range(256)))
    dst = storage.join(root, "b", "y.bin")
    storage.copy(src, dst)
    assert storage.get_bytes(dst) == bytes(range(256))
    with storage.local_copy(dst) as path:
        assert path.read_bytes() == bytes(range(256))
    local = tmp_path / "other" / "z.bin"
    storage.copy(src, str(local))
    assert local.read_bytes() == bytes(range(256))


def test_missing_object_is_a_clear_error(root):
    url = storage.join(root, "nope.fits")
    with pytest.raises(storage.NotFoundError, match="nope.fits"):
        storage.get_bytes(url)


def test_raw_data_is_read_only(root):
    raw = storage.join(root, "obsdata", "7DT01", "2025-01-01_gain2750", "x.fits")
    with pytest.raises(ConfigError, match="read-only"):
        storage.put_bytes(raw, b"no")
    storage.put_bytes(raw, b"sim", allow_raw=True)  # only the simulator says so
    with pytest.raises(ConfigError):
        storage.delete(raw)
    assert storage.get_bytes(raw) == b"sim"


def test_puts_are_atomic(root):
    """Readers never see a partial object: every read is one of the whole versions written."""
    url = storage.join(root, "atomic.bin")
    versions = [bytes([i]) * 200_000 for i in range(8)]
    storage.put_bytes(url, versions[0])
    seen, stop = [], threading.Event()

    def reader():
        while not stop.is_set():
            seen.append(storage.get_bytes(url))

    t = threading.Thread(target=reader)
    t.start()
    for v in versions[1:]:
        storage.put_bytes(url, v)
    stop.set()
    t.join()
    assert seen and all(s in versions for s in seen)
    if not storage.is_s3(root):
        parent = storage.join(root)
        import os
        assert not [n for n in os.listdir(parent) if n.startswith(".gppy-tmp-")]


def test_join_and_basename():
    assert storage.join("s3://b/p/", "obsdata", "/7DT01/") == "s3://b/p/obsdata/7DT01"
    assert storage.join("/data", "x") == "/data/x"
    assert storage.basename("s3://b/p/x.fits") == "x.fits"


def test_unreachable_endpoint_is_retriable(monkeypatch):
    from gppy_stage.errors import RetriableError

    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")  # nothing listens on port 9
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "x")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "x")
    monkeypatch.setenv("GPPY_S3_RETRIES", "1")
    storage._local.__dict__.clear()
    try:
        with pytest.raises(RetriableError):
            storage.get_bytes("s3://bucket/key")
    finally:
        storage._local.__dict__.clear()
