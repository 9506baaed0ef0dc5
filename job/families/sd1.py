"""SD 1.x: one CLIP ViT-L text encoder whose last hidden states condition the UNet; no extra UNet inputs."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from job.families.base import Family, SizeConditioning, token_ids


class SD1(Family):
    name = "sd1"
    text_encoder_names = ("text_encoder",)
    tokenizer_names = ("tokenizer",)
    kohya_prefixes = {"unet": "lora_unet_", "text_encoder": "lora_te_"}
    kohya_version = "sd_v1"  # kohya's `ss_base_model_version` stem
    modelspec_architecture = "stable-diffusion-v1"

    def native_resolution(self, prediction_type: str) -> int:
        return 512

    def load_text_encoder(self, model_path: Path, name: str, dtype: torch.dtype) -> torch.nn.Module:
        from transformers import CLIPTextModel

        return CLIPTextModel.from_pretrained(model_path, subfolder=name, torch_dtype=dtype, use_safetensors=True)

    def encode(self, tokenizers: Sequence, text_encoders: Sequence, captions: list[str], device) -> dict[str, torch.Tensor]:
        """`prompt_embeds`: the encoder's last hidden states, [batch, 77, width] (768 SD 1.x, 1024 SD 2.x)."""
        (tokenizer,), (text_encoder,) = tokenizers, text_encoders
        return {"prompt_embeds": text_encoder(token_ids(tokenizer, captions).to(device))[0]}

    def unet_inputs(self, conditioning: dict[str, torch.Tensor], crops: Sequence[SizeConditioning], device, dtype) -> dict:
        return {"encoder_hidden_states": conditioning["prompt_embeds"].to(device, dtype)}

    def pipeline_class(self):
        from diffusers import StableDiffusionPipeline

        return StableDiffusionPipeline

    def pipeline_extras(self) -> dict:
        return {"safety_checker": None, "feature_extractor": None, "requires_safety_checker": False}

    def kohya_metadata(self, prediction_type: str) -> dict[str, str]:
        """Values as kohya sd-scripts writes them (`library/model_util.py`
        `get_model_version_str_for_sd1_sd2`, `library/sai_model_spec.py`). AUTOMATIC1111 files a LoRA
        under SD 2 when `ss_v2 == "True"` and under SDXL when `ss_base_model_version` starts with `sdxl_`."""
        v = prediction_type == "v_prediction"
        return {
            "ss_base_model_version": self.kohya_version + ("_v" if v else ""),
            "ss_v2": str(self.name == "sd2"),
            "ss_v_parameterization": str(v),
            "modelspec.architecture": self.architecture(prediction_type) + "/lora",
            "modelspec.implementation": "diffusers",
            "modelspec.prediction_type": "v" if v else "epsilon",
        }

    def architecture(self, prediction_type: str) -> str:
        return self.modelspec_architecture
