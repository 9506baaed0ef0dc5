"""Publication: the staged outputs go up, then `manifest.json` with every artifact's hash.

Uploads run in an order that never lets a half-written result look complete: the caller removes the
old `_SUCCESS` before training, this uploads the artifacts, then the manifest; `_SUCCESS` goes last.
"""

from pathlib import Path

import structlog

from job import layout
from job.digests import sha256_file
from job.run_record import put_json
from job.storage import Store

log = structlog.get_logger()


def publish(output: Store, staging: Path, manifest: dict) -> None:
    """Uploads the staged outputs, then `manifest.json` with every artifact's hash (not `_SUCCESS`)."""
    artifacts = [
        {"path": p.relative_to(staging).as_posix(), "sha256": sha256_file(p), "bytes": p.stat().st_size}
        for p in sorted(staging.rglob("*"))
        if p.is_file()
    ]
    output.upload_tree(staging)
    put_json(output, layout.MANIFEST, {**manifest, "artifacts": artifacts})
    log.info("output.published", uri=output.uri, artifacts=len(artifacts))
