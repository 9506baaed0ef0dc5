"""`open_store(uri)`: the store for a URI. `s3://bucket/prefix` is S3; anything else (`/abs/dir`,
`file:///abs/dir`, `relative/dir`) a local folder."""

from __future__ import annotations

from pathlib import Path
from urllib.parse import unquote, urlparse

from job.errors import ConfigError
from job.storage.base import Store
from job.storage.local import LocalStore

MAX_ATTEMPTS = 5  # botocore "standard" retries: exponential backoff with jitter, capped at 20 s
CONNECT_TIMEOUT_S = 10.0
READ_TIMEOUT_S = 60.0
OPERATION_TIMEOUT_S = 300.0  # SDFT_STORAGE_TIMEOUT_S's default: one request, retries included
PART_SIZE_BYTES = 16 * 1024 * 1024  # multipart threshold and part size
PAGE_SIZE = 1000  # keys per ListObjectsV2 page (the S3 maximum)


_operation_timeout_s = OPERATION_TIMEOUT_S


def set_operation_timeout(seconds: float) -> None:
    """The default total time of one storage request, retries included (`SDFT_STORAGE_TIMEOUT_S`),
    for every store opened from now on in this process."""
    global _operation_timeout_s
    _operation_timeout_s = seconds


def open_store(uri: str, *, max_attempts: int = MAX_ATTEMPTS,
               connect_timeout_s: float = CONNECT_TIMEOUT_S, read_timeout_s: float = READ_TIMEOUT_S,
               part_size_bytes: int = PART_SIZE_BYTES, page_size: int = PAGE_SIZE,
               operation_timeout_s: float | None = None) -> Store:
    """Open the store for `uri`. No request is made until the store is used.

    `operation_timeout_s` (default: `set_operation_timeout`'s, else 300 s) bounds each S3 request,
    retries and backoff included; past it the request fails with `TransientError`.

    Raises `ConfigError` for an `s3://` URI without a bucket, an unsupported scheme, or (S3) an
    invalid AWS_PROFILE / endpoint / AWS_S3_ADDRESSING_STYLE.
    """
    parsed = urlparse(uri)
    if parsed.scheme == "s3":
        if not parsed.netloc:
            raise ConfigError(f"{uri!r} has no bucket; expected s3://bucket/prefix")
        from job.storage.s3 import S3Store, s3_client  # botocore is imported only when S3 is used

        client = s3_client(max_attempts, connect_timeout_s, read_timeout_s,
                           operation_timeout_s if operation_timeout_s is not None else _operation_timeout_s)
        return S3Store(client, parsed.netloc, parsed.path.strip("/"), part_size_bytes, page_size, max_attempts)
    if parsed.scheme == "file":
        return LocalStore(Path(unquote(parsed.path)).resolve())
    if parsed.scheme and len(parsed.scheme) > 1:  # len 1: a Windows drive letter, not a scheme
        raise ConfigError(f"unsupported storage URI {uri!r}; use s3://bucket/prefix or a local path")
    return LocalStore(Path(uri).expanduser().resolve())
