"""The LoRA in kohya / A1111 / ComfyUI layout: same image as the diffusers file, right keys, metadata.

One LoRA run with the text encoder trained and alpha ≠ rank (so a lost alpha or a dropped text
encoder shows up as a different image), through the real S3 server.
"""

import json

import numpy as np
import pytest
import torch
from safetensors import safe_open

from models_util import INSTANCE_PROMPT, contract_files, render, s3_run, text_states, tiny_model_path

pytestmark = pytest.mark.slow  # each test runs the job end to end

RANK, ALPHA = 4, 8
RESOLUTION = 32


@pytest.fixture(scope="module")
def lora_run(s3_server, tmp_path_factory):
    return s3_run("kohya", s3_server, tmp_path_factory, SDFT_METHOD="lora", SDFT_TRAIN_TEXT_ENCODER="true",
                  SDFT_LORA_RANK=str(RANK), SDFT_LORA_ALPHA=str(ALPHA), SDFT_LEARNING_RATE="1e-2",
                  SDFT_MAX_TRAIN_STEPS="10", SDFT_CHECKPOINT_EVERY_STEPS="1000")


@pytest.fixture(scope="module")
def base_path(tmp_path_factory):
    return tiny_model_path(tmp_path_factory)


def _pipeline(base_path, weight_name=None, lora_dir=None):
    from diffusers import StableDiffusionPipeline

    pipeline = StableDiffusionPipeline.from_pretrained(base_path, safety_checker=None, use_safetensors=True)
    pipeline.set_progress_bar_config(disable=True)
    if lora_dir is not None:
        pipeline.load_lora_weights(lora_dir, weight_name=weight_name)
    return pipeline


def test_the_lora_output_file_set_is_the_contract(lora_run):
    assert lora_run.keys == contract_files("lora")


def test_kohya_file_gives_the_same_image_as_the_diffusers_file(lora_run, base_path):
    lora_dir = lora_run.out / "lora"
    base = _pipeline(base_path)
    diffusers_file = _pipeline(base_path, "pytorch_lora_weights.safetensors", lora_dir)
    kohya_file = _pipeline(base_path, "test-run.safetensors", lora_dir)

    base_image = render(base, INSTANCE_PROMPT, RESOLUTION)
    diffusers_image = render(diffusers_file, INSTANCE_PROMPT, RESOLUTION)
    kohya_image = render(kohya_file, INSTANCE_PROMPT, RESOLUTION)
    assert np.abs(kohya_image - diffusers_image).max() <= 1 / 255
    # The LoRA matters: an empty or unapplied file would also "match".
    assert np.abs(diffusers_image - base_image).max() > 4 / 255


def test_text_encoder_lora_is_saved_in_both_formats_and_changes_the_encoding(lora_run, base_path):
    lora_dir = lora_run.out / "lora"
    base = text_states(_pipeline(base_path))
    from_diffusers = text_states(_pipeline(base_path, "pytorch_lora_weights.safetensors", lora_dir))
    from_kohya = text_states(_pipeline(base_path, "test-run.safetensors", lora_dir))
    assert not torch.allclose(from_diffusers, base, atol=1e-4)
    torch.testing.assert_close(from_kohya, from_diffusers, atol=1e-5, rtol=1e-4)


def test_diffusers_converts_every_kohya_key(lora_run):
    from diffusers import StableDiffusionPipeline

    state_dict, alphas = StableDiffusionPipeline.lora_state_dict(lora_run.out / "lora", weight_name="test-run.safetensors")
    assert state_dict and all(k.startswith(("unet.", "text_encoder.")) for k in state_dict)
    assert any(k.startswith("text_encoder.") for k in state_dict)
    with safe_open(lora_run.out / "lora" / "test-run.safetensors", "pt") as kohya:
        pairs = [k for k in kohya.keys() if k.endswith(".lora_down.weight")]
    assert len(state_dict) == 2 * len(pairs)  # every down/up pair came through, none dropped


def test_kohya_keys_and_header(lora_run):
    with safe_open(lora_run.out / "lora" / "test-run.safetensors", "pt") as kohya:
        keys = list(kohya.keys())
        metadata = kohya.metadata()
        alpha = kohya.get_tensor(next(k for k in keys if k.endswith(".alpha")))
    assert all(k.startswith(("lora_unet_", "lora_te_")) for k in keys)
    assert any(k.startswith("lora_te_text_model_encoder_layers_") for k in keys)
    assert {k.split(".", 1)[1] for k in keys} == {"lora_down.weight", "lora_up.weight", "alpha"}
    assert float(alpha) == ALPHA
    assert metadata["ss_network_dim"] == str(RANK)
    assert float(metadata["ss_network_alpha"]) == ALPHA
    assert metadata["ss_steps"] == "10"
    assert json.loads(metadata["ss_resolution"]) == [RESOLUTION, RESOLUTION]
    assert metadata["ss_sd_model_name"] == "builtin:tiny"
    assert metadata["sdft_instance_prompt"] == INSTANCE_PROMPT
    assert json.loads(metadata["ss_train_text_encoder"]) is True
    from job import __version__

    assert metadata["sdft_version"] == __version__
