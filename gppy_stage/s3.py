"""The S3 side of storage (storage.py is the interface; nothing else calls these): one boto3
client per thread, bounded retries and timeouts from the environment, a body read again when it
arrives cut or damaged, and botocore's errors mapped onto the pipeline's typed ones."""

from __future__ import annotations

import contextlib
import functools
import os
import random
import threading
import time
from urllib.parse import urlparse

from .errors import ConfigError, NotFoundError, RetriableError


def split(url: str) -> tuple[str, str]:
    parsed = urlparse(url)
    if not parsed.netloc:
        raise ConfigError(f"S3 URL without a bucket: {url!r}")
    return parsed.netloc, parsed.path.lstrip("/")


local = threading.local()


def client():
    # boto3 clients are not safe to share across threads; one per thread, made lazily.
    client = getattr(local, "client", None)
    if client is None:
        import boto3
        from botocore.config import Config

        endpoint = os.environ.get("GPPY_S3_ENDPOINT") or os.environ.get("AWS_ENDPOINT_URL") or None
        # bounded: an endpoint gone for good costs at most ~attempts x (connect + backoff), and
        # a stalled transfer is cut after the read timeout rather than hanging the pod
        config = Config(retries={"max_attempts": int(os.environ.get("GPPY_S3_RETRIES", "5")), "mode": "standard"},
                        connect_timeout=float(os.environ.get("GPPY_S3_CONNECT_TIMEOUT", "5")),
                        read_timeout=float(os.environ.get("GPPY_S3_READ_TIMEOUT", "60")),
                        s3={"addressing_style": "path"})
        client = boto3.client("s3", endpoint_url=endpoint, config=config)
        local.client = client
    return client


@functools.lru_cache(maxsize=1)
def _retriable_types():
    from botocore.exceptions import ConnectionError as BotoConnectionError
    from botocore.exceptions import (
        EndpointConnectionError,
        FlexibleChecksumError,
        HTTPClientError,
        IncompleteReadError,
        ReadTimeoutError,
    )
    from boto3.exceptions import RetriesExceededError as Boto3RetriesExceededError
    from s3transfer.exceptions import RetriesExceededError

    # HTTPClientError covers a connection closed or a body cut mid-stream (ResponseStreamingError);
    # a body failing its checksum was damaged on the way; s3transfer gives up with
    # RetriesExceededError after its own retries: all are the network's, not the data's
    return (BotoConnectionError, EndpointConnectionError, ReadTimeoutError, HTTPClientError, IncompleteReadError,
            FlexibleChecksumError, RetriesExceededError, Boto3RetriesExceededError, ConnectionError, TimeoutError)


@functools.lru_cache(maxsize=1)
def _body_faults():
    """What a damaged or cut response body raises while it is read (after the request succeeded)."""
    from botocore.exceptions import FlexibleChecksumError, IncompleteReadError, ReadTimeoutError, ResponseStreamingError

    return (ResponseStreamingError, IncompleteReadError, FlexibleChecksumError, ReadTimeoutError, ConnectionError,
            TimeoutError, _ShortBody)


class _ShortBody(Exception):
    """A body shorter (or longer) than its ContentLength."""


def read_attempts() -> int:
    return max(1, int(os.environ.get("GPPY_S3_READ_ATTEMPTS", "4")))


def backoff(attempt: int) -> None:
    # full jitter, capped: pods retrying together do not hammer the store in step
    time.sleep(random.uniform(0, min(2.0, 0.1 * 2 ** attempt)))


def get_body(url: str, **kwargs) -> bytes:
    """An object's body (or a range of it), read again when it arrives cut or damaged."""
    bucket, key = split(url)
    attempts = read_attempts()
    for attempt in range(attempts):
        with errors_typed(url):
            response = client().get_object(Bucket=bucket, Key=key, **kwargs)
            try:
                body = response["Body"].read()
                expected = response.get("ContentLength")
                if expected is not None and len(body) != expected:
                    raise _ShortBody(f"{len(body)} of {expected} bytes")
                return body
            except _body_faults() as exc:
                if attempt == attempts - 1:
                    raise RetriableError(f"the object store's response stayed damaged after {attempts} reads "
                                         f"({type(exc).__name__}: {exc})", path=url) from exc
        backoff(attempt)
    raise AssertionError("unreachable")


def _s3_error(exc: Exception, url: str) -> Exception:
    """Map a botocore error onto the pipeline's typed errors (retriable or not)."""
    from boto3.exceptions import S3UploadFailedError
    from botocore.exceptions import ClientError, NoCredentialsError

    if isinstance(exc, S3UploadFailedError) and isinstance(exc.__context__, ClientError):
        exc = exc.__context__  # boto3 wraps the store's answer to an upload; judge the answer

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
def errors_typed(url: str):
    try:
        yield
    except Exception as exc:  # re-raised typed, or unchanged when it is not a storage error
        mapped = _s3_error(exc, url)
        if mapped is exc:
            raise
        raise mapped from exc
