"""SDXL LoRA end to end through the real S3 server, on builtin:tiny-sdxl read from the bucket (issue 11).

One LoRA run with both text encoders trained and alpha ≠ rank: the contract's file set, the manifest's
family, diffusers' SDXL pipeline loads both files to the same image, both encoders' kohya keys exist
and change their encoder, and the denoising loss at fixed timesteps and noise falls.
"""

import json
import uuid

import numpy as np
import pytest
import torch
from safetensors import safe_open

from jobrun import EXAMPLES
from models_util import (
    INSTANCE_PROMPT, contract_files, render, s3_run, sdxl_denoising_loss, tiny_model_path, upload_folder,
)

pytestmark = pytest.mark.slow  # each test runs the job end to end

RESOLUTION = 64
RANK, ALPHA = 4, 8
# Settings under which tiny-sdxl measurably learns in a few CPU seconds at 64 px.
SDXL = {"SDFT_RESOLUTION": str(RESOLUTION), "SDFT_SAMPLE_INFERENCE_STEPS": "2", "SDFT_CHECKPOINT_EVERY_STEPS": "1000"}


@pytest.fixture(scope="module")
def base_path(tmp_path_factory):
    return tiny_model_path(tmp_path_factory, "tiny-sdxl")


@pytest.fixture(scope="module")
def model_uri(s3_server, base_path):
    """builtin:tiny-sdxl as a diffusers folder in a bucket, the way a user keeps a base model."""
    s3_server.start()
    bucket = s3_server.create_bucket(f"models-{uuid.uuid4().hex[:8]}")
    return upload_folder(s3_server, bucket, base_path, "base/tiny-sdxl")


@pytest.fixture(scope="module")
def lora_run(s3_server, tmp_path_factory, model_uri):
    return s3_run("sdxl-lora", s3_server, tmp_path_factory, **SDXL, SDFT_BASE_MODEL=model_uri, SDFT_METHOD="lora",
                  SDFT_TRAIN_TEXT_ENCODER="true", SDFT_LORA_RANK=str(RANK), SDFT_LORA_ALPHA=str(ALPHA),
                  SDFT_LEARNING_RATE="1e-2", SDFT_MAX_TRAIN_STEPS="30")


def _pipeline(base_path, weight_name=None, lora_dir=None):
    from diffusers import StableDiffusionXLPipeline

    pipeline = StableDiffusionXLPipeline.from_pretrained(base_path, use_safetensors=True)
    pipeline.set_progress_bar_config(disable=True)
    if lora_dir is not None:
        pipeline.load_lora_weights(lora_dir, weight_name=weight_name)
    return pipeline


def _encoder_states(pipeline, name: str) -> torch.Tensor:
    """What one of the two text encoders makes of the instance prompt (penultimate hidden states)."""
    tokenizer = pipeline.tokenizer if name == "text_encoder" else pipeline.tokenizer_2
    tokens = tokenizer([INSTANCE_PROMPT], padding="max_length", max_length=tokenizer.model_max_length,
                       return_tensors="pt").input_ids
    with torch.no_grad():
        return getattr(pipeline, name)(tokens, output_hidden_states=True).hidden_states[-2]


def test_the_output_is_the_contracts_file_set_and_the_manifest_says_sdxl(lora_run):
    assert lora_run.keys == contract_files("lora")
    manifest = json.loads((lora_run.out / "manifest.json").read_text())
    assert manifest["base_model"]["reference"].startswith("s3://")
    assert manifest["base_model"]["family"] == "sdxl"
    assert manifest["base_model"]["prediction_type"] == "epsilon"
    assert manifest["settings"]["resolution"] == RESOLUTION
    card = (lora_run.out / "README.md").read_text()
    assert "StableDiffusionXLPipeline" in card and "InvokeAI" in card


def test_the_lora_changes_a_fixed_seed_image_and_the_kohya_file_gives_the_same_one(lora_run, base_path):
    lora_dir = lora_run.out / "lora"
    base_image = render(_pipeline(base_path), INSTANCE_PROMPT, RESOLUTION)
    diffusers_image = render(_pipeline(base_path, "pytorch_lora_weights.safetensors", lora_dir), INSTANCE_PROMPT, RESOLUTION)
    kohya_image = render(_pipeline(base_path, "test-run.safetensors", lora_dir), INSTANCE_PROMPT, RESOLUTION)
    assert np.abs(diffusers_image - base_image).max() > 4 / 255
    assert np.abs(kohya_image - diffusers_image).max() <= 1 / 255


def test_both_text_encoders_have_kohya_keys_that_change_their_output(lora_run, base_path):
    path = lora_run.out / "lora" / "test-run.safetensors"
    with safe_open(path, "pt") as kohya:
        keys = list(kohya.keys())
        alphas = {float(kohya.get_tensor(k)) for k in keys if k.endswith(".alpha")}
    assert {k.split("_text_model_")[0] for k in keys if "_text_model_" in k} == {"lora_te1", "lora_te2"}
    assert all(k.startswith(("lora_unet_", "lora_te1_text_model_encoder_layers_", "lora_te2_text_model_encoder_layers_"))
               for k in keys)
    assert {k.split(".", 1)[1] for k in keys} == {"lora_down.weight", "lora_up.weight", "alpha"}
    assert alphas == {ALPHA}

    base = _pipeline(base_path)
    from_kohya = _pipeline(base_path, "test-run.safetensors", lora_run.out / "lora")
    from_diffusers = _pipeline(base_path, "pytorch_lora_weights.safetensors", lora_run.out / "lora")
    for name in ("text_encoder", "text_encoder_2"):
        assert not torch.allclose(_encoder_states(from_kohya, name), _encoder_states(base, name), atol=1e-4), name
        torch.testing.assert_close(_encoder_states(from_kohya, name), _encoder_states(from_diffusers, name),
                                   atol=1e-5, rtol=1e-4)


def test_training_lowers_the_denoising_loss(lora_run, base_path):
    images = sorted(EXAMPLES.glob("*.png"))
    pipeline = _pipeline(base_path)
    before = sdxl_denoising_loss(pipeline, images, INSTANCE_PROMPT, RESOLUTION)
    pipeline.load_lora_weights(lora_run.out / "lora")
    after = sdxl_denoising_loss(pipeline, images, INSTANCE_PROMPT, RESOLUTION)
    assert after < before * 0.95, (before, after)


def test_the_kohya_header_names_sdxl_and_carries_what_a1111_shows(lora_run, model_uri):
    with safe_open(lora_run.out / "lora" / "test-run.safetensors", "pt") as kohya:
        metadata = kohya.metadata()
    assert metadata["ss_base_model_version"] == "sdxl_base_v1-0"
    assert metadata["ss_v2"] == "False" and metadata["ss_v_parameterization"] == "False"
    assert metadata["modelspec.architecture"] == "stable-diffusion-xl-v1-base/lora"
    assert metadata["modelspec.title"] == metadata["ss_output_name"] == "test-run"
    assert metadata["modelspec.trigger_phrase"] == INSTANCE_PROMPT
    assert metadata["ss_num_train_images"] == str(len(list(EXAMPLES.glob("*.png"))))
    assert json.loads(metadata["ss_tag_frequency"])["instance"]["sks"] == len(list(EXAMPLES.glob("*.png")))
    assert float(metadata["ss_training_started_at"]) > 1.6e9
    assert json.loads(metadata["ss_resolution"]) == [RESOLUTION, RESOLUTION]
    # The model's name, never where it was read from: the file gets shared.
    assert metadata["ss_sd_model_name"] == "tiny-sdxl"
    assert not any("s3://" in value or "/tmp" in value for value in metadata.values())
    # sd-scripts' model hash (what A1111 shows and matches on): sha256 of the tensor bytes after the header.
    import hashlib

    raw = (lora_run.out / "lora" / "test-run.safetensors").read_bytes()
    header_bytes = int.from_bytes(raw[:8], "little")
    assert metadata["sshs_model_hash"] == hashlib.sha256(raw[8 + header_bytes :]).hexdigest()
