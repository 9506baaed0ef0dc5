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


def select_trainable(settings, unet, text_encoders: list) -> list[torch.nn.Parameter]:
    """Marks what trains (adding LoRA adapters for `lora`) and returns those parameters.

    `text_encoders`: the family's (one for SD 1.x/2.x, two for SDXL); all train, or none.
    """
    unet.requires_grad_(False)
    for text_encoder in text_encoders:
        text_encoder.requires_grad_(False)
    if settings.method == "lora":
        unet.add_adapter(_lora_config(settings, UNET_LORA_TARGETS))
        if settings.train_text_encoder:
            for text_encoder in text_encoders:
                text_encoder.add_adapter(_lora_config(settings, TEXT_ENCODER_LORA_TARGETS))
    else:
        unet.requires_grad_(True)
        if settings.train_text_encoder:
            for text_encoder in text_encoders:
                text_encoder.requires_grad_(True)
    # Trainable weights stay in fp32 whatever the compute dtype: Adam updates underflow in half precision.
    trainable = [p for model in (unet, *text_encoders) for p in model.parameters() if p.requires_grad]
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

    transformers 5 dropped the `text_model` level from CLIPTextModel (not from
    CLIPTextModelWithProjection, whose `text_projection` stays at the top); diffusers and
    transformers 5 map both layouts on load, ComfyUI and InvokeAI only the standard one.
    """
    return {k if k.startswith(("text_model.", "text_projection.")) else "text_model." + k: v for k, v in layers.items()}


def standardize_text_encoder_files(folder: Path) -> None:
    """Rewrites a saved text encoder's safetensors (and shard index) in the standard `text_model.` layout."""
    import json

    from safetensors import safe_open
    from safetensors.torch import save_file

    for path in sorted(folder.glob("*.safetensors")):
        with safe_open(path, "pt") as weights:
            metadata = weights.metadata()
            tensors = {key: weights.get_tensor(key) for key in weights.keys()}
        renamed = _standard_clip_keys(tensors)
        if renamed.keys() != tensors.keys():
            save_file(renamed, str(path), metadata=metadata)
    for index_path in folder.glob("*.safetensors.index.json"):
        index = json.loads(index_path.read_text())
        index["weight_map"] = _standard_clip_keys(index["weight_map"])
        index_path.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")


def _adapter_config(model) -> dict:
    # peft keeps target modules in a set; sorted, the header (and so the file) is the same every run.
    config = model.peft_config["default"].to_dict()
    return {k: sorted(v) if isinstance(v, (set, frozenset)) else v for k, v in config.items()}


def export_weights(settings, pipeline, facts, out_dir: Path) -> list[Path]:
    """Writes the trained weights under `out_dir` per the contract: `lora/…` or `model/`.

    `facts` (`job.kohya.LoraFacts`) names the family, whose text encoders are exported (both for
    SDXL, through the pipeline's own `save_lora_weights`), and what the kohya header says.
    """
    family = facts.family
    if settings.method == "lora":
        from diffusers.utils import convert_state_dict_to_diffusers

        from job.kohya import save_kohya_lora

        unet_layers = _peft_layers(pipeline.unet)
        encoders = family.text_encoder_names if settings.train_text_encoder else ()
        text_layers = {name: _standard_clip_keys(_peft_layers(getattr(pipeline, name))) for name in encoders}
        lora_dir = out_dir / layout.LORA_DIR
        pipeline.save_lora_weights(
            lora_dir,
            weight_name=PurePosixPath(layout.DIFFUSERS_LORA).name,
            unet_lora_layers=convert_state_dict_to_diffusers(unet_layers),
            **{f"{name}_lora_layers": convert_state_dict_to_diffusers(layers) for name, layers in text_layers.items()},
            # The adapter configs go in the header: without them diffusers assumes alpha = rank on load.
            unet_lora_adapter_metadata=_adapter_config(pipeline.unet),
            **{f"{name}_lora_adapter_metadata": _adapter_config(getattr(pipeline, name)) for name in text_layers},
            safe_serialization=True,
        )
        save_kohya_lora(settings, facts, unet_layers, text_layers, out_dir / layout.kohya_lora(settings.run_id))
        for path in lora_dir.glob("*.safetensors"):
            canonicalize_header(path)
        return sorted(lora_dir.iterdir())
    model_dir = out_dir / layout.MODEL_DIR
    pipeline.save_pretrained(model_dir, safe_serialization=True)
    for name in family.text_encoder_names:
        standardize_text_encoder_files(model_dir / name)
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

