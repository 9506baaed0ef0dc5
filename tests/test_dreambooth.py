"""DreamBooth through the real S3 server: it learns, `model/` is a pipeline people load, the text
encoder trains only when asked, and the output is exactly the contract's file set."""

import numpy as np
import pytest
import torch
from PIL import Image

from job.inputs import load_rgb
from jobrun import EXAMPLES
from models_util import (
    DREAMBOOTH_LEARN, INSTANCE_PROMPT, LEARN, contract_files, denoising_loss, render, s3_run, text_states, tiny_model_path,
)

pytestmark = pytest.mark.slow  # each test runs the job end to end

RESOLUTION = 32
INSTANCES = sorted(EXAMPLES.glob("*.png"))


@pytest.fixture(scope="module")
def frozen_text(s3_server, tmp_path_factory):
    """UNet only, with intermediate samples halfway (test_prior compares its prior run with this one)."""
    return s3_run("dreambooth", s3_server, tmp_path_factory, **DREAMBOOTH_LEARN)


@pytest.fixture(scope="module")
def with_text(s3_server, tmp_path_factory):
    return s3_run("dreambooth-text", s3_server, tmp_path_factory, SDFT_METHOD="dreambooth", SDFT_TRAIN_TEXT_ENCODER="true",
                  **{**LEARN, "SDFT_MAX_TRAIN_STEPS": "3"})


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    from diffusers import StableDiffusionPipeline

    pipeline = StableDiffusionPipeline.from_pretrained(tiny_model_path(tmp_path_factory), safety_checker=None)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def _load(run):
    from diffusers import StableDiffusionPipeline

    pipeline = StableDiffusionPipeline.from_pretrained(run.out / "model")  # a plain user's call
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def test_the_dreambooth_output_file_set_is_the_contract(frozen_text):
    assert frozen_text.keys == contract_files("dreambooth", sample_steps=[15])


def test_dreambooth_learns_the_instance_images(frozen_text, base):
    trained = _load(frozen_text)
    before = denoising_loss(base, INSTANCES, INSTANCE_PROMPT, RESOLUTION)
    after = denoising_loss(trained, INSTANCES, INSTANCE_PROMPT, RESOLUTION)
    assert after < 0.8 * before, (before, after)


def test_model_folder_loads_and_generates_a_different_image(frozen_text, base):
    trained = _load(frozen_text)
    image = render(trained, INSTANCE_PROMPT, RESOLUTION)
    assert image.shape == (RESOLUTION, RESOLUTION, 3) and np.isfinite(image).all()
    assert np.abs(image - render(base, INSTANCE_PROMPT, RESOLUTION)).max() > 4 / 255
    assert not list((frozen_text.out / "model").rglob("*.bin"))  # safetensors only


def test_without_text_encoder_training_the_text_encoder_is_bit_identical(frozen_text, base):
    trained = _load(frozen_text).text_encoder.state_dict()
    original = base.text_encoder.state_dict()
    assert trained.keys() == original.keys()
    assert all(torch.equal(trained[k], original[k]) for k in original)


def test_text_encoder_training_changes_the_instance_prompt_encoding(with_text, base):
    trained = _load(with_text)
    assert not torch.allclose(text_states(trained), text_states(base), atol=1e-4)


def test_grid_shows_instance_images_above_the_samples(frozen_text):
    grid = Image.open(frozen_text.out / "samples" / "grid.png").convert("RGB")
    cell, label = 128, 16
    assert grid.size == (len(INSTANCES) * cell, 2 * (cell + label))  # instance row + one prompt row
    first = grid.crop((0, label, cell, label + cell))
    assert np.array_equal(np.asarray(first), np.asarray(load_rgb(INSTANCES[0]).resize((cell, cell))))
    sample = Image.open(frozen_text.out / "samples" / "final" / "0-0.png").convert("RGB").resize((cell, cell))
    below = grid.crop((0, 2 * label + cell, cell, 2 * (label + cell)))
    assert np.array_equal(np.asarray(below), np.asarray(sample))


def test_model_card_says_what_and_how_to_load(frozen_text, with_text):
    card = (frozen_text.out / "README.md").read_text()
    assert "base_model: builtin:tiny" in card and "DreamBooth" in card
    assert INSTANCE_PROMPT in card
    assert 'StableDiffusionPipeline.from_pretrained("./model"' in card
    assert "ComfyUI" in card and "AUTOMATIC1111" in card
    assert "![samples](samples/grid.png)" in card
    assert "text encoder" in (with_text.out / "README.md").read_text()
