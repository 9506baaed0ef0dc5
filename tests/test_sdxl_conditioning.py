"""SDXL's conditioning as the family module builds it equals what diffusers' SDXL pipeline computes (issue 11)."""

from __future__ import annotations

import torch
from job.families import family_for
from models_util import INSTANCE_PROMPT, tiny_model_path


def test_caption_conditioning_and_time_ids_match_the_sdxl_pipeline(tmp_path_factory):
    from diffusers import StableDiffusionXLPipeline

    pipeline = StableDiffusionXLPipeline.from_pretrained(tiny_model_path(tmp_path_factory, "tiny-sdxl"))
    family = family_for("sdxl")
    captions = [INSTANCE_PROMPT, "a dog on the beach"]
    with torch.no_grad():
        ours = family.encode([pipeline.tokenizer, pipeline.tokenizer_2], [pipeline.text_encoder, pipeline.text_encoder_2],
                             captions, "cpu")
        prompt_embeds, _, pooled, _ = pipeline.encode_prompt(captions, device="cpu", do_classifier_free_guidance=False)
    torch.testing.assert_close(ours["prompt_embeds"], prompt_embeds)
    torch.testing.assert_close(ours["pooled_prompt_embeds"], pooled)
    assert ours["prompt_embeds"].shape[-1] == pipeline.unet.config.cross_attention_dim  # both encoders, concatenated

    crop = ((480, 640), (0, 80), (64, 64))  # original (height, width), crop (top, left), target (height, width)
    inputs = family.unet_inputs(ours, [crop, crop], "cpu", torch.float32)
    expected = pipeline._get_add_time_ids((480, 640), (0, 80), (64, 64), torch.float32,
                                          text_encoder_projection_dim=pipeline.text_encoder_2.config.projection_dim)
    torch.testing.assert_close(inputs["added_cond_kwargs"]["time_ids"], expected.repeat(2, 1))
    torch.testing.assert_close(inputs["added_cond_kwargs"]["text_embeds"], pooled)
