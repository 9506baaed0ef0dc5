"""The interface a model family implements (`job.families.sd1`, `sd2`, `sdxl` are the implementations).

A family knows its text side (tokenizers and encoders, caption → conditioning), the UNet's extra
inputs, the pipeline that samples, and how its LoRA is exported and labelled for other tools. It
holds no state: the loaded parts live in `job.model_parts.Models`.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch


# SDXL's size conditioning of one example, in pixels: ((height, width) of the original image,
# (top, left) of the crop, (height, width) trained at), as the data step (`job.training_data`) cut it.
SizeConditioning = tuple[tuple[int, int], tuple[int, int], tuple[int, int]]


class Family:
    """One model family. Subclasses set the class attributes and implement the methods."""

    name: str
    # Pipeline components that are text encoders, and their tokenizers, in the pipeline's order.
    text_encoder_names: tuple[str, ...]
    tokenizer_names: tuple[str, ...]
    # kohya key prefix of each trainable part (what AUTOMATIC1111, ComfyUI and sd-scripts expect).
    kohya_prefixes: dict[str, str]

    def native_resolution(self, prediction_type: str) -> int:
        """The side, in pixels, the family's base models were trained at."""
        raise NotImplementedError

    def load_tokenizers(self, model_path: Path) -> list:
        """The tokenizers of `tokenizer_names`, from the diffusers folder."""
        from transformers import CLIPTokenizer

        return [CLIPTokenizer.from_pretrained(model_path, subfolder=name) for name in self.tokenizer_names]

    def load_text_encoder(self, model_path: Path, name: str, dtype: torch.dtype) -> torch.nn.Module:
        """The text encoder `name` (one of `text_encoder_names`) in `dtype`, safetensors only."""
        raise NotImplementedError

    def encode(self, tokenizers: Sequence, text_encoders: Sequence, captions: list[str], device) -> dict[str, torch.Tensor]:
        """Conditioning for `captions`, batch first, keyed by the pipeline's argument names
        (`prompt_embeds`, and `pooled_prompt_embeds` where the family has one)."""
        raise NotImplementedError

    def negative_conditioning(self, empty: dict[str, torch.Tensor], pipeline_config) -> dict[str, torch.Tensor]:
        """The unconditional half of classifier-free guidance, from the empty prompt's conditioning
        (keys `negative_<key>`), as the family's pipeline would compute it."""
        return {f"negative_{key}": value for key, value in empty.items()}

    def unet_inputs(self, conditioning: dict[str, torch.Tensor], crops: Sequence[SizeConditioning], device, dtype) -> dict:
        """Keyword arguments of `UNet2DConditionModel.forward` besides the noisy latents and timesteps."""
        raise NotImplementedError

    def pipeline_class(self):
        """The diffusers pipeline class that samples from (and saves) this family's models."""
        raise NotImplementedError

    def pipeline_extras(self) -> dict:
        """Extra `from_pretrained` arguments of the sampling pipeline."""
        return {}

    def kohya_metadata(self, prediction_type: str) -> dict[str, str]:
        """Header fields that tell AUTOMATIC1111/Forge/ComfyUI which base model the LoRA belongs to."""
        raise NotImplementedError


def token_ids(tokenizer, captions: list[str]) -> torch.Tensor:
    """Token ids padded (and truncated) to the tokenizer's length (77 for CLIP), [batch, 77]."""
    return tokenizer(
        captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
    ).input_ids
