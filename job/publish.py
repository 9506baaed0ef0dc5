"""Publication: the staged outputs go up, then `manifest.json` with every artifact's hash.

Uploads run in an order that never lets a half-written result look complete: the caller removes the
old `_SUCCESS` before training, this uploads the artifacts, then the manifest; `_SUCCESS` goes last.
"""

from pathlib import Path

import structlog

from job import layout
from job.digests import hash_tree
from job.run_record import put_json
from job.storage import Store

log = structlog.get_logger()


def publish(output: Store, staging: Path, manifest: dict) -> None:
    """Uploads the staged outputs, then `manifest.json` with every artifact's hash (not `_SUCCESS`)."""
    artifacts = [{"path": path, **facts} for path, facts in hash_tree(staging).items()]
    output.upload_tree(staging)
    put_json(output, layout.MANIFEST, {**manifest, "artifacts": artifacts})
    log.info("output.published", uri=output.uri, artifacts=len(artifacts))
