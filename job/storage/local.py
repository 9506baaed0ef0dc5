"""The local half of `job.storage`: a plain folder as a `Store` (`/abs/dir`, `file:///abs/dir`, `relative/dir`)."""

from __future__ import annotations

import os
import shutil
from contextlib import suppress
from pathlib import Path

from job.storage.base import TEMP_PREFIX, ObjectInfo, Store, check_key, write_atomically


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
        check_key(key, self.url(key))
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
        write_atomically(self._path(key), lambda f: f.write(data))

    def _download_files(self, pairs: list[tuple[str, Path]]) -> None:
        for key, dest in pairs:
            with self._path(key).open("rb") as src:
                write_atomically(dest, lambda f: shutil.copyfileobj(src, f))

    def _upload_files(self, pairs: list[tuple[Path, str]]) -> None:
        for src, key in pairs:
            with src.open("rb") as source:
                write_atomically(self._path(key), lambda f: shutil.copyfileobj(source, f))

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


