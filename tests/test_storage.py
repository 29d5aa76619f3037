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


def test_keys_cannot_leave_the_root(root):
    """A key is never a path: '..' (from a header, a plan, anywhere) is refused before any write."""
    from gppy_stage.errors import BadInputError

    for parts in (("processed", "../../etc", "x.fits"), ("..", "x"), ("processed/a/../../../x",)):
        with pytest.raises(BadInputError, match=r"\.\..*would leave the storage root"):
            storage.join(root, *parts)
    assert storage.join(root, "processed//T1/", "a.fits") == root.rstrip("/") + "/processed/T1/a.fits"
    assert storage.list_objects(root) == []


def test_s3_keys_with_dot_dot_or_a_leading_slash_are_refused(s3_root):
    from gppy_stage.errors import BadInputError

    bucket = s3_root.split("/")[2]
    for url in (f"s3://{bucket}//etc/passwd", f"s3://{bucket}/root/../../x", f"s3://{bucket}/root/a/../b"):
        with pytest.raises(BadInputError, match="refusing to write the S3 key"):
            storage.put_bytes(url, b"no")
        with pytest.raises(BadInputError):
            storage.copy(storage.join(s3_root, "nothing"), url)
    assert storage.list_objects(f"s3://{bucket}") == []


@pytest.mark.parametrize("umask", [0o002, 0o022, 0o077])
def test_local_products_follow_the_umask(tmp_path, umask):
    import os

    old = os.umask(umask)
    try:
        storage.put_bytes(str(tmp_path / "a" / "b.json"), b"{}")
        src = tmp_path / "src.bin"
        src.write_bytes(b"x")
        storage.put_file(src, str(tmp_path / "a" / "c.fits"))
    finally:
        os.umask(old)
    for name in ("b.json", "c.fits"):
        assert (tmp_path / "a" / name).stat().st_mode & 0o777 == 0o666 & ~umask, name


def test_temporaries_of_a_killed_writer_are_removed_by_the_next_put(tmp_path):
    import signal
    import subprocess
    import sys

    folder = tmp_path / "out"
    # a writer killed between its temporary file and the rename: what SIGKILL leaves behind
    child = subprocess.Popen([sys.executable, "-c", "import os, tempfile, time; from gppy_stage import scratch; "
                              f"tempfile.mkstemp(prefix='{storage.TMP_PREFIX}' + scratch.owner() + '.', "
                              f"dir={str(folder)!r}); print('ready', flush=True); time.sleep(60)"],
                             stdout=subprocess.PIPE, text=True)
    folder.mkdir()
    assert child.stdout.readline().strip() == "ready"
    live = next(folder.glob(storage.TMP_PREFIX + "*"))
    storage._swept.clear()
    storage.put_bytes(str(folder / "a.json"), b"1")
    assert live.exists()  # its writer is alive: never touched
    child.send_signal(signal.SIGKILL)
    child.wait()
    storage._swept.clear()  # a new process's first put into the folder
    storage.put_bytes(str(folder / "b.json"), b"2")
    assert sorted(p.name for p in folder.iterdir()) == ["a.json", "b.json"]


def test_a_file_where_a_folder_should_be_is_a_config_error(tmp_path):
    (tmp_path / "processed").write_text("a file, not a folder")
    with pytest.raises(ConfigError, match="processed/T1/a.fits.*clash"):
        storage.put_bytes(str(tmp_path / "processed" / "T1" / "a.fits"), b"x")
    (tmp_path / "b.fits").mkdir()  # and a folder where the file should be
    with pytest.raises(ConfigError, match="b.fits.*clash"):
        storage.put_bytes(str(tmp_path / "b.fits"), b"x")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b.fits", "processed"]  # no temporary left


def test_unwritable_output_root_is_one_clear_line_exit_78(tmp_path):
    """A read-only file system under the root (a real one: a read-only bind mount) is a
    configuration error naming the path, not a bug with a traceback."""
    import shutil
    import subprocess
    import sys

    if not shutil.which("unshare") or subprocess.run(["unshare", "-rm", "true"]).returncode != 0:
        pytest.skip("needs unshare (user and mount namespaces) for a read-only bind mount")
    root = tmp_path / "root"
    night = root / "obsdata" / "7DT01" / "2025-01-01_gain2750"
    night.mkdir(parents=True)
    (night / "7DT01_20250102_004000_T10779_m425_1x1_100.0s_0001.fits").write_bytes(b"not a FITS file" * 200)
    before = {p: p.read_bytes() for p in root.rglob("*") if p.is_file()}
    script = (f"mount --bind -o ro {root} {root} && exec {sys.executable} -m gppy_stage.cli night run "
              f"--root {root} --obs 7DT01 --night 2025-01-01_gain2750 --workers 1")
    proc = subprocess.run(["unshare", "-rm", "sh", "-c", script], capture_output=True, text=True, timeout=120,
                          env={**__import__("os").environ, "GPPY_SCRATCH": str(tmp_path / "scratch")})
    assert proc.returncode == 78, proc.stdout[-2000:] + proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and str(root) in errors[0] and "Read-only file system" in errors[0], proc.stderr
    assert "Traceback" not in proc.stdout + proc.stderr
    assert {p: p.read_bytes() for p in root.rglob("*") if p.is_file()} == before


def _proxied(monkeypatch, proxy_url: str) -> None:
    monkeypatch.setenv("AWS_ENDPOINT_URL", proxy_url)
    storage._local.__dict__.clear()  # the thread's client was made for the endpoint itself


def test_cut_and_damaged_bodies_are_read_again(s3_root, s3_endpoint, monkeypatch):
    """A body cut short (ResponseStreamingError) or failing its checksum (FlexibleChecksumError)
    is read again and its length checked; header reads (ranges) too."""
    from faultproxy import FaultProxy

    url = storage.join(s3_root, "processed", "x.fits")
    data = bytes(range(256)) * 2000
    storage.put_bytes(url, data)
    for faults in (("truncate",), ("corrupt",)):
        with FaultProxy(s3_endpoint, rate=1.0, faults=faults, max_in_a_row=1, seed=1) as proxy:
            _proxied(monkeypatch, proxy.url)
            assert storage.get_bytes(url) == data
            if faults == ("truncate",):  # a range has no checksum of its own; a cut one shows by its length
                assert storage.get_head(url, 2880) == data[:2880]
            assert proxy.injected[faults[0]] >= 1
    storage._local.__dict__.clear()


@pytest.mark.parametrize("fault", ["truncate", "corrupt"])
def test_a_body_that_stays_damaged_is_retriable_after_bounded_reads(s3_root, s3_endpoint, monkeypatch, fault):
    from faultproxy import FaultProxy

    from gppy_stage import errors

    url = storage.join(s3_root, "processed", "y.fits")
    storage.put_bytes(url, b"z" * 50_000)
    monkeypatch.setenv("GPPY_S3_READ_ATTEMPTS", "3")
    with FaultProxy(s3_endpoint, rate=1.0, faults=(fault,), max_in_a_row=10**6) as proxy:
        _proxied(monkeypatch, proxy.url)
        with pytest.raises(errors.RetriableError, match="stayed damaged after 3 reads") as info:
            storage.get_bytes(url)
        assert errors.exit_code_for(info.value) == errors.RETRIABLE and "y.fits" in str(info.value)
        assert proxy.requests == 3
        with pytest.raises(errors.RetriableError, match="y.fits"):  # downloads (s3transfer) too
            with storage.local_copy(url):
                pass
    storage._local.__dict__.clear()


@pytest.mark.parametrize("fault", ["503", "500", "drop"])
def test_an_upload_that_keeps_failing_is_retriable(s3_root, s3_endpoint, monkeypatch, tmp_path, fault):
    """boto3 wraps a failed upload (S3UploadFailedError): still retriable, naming the key."""
    from faultproxy import FaultProxy

    from gppy_stage import errors

    src = tmp_path / "p.fits"
    src.write_bytes(b"p" * 10_000)
    monkeypatch.setenv("GPPY_S3_RETRIES", "2")
    with FaultProxy(s3_endpoint, rate=1.0, faults=(fault,), max_in_a_row=10**6) as proxy:
        _proxied(monkeypatch, proxy.url)
        with pytest.raises(errors.RetriableError, match="p.fits"):
            storage.put_file(src, storage.join(s3_root, "processed", "p.fits"))
        assert proxy.requests == 3  # bounded: the first try and GPPY_S3_RETRIES retries
    _proxied(monkeypatch, s3_endpoint)
    assert not storage.exists(storage.join(s3_root, "processed", "p.fits"))
