"""Model-family detection from a diffusers folder's configs, and builtin:sdxl-shape's architecture (issue 11).

Detection reads only JSON, so folders of configs stand in for real models here; sdxl-shape is built
on the meta device, so its 3.5 B parameters are counted without allocating or writing them.
"""

from __future__ import annotations

import json

import pytest
import torch

from job.builtin_models import byte_level_vocab, sdxl_shape_configs, text_config
from job.errors import ModelError
from job.families import detect_family
from models_util import tiny_model_path

# Parameter counts of stabilityai/stable-diffusion-xl-base-1.0: unet, vae, text_encoder (CLIP ViT-L)
# and text_encoder_2 (OpenCLIP bigG with its projection), the latter two with 49,408 tokens.
SDXL_UNET, SDXL_VAE, SDXL_TEXT_ENCODER, SDXL_TEXT_ENCODER_2, CLIP_VOCAB = 2_567_463_684, 83_653_863, 123_060_480, 694_659_840, 49_408


def _configs(tmp_path, pipeline_class: str, unet: dict, components=("text_encoder",)):
    folder = tmp_path / "model"
    (folder / "unet").mkdir(parents=True)
    index = {"_class_name": pipeline_class, **{name: ["transformers", "CLIPTextModel"] for name in components}}
    (folder / "model_index.json").write_text(json.dumps(index))
    (folder / "unet" / "config.json").write_text(json.dumps({"in_channels": 4, **unet}))
    return folder


@pytest.mark.parametrize("name, family", [("tiny", "sd1"), ("tiny-sd2", "sd2"), ("tiny-sdxl", "sdxl")])
def test_the_builtins_are_detected_as_their_family(tmp_path_factory, name, family):
    assert detect_family(tiny_model_path(tmp_path_factory, name)) == family


@pytest.mark.parametrize("pipeline_class, unet, components, family", [
    ("StableDiffusionPipeline", {"cross_attention_dim": 768}, ("text_encoder",), "sd1"),
    ("StableDiffusionPipeline", {"cross_attention_dim": 1024, "use_linear_projection": True}, ("text_encoder",), "sd2"),
    ("StableDiffusionXLPipeline", {"cross_attention_dim": 2048}, ("text_encoder", "text_encoder_2"), "sdxl"),
])
def test_real_models_are_told_apart_by_their_configs(tmp_path, pipeline_class, unet, components, family):
    assert detect_family(_configs(tmp_path, pipeline_class, unet, components)) == family


@pytest.mark.parametrize("pipeline_class, unet, components, message", [
    ("StableDiffusionInpaintPipeline", {"in_channels": 9, "cross_attention_dim": 768}, ("text_encoder",), "inpainting"),
    ("StableDiffusionXLImg2ImgPipeline", {"cross_attention_dim": 1280}, ("text_encoder_2",), "refiner"),
    ("KandinskyPipeline", {"cross_attention_dim": 768}, ("text_encoder",), "KandinskyPipeline"),
])
def test_other_models_are_refused_with_exit_4(tmp_path, pipeline_class, unet, components, message):
    with pytest.raises(ModelError, match=message) as error:
        detect_family(_configs(tmp_path, pipeline_class, unet, components))
    assert error.value.exit_code == 4


def _count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def test_sdxl_shape_has_sdxl_bases_parameter_counts():
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    configs = sdxl_shape_configs()
    vocab, _ = byte_level_vocab()
    with torch.device("meta"):
        unet = UNet2DConditionModel(**configs["unet"])
        vae = AutoencoderKL(**configs["vae"])
        text_encoder = CLIPTextModel(text_config(configs["text_encoder"]))
        text_encoder_2 = CLIPTextModelWithProjection(text_config(configs["text_encoder_2"]))
    assert _count(unet) == SDXL_UNET
    assert _count(vae) == SDXL_VAE and configs["vae"]["scaling_factor"] == 0.13025
    # The one documented difference, as for sd15-shape: the byte-level vocabulary instead of CLIP's 49,408 tokens.
    assert _count(text_encoder) == SDXL_TEXT_ENCODER - (CLIP_VOCAB - len(vocab)) * 768
    assert _count(text_encoder_2) == SDXL_TEXT_ENCODER_2 - (CLIP_VOCAB - len(vocab)) * 1280
    assert configs["unet"]["cross_attention_dim"] == 768 + 1280  # both encoders' hidden states, concatenated


def test_sdft_vae_replaces_the_vae_in_fp32_and_a_wrong_one_is_exit_4(tmp_path_factory, tmp_path):
    from job.families import load_vae

    sdxl = tiny_model_path(tmp_path_factory, "tiny-sdxl")
    vae = load_vae(tiny_model_path(tmp_path_factory, "tiny"), str(sdxl / "vae"))  # SD 1.x model, SDXL's VAE
    assert vae.config.scaling_factor == 0.13025 and vae.dtype == torch.float32
    assert not any(p.requires_grad for p in vae.parameters())
    with pytest.raises(ModelError, match="SDFT_VAE") as error:
        load_vae(sdxl, str(tmp_path / "no-vae-here"))
    assert error.value.exit_code == 4


@pytest.mark.parametrize("family, prediction_type, version, v2, v, architecture", [
    ("sd1", "epsilon", "sd_v1", "False", "False", "stable-diffusion-v1/lora"),
    ("sd2", "epsilon", "sd_v2", "True", "False", "stable-diffusion-v2-512/lora"),
    ("sd2", "v_prediction", "sd_v2_v", "True", "True", "stable-diffusion-v2-768-v/lora"),
    ("sdxl", "epsilon", "sdxl_base_v1-0", "False", "False", "stable-diffusion-xl-v1-base/lora"),
])
def test_the_kohya_header_names_the_family_as_a1111_reads_it(family, prediction_type, version, v2, v, architecture):
    from job.families import family_for

    header = family_for(family).kohya_metadata(prediction_type)
    assert (header["ss_base_model_version"], header["ss_v2"], header["ss_v_parameterization"]) == (version, v2, v)
    assert header["modelspec.architecture"] == architecture


def test_the_kohya_header_names_the_model_never_its_location():
    from job.kohya import model_name

    assert model_name("stabilityai/stable-diffusion-xl-base-1.0@abc123") == "stabilityai/stable-diffusion-xl-base-1.0"
    assert model_name("s3://bucket/models/my-sdxl/") == "my-sdxl"
    assert model_name("/data/models/realistic.safetensors") == "realistic"
    assert model_name("file:///data/models/sd15") == "sd15"
    assert model_name("builtin:tiny-sdxl") == "builtin:tiny-sdxl"
