"""The run record and its publication: status.json, manifest.json, the model card, `_SUCCESS` last.

Outputs are staged in the work dir and uploaded in an order that never lets a half-written result
look complete: the old `_SUCCESS` goes first, then artifacts, then the manifest, then `_SUCCESS`.
"""

import hashlib
import json
import platform
import time
from datetime import datetime, timezone
from pathlib import Path

import structlog

from job import __version__
from job.logs import redact
from job.settings import Settings, public_settings
from job.storage import Store
from job.digests import sha256_file

log = structlog.get_logger()

SUCCESS = "_SUCCESS"
# Settings that change where or how a run reports, not what it produces.
_NOT_IN_FINGERPRINT = {
    "run_id", "work_dir", "force", "batch_uri", "log_format", "log_level", "output_uri", "checkpoint_uri",
    "class_uri", "checkpoint_every_steps", "validation_every_steps", "machine_rank", "main_process_ip",
    "main_process_port", "num_machines",
}


def fingerprint(settings: Settings, inputs: list[dict]) -> str:
    """Hash of everything that determines the result: settings that matter and every input's bytes."""
    relevant = {k: v for k, v in public_settings(settings).items() if k not in _NOT_IN_FINGERPRINT}
    payload = json.dumps({"settings": relevant, "inputs": inputs, "sdft": __version__}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()


def already_succeeded(output: Store, fingerprint_: str) -> bool:
    if not output.exists(SUCCESS):
        return False
    try:
        manifest = json.loads(output.get("manifest.json"))
    except (FileNotFoundError, json.JSONDecodeError):
        return False
    return manifest.get("fingerprint") == fingerprint_


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _put_json(store: Store, key: str, data: dict) -> None:
    # Every record passes through the same redaction as the logs.
    store.put(key, redact(json.dumps(data, indent=2, default=str)).encode())


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
        _put_json(store or self.output, "status.json", {**self.fields, "updated_at": _now()})
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

    info = {"machine": platform.machine(), "cpu_count": __import__("os").cpu_count(), "cuda": torch.cuda.is_available()}
    if torch.cuda.is_available():
        info["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return info


def write_model_card(settings: Settings, staging: Path, base_model: str, steps: int, prompts: list[str], family=None) -> Path:
    """`README.md` beside the weights: what was trained, from what, how to load it, what it makes.

    `family` (`job.families`, default SD 1.x) names the pipeline class in the loading code.
    """
    from job.families import family_for

    family = family or family_for("sd1")
    name = "LoRA" if settings.method == "lora" else "DreamBooth"
    rows = [
        ("method", f"{settings.method}" + (" + text encoder" if settings.train_text_encoder else "")),
        ("instance prompt", settings.instance_prompt or "(per-image captions)"),
        ("prior preservation", _prior_summary(settings)),
        ("steps / batch size × accumulation", f"{steps} / {settings.train_batch_size} × {settings.gradient_accumulation_steps}"),
        ("learning rate / schedule", f"{settings.effective_learning_rate} / {settings.lr_scheduler}"),
        ("resolution", f"{settings.resolution} px"),
        ("min-SNR γ / noise offset", f"{settings.snr_gamma or '—'} / {settings.noise_offset}"),
        ("seed", str(settings.seed)),
    ]
    if settings.method == "lora":
        rows.insert(1, ("LoRA rank / alpha", f"{settings.lora_rank} / {settings.effective_lora_alpha}"))
    table = "\n".join(f"| {key} | {value} |" for key, value in rows)
    sample_prompts = "\n".join(f"{i}. `{p}`" for i, p in enumerate(prompts))
    card = f"""---
library_name: diffusers
base_model: {base_model}
tags: [stable-diffusion, {_FAMILY_TAGS[family.name]}text-to-image, {settings.method}, sdft]
---

# {settings.run_id}

A {name} fine-tune of `{base_model}` ({_FAMILY_LABELS[family.name]}) made by sdft {__version__}.

| setting | value |
|---|---|
{table}

## How to load it

{_loading_instructions(settings, base_model, prompts[0], family.pipeline_class().__name__)}
## Samples

Prompts (`samples/final/<prompt>-<n>.png`, image n from seed {settings.seed} + n):

{sample_prompts}

Instance images in the first row, fixed-seed samples of the trained model below:

![samples](samples/grid.png)
"""
    path = staging / "README.md"
    path.write_text(redact(card))
    return path


def _prior_summary(settings: Settings) -> str:
    if not settings.with_prior_preservation:
        return "off"
    return (f"class prompt `{settings.class_prompt or '(from dataset_info.json)'}`, "
            f"{settings.num_class_images} class images, weight {settings.prior_loss_weight}")


_FAMILY_LABELS = {"sd1": "Stable Diffusion 1.x", "sd2": "Stable Diffusion 2.x", "sdxl": "Stable Diffusion XL"}
_FAMILY_TAGS = {"sd1": "", "sd2": "", "sdxl": "stable-diffusion-xl, "}


def _loading_instructions(settings: Settings, base_model: str, prompt: str, pipeline_class: str = "StableDiffusionPipeline") -> str:
    """Diffusers code, then which file ComfyUI, AUTOMATIC1111 and InvokeAI take."""
    code = f"```python\nimport torch\nfrom diffusers import {pipeline_class}\n\n"
    if settings.method == "lora":
        return (
            code + f'pipe = {pipeline_class}.from_pretrained("{base_model}", torch_dtype=torch.float16).to("cuda")\n'
            'pipe.load_lora_weights("./lora")  # the folder holding pytorch_lora_weights.safetensors\n'
            f'image = pipe("{prompt}").images[0]\n```\n\n'
            f"ComfyUI / AUTOMATIC1111: copy `lora/{settings.run_id}.safetensors` (kohya layout, training facts in "
            f"its header) into `models/loras/` (ComfyUI: a LoraLoader node; A1111: `<lora:{settings.run_id}:1>` "
            "in the prompt), on top of the same base model. InvokeAI: import that one file "
            f"(`lora/{settings.run_id}.safetensors`), not the `lora/` folder (it refuses a folder with two weight files).\n"
        )
    return (
        code + f'pipe = {pipeline_class}.from_pretrained("./model", torch_dtype=torch.float16).to("cuda")\n'
        f'image = pipe("{prompt}").images[0]\n```\n\n'
        "ComfyUI: copy the `model/` folder into `models/diffusers/` and load it with the DiffusersLoader node. "
        "InvokeAI: import the `model/` folder (a diffusers pipeline). "
        "AUTOMATIC1111 loads single-file checkpoints only: convert `model/` with diffusers' "
        "`scripts/convert_diffusers_to_original_stable_diffusion.py --use_safetensors` "
        "(SDXL: `convert_diffusers_to_original_sdxl.py`) first.\n"
    )


def publish(output: Store, staging: Path, manifest: dict) -> None:
    """Uploads the staged outputs, then `manifest.json` with every artifact's hash (not `_SUCCESS`)."""
    artifacts = [
        {"path": p.relative_to(staging).as_posix(), "sha256": sha256_file(p), "bytes": p.stat().st_size}
        for p in sorted(staging.rglob("*"))
        if p.is_file()
    ]
    output.upload_tree(staging)
    _put_json(output, "manifest.json", {**manifest, "artifacts": artifacts})
    log.info("output.published", uri=output.uri, artifacts=len(artifacts))
