"""Object storage behind one small interface: S3 (or an S3-compatible store) and local folders.

`open_store(uri)`: `s3://bucket/prefix` is S3; anything else (`/abs/dir`, `file:///abs/dir`,
`relative/dir`) a local folder. A root is a folder: `s3://b/data`, `s3://b/data/` and `s3://b//data/`
are one store (`uri` drops the trailing slash) that never matches `s3://b/database/…`. Keys are
'/'-separated and relative to the root; `list(prefix)` filters by string prefix; S3 folder markers
(keys ending in '/') are skipped. If nothing lies under `root/` but `root` is itself an object (or a
local file), the store holds just that object, keyed by its basename; this is decided on first use.

Errors: wrong credentials or a missing bucket raise `ConfigError` (exit 2); network failures,
timeouts, throttling and 5xx after retries `TransientError` (exit 75); a missing object on
get/download `FileNotFoundError` whose `filename` is its URI. Messages are one line, without secrets.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from abc import ABC, abstractmethod
from collections.abc import Callable
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import IO, Any
from urllib.parse import unquote, urlparse

from job.errors import ConfigError, InputError

MAX_ATTEMPTS = 5  # botocore "standard" retries: exponential backoff with jitter, capped at 20 s
CONNECT_TIMEOUT_S = 10.0
READ_TIMEOUT_S = 60.0
OPERATION_TIMEOUT_S = 300.0  # SDFT_STORAGE_TIMEOUT_S's default: one request, retries included
PART_SIZE_BYTES = 16 * 1024 * 1024  # multipart threshold and part size
PAGE_SIZE = 1000  # keys per ListObjectsV2 page (the S3 maximum)
TEMP_PREFIX = ".sdft-tmp-"  # local half-written files; never listed


@dataclass(frozen=True)
class ObjectInfo:
    key: str  # relative to the store's root
    size: int  # bytes


class Store(ABC):
    """A folder of objects. Subclasses implement the primitives; shared logic lives here."""

    uri: str

    @abstractmethod
    def child(self, key: str) -> Store: ...
    @abstractmethod
    def url(self, key: str) -> str: ...
    @abstractmethod
    def list(self, prefix: str = "") -> list[ObjectInfo]: ...
    @abstractmethod
    def exists(self, key: str) -> bool: ...
    @abstractmethod
    def get(self, key: str) -> bytes: ...
    @abstractmethod
    def put(self, key: str, data: bytes) -> None: ...
    @abstractmethod
    def delete(self, keys: list[str]) -> None: ...
    @abstractmethod
    def _download_files(self, pairs: list[tuple[str, Path]]) -> None: ...
    @abstractmethod
    def _upload_files(self, pairs: list[tuple[Path, str]]) -> None: ...

    def download(self, key: str, dest: Path) -> Path:
        self._download_files([(key, Path(dest))])
        return Path(dest)

    def upload(self, src: Path, key: str) -> None:
        self._upload_files([(Path(src), key)])

    def download_all(self, dest_dir: Path, keys: list[str] | None = None) -> list[Path]:
        """Download `keys` (default: everything under the root) into dest_dir, keeping the layout.

        Every target is checked before anything is written, so a hostile key in the bucket
        (`../x`, `/etc/x`) aborts the whole download with InputError instead of escaping dest_dir.
        """
        keys = [o.key for o in self.list()] if keys is None else keys
        root = Path(dest_dir).resolve()
        # Following symlinks costs ~10 syscalls a key (10 ms for 200), before any transfer starts;
        # a dest_dir that does not exist yet holds no symlinks to follow.
        follow_links = root.exists()
        pairs = [(key, _target_in(root, key, self.url(key), follow_links)) for key in keys]
        if pairs:
            self._download_files(pairs)
        return [dest for _, dest in pairs]

    def upload_tree(self, src_dir: Path, key_prefix: str = "") -> list[str]:
        """Upload every file under src_dir to key_prefix/<relative path>; returns the keys."""
        files = sorted(p for p in Path(src_dir).rglob("*") if p.is_file())
        keys = [_join(key_prefix.strip("/"), p.relative_to(src_dir).as_posix()) for p in files]
        if files:
            self._upload_files(list(zip(files, keys)))
        return keys

    def delete_prefix(self, prefix: str) -> None:
        self.delete([o.key for o in self.list(prefix)])


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

    `operation_timeout_s` (default: `set_operation_timeout`'s, else 300 s) bounds each request,
    retries and backoff included; past it the request fails with `TransientError`.
    """
    parsed = urlparse(uri)
    if parsed.scheme == "s3":
        if not parsed.netloc:
            raise ConfigError(f"{uri!r} has no bucket; expected s3://bucket/prefix")
        from job.s3_store import (  # botocore is imported only when S3 is used
            S3Store,
            s3_client,
        )

        client = s3_client(max_attempts, connect_timeout_s, read_timeout_s,
                           operation_timeout_s if operation_timeout_s is not None else _operation_timeout_s)
        return S3Store(client, parsed.netloc, parsed.path.strip("/"), part_size_bytes, page_size, max_attempts)
    if parsed.scheme == "file":
        return LocalStore(Path(unquote(parsed.path)).resolve())
    if parsed.scheme and len(parsed.scheme) > 1:  # len 1: a Windows drive letter, not a scheme
        raise ConfigError(f"unsupported storage URI {uri!r}; use s3://bucket/prefix or a local path")
    return LocalStore(Path(uri).expanduser().resolve())


def _join(base: str, key: str) -> str:
    return f"{base}/{key}" if base and key else base or key


def _check_key(key: str, url: str) -> None:
    """Refuse keys that could address a path outside a root: absolute, empty or with '..'."""
    parts = PurePosixPath(key).parts
    if not key or key.startswith("/") or ".." in parts or key.endswith("/"):
        raise InputError(f"refusing unsafe object key {key!r} ({url}): it would map outside the target folder")


def _target_in(root: Path, key: str, url: str, follow_links: bool) -> Path:
    """root/key (root already resolved), after checking lexically, and through any symlinks if
    follow_links, that it stays inside root."""
    _check_key(key, url)
    target = (root / key).resolve() if follow_links else root / key
    if not target.is_relative_to(root) or target == root:
        raise InputError(f"refusing object key {key!r} ({url}): it would be written outside {root}")
    return target


class LocalStore(Store):
    """A plain folder. Writes go to a temp file in the same folder and are renamed into place,
    so a crash never leaves a half-written file under its final name."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.uri = str(root)

    def child(self, key: str) -> LocalStore:
        return LocalStore(self.root / key.strip("/"))

    def _base(self) -> Path:
        return self.root.parent if self.root.is_file() else self.root

    def url(self, key: str) -> str:
        return str(self._base() / key)

    def _path(self, key: str) -> Path:
        _check_key(key, self.url(key))
        return self._base() / key

    def list(self, prefix: str = "") -> list[ObjectInfo]:
        if self.root.is_file():
            return [ObjectInfo(self.root.name, self.root.stat().st_size)] if self.root.name.startswith(prefix) else []
        found = []
        for folder, _, files in os.walk(self.root):
            for name in files:
                path = Path(folder, name)
                key = path.relative_to(self.root).as_posix()
                if key.startswith(prefix) and not name.startswith(TEMP_PREFIX) and path.is_file():
                    found.append(ObjectInfo(key, path.stat().st_size))
        return sorted(found, key=lambda o: o.key)

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def get(self, key: str) -> bytes:
        return self._path(key).read_bytes()

    def put(self, key: str, data: bytes) -> None:
        _write_atomically(self._path(key), lambda f: f.write(data))

    def _download_files(self, pairs: list[tuple[str, Path]]) -> None:
        for key, dest in pairs:
            with self._path(key).open("rb") as src:
                _write_atomically(dest, lambda f: shutil.copyfileobj(src, f))

    def _upload_files(self, pairs: list[tuple[Path, str]]) -> None:
        for src, key in pairs:
            with src.open("rb") as source:
                _write_atomically(self._path(key), lambda f: shutil.copyfileobj(source, f))

    def delete(self, keys: list[str]) -> None:
        for key in keys:
            path = self._path(key)
            path.unlink(missing_ok=True)
            # Prune folders the deletion emptied, as S3 has no empty folders either.
            for parent in path.parents:
                if parent == self.root or not parent.is_relative_to(self.root) or any(parent.iterdir()):
                    break
                parent.rmdir()

    def delete_prefix(self, prefix: str) -> None:
        super().delete_prefix(prefix)
        if not prefix:  # everything went, so the root folder goes too, as on S3
            with suppress(OSError):  # not empty (a concurrent write), already gone, or a file
                self.root.rmdir()


def _write_atomically(path: Path, write: Callable[[IO[bytes]], Any], *, make_parent: bool = True,
                      fsync: bool = True) -> None:
    """Write through a temp file renamed into place. S3 downloads into the work dir skip fsync, as
    s3transfer did: syncing 200 x 1 MiB took 0.2-0.5 s here, as long as the download itself."""
    if make_parent:
        path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=TEMP_PREFIX)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            if fsync:
                f.flush()
                os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; outputs should be readable like any other file
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
