"""The base model's parts on the training device: the accelerator, the precision, and the loaded parts.

`make_accelerator` turns the precision settings into an `Accelerator` (refusing what this machine
cannot honour); `load_models` loads the parts of the model's family (`job.families`) into `Models`,
frozen ones in the compute dtype. The loop that trains them is `job.train`.
"""

from dataclasses import dataclass, field
from pathlib import Path

import torch
from accelerate import Accelerator

from job.errors import ConfigError
from job.families import Family, detect_family, family_for, load_vae, scheduler_prediction_type


@dataclass
class Models:
    """The pipeline's parts, on the training device, frozen ones in the compute dtype.

    Once latents and captions are cached, `vae` (and frozen text encoders) are None: they have
    left memory, `prompt_embeds` holds the validation prompts' conditioning (and the empty negative
    prompt's), and `job.sampling.sample_pipeline` loads back from `model_path` what a pipeline needs.
    `text_encoder_2` / `tokenizer_2` are SDXL's second pair (None for SD 1.x/2.x).
    """

    tokenizer: object
    text_encoder: torch.nn.Module | None
    vae: torch.nn.Module | None
    unet: torch.nn.Module
    noise_scheduler: object
    model_path: Path
    dtype: torch.dtype = torch.float32  # the frozen weights' compute dtype
    prompt_embeds: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)
    family: Family = field(default_factory=lambda: family_for("sd1"))
    prediction_type: str = "epsilon"  # what the UNet is trained to predict (after SDFT_PREDICTION_TYPE)
    tokenizer_2: object = None
    text_encoder_2: torch.nn.Module | None = None
    vae_source: str | None = None  # SDFT_VAE, when the VAE is not the base model's

    @property
    def tokenizers(self) -> list:
        return [getattr(self, name) for name in self.family.tokenizer_names]

    @property
    def text_encoders(self) -> list:
        """The text encoders in the family's order (entries are None once released)."""
        return [getattr(self, name) for name in self.family.text_encoder_names]


def mixed_precision(setting: str) -> str:
    """`auto` → bf16 where the GPU supports it, else fp16 on CUDA, none on CPU."""
    if setting != "auto":
        return setting
    if not torch.cuda.is_available():
        return "no"
    return "bf16" if torch.cuda.is_bf16_supported() else "fp16"


def check_device_settings(settings) -> None:
    """Settings this machine cannot honour (raised before any download, and by `check`)."""
    problems = []
    precision = mixed_precision(settings.mixed_precision)
    if precision != "no" and not torch.cuda.is_available():
        problems.append(f"SDFT_MIXED_PRECISION={precision} needs a CUDA GPU; use `auto` or `no` on CPU")
    if settings.use_8bit_adam and not torch.cuda.is_available():
        problems.append("SDFT_USE_8BIT_ADAM=true needs a CUDA GPU (bitsandbytes); set it to false on CPU")
    if problems:
        raise ConfigError("invalid settings for this machine: " + "; ".join(problems))


def make_accelerator(settings) -> Accelerator:
    check_device_settings(settings)
    precision = mixed_precision(settings.mixed_precision)
    if torch.cuda.is_available():
        # TF32 matmuls on Ampere and newer: ~free speed at the precision SD training needs.
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    # `cpu` on a machine without CUDA: under a multi-process launch that is what makes accelerate
    # set up gloo DDP (MULTI_CPU); without it every process would train alone, each its own "main".
    return Accelerator(mixed_precision=precision, cpu=not torch.cuda.is_available())


def load_models(model_path: Path, accelerator: Accelerator, prediction_type: str = "auto", vae_source: str | None = None) -> Models:
    """The parts of the base model's family, frozen ones in the compute dtype, on the training device.

    `prediction_type` (`SDFT_PREDICTION_TYPE`): `auto` takes the scheduler config's; `vae_source`
    (`SDFT_VAE`) replaces the VAE. Raises `ModelError` for a model that is no SD 1.x/2.x/SDXL.
    """
    from diffusers import DDPMScheduler, UNet2DConditionModel

    family = family_for(detect_family(model_path))
    prediction = scheduler_prediction_type(model_path) if prediction_type == "auto" else prediction_type
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)
    device = accelerator.device
    # The UNet's config carries SD 2.x's `upcast_attention`, which diffusers then honours.
    unet = UNet2DConditionModel.from_pretrained(model_path, subfolder="unet", torch_dtype=dtype, use_safetensors=True)
    text_encoders = {name: family.load_text_encoder(model_path, name, dtype).to(device) for name in family.text_encoder_names}
    tokenizers = dict(zip(family.tokenizer_names, family.load_tokenizers(model_path)))
    return Models(
        **tokenizers,
        **text_encoders,
        vae=load_vae(model_path, vae_source).to(device),
        unet=unet.to(device),
        noise_scheduler=DDPMScheduler.from_pretrained(model_path, subfolder="scheduler", prediction_type=prediction),
        model_path=model_path,
        dtype=dtype,
        family=family,
        prediction_type=prediction,
        vae_source=vae_source,
    )
