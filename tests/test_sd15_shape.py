"""builtin:sd15-shape has exactly Stable Diffusion 1.5's architecture (issue 6).

Built on the meta device: the parameter counts are checked without allocating 4 GB or writing it.
"""

from __future__ import annotations

import torch

from job.builtin_models import byte_level_vocab, sd15_shape_configs

# Parameter counts of stable-diffusion-v1-5's unet, vae and text_encoder.
SD15_UNET, SD15_VAE, SD15_TEXT_ENCODER, SD15_VOCAB = 859_520_964, 83_653_863, 123_060_480, 49_408


def _count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def test_sd15_shape_has_sd15s_parameter_counts():
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    configs = sd15_shape_configs()
    vocab, _ = byte_level_vocab()
    with torch.device("meta"):
        unet = UNet2DConditionModel(**configs["unet"])
        vae = AutoencoderKL(**configs["vae"])
        text_encoder = CLIPTextModel(CLIPTextConfig(vocab_size=len(vocab), **configs["text_encoder"]))
    assert _count(unet) == SD15_UNET
    assert _count(vae) == SD15_VAE
    # The one documented difference: builtin:tiny's byte-level vocabulary instead of CLIP's 49,408 tokens.
    hidden = configs["text_encoder"]["hidden_size"]
    assert _count(text_encoder) == SD15_TEXT_ENCODER - (SD15_VOCAB - len(vocab)) * hidden
