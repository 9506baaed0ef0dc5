"""The LoRA in kohya's layout, which AUTOMATIC1111, ComfyUI and most SD tools read as-is.

Keys are `lora_unet_<module path with _>` / `lora_te_<…>`, each with `.lora_down.weight` (peft's A),
`.lora_up.weight` (peft's B) and `.alpha`; training facts go in the safetensors header, where those
tools show them.
"""

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from job import __version__

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


def save_kohya_lora(settings, base_model: str, unet_layers: dict, text_layers: dict | None, path: Path, steps: int) -> Path:
    alpha = settings.effective_lora_alpha
    weights = to_kohya(unet_layers, "lora_unet_", alpha)
    if text_layers:
        weights.update(to_kohya(text_layers, "lora_te_", alpha))
    metadata = {
        "ss_base_model_version": "sd_v1",
        "ss_sd_model_name": base_model,
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(settings.lora_rank),
        "ss_network_alpha": str(alpha),
        "ss_steps": str(steps),
        "ss_resolution": json.dumps([settings.resolution, settings.resolution]),
        "ss_learning_rate": str(settings.effective_learning_rate),
        "ss_seed": str(settings.seed),
        "ss_train_text_encoder": json.dumps(settings.train_text_encoder),
        "sdft_instance_prompt": settings.instance_prompt or "",
        "sdft_version": __version__,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(weights, str(path), metadata=metadata)
    return path
