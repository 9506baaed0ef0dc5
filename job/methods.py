"""What differs between LoRA and DreamBooth: which parameters train, and what gets exported.

Everything else (the loop, the loss, sampling, publishing) is shared.
"""

from pathlib import Path, PurePosixPath

import torch
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict

from job import layout

UNET_LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
TEXT_ENCODER_LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]


def select_trainable(settings, unet, text_encoder) -> list[torch.nn.Parameter]:
    """Marks what trains (adding LoRA adapters for `lora`) and returns those parameters."""
    unet.requires_grad_(False)
    text_encoder.requires_grad_(False)
    if settings.method == "lora":
        unet.add_adapter(_lora_config(settings, UNET_LORA_TARGETS))
        if settings.train_text_encoder:
            text_encoder.add_adapter(_lora_config(settings, TEXT_ENCODER_LORA_TARGETS))
    else:
        unet.requires_grad_(True)
        if settings.train_text_encoder:
            text_encoder.requires_grad_(True)
    # Trainable weights stay in fp32 whatever the compute dtype: Adam updates underflow in half precision.
    trainable = [p for model in (unet, text_encoder) for p in model.parameters() if p.requires_grad]
    for parameter in trainable:
        parameter.data = parameter.data.float()
    return trainable


def _lora_config(settings, targets: list[str]) -> LoraConfig:
    return LoraConfig(
        r=settings.lora_rank,
        lora_alpha=settings.effective_lora_alpha,
        lora_dropout=settings.lora_dropout,
        init_lora_weights="gaussian",
        target_modules=targets,
    )


def _peft_layers(model) -> dict:
    return {k: v.detach().float().cpu().contiguous() for k, v in get_peft_model_state_dict(model).items()}


def _standard_clip_keys(layers: dict) -> dict:
    """Text encoder keys as `text_model.encoder.…`, the CLIP layout every SD tool (and transformers 4) knows.

    transformers 5 dropped the `text_model` level from CLIPTextModel; diffusers maps both on load.
    """
    return {k if k.startswith("text_model.") else "text_model." + k: v for k, v in layers.items()}


def _adapter_config(model) -> dict:
    # peft keeps target modules in a set; sorted, the header (and so the file) is the same every run.
    config = model.peft_config["default"].to_dict()
    return {k: sorted(v) if isinstance(v, (set, frozenset)) else v for k, v in config.items()}


def export_weights(settings, pipeline, base_model: str, steps: int, out_dir: Path) -> list[Path]:
    """Writes the trained weights under `out_dir` per the contract: `lora/…` or `model/`."""
    if settings.method == "lora":
        from diffusers.utils import convert_state_dict_to_diffusers

        from job.kohya import save_kohya_lora

        unet_layers = _peft_layers(pipeline.unet)
        text_layers = _standard_clip_keys(_peft_layers(pipeline.text_encoder)) if settings.train_text_encoder else None
        lora_dir = out_dir / layout.LORA_DIR
        pipeline.save_lora_weights(
            lora_dir,
            weight_name=PurePosixPath(layout.DIFFUSERS_LORA).name,
            unet_lora_layers=convert_state_dict_to_diffusers(unet_layers),
            text_encoder_lora_layers=text_layers and convert_state_dict_to_diffusers(text_layers),
            # The adapter configs go in the header: without them diffusers assumes alpha = rank on load.
            unet_lora_adapter_metadata=_adapter_config(pipeline.unet),
            text_encoder_lora_adapter_metadata=_adapter_config(pipeline.text_encoder) if text_layers else None,
            safe_serialization=True,
        )
        save_kohya_lora(settings, base_model, unet_layers, text_layers, out_dir / layout.kohya_lora(settings.run_id), steps)
        for path in lora_dir.glob("*.safetensors"):
            canonicalize_header(path)
        return sorted(lora_dir.iterdir())
    model_dir = out_dir / layout.MODEL_DIR
    pipeline.save_pretrained(model_dir, safe_serialization=True)
    return sorted(p for p in model_dir.rglob("*") if p.is_file())


def canonicalize_header(path: Path) -> None:
    """Rewrites a safetensors header with sorted keys, so equal weights give byte-identical files.

    safetensors writes its metadata map in hash order, which differs between processes; the tensor
    bytes that follow the header are left as they are (their offsets are relative to the header).
    """
    import json
    import struct

    raw = path.read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + length])
    text = json.dumps(header, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
    text += b" " * (-len(text) % 8)  # the format pads the header to an 8-byte boundary
    path.write_bytes(struct.pack("<Q", len(text)) + text + raw[8 + length :])

