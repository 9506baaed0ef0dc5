"""SDXL's conditioning as the family module builds it equals what diffusers' SDXL pipeline computes,
and each example's size conditioning describes the crop the data step really made (issue 11)."""

from __future__ import annotations

import torch
from PIL import Image

from job.families import family_for
from job.inputs import Example
from job.training_data import ImageSet, resize_and_crop
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

    class Crop:
        original_size, crop_top_left, target_size = (480, 640), (0, 80), (64, 64)

    inputs = family.unet_inputs(ours, [Crop(), Crop()], "cpu", torch.float32)
    expected = pipeline._get_add_time_ids((480, 640), (0, 80), (64, 64), torch.float32,
                                          text_encoder_projection_dim=pipeline.text_encoder_2.config.projection_dim)
    torch.testing.assert_close(inputs["added_cond_kwargs"]["time_ids"], expected.repeat(2, 1))
    torch.testing.assert_close(inputs["added_cond_kwargs"]["text_embeds"], pooled)


def test_each_examples_crop_is_the_one_the_data_step_cut(tmp_path):
    # A wide image with a distinct pixel pattern, so that every crop position gives another image.
    image = Image.effect_mandelbrot((96, 64), (-2, -1, 1, 1), 60).convert("RGB")
    path = tmp_path / "wide.png"
    image.save(path)
    for center_crop, random_flip in ((True, False), (False, False), (False, True)):
        images = ImageSet([Example(str(path), "wide.png", "0" * 64, "x")] * 1, resolution_px=32,
                          center_crop=center_crop, random_flip=random_flip, seed=3, role="instance")
        for position in range(6):
            [crop] = images.crops([position])
            _, flip, generator = images.pick(position)
            cut = resize_and_crop(image, 32, None if center_crop else generator)
            cut = cut.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if flip else cut
            assert crop.original_size == (64, 96) and crop.target_size == (32, 32)
            # The crop's (top, left) in the resized (and, when flipped, mirrored) image gives the same pixels.
            resized = image.resize((48, 32), Image.Resampling.BICUBIC)
            resized = resized.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if flip else resized
            top, left = crop.crop_top_left
            assert list(resized.crop((left, top, left + 32, top + 32)).getdata()) == list(cut.getdata())
        if center_crop:
            assert images.crops([0])[0].crop_top_left == (0, 8)
