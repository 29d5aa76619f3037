"""Objects addressed by URL: local paths (``file://`` or plain) and ``s3://bucket/key``.

Nothing else in gppy-stage talks to boto3 or writes files directly, so every stage runs the
same on a laptop folder and on an object store. S3 settings come from the standard AWS
environment (``AWS_ACCESS_KEY_ID``..., ``AWS_ENDPOINT_URL`` for MinIO/Ceph/moto).

Guarantees:
- puts are atomic: a local put writes a temporary file in the same folder and renames it;
  an S3 put is atomic by itself. Nothing half-written is ever visible under the final name.
- raw data is read-only: any write under an ``obsdata/`` prefix is refused unless the caller
  says ``allow_raw=True`` (only the simulator and tests do).
"""

from __future__ import annotations

import contextlib
import functools
import os
import shutil
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator
from urllib.parse import urlparse

from .errors import BadInputError, ConfigError, RetriableError


class NotFoundError(BadInputError):
    """The object does not exist."""


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


def _split_s3(url: str) -> tuple[str, str]:
    parsed = urlparse(url)
    if not parsed.netloc:
        raise ConfigError(f"S3 URL without a bucket: {url!r}")
    return parsed.netloc, parsed.path.lstrip("/")


def join(root: str, *parts: str) -> str:
    """``join("s3://b/p", "obsdata", "7DT01")`` -> ``s3://b/p/obsdata/7DT01`` (local paths alike)."""
    root = str(root)
    tail = "/".join(str(p).strip("/") for p in parts if str(p).strip("/"))
    if not tail:
        return root
    return root.rstrip("/") + "/" + tail


def basename(url: str) -> str:
    return str(url).rstrip("/").rsplit("/", 1)[-1]


def _guard_raw(url: str, allow_raw: bool) -> None:
    if not allow_raw and "/obsdata/" in "/" + str(url).replace("\\", "/"):
        raise ConfigError(f"refusing to write under obsdata/ (raw data is read-only): {url}")


# --- S3 -----------------------------------------------------------------------------------

_local = threading.local()


def _client():
    # boto3 clients are not safe to share across threads; one per thread, made lazily.
    client = getattr(_local, "client", None)
    if client is None:
        import boto3
        from botocore.config import Config

        endpoint = os.environ.get("GPPY_S3_ENDPOINT") or os.environ.get("AWS_ENDPOINT_URL") or None
        client = boto3.client(
            "s3",
            endpoint_url=endpoint,
            config=Config(retries={"max_attempts": int(os.environ.get("GPPY_S3_RETRIES", "5")), "mode": "standard"}, s3={"addressing_style": "path"}),
        )
        _local.client = client
    return client


@functools.lru_cache(maxsize=1)
def _retriable_types():
    from botocore.exceptions import ConnectionError as BotoConnectionError
    from botocore.exceptions import (
        EndpointConnectionError,
        HTTPClientError,
        IncompleteReadError,
        ReadTimeoutError,
    )
    from s3transfer.exceptions import RetriesExceededError

    # HTTPClientError covers a connection closed or a body cut mid-stream; s3transfer gives up
    # with RetriesExceededError after its own retries: all are the network's, not the data's
    return (BotoConnectionError, EndpointConnectionError, ReadTimeoutError, HTTPClientError, IncompleteReadError,
            RetriesExceededError, ConnectionError, TimeoutError)


def _s3_error(exc: Exception, url: str) -> Exception:
    """Map a botocore error onto the pipeline's typed errors (retriable or not)."""
    from botocore.exceptions import ClientError, NoCredentialsError

    if isinstance(exc, ClientError):
        code = exc.response.get("Error", {}).get("Code", "")
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
        if code in ("NoSuchKey", "404", "NotFound"):
            return NotFoundError("no such object", path=url)
        if code in ("NoSuchBucket",):
            return ConfigError(f"no such bucket: {url}")
        if code in ("SlowDown", "Throttling", "RequestTimeout", "InternalError", "ServiceUnavailable") or status >= 500:
            return RetriableError(f"S3 {code or status}: try again", path=url)
        if code in ("AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch"):
            return ConfigError(f"S3 refused access ({code}) to {url}: check the credentials")
        return ConfigError(f"S3 error {code or status} on {url}")
    if isinstance(exc, NoCredentialsError):
        return ConfigError("no S3 credentials: set AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY")
    if isinstance(exc, _retriable_types()):
        return RetriableError(f"cannot reach the object store ({type(exc).__name__})", path=url)
    return exc


@contextlib.contextmanager
def _s3_errors(url: str):
    try:
        yield
    except Exception as exc:  # re-raised typed, or unchanged when it is not a storage error
        mapped = _s3_error(exc, url)
        if mapped is exc:
            raise
        raise mapped from exc


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
        if p.is_file() and not p.name.startswith(".gppy-tmp-"):
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
        bucket, key = _split_s3(url)
        with _s3_errors(url):
            return _client().get_object(Bucket=bucket, Key=key)["Body"].read()
    try:
        return _local_path(url).read_bytes()
    except FileNotFoundError:
        raise NotFoundError("no such file", path=url) from None


def get_head(url: str, nbytes: int) -> bytes:
    """The first ``nbytes`` of an object (a FITS header without downloading the pixels)."""
    url = str(url)
    if is_s3(url):
        bucket, key = _split_s3(url)
        with _s3_errors(url):
            return _client().get_object(Bucket=bucket, Key=key, Range=f"bytes=0-{nbytes - 1}")["Body"].read()
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
        with _s3_errors(url):
            _client().download_file(bucket, key, str(dest))
        return dest
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
    path = _local_path(url)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".gppy-tmp-", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def put_file(src: str | Path, url: str, *, allow_raw: bool = False) -> None:
    """Upload (or copy) a local file to a URL, atomically."""
    url, src = str(url), Path(src)
    _guard_raw(url, allow_raw)
    if is_s3(url):
        bucket, key = _split_s3(url)
        with _s3_errors(url):
            _client().upload_file(str(src), bucket, key)
        return
    path = _local_path(url)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".gppy-tmp-", dir=path.parent)
    os.close(fd)
    try:
        shutil.copyfile(src, tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


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
