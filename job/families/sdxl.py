"""SDXL: two text encoders, pooled text embeddings and size conditioning (Podell et al. 2023, §2.2).

The conditioning, as in diffusers' `StableDiffusionXLPipeline.encode_prompt` and cog-sdxl's trainer:
the penultimate hidden states of CLIP ViT-L (768) and OpenCLIP bigG (1280), concatenated (2048 on
the real model); the projected pooled embedding of the second encoder; and per example `time_ids` =
(original height, width, crop top, left, target height, width) of what the data step did to it.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from job.families.base import Family, SizeConditioning, token_ids


class SDXL(Family):
    name = "sdxl"
    text_encoder_names = ("text_encoder", "text_encoder_2")
    tokenizer_names = ("tokenizer", "tokenizer_2")
    kohya_prefixes = {"unet": "lora_unet_", "text_encoder": "lora_te1_", "text_encoder_2": "lora_te2_"}

    def native_resolution(self, prediction_type: str) -> int:
        return 1024

    def load_text_encoder(self, model_path: Path, name: str, dtype: torch.dtype) -> torch.nn.Module:
        from transformers import CLIPTextModel, CLIPTextModelWithProjection

        model_class = CLIPTextModel if name == "text_encoder" else CLIPTextModelWithProjection
        return model_class.from_pretrained(model_path, subfolder=name, torch_dtype=dtype, use_safetensors=True)

    def encode(self, tokenizers: Sequence, text_encoders: Sequence, captions: list[str], device) -> dict[str, torch.Tensor]:
        """`prompt_embeds` [batch, 77, 768 + 1280] and `pooled_prompt_embeds` [batch, 1280] (real SDXL widths)."""
        hidden_states = []
        for tokenizer, text_encoder in zip(tokenizers, text_encoders):
            output = text_encoder(token_ids(tokenizer, captions).to(device), output_hidden_states=True)
            hidden_states.append(output.hidden_states[-2])  # SDXL conditions on the penultimate layer
        pooled = output.text_embeds  # the second encoder's projected pooled output
        return {"prompt_embeds": torch.cat(hidden_states, dim=-1), "pooled_prompt_embeds": pooled}

    def negative_conditioning(self, empty: dict[str, torch.Tensor], pipeline_config) -> dict[str, torch.Tensor]:
        # SDXL base guides against zeros rather than the empty prompt (`force_zeros_for_empty_prompt`).
        if getattr(pipeline_config, "force_zeros_for_empty_prompt", False):
            empty = {key: torch.zeros_like(value) for key, value in empty.items()}
        return super().negative_conditioning(empty, pipeline_config)

    def unet_inputs(self, conditioning: dict[str, torch.Tensor], crops: Sequence[SizeConditioning], device, dtype) -> dict:
        time_ids = torch.tensor(
            [[*original_size, *top_left, *target_size] for original_size, top_left, target_size in crops], dtype=dtype
        )
        # Built on the host; to a GPU through pinned memory, so that the step does not wait on the copy.
        time_ids = time_ids.pin_memory().to(device, non_blocking=True) if torch.device(device).type == "cuda" else time_ids.to(device)
        return {
            "encoder_hidden_states": conditioning["prompt_embeds"].to(device, dtype),
            "added_cond_kwargs": {"text_embeds": conditioning["pooled_prompt_embeds"].to(device, dtype), "time_ids": time_ids},
        }

    def pipeline_class(self):
        from diffusers import StableDiffusionXLPipeline

        return StableDiffusionXLPipeline

    def kohya_metadata(self, prediction_type: str) -> dict[str, str]:
        """As kohya sd-scripts writes them for SDXL (`sdxl_model_util.MODEL_VERSION_SDXL_BASE_V1_0`,
        `sai_model_spec.ARCH_SD_XL_V1_BASE`)."""
        v = prediction_type == "v_prediction"
        return {
            "ss_base_model_version": "sdxl_base_v1-0",
            "ss_v2": "False",
            "ss_v_parameterization": str(v),
            "modelspec.architecture": "stable-diffusion-xl-v1-base/lora",
            "modelspec.implementation": "https://github.com/Stability-AI/generative-models",
            "modelspec.prediction_type": "v" if v else "epsilon",
        }
