"""Fan-out: with `SDFT_BATCH_URI` and `JOB_COMPLETION_INDEX=N`, line N of the batch file overrides the settings.

Kubernetes sets `JOB_COMPLETION_INDEX` in every pod of an Indexed Job; one Job so trains one
subject per index, each writing under the output prefix its line names.
"""

import json

from job.errors import ConfigError
from job.settings import BatchLineSource
from job.storage import open_store


def read_batch_line(source: BatchLineSource) -> dict:
    """The settings on line `source.index_text` of the batch file at `source.uri` (keys lower-cased).

    Raises `ConfigError` for a missing or out-of-range index or a line that is not a JSON object,
    and what `Store.get` raises for the file itself.
    """
    uri, default_run_id = source.uri, source.default_run_id
    if not (source.index_text or "").isdigit():
        raise ConfigError("SDFT_BATCH_URI is set but JOB_COMPLETION_INDEX is not a number (run it as an Indexed Job)")
    index = int(source.index_text)
    parent, _, name = uri.rstrip("/").rpartition("/")
    text = open_store(parent or ".").get(name).decode()
    lines = [line for line in text.splitlines() if line.strip()]
    if index >= len(lines):
        raise ConfigError(f"JOB_COMPLETION_INDEX={index} but the batch file {uri} has only {len(lines)} lines")
    try:
        line = json.loads(lines[index])
    except json.JSONDecodeError as error:
        raise ConfigError(f"line {index} of the batch file {uri} is not JSON: {error}") from error
    if not isinstance(line, dict):
        raise ConfigError(f"line {index} of the batch file {uri} must be a JSON object of settings")
    line = {key.lower(): value for key, value in line.items()}
    line.setdefault("run_id", f"{default_run_id}-{index}")  # each subject a run of its own
    return line
