"""The run record: the fingerprint, `status.json`, and the manifest's facts (versions, hardware).

`fingerprint` names what determines a result (settings that matter + input hashes);
`already_succeeded` compares it with the output's manifest; `StatusFile` keeps `status.json` current;
`manifest` assembles `manifest.json`'s fields (contract §3) except `artifacts`, which `publish` adds.
"""

import hashlib
import json
import os
import platform
import time
from datetime import datetime, timezone

from job import __version__, layout, strict_json
from job.logs import redact
from job.settings import Settings, public_settings
from job.storage import Store

# Settings that change where or how a run reports, not what it produces.
_NOT_IN_FINGERPRINT = {
    "run_id", "work_dir", "force", "batch_uri", "log_format", "log_level", "output_uri", "checkpoint_uri",
    "class_uri", "checkpoint_every_steps", "validation_every_steps", "machine_rank", "main_process_ip",
    "main_process_port", "num_machines", "storage_timeout_s", "log_every_steps",
}


def fingerprint(settings: Settings, inputs: list[dict]) -> str:
    """Hash of everything that determines the result: settings that matter and every input's bytes."""
    relevant = {k: v for k, v in public_settings(settings).items() if k not in _NOT_IN_FINGERPRINT}
    payload = json.dumps({"settings": relevant, "inputs": inputs, "sdft": __version__}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()


def already_succeeded(output: Store, fingerprint_: str) -> bool:
    """True when the output holds `_SUCCESS` and a manifest with this fingerprint."""
    if not output.exists(layout.SUCCESS):
        return False
    try:
        manifest = json.loads(output.get(layout.MANIFEST))
    except (FileNotFoundError, json.JSONDecodeError):
        return False
    return manifest.get("fingerprint") == fingerprint_


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def put_json(store: Store, key: str, data: dict) -> None:
    """Writes a record as indented JSON; every record passes through the same redaction as the logs."""
    store.put(key, redact(strict_json.dumps(data, indent=2, default=str)).encode())  # no NaN: strict JSON


class StatusFile:
    """`status.json`: progress while running, outcome at the end (contract §3)."""

    def __init__(self, output: Store, max_steps: int, min_interval_s: float = 30.0):
        self.output = output
        self.fields = {"state": "running", "phase": "start", "step": 0, "max_steps": max_steps, "loss": None,
                       "eta_seconds": None, "exit_code": None, "reason": None}
        self.min_interval_s = min_interval_s
        self.written_at = 0.0

    def update(self, force: bool = False, **fields) -> None:
        self.fields.update(fields)
        if force or time.monotonic() - self.written_at >= self.min_interval_s:
            self.write()

    def write(self, store: Store | None = None) -> None:
        put_json(store or self.output, layout.STATUS, {**self.fields, "updated_at": _now()})
        self.written_at = time.monotonic()

    def finish(self, state: str, exit_code: int, reason: str | None = None, store: Store | None = None, **fields) -> None:
        """The outcome; `store` (default the output) lets a failing run report through a quicker client."""
        self.fields.update(fields, state=state, exit_code=exit_code, reason=reason,
                           eta_seconds=0 if state == "succeeded" else None)
        self.write(store)


def versions() -> dict:
    import accelerate
    import diffusers
    import peft
    import torch
    import transformers

    return {
        "python": platform.python_version(), "torch": torch.__version__, "diffusers": diffusers.__version__,
        "transformers": transformers.__version__, "accelerate": accelerate.__version__, "peft": peft.__version__,
        "sdft": __version__,
    }


def hardware() -> dict:
    import torch

    info = {"machine": platform.machine(), "cpu_count": os.cpu_count(), "cuda": torch.cuda.is_available()}
    if torch.cuda.is_available():
        info["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return info


def manifest(settings: Settings, fingerprint_: str, base_model, inputs: list[dict], skipped: list[dict],
             result, timings: dict, processes: int, family: str | None = None, prediction_type: str | None = None) -> dict:
    """`manifest.json`'s fields (contract §3) but `artifacts`: `base_model` is a resolved
    `job.base_model.BaseModel`, `result` the training's `TrainResult`, `timings` seconds per stage,
    `family` / `prediction_type` what `job.families` found in the model (and SDFT_PREDICTION_TYPE)."""
    return {
        "run_id": settings.run_id,
        "fingerprint": fingerprint_,
        "settings": public_settings(settings),
        "base_model": {"reference": base_model.reference, "revision": base_model.revision,
                       "family": family, "prediction_type": prediction_type, **base_model.manifest_fields()},
        "versions": versions(),
        "inputs": inputs,
        "skipped": skipped,
        "steps": result.steps,
        "final_loss": result.final_loss,
        "timings": {**timings, "seconds_to_first_step": result.seconds_to_first_step},
        "hardware": {**hardware(), "processes": processes},
    }
