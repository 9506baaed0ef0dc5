"""The LoRA in kohya's layout, which AUTOMATIC1111, ComfyUI and most SD tools read as-is.

Keys are `lora_unet_<module path with _>` / `lora_te_<…>` (SDXL: `lora_te1_`, `lora_te2_`), each with `.lora_down.weight` (peft's A),
`.lora_up.weight` (peft's B) and `.alpha`; training facts go in the safetensors header, where those
tools show them.
"""

import json
import re
from collections import Counter
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import torch
from safetensors.torch import save, save_file

from job import __version__
from job.families import Family

_SUFFIXES = {".lora_A.weight": ".lora_down.weight", ".lora_B.weight": ".lora_up.weight"}


def to_kohya(peft_layers: dict[str, torch.Tensor], prefix: str, alpha: float) -> dict[str, torch.Tensor]:
    """Renames peft adapter weights (`<module>.lora_A.weight`, …) to kohya's keys under `prefix`."""
    converted = {}
    for key, tensor in peft_layers.items():
        suffix = next((s for s in _SUFFIXES if key.endswith(s)), None)
        if suffix is None:
            raise ValueError(f"unexpected LoRA key {key!r}")
        module = prefix + key[: -len(suffix)].replace(".", "_")
        converted[module + _SUFFIXES[suffix]] = tensor.detach().float().cpu().contiguous()
        converted[module + ".alpha"] = torch.tensor(float(alpha))
    return converted


@dataclass(frozen=True)
class LoraFacts:
    """What the exports say about the run beyond the settings."""

    base_model: str  # the SDFT_BASE_MODEL reference (never written as is: see `model_name`)
    family: Family
    prediction_type: str  # `epsilon` or `v_prediction`, as trained
    steps: int
    captions: list[str]  # of the instance images, one per image
    started_at: float  # when training started, Unix seconds


def model_name(reference: str) -> str:
    """The base model's name for a file people share: a Hub id (without `@revision`) or `builtin:` name as
    is; for a local folder or file, a `file://` or `s3://` location, its last component (no suffix)."""
    if reference.startswith("builtin:"):
        return reference
    location = reference.startswith(("s3://", "file://", "/", ".", "~")) or Path(reference).exists()
    if not location:
        return reference.partition("@")[0]
    last = reference.rstrip("/").rsplit("/", 1)[-1]
    return last.removesuffix(".safetensors") or "model"


def tag_frequency(captions: list[str]) -> dict[str, dict[str, int]]:
    """kohya's `ss_tag_frequency`: {dataset: {word: images whose caption has it}}; shows the trigger word."""
    counts: Counter[str] = Counter()
    for caption in captions:
        counts.update({word.strip(".;:!?\"'()[]{}") for word in re.split(r"[\s,]+", caption)} - {""})
    return {"instance": dict(sorted(counts.items()))}


def save_kohya_lora(settings, facts: LoraFacts, unet_layers: dict, text_layers: dict[str, dict], path: Path) -> Path:
    """Writes the kohya file: `facts.family`'s key prefixes (`lora_te_` SD 1.x/2.x; `lora_te1_`,
    `lora_te2_` SDXL), an `.alpha` per module, and the header A1111/Forge/ComfyUI show (the
    `ss_*` fields of kohya sd-scripts' `train_network.py`, `modelspec.*` of SAI's model spec 1.0)."""
    alpha = settings.effective_lora_alpha
    prefixes = facts.family.kohya_prefixes
    weights = to_kohya(unet_layers, prefixes["unet"], alpha)
    for name, layers in text_layers.items():
        weights.update(to_kohya(layers, prefixes[name], alpha))
    resolution = settings.resolution
    started = datetime.fromtimestamp(facts.started_at, timezone.utc)
    metadata = {
        "ss_sd_model_name": model_name(facts.base_model),
        "ss_output_name": settings.run_id,
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(settings.lora_rank),
        "ss_network_alpha": str(alpha),
        "ss_steps": str(facts.steps),
        "ss_resolution": json.dumps([resolution, resolution]),
        "ss_learning_rate": str(settings.effective_learning_rate),
        "ss_seed": str(settings.seed),
        "ss_train_text_encoder": json.dumps(settings.train_text_encoder),
        "ss_num_train_images": str(len(facts.captions)),
        "ss_tag_frequency": json.dumps(tag_frequency(facts.captions)),
        "ss_training_started_at": str(facts.started_at),
        **facts.family.kohya_metadata(facts.prediction_type),
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.title": settings.run_id,
        "modelspec.date": started.date().isoformat(),
        "modelspec.resolution": f"{resolution}x{resolution}",
        "modelspec.trigger_phrase": settings.instance_prompt or "",
        "sdft_instance_prompt": settings.instance_prompt or "",
        "sdft_version": __version__,
    }
    metadata.update(_model_hashes(weights, metadata))
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(weights, str(path), metadata=metadata)
    return path


def _model_hashes(weights: dict, metadata: dict) -> dict[str, str]:
    """`sshs_model_hash` / `sshs_legacy_hash` as sd-scripts' `precalculate_safetensors_hashes` computes
    them (what sd-webui-additional-networks and A1111 show): sha256 of the file's tensor bytes after
    the header, and the legacy hash of 64 KiB at offset 1 MiB, written with the `ss_*` fields only."""
    import hashlib

    raw = save({k: v for k, v in weights.items()}, metadata={k: v for k, v in metadata.items() if k.startswith("ss_")})
    header_bytes = int.from_bytes(raw[:8], "little")
    return {
        "sshs_model_hash": hashlib.sha256(raw[8 + header_bytes :]).hexdigest(),
        "sshs_legacy_hash": hashlib.sha256(raw[0x100000 : 0x100000 + 0x10000]).hexdigest()[:8],
    }
