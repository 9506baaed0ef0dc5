"""Content hashes of files: inputs, artifacts, checkpoints and base models are all named by sha256."""

import hashlib
from pathlib import Path


def sha256_file(path: Path) -> str:
    """The hex sha256 of a file, read in 1 MiB blocks (checkpoints and models can be gigabytes)."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def hash_tree(folder: Path) -> dict[str, dict]:
    """`{relative posix path: {"sha256": hex, "bytes": size}}` of every file under `folder`, sorted by path."""
    folder = Path(folder)
    return {
        path.relative_to(folder).as_posix(): {"sha256": sha256_file(path), "bytes": path.stat().st_size}
        for path in sorted(folder.rglob("*"))
        if path.is_file()
    }
