"""The S3 half of `job.storage`: a client built from the standard AWS environment, and `S3Store`.

Only `job.storage.factory.open_store` creates these; nothing else in sdft talks to botocore.
"""

from __future__ import annotations

import errno
import os
import shutil
import threading
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from datetime import datetime
from email.utils import parsedate_to_datetime
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import urlparse

import botocore.loaders
import botocore.session
from botocore import exceptions as botoexc
from botocore.config import Config
from botocore.utils import parse_timestamp
from s3transfer.exceptions import RetriesExceededError
from s3transfer.manager import TransferConfig, TransferManager

from job.errors import ConfigError, JobError, TransientError
from job.storage.base import ObjectInfo, Store, join_key, write_atomically

CONCURRENCY = 16  # parallel requests of an s3transfer transfer (uploads, large downloads)
# Threads fetching small objects. Their copy is CPU-bound, and past ~2 threads per core more only
# add GIL hand-offs: 200 x 1 MiB from a local server on 2 cores ran at 0.85x s5cmd's speed with 4
# threads, 0.82x with 8, 0.75x with 16. (s3transfer's ranged GETs of one large object, mostly
# waiting on the network, were 25% faster with 16 threads than with 4.)
SMALL_OBJECT_THREADS = min(CONCURRENCY, 2 * (os.cpu_count() or 1))
READ_CHUNK_BYTES = 1024 * 1024  # per read of a response body; 256 KiB cost more CPU
DELETE_BATCH = 1000  # DeleteObjects accepts at most 1000 keys per request
# Every uploaded part is checksummed by the client and verified by the server. SHA256 needs no extra
# dependency (CRC32C/CRC64NVME need botocore[crt]) and SeaweedFS, MinIO and AWS all accept it.
CHECKSUM_ALGORITHM = "SHA256"
CREDENTIAL_HINT = (
    "check AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY / AWS_SESSION_TOKEN, AWS_PROFILE or the pod's "
    "web identity role, and AWS_ENDPOINT_URL_S3 for S3-compatible stores"
)
_ACCESS_CODES = {"AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "InvalidToken",
                 "ExpiredToken", "TokenRefreshRequired", "AllAccessDisabled", "403"}
_MISSING_CODES = {"NoSuchKey", "NotFound", "404"}
# The store recomputed the upload's checksum and it differs: the bytes were damaged on the way.
_CORRUPTED_CODES = {"BadDigest", "InvalidDigest", "XAmzContentChecksumMismatch", "XAmzContentSHA256Mismatch"}
_THROTTLE_CODES = {"SlowDown", "Throttling", "ThrottlingException", "RequestTimeout",
                   "RequestLimitExceeded", "ServiceUnavailable", "InternalError"}
# botocore parses ~50 ms of service-model JSON per client (and the client was built twice); the
# models never change, so stores share one loader. Sessions, and so credentials, stay per store.
_MODEL_LOADER = botocore.loaders.create_loader()
# What breaks a response body mid-read (botocore wraps urllib3's errors); disk errors are not here.
_BODY_ERRORS = (botoexc.ReadTimeoutError, botoexc.ResponseStreamingError, botoexc.IncompleteReadError)


class _DeadlinePassed(Exception):
    """A request's total time (`SDFT_STORAGE_TIMEOUT_S`) ran out before it succeeded."""

    def __init__(self, timeout_s: float, attempts: int, last: str):
        super().__init__(f"no answer within SDFT_STORAGE_TIMEOUT_S={timeout_s:g} s ({attempts} attempts, last: {last})")


def _bound_total_time(client: Any, timeout_s: float) -> None:
    """Makes each API call, retries and backoff included, end within about `timeout_s`.

    botocore bounds each attempt (connect and read timeouts, here at most `timeout_s` each) and the
    number of attempts, not their total. Its events carry a per-call `context`: the clock starts
    when the call does ('before-call'); an attempt that would start past the deadline fails at once
    ('before-send'), and a failed attempt past it is not retried ('needs-retry').
    """
    def start(context: dict, **_: Any) -> None:
        context["sdft_deadline"] = time.monotonic() + timeout_s

    def refuse_late_attempt(request: Any, **_: Any) -> None:
        deadline = request.context.get("sdft_deadline")
        if deadline is not None and time.monotonic() >= deadline:
            raise _DeadlinePassed(timeout_s, request.context.get("retries", {}).get("attempt", 0), "deadline before sending")

    def stop_retrying(attempts: int, caught_exception: BaseException | None, request_dict: dict,
                      response: Any = None, **_: Any) -> None:
        deadline = request_dict.get("context", {}).get("sdft_deadline")
        failed = caught_exception is not None or (response is not None and response[0].status_code >= 500)
        if deadline is not None and failed and time.monotonic() >= deadline:
            if isinstance(caught_exception, _DeadlinePassed):
                raise caught_exception
            last = type(caught_exception).__name__ if caught_exception else f"HTTP {response[0].status_code}"
            raise _DeadlinePassed(timeout_s, attempts, last)

    client.meta.events.register("before-call.s3", start)
    client.meta.events.register("before-send.s3", refuse_late_attempt)
    client.meta.events.register("needs-retry.s3", stop_retrying)


def s3_client(max_attempts: int, connect_timeout_s: float, read_timeout_s: float,
              operation_timeout_s: float = 300.0) -> Any:
    """An S3 client configured only by the standard AWS environment / config files.

    botocore itself reads credentials, region, profile, web identity and AWS_ENDPOINT_URL(_S3).
    A non-AWS endpoint gets path-style addressing: S3-compatible stores rarely have wildcard DNS
    for virtual-hosted buckets. AWS_S3_ADDRESSING_STYLE (auto|path|virtual) overrides that.
    """
    style = os.environ.get("AWS_S3_ADDRESSING_STYLE", "").strip().lower()
    if style not in ("", "auto", "path", "virtual"):
        raise ConfigError(f"AWS_S3_ADDRESSING_STYLE={style!r} is invalid; use auto, path or virtual")
    session = botocore.session.Session()
    session.register_component("data_loader", _MODEL_LOADER)
    session.get_component("response_parser_factory").set_parser_defaults(timestamp_parser=_parse_timestamp)

    def build(addressing_style: str | None) -> Any:
        # Response checksums are not validated ("when_required"): small-object downloads are
        # CPU-bound (~0.4 s of CPU per 200 x 1 MiB), and hashing 200 MiB costs 0.03 s with CRC32,
        # 0.10 s with SHA256 (what sdft's uploads carry) and 0.24 s with MD5 (to compare ETags).
        # Integrity rests on botocore raising when a body's length differs from its
        # Content-Length, and on TCP's checksums. Uploads are still checksummed (SHA256).
        config = Config(retries={"mode": "standard", "max_attempts": max_attempts},
                        connect_timeout=min(connect_timeout_s, operation_timeout_s),
                        read_timeout=min(read_timeout_s, operation_timeout_s),
                        max_pool_connections=CONCURRENCY + 4, response_checksum_validation="when_required",
                        s3={"addressing_style": addressing_style} if addressing_style else None)
        client = session.create_client("s3", config=config)
        _bound_total_time(client, operation_timeout_s)
        return client

    try:
        client = build(style or None)
        host = urlparse(client.meta.endpoint_url).hostname or ""
        if not style and not host.endswith((".amazonaws.com", ".amazonaws.com.cn")):
            client = build("path")
        return client
    except botoexc.ProfileNotFound as exc:
        raise ConfigError(f"AWS profile not found ({exc.kwargs.get('profile')}); check AWS_PROFILE") from exc
    except ValueError as exc:  # botocore rejects a malformed endpoint URL here
        raise ConfigError(f"invalid S3 endpoint ({exc}); check AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL") from exc


def _parse_timestamp(value: Any) -> datetime:
    """botocore parses every timestamp (each listed object's, each GET's Last-Modified) with
    dateutil: ~8% of a small-object download's CPU. S3's two formats parse natively."""
    try:
        return datetime.fromisoformat(value) if value[:4].isdigit() else parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return parse_timestamp(value)


def _classify(exc: BaseException, url: str, bucket: str, attempts: int) -> Exception | None:
    """Map a boto exception (or one it caused) to the job's typed errors; None if unknown."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, botoexc.ClientError):
            err = seen.response.get("Error", {})
            code = str(err.get("Code", ""))
            status = seen.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
            if code in _ACCESS_CODES or status == 403:
                return ConfigError(f"storage refused access to {url} ({code}); {CREDENTIAL_HINT}")
            if code == "NoSuchBucket":
                return ConfigError(f"bucket {bucket!r} does not exist ({url}); create it or fix the URI "
                                   "and AWS_ENDPOINT_URL_S3")
            if code in _MISSING_CODES or status == 404:
                return FileNotFoundError(errno.ENOENT, "no such object", url)
            if code in _CORRUPTED_CODES:
                return TransientError(f"storage refused an upload to {url} whose checksum did not match "
                                      f"({code}): the data was damaged in transit; a retry resends it")
            if code in _THROTTLE_CODES or status >= 500:
                return TransientError(f"storage failed for {url} after {attempts} attempts ({code})")
            return None
        if isinstance(seen, _DeadlinePassed):
            return TransientError(f"storage did not answer for {url}: {seen}")
        if isinstance(seen, (botoexc.NoCredentialsError, botoexc.PartialCredentialsError)):
            return ConfigError(f"no usable AWS credentials for {url}; {CREDENTIAL_HINT}")
        if isinstance(seen, (botoexc.HTTPClientError, botoexc.ConnectionError, botoexc.IncompleteReadError,
                             RetriesExceededError)):
            return TransientError(f"storage unreachable for {url} after {attempts} attempts "
                                  f"({type(seen).__name__})")
        seen = getattr(seen, "last_exception", None) or seen.__cause__ or seen.__context__
    return None


class S3Store(Store):
    def __init__(self, client: Any, bucket: str, root: str, part_size: int, page_size: int, attempts: int) -> None:
        self._client, self.bucket, self.root = client, bucket, root
        self._part_size, self._page_size, self._attempts = part_size, page_size, attempts
        self._transfer_config = TransferConfig(multipart_threshold=part_size, multipart_chunksize=part_size,
                                               max_request_concurrency=CONCURRENCY)
        self.uri = f"s3://{bucket}/{root}" if root else f"s3://{bucket}"
        self._object_size: int | None = None  # set when the root turns out to be one object
        self._mode_known = False
        self._lock = threading.Lock()

    def child(self, key: str) -> S3Store:
        return S3Store(self._client, self.bucket, join_key(self.root, key.strip("/")), self._part_size,
                       self._page_size, self._attempts)

    def url(self, key: str) -> str:
        return f"s3://{self.bucket}/{self._key(key)}"

    @contextmanager
    def _errors(self, url: str) -> Iterator[None]:
        try:
            yield
        except (FileNotFoundError, JobError):  # already translated (their causes are boto errors)
            raise
        except Exception as exc:
            mapped = _classify(exc, url, self.bucket, self._attempts)
            if mapped is None:
                raise
            raise mapped from exc

    def _is_object(self) -> bool:
        """True if nothing lies under root/ but root itself is an object (decided once)."""
        with self._lock:
            if not self._mode_known and self.root:
                with self._errors(self.uri):
                    page = self._client.list_objects_v2(Bucket=self.bucket, Prefix=self.root + "/", MaxKeys=1)
                if not page.get("Contents"):
                    self._object_size = self._head(self.root)
            self._mode_known = True
            return self._object_size is not None

    def _key(self, key: str) -> str:
        base = str(PurePosixPath(self.root).parent).lstrip(".") if self._is_object() else self.root
        return join_key(base, key)

    def _head(self, full_key: str) -> int | None:
        """Size of an object, None if missing. A 404 is ambiguous (HEAD has no error body), so a
        miss is confirmed against the bucket: a missing bucket must fail loudly, not read as empty."""
        url = f"s3://{self.bucket}/{full_key}"
        try:
            with self._errors(url):
                return int(self._client.head_object(Bucket=self.bucket, Key=full_key)["ContentLength"])
        except FileNotFoundError:
            with self._errors(url):
                try:
                    self._client.head_bucket(Bucket=self.bucket)
                except botoexc.ClientError as exc:
                    if exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") == 404:
                        raise ConfigError(f"bucket {self.bucket!r} does not exist ({url}); create it or "
                                          "fix the URI and AWS_ENDPOINT_URL_S3") from exc
                    raise
            return None

    def list(self, prefix: str = "") -> list[ObjectInfo]:
        if self._is_object():
            name = PurePosixPath(self.root).name
            return [ObjectInfo(name, self._object_size or 0)] if name.startswith(prefix) else []
        base = self.root + "/" if self.root else ""
        found = []
        with self._errors(self.url(prefix)):
            pages = self._client.get_paginator("list_objects_v2").paginate(
                Bucket=self.bucket, Prefix=base + prefix, PaginationConfig={"PageSize": self._page_size})
            for page in pages:
                found += [ObjectInfo(o["Key"][len(base):], int(o["Size"]))
                          for o in page.get("Contents", []) if not o["Key"].endswith("/")]
        return sorted(found, key=lambda o: o.key)

    def exists(self, key: str) -> bool:
        return self._head(self._key(key)) is not None

    def get(self, key: str) -> bytes:
        with self._errors(self.url(key)):
            return self._client.get_object(Bucket=self.bucket, Key=self._key(key))["Body"].read()

    def put(self, key: str, data: bytes) -> None:
        with self._errors(self.url(key)):
            self._client.put_object(Bucket=self.bucket, Key=self._key(key), Body=data,
                                    ChecksumAlgorithm=CHECKSUM_ALGORITHM)

    def _download_files(self, pairs: list[tuple[str, Path]]) -> None:
        # One plain GET per object on a bounded pool, streamed into a temp file. Small-object
        # downloads are CPU-bound, and s3transfer's per-object machinery (futures, queues, 256 KiB
        # chunks handed to an IO thread) took 2-2.5x the CPU. Objects of a part or more, as the
        # GET's Content-Length tells, go to s3transfer instead, whose ranged parallel GETs suit them.
        self._is_object()  # decide the mode before worker threads resolve keys
        for folder in {dest.parent for _, dest in pairs}:  # once here, not once per file in workers
            folder.mkdir(parents=True, exist_ok=True)
        with ThreadPoolExecutor(SMALL_OBJECT_THREADS) as pool:
            futures = [(key, pool.submit(self._download_small, key, dest)) for key, dest in pairs]
            try:
                sizes = self._wait(futures)
            except BaseException:
                pool.shutdown(cancel_futures=True)  # the first failure stops the rest
                raise
        if large := [(key, dest) for (key, dest), size in zip(pairs, sizes) if size is not None]:
            with TransferManager(self._client, self._transfer_config) as manager:
                self._wait([(key, manager.download(self.bucket, self._key(key), str(dest))) for key, dest in large])

    def _download_small(self, key: str, dest: Path) -> int | None:
        """Stream the object into dest, or return its size, body unread, if it is a part or more.
        botocore retries the request but not the body's read, so that is retried here."""
        for attempt in range(1, self._attempts + 1):
            response = self._client.get_object(Bucket=self.bucket, Key=self._key(key))
            with response["Body"] as body:
                if response["ContentLength"] >= self._part_size:
                    return int(response["ContentLength"])
                try:  # reading to EOF makes botocore check the length against Content-Length
                    write_atomically(dest, lambda f: shutil.copyfileobj(body, f, READ_CHUNK_BYTES),
                                     make_parent=False, fsync=False)
                    return None
                except _BODY_ERRORS:
                    if attempt == self._attempts:
                        raise
        return None  # not reached: the last attempt returns or raises

    def _upload_files(self, pairs: list[tuple[Path, str]]) -> None:
        self._is_object()
        with TransferManager(self._client, self._transfer_config) as manager:
            self._wait([(key, manager.upload(str(src), self.bucket, self._key(key),
                                             extra_args={"ChecksumAlgorithm": CHECKSUM_ALGORITHM}))
                        for src, key in pairs])

    def _wait(self, futures: list[tuple[str, Future[Any]]]) -> list[Any]:
        """Each future's result in order; the first failure raises, typed."""
        results = []
        for key, future in futures:
            with self._errors(self.url(key)):
                results.append(future.result())
        return results

    def delete(self, keys: list[str]) -> None:
        for start in range(0, len(keys), DELETE_BATCH):
            batch = keys[start:start + DELETE_BATCH]
            with self._errors(self.url(batch[0])):
                response = self._client.delete_objects(Bucket=self.bucket, Delete={
                    "Objects": [{"Key": self._key(k)} for k in batch], "Quiet": True})
            if response.get("Errors"):
                first = response["Errors"][0]
                raise TransientError(f"could not delete {len(response['Errors'])} objects, e.g. "
                                     f"s3://{self.bucket}/{first.get('Key')} ({first.get('Code')})")
