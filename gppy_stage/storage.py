"""Objects addressed by URL: local paths (``file://`` or plain) and ``s3://bucket/key``.

Nothing else in gppy-stage talks to boto3 (but this module's S3 side, ``s3.py``) or writes files
directly, so every stage runs the same on a laptop folder and on an object store. S3 settings come from the standard AWS
environment (``AWS_ACCESS_KEY_ID``..., ``AWS_ENDPOINT_URL`` for MinIO/Ceph/moto).

Guarantees:
- puts are atomic: a local put writes a temporary file in the same folder and renames it;
  an S3 put is atomic by itself. Nothing half-written is ever visible under the final name.
- raw data is read-only: any write under an ``obsdata/`` prefix is refused unless the caller
  says ``allow_raw=True`` (only the simulator and tests do).
- keys stay under their root: ``join`` refuses a part with a ``..`` segment (names built from
  headers go through it), and an S3 key written must have no ``..`` segment and no leading ``/``.
- local products get the permissions the umask allows, like any other program's files.
- an S3 body cut short or failing its checksum is read again (a few times, with backoff) and its
  length checked against ContentLength; a fault that outlasts that is retriable (exit 75).
- a write refused by the file system (read-only, permission denied) is a configuration error
  naming the path (exit 78); a full disk or an I/O error is retriable (exit 75).
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator
from urllib.parse import urlparse

from . import scratch
from .errors import BadInputError, ConfigError, NotFoundError, RetriableError
# the S3 side (s3.py): a client per thread (``_local``, which the tests reset), bodies read
# again when damaged, errors typed
from .s3 import backoff as _backoff
from .s3 import client as _client
from .s3 import errors_typed as _s3_errors
from .s3 import get_body as _get_body
from .s3 import local as _local  # noqa: F401
from .s3 import read_attempts as _read_attempts
from .s3 import split as _split_s3


@dataclass(frozen=True)
class ObjectInfo:
    url: str
    key: str  # path relative to the listed prefix, with '/' separators
    size: int
    mtime: float  # seconds since the epoch, UTC


def is_s3(url: str) -> bool:
    return str(url).startswith("s3://")


def _local_path(url: str) -> Path:
    url = str(url)
    if url.startswith("file://"):
        return Path(urlparse(url).path)
    return Path(url)


def join(root: str, *parts: str) -> str:
    """``join("s3://b/p", "obsdata", "7DT01")`` -> ``s3://b/p/obsdata/7DT01`` (local paths alike).

    The result is always under ``root``: parts are keys, never paths, so a ``..`` segment (or a
    NUL byte) in any of them is refused, whatever built it (a header value, a plan entry)."""
    root = str(root)
    segments = [seg for p in parts for seg in str(p).split("/") if seg]
    bad = [seg for seg in segments if seg == ".." or "\0" in seg]
    if bad:
        key = "/".join(str(p) for p in parts)
        raise BadInputError(f"refusing the key {key!r}: it would leave the storage root {root}", path=key)
    if not segments:
        return root
    return root.rstrip("/") + "/" + "/".join(segments)


def basename(url: str) -> str:
    return str(url).rstrip("/").rsplit("/", 1)[-1]


def _guard_raw(url: str, allow_raw: bool) -> None:
    if not allow_raw and "/obsdata/" in "/" + str(url).replace("\\", "/"):
        raise ConfigError(f"refusing to write under obsdata/ (raw data is read-only): {url}")
    _guard_key(url)


def _guard_key(url: str) -> None:
    """An S3 key written must be a plain key: one that a sync to disk cannot turn into a path
    outside the bucket's folder. (Local keys are checked where they are built, in ``join``.)"""
    if not is_s3(url):
        return
    key = urlparse(url).path[1:]
    if key.startswith("/") or ".." in key.split("/") or "\0" in key:
        raise BadInputError(f"refusing to write the S3 key {key!r}: a leading '/' or a '..' segment", path=url)


# --- the interface ------------------------------------------------------------------------


def _s3_pages(prefix: str, delimiter: bool):
    """(bucket, key prefix, page) for each page of an S3 listing, errors typed."""
    bucket, key = _split_s3(prefix)
    key = key.rstrip("/") + "/" if key else ""
    kwargs = {"Bucket": bucket, "Prefix": key} | ({"Delimiter": "/"} if delimiter else {})
    with _s3_errors(prefix):
        for page in _client().get_paginator("list_objects_v2").paginate(**kwargs):
            yield bucket, key, page


def list_objects(prefix: str, recursive: bool = True) -> list[ObjectInfo]:
    """Objects under a prefix (a folder), sorted by key. A missing prefix lists nothing."""
    prefix = str(prefix)
    out = []
    if is_s3(prefix):
        for bucket, key, page in _s3_pages(prefix, delimiter=not recursive):
            for obj in page.get("Contents", []):
                out.append(ObjectInfo(f"s3://{bucket}/{obj['Key']}", obj["Key"][len(key):], obj["Size"],
                                      obj["LastModified"].timestamp()))
        return sorted(out, key=lambda o: o.key)
    base = _local_path(prefix)
    if not base.is_dir():
        return []
    for p in base.rglob("*") if recursive else base.iterdir():
        if p.is_file() and not p.name.startswith(TMP_PREFIX):
            st = p.stat()
            out.append(ObjectInfo(str(p), p.relative_to(base).as_posix(), st.st_size, st.st_mtime))
    return sorted(out, key=lambda o: o.key)


def list_prefixes(prefix: str) -> list[str]:
    """Names of the immediate sub-folders (common prefixes) of a prefix."""
    prefix = str(prefix)
    if is_s3(prefix):
        return sorted(cp["Prefix"][len(key):].rstrip("/") for _, key, page in _s3_pages(prefix, delimiter=True)
                      for cp in page.get("CommonPrefixes", []))
    base = _local_path(prefix)
    return sorted(p.name for p in base.iterdir() if p.is_dir()) if base.is_dir() else []


def exists(url: str) -> bool:
    url = str(url)
    if is_s3(url):
        bucket, key = _split_s3(url)
        try:
            with _s3_errors(url):
                _client().head_object(Bucket=bucket, Key=key)
            return True
        except NotFoundError:
            return False
    return _local_path(url).is_file()


def get_bytes(url: str) -> bytes:
    url = str(url)
    if is_s3(url):
        return _get_body(url)
    try:
        return _local_path(url).read_bytes()
    except FileNotFoundError:
        raise NotFoundError("no such file", path=url) from None


def get_head(url: str, nbytes: int) -> bytes:
    """The first ``nbytes`` of an object (a FITS header without downloading the pixels)."""
    url = str(url)
    if is_s3(url):
        return _get_body(url, Range=f"bytes=0-{nbytes - 1}")
    try:
        with open(_local_path(url), "rb") as fh:
            return fh.read(nbytes)
    except FileNotFoundError:
        raise NotFoundError("no such file", path=url) from None


def get_file(url: str, dest: str | Path) -> Path:
    """Download (or copy) an object to a local path."""
    url, dest = str(url), Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    if is_s3(url):
        bucket, key = _split_s3(url)
        from botocore.exceptions import FlexibleChecksumError

        attempts = _read_attempts()
        for attempt in range(attempts):
            with _s3_errors(url):
                try:
                    _client().download_file(bucket, key, str(dest))
                    return dest
                except FlexibleChecksumError:
                    # s3transfer reads a cut stream again itself, but not a damaged one
                    if attempt == attempts - 1:
                        raise
            _backoff(attempt)
    try:
        shutil.copyfile(_local_path(url), dest)
    except FileNotFoundError:
        raise NotFoundError("no such file", path=url) from None
    return dest


@contextlib.contextmanager
def local_copy(url: str) -> Iterator[Path]:
    """A local path to read an object from: the file itself when local, a temporary download on S3."""
    url = str(url)
    if not is_s3(url):
        path = _local_path(url)
        if not path.is_file():
            raise NotFoundError("no such file", path=url)
        yield path
        return
    with tempfile.TemporaryDirectory(prefix="gppy-get-") as tmp:
        yield get_file(url, Path(tmp) / basename(url))


def put_bytes(url: str, data: bytes, *, allow_raw: bool = False) -> None:
    url = str(url)
    _guard_raw(url, allow_raw)
    if is_s3(url):
        bucket, key = _split_s3(url)
        with _s3_errors(url):
            _client().put_object(Bucket=bucket, Key=key, Body=data)
        return

    def write(tmp: str) -> None:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())

    _put_local(url, write)


def put_file(src: str | Path, url: str, *, allow_raw: bool = False) -> None:
    """Upload (or copy) a local file to a URL, atomically."""
    url, src = str(url), Path(src)
    _guard_raw(url, allow_raw)
    if is_s3(url):
        bucket, key = _split_s3(url)
        with _s3_errors(url):
            _client().upload_file(str(src), bucket, key)
        return
    _put_local(url, lambda tmp: shutil.copyfile(src, tmp))


TMP_PREFIX = ".gppy-tmp-"
_swept: set[str] = set()


def _put_local(url: str, write) -> None:
    """Write a local file whole or not at all: a temporary file beside it, then a rename.

    The temporary name carries its writer's identity, so the first put of a process into a
    folder removes what writers killed earlier (SIGKILL, a lost node) left there."""
    path = _local_path(url)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        _sweep_dead_temporaries(path.parent)
        fd, tmp = tempfile.mkstemp(prefix=f"{TMP_PREFIX}{scratch.owner()}.", dir=path.parent)
        os.close(fd)
    except OSError as exc:
        raise _write_error(exc, url) from exc
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; products follow the umask
        os.replace(tmp, path)
    except BaseException as exc:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        if isinstance(exc, OSError):
            raise _write_error(exc, url) from exc
        raise


def _sweep_dead_temporaries(folder: Path) -> None:
    if str(folder) in _swept:
        return
    _swept.add(str(folder))
    for entry in folder.glob(TMP_PREFIX + "*"):
        if scratch.owner_is_dead(entry.name[len(TMP_PREFIX):]):
            with contextlib.suppress(FileNotFoundError):
                entry.unlink()


_umask_lock = threading.Lock()


def _umask() -> int:
    with contextlib.suppress(OSError, ValueError):  # Linux says it without changing it
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    with _umask_lock:  # elsewhere the only way to read the umask is to set it; put it straight back
        mask = os.umask(0o077)
        os.umask(mask)
    return mask


def _write_error(exc: OSError, url: str) -> Exception:
    """A write the file system refused, typed: for good (78) or for now (75); else unchanged (a bug)."""
    if exc.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        return ConfigError(f"cannot write here ({exc.strerror}): the output root must be writable", path=url)
    if exc.errno in (errno.ENOTDIR, errno.EISDIR, errno.EEXIST):
        return ConfigError(f"cannot write here ({exc.strerror}): a file and a folder of the root's layout clash",
                           path=url)
    if exc.errno == errno.ENAMETOOLONG:
        return BadInputError(f"cannot write here ({exc.strerror})", path=url)
    if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EIO, errno.ESTALE):
        return RetriableError(f"cannot write here for now ({exc.strerror})", path=url)
    return exc


def copy(src: str, dst: str, *, allow_raw: bool = False) -> None:
    """Copy one object to another URL (across local and S3 too)."""
    src, dst = str(src), str(dst)
    _guard_raw(dst, allow_raw)
    if is_s3(src) and is_s3(dst):
        sb, sk = _split_s3(src)
        db, dk = _split_s3(dst)
        with _s3_errors(src):
            _client().copy({"Bucket": sb, "Key": sk}, db, dk)
        return
    with local_copy(src) as path:
        put_file(path, dst, allow_raw=allow_raw)


def delete(url: str) -> None:
    """Remove an object (never under obsdata/)."""
    url = str(url)
    _guard_raw(url, False)
    if is_s3(url):
        bucket, key = _split_s3(url)
        with _s3_errors(url):
            _client().delete_object(Bucket=bucket, Key=key)
        return
    with contextlib.suppress(FileNotFoundError):
        _local_path(url).unlink()


def copy_tree(src: str, dst: str, *, allow_raw: bool = False) -> int:
    """Copy every object under ``src`` to the same relative keys under ``dst``; returns the count."""
    n = 0
    for obj in list_objects(src):
        copy(obj.url, join(dst, obj.key), allow_raw=allow_raw)
        n += 1
    return n
