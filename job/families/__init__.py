"""Model families: everything that differs between SD 1.x, SD 2.x and SDXL, behind one small interface.

The loop, checkpoints, caching, prior preservation and publishing are shared; they ask the family
(`job.families.base.Family`) which text parts load, how a caption becomes conditioning, what extra
inputs the UNet takes, which pipeline samples, and how a LoRA is named and described for other tools.

`detect_family` decides the family from a diffusers folder's configs alone (no weights are read), so
that `check` and single-file conversion can use it too. `load_vae` loads the one part every family
shares the same way.
"""

import json
from pathlib import Path

import torch

from job.errors import ModelError
from job.families.base import Family

FAMILY_NAMES = ("sd1", "sd2", "sdxl")


def detect_family(model_path: Path) -> str:
    """`sd1`, `sd2` or `sdxl` for the diffusers pipeline folder at `model_path`.

    Read from `model_index.json` (the pipeline class; `text_encoder_2` means SDXL) and
    `unet/config.json` (cross-attention width: 768 SD 1.x, 1024 SD 2.x, 2048 SDXL; models of other
    widths, such as the tiny builtins, are told apart by SD 2.x's linear transformer projections).
    Raises `ModelError` (exit 4) for anything else: inpainting or other UNet inputs, the SDXL
    refiner, other pipeline classes.
    """
    index = _read_json(model_path / "model_index.json", model_path)
    unet = _read_json(model_path / "unet" / "config.json", model_path)
    pipeline_class = str(index.get("_class_name", ""))
    if "Inpaint" in pipeline_class or unet.get("in_channels", 4) != 4:
        raise ModelError(
            f"base model {model_path.name} is an inpainting or other special-purpose model "
            f"({pipeline_class or 'unknown pipeline'}, UNet with {unet.get('in_channels')} input channels); "
            "sdft fine-tunes text-to-image SD 1.x, SD 2.x and SDXL models"
        )
    if pipeline_class.startswith("StableDiffusionXL") or "text_encoder_2" in index:
        if not _component(index, "text_encoder"):
            raise ModelError(
                f"base model {model_path.name} is an SDXL refiner (no first text encoder); fine-tune the SDXL base model instead"
            )
        return "sdxl"
    if pipeline_class != "StableDiffusionPipeline":
        raise ModelError(
            f"base model {model_path.name} is a {pipeline_class or 'pipeline without a class name'}; "
            "sdft fine-tunes StableDiffusionPipeline (SD 1.x / 2.x) and StableDiffusionXLPipeline models"
        )
    width = unet.get("cross_attention_dim")
    if width == 768:
        return "sd1"
    if width == 1024:
        return "sd2"
    return "sd2" if unet.get("use_linear_projection") else "sd1"


def scheduler_prediction_type(model_path: Path) -> str:
    """The prediction type in the model's scheduler config (`epsilon` when it says none)."""
    config = _read_json(model_path / "scheduler" / "scheduler_config.json", model_path)
    return config.get("prediction_type") or "epsilon"


def family_for(name: str) -> Family:
    """The family object for `name` (one of FAMILY_NAMES)."""
    if name == "sd1":
        from job.families.sd1 import SD1

        return SD1()
    if name == "sd2":
        from job.families.sd2 import SD2

        return SD2()
    if name == "sdxl":
        from job.families.sdxl import SDXL

        return SDXL()
    raise ValueError(f"unknown model family {name!r}")


def load_vae(model_path: Path, vae_source: str | None = None) -> torch.nn.Module:
    """The base model's VAE, or the replacement at `vae_source` (a VAE folder or Hub id), frozen, in fp32.

    fp32 whatever the mixed precision: SD's and SDXL's VAEs overflow in fp16, and it runs once per
    image when latents are cached. Its `scaling_factor` (0.18215 SD, 0.13025 SDXL) is read from its config.
    """
    from diffusers import AutoencoderKL

    if vae_source is None:
        vae = AutoencoderKL.from_pretrained(model_path, subfolder="vae", use_safetensors=True)
    else:
        try:
            vae = AutoencoderKL.from_pretrained(vae_source, use_safetensors=True, torch_dtype=torch.float32)
        except (OSError, ValueError) as error:
            raise ModelError(f"SDFT_VAE={vae_source} is not a diffusers VAE with safetensors weights: {error}") from error
    vae.requires_grad_(False)
    return vae


def with_family_defaults(settings, family: Family, prediction_type: str):
    """`settings` with what defaults to the family filled in: `resolution` (its native size)."""
    if settings.resolution is not None:
        return settings
    return settings.model_copy(update={"resolution": family.native_resolution(prediction_type)})


def _component(index: dict, name: str) -> bool:
    value = index.get(name)
    return isinstance(value, list) and value[0] is not None


def _read_json(path: Path, model_path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise ModelError(f"base model {model_path.name} has no {path.relative_to(model_path)}") from None
    except json.JSONDecodeError as error:
        raise ModelError(f"base model {model_path.name}: {path.relative_to(model_path)} is not valid JSON ({error})") from None
