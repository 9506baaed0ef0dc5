"""Single-file checkpoints (`.safetensors` in the original LDM / A1111 layout), converted fully offline.

The family is read from the file's header alone (tensor names and shapes, no weights loaded):

| family | UNet cross-attention | text encoder(s) in the file |
|---|---|---|
| `sd1` | 768 | `cond_stage_model.transformer.` (CLIP ViT-L/14) |
| `sd2` | 1024 | `cond_stage_model.model.` (OpenCLIP ViT-H/14) |
| `sdxl` | 2048 | `conditioner.embedders.0.transformer.` + `conditioner.embedders.1.model.` (CLIP-L + OpenCLIP bigG) |

SD 2.x files share one architecture for the 512 base (epsilon) and the 768 models (v-prediction):
the target comes from `SDFT_PREDICTION_TYPE`, else the file's metadata (`modelspec.prediction_type`,
`modelspec.architecture`, kohya's `ss_v_parameterization`), else v-prediction (the 768 models, as
diffusers assumes), with a warning. The pipeline configs ship in `job/model_configs/<family>/` and
the tokenizers are built from CLIP's BPE merges (`job.clip_tokenizer`): nothing is fetched.
"""

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import structlog

from job.errors import ModelError

log = structlog.get_logger()

CONFIGS = Path(__file__).parent / "model_configs"
UNET = "model.diffusion_model."
UNET_IN = UNET + "input_blocks.0.0.weight"
# A cross-attention key projection of the first transformer block: its input width is the text width.
CROSS_ATTENTION = UNET + "input_blocks.{}.1.transformer_blocks.0.attn2.to_k.weight"
TEXT_ENCODERS = {
    "sd1": ["cond_stage_model.transformer.text_model.embeddings.token_embedding.weight"],
    "sd2": ["cond_stage_model.model.token_embedding.weight"],
    "sdxl": [
        "conditioner.embedders.0.transformer.text_model.embeddings.token_embedding.weight",
        "conditioner.embedders.1.model.token_embedding.weight",
    ],
}
TEXT_WIDTH = {"sd1": 768, "sd2": 1024, "sdxl": 768 + 1280}
FAMILY_NAMES = {"sd1": "SD 1.x", "sd2": "SD 2.x", "sdxl": "SDXL"}


SAFETENSORS_DTYPES = {"F16": "float16", "BF16": "bfloat16", "F32": "float32"}


@dataclass(frozen=True)
class SingleFileModel:
    """What the header of a single-file checkpoint says it is."""

    family: str  # sd1 | sd2 | sdxl
    prediction_type: str  # epsilon | v_prediction
    prediction_source: str  # "setting", "metadata" or "default"
    dtype: str = "float32"  # the UNet's stored dtype: the converted pipeline keeps it (no precision lost or invented)


def read_header(path: Path, reference: str) -> tuple[dict[str, tuple[int, ...]], dict[str, str], str]:
    """(tensor name → shape, metadata, the UNet's dtype) of a safetensors file, without loading any tensor.

    Raises ModelError("… could not be read …") when the file is not a readable safetensors file.
    """
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            shapes = {key: tuple(handle.get_slice(key).get_shape()) for key in handle.keys()}
            metadata = dict(handle.metadata() or {})
            dtype = handle.get_slice(UNET_IN).get_dtype() if UNET_IN in shapes else "F32"
    except Exception as error:  # safetensors raises SafetensorError, OSError or ValueError
        raise ModelError(
            f"base model {reference} could not be read as a safetensors file ({type(error).__name__}: {error}); "
            "it may be truncated or not a .safetensors file at all: download it again"
        ) from error
    return shapes, metadata, SAFETENSORS_DTYPES.get(dtype, "float32")


def detect(shapes: dict[str, tuple[int, ...]], reference: str) -> str:
    """The family (`sd1`, `sd2`, `sdxl`) of a checkpoint from its tensor names and shapes.

    Raises ModelError("… not Stable Diffusion: this file holds …") for anything sdft cannot train.
    """
    refuse = lambda what, hint="": ModelError(  # noqa: E731
        f"base model {reference} is not Stable Diffusion 1.x/2.x/SDXL: this file holds {what}{hint}"
    )
    if not any(key.startswith(UNET) for key in shapes):
        raise refuse(_what_else(shapes))
    if "edm_mean" in shapes:
        raise refuse("Playground v2.5 (an EDM model on the SDXL architecture)", "; sdft trains DDPM models only")
    if UNET_IN not in shapes:
        raise refuse("a diffusion model with another architecture (no `input_blocks.0.0` convolution)")
    channels = shapes[UNET_IN][1]
    sdxl = any(key.startswith("conditioner.embedders.") for key in shapes)
    if channels != 4:
        kind = {9: "an inpainting model", 8: "an instruct-pix2pix model"}.get(channels, f"a UNet with {channels} input channels")
        raise refuse(f"{kind} ({'SDXL' if sdxl else 'SD'} UNet with {channels} input channels)",
                     "; sdft fine-tunes text-to-image models (4 input channels): use the base text-to-image model")
    if sdxl:
        if "conditioner.embedders.1.model.token_embedding.weight" not in shapes:
            raise refuse("an SDXL refiner (one OpenCLIP text encoder)", "; use the SDXL base model")
        family = "sdxl"
    elif "cond_stage_model.model.token_embedding.weight" in shapes:
        family = "sd2"
    elif "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight" in shapes:
        family = "sd1"
    else:
        raise refuse("a UNet without a text encoder", "; give a full checkpoint (UNet, VAE and text encoder)")
    if not any(key.startswith("first_stage_model.") for key in shapes):
        raise refuse(f"an {FAMILY_NAMES[family]} UNet and text encoder without a VAE", "; give a checkpoint that includes its VAE")
    width = _cross_attention_width(shapes)
    text_width = sum(shapes[key][1] for key in TEXT_ENCODERS[family] if key in shapes)
    if width != text_width:
        raise refuse(
            f"an {FAMILY_NAMES[family]}-like model whose UNet cross-attention width ({width}) does not match "
            f"its text encoder(s) ({text_width})"
        )
    if width != TEXT_WIDTH[family]:
        raise refuse(f"an {FAMILY_NAMES[family]}-like model of another size (text width {width}, "
                     f"{FAMILY_NAMES[family]} has {TEXT_WIDTH[family]})")
    return family


def _cross_attention_width(shapes) -> int | None:
    for block in range(1, 9):
        key = CROSS_ATTENTION.format(block)
        if key in shapes:
            return shapes[key][-1]
    return None


def _what_else(shapes) -> str:
    """A short description of a safetensors file that holds no SD UNet."""
    keys = list(shapes)
    if any(k.startswith(("lora_unet_", "lora_te")) or ".lora_down." in k or "lora_A" in k for k in keys):
        return "a LoRA, not a base model; set SDFT_BASE_MODEL to the model it was trained on"
    if any(k.startswith(("double_blocks.", "model.diffusion_model.double_blocks.")) for k in keys):
        return "a FLUX model"
    if any("joint_blocks." in k for k in keys):
        return "a Stable Diffusion 3 model"
    if any(k.startswith("control_model.") for k in keys):
        return "a ControlNet"
    if any(k.startswith(("encoder.down.", "decoder.up.")) for k in keys):
        return "a VAE only"
    if any(k in ("emb_params", "clip_l", "clip_g") or k.startswith("string_to_param") for k in keys):
        return "a textual-inversion embedding"
    shown = ", ".join(sorted(keys)[:3]) + (", …" if len(keys) > 3 else "")
    count = f"{len(keys)} tensor" + ("s" if len(keys) != 1 else "")
    return f"{count} ({shown}) and no Stable Diffusion UNet (`model.diffusion_model.*`)"


def prediction_type(family: str, metadata: dict[str, str], setting: str) -> tuple[str, str]:
    """(prediction type, where it came from): the setting, else the metadata, else the family's default."""
    if setting != "auto":
        return setting, "setting"
    declared = _declared_prediction_type(metadata)
    if declared:
        return declared, "metadata"
    return ("v_prediction" if family == "sd2" else "epsilon"), "default"


def _declared_prediction_type(metadata: dict[str, str]) -> str | None:
    value = metadata.get("modelspec.prediction_type", "").lower()
    if value in ("v", "v_prediction", "v-prediction"):
        return "v_prediction"
    if value in ("epsilon", "eps"):
        return "epsilon"
    architecture = metadata.get("modelspec.architecture", "").lower()
    if architecture.startswith("stable-diffusion-v2"):
        return "v_prediction" if architecture.split("/")[0].endswith("-v") else "epsilon"
    v_parameterization = metadata.get("ss_v_parameterization", "").lower()
    if v_parameterization in ("true", "false"):
        return "v_prediction" if v_parameterization == "true" else "epsilon"
    return None


def inspect_single_file(path: Path, reference: str, prediction_setting: str = "auto") -> SingleFileModel:
    """Reads the header of `path` and says what it is; raises ModelError when sdft cannot train it."""
    shapes, metadata, dtype = read_header(path, reference)
    family = detect(shapes, reference)
    prediction, source = prediction_type(family, metadata, prediction_setting)
    if family == "sd2" and source == "default":
        log.warning("base_model.prediction_type_assumed", reference=reference, prediction_type=prediction,
                    hint="the file does not say; SD 2.x 768 models are v_prediction, the 512 base is epsilon: "
                         "set SDFT_PREDICTION_TYPE=epsilon for a 512 base model")
    return SingleFileModel(family, prediction, source, dtype)


def config_folder(model: SingleFileModel, work_dir: Path) -> Path:
    """The shipped configs of `model.family`, with the prediction type (and SD 2.x's size) filled in."""
    target = work_dir / f"{model.family}-{model.prediction_type}"
    shutil.rmtree(target, ignore_errors=True)
    shutil.copytree(CONFIGS / model.family, target)
    _update_json(target / "scheduler" / "scheduler_config.json", prediction_type=model.prediction_type)
    if model.family == "sd2" and model.prediction_type == "epsilon":
        # stable-diffusion-2-base: 512 px, no attention upcasting.
        _update_json(target / "unet" / "config.json", sample_size=64, upcast_attention=False)
        _update_json(target / "vae" / "config.json", sample_size=512)
    return target


def _update_json(path: Path, **changes) -> None:
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}, indent=2) + "\n")


def convert_single_file(path: Path, model: SingleFileModel, work_dir: Path):
    """Loads `path` as a diffusers pipeline of its family, offline (configs shipped, tokenizers built).

    Raises ModelError when diffusers cannot map the file's tensors onto the family's architecture.
    """
    import torch
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    from job.clip_tokenizer import clip_tokenizer

    config = config_folder(model, work_dir)
    if model.family == "sdxl":
        pipeline_class = StableDiffusionXLPipeline
        parts = dict(tokenizer=clip_tokenizer(), tokenizer_2=clip_tokenizer(pad_token="!"))
    else:
        pipeline_class = StableDiffusionPipeline
        pad = "!" if model.family == "sd2" else "<|endoftext|>"
        parts = dict(tokenizer=clip_tokenizer(pad_token=pad), safety_checker=None, feature_extractor=None,
                     requires_safety_checker=False)
    try:
        return pipeline_class.from_single_file(
            str(path), config=str(config), local_files_only=True, torch_dtype=getattr(torch, model.dtype), **parts
        )
    except Exception as error:  # diffusers raises many kinds for a file it cannot map
        raise ModelError(
            f"base model {path.name} looks like {FAMILY_NAMES[model.family]} but diffusers could not convert it "
            f"({type(error).__name__}: {error}); the file may be damaged or a variant sdft does not know"
        ) from error
