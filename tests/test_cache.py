"""Cached latents and text embeddings change speed and memory, never results (issue 6).

Two real fine-tunes of builtin:tiny, cache on and off, with random flips (so the cache holds both
mirror variants), must log the same loss curve. An in-process run checks that caching really lets
the VAE and the frozen text encoder go, and that samples from the precomputed prompt embeddings
are those the text encoder would give.
"""

from __future__ import annotations

import gc
import json
import weakref
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from jobrun import EXAMPLES, job_env, run_job

pytestmark = pytest.mark.slow  # each test runs the job end to end

STEPS = 6
FLIP = {"SDFT_RANDOM_FLIP": "true", "SDFT_MAX_TRAIN_STEPS": str(STEPS), "SDFT_LEARNING_RATE": "1e-3",
        "SDFT_NUM_VALIDATION_IMAGES": "0", "SDFT_CHECKPOINT_EVERY_STEPS": "1000"}


def _losses(tmp: Path, cache: str) -> list[float]:
    env = job_env(tmp / "work", SDFT_INSTANCE_URI=str(EXAMPLES), SDFT_OUTPUT_URI=str(tmp / "out"),
                  SDFT_CACHE_LATENTS=cache, **FLIP)
    result = run_job(env)
    assert result.exit_code == 0, result.stderr[-2000:]
    released = result.named("train.cache_ready")
    assert bool(released) == (cache == "true")
    lines = (tmp / "out" / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line)["loss"] for line in lines]


@pytest.fixture(scope="module")
def curves(tmp_path_factory) -> dict[str, list[float]]:
    return {cache: _losses(tmp_path_factory.mktemp(f"cache-{cache}"), cache) for cache in ("true", "false")}


def test_cached_and_uncached_runs_give_the_same_loss_curve(curves):
    cached, uncached = curves["true"], curves["false"]
    assert len(cached) == len(uncached) == STEPS
    assert cached == pytest.approx(uncached, rel=1e-4, abs=1e-6)
    assert len(set(cached)) > 1  # the steps really differ (a constant curve would prove nothing)


# In process: the parts themselves, not the logs about them.
@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from job.inputs import prepare_dataset
    from job.base_model import resolve_base_model

    work = tmp_path_factory.mktemp("tiny")
    return resolve_base_model("builtin:tiny", work), prepare_dataset(EXAMPLES, "a photo of sks dog")


def _train(tiny, cache: str):
    from job.settings import Settings
    from job.model_parts import load_models, make_accelerator
    from job.train import train

    base, dataset = tiny
    settings = Settings(base_model="builtin:tiny", instance_uri=str(EXAMPLES), instance_prompt="a photo of sks dog",
                        output_uri="/unused", resolution=32, max_train_steps=2, cache_latents=cache,
                        validation_prompts=["a photo of sks dog", "a dog on the beach"])
    accelerator = make_accelerator(settings)
    models = load_models(base.path, accelerator)
    encoders = weakref.ref(models.vae), weakref.ref(models.text_encoder)
    train(settings, models, accelerator, dataset)
    gc.collect()
    return settings, models, encoders


def test_cache_releases_the_vae_and_the_frozen_text_encoder(tiny):
    _, models, (vae, text_encoder) = _train(tiny, "true")
    assert models.vae is None and models.text_encoder is None
    assert vae() is None and text_encoder() is None  # no reference left anywhere: the memory is free
    assert set(models.prompt_embeds) == {"a photo of sks dog", "a dog on the beach", ""}

    _, models, (vae, text_encoder) = _train(tiny, "false")
    assert vae() is models.vae and text_encoder() is models.text_encoder


def test_samples_from_precomputed_embeddings_match_the_text_encoder(tiny, tmp_path):
    from job.sampling import render_samples, sample_pipeline

    settings, models, _ = _train(tiny, "true")
    settings = settings.model_copy(update={"num_validation_images": 1, "sample_inference_steps": 2})
    pipeline = sample_pipeline(models, models.unet, models.text_encoder)  # loads back VAE and text encoder
    assert pipeline.text_encoder is not None and pipeline.vae.encoder is not None  # complete, for export
    prompts = ["a dog on the beach"]
    embedded = render_samples(settings, pipeline, prompts, tmp_path / "embedded")
    pipeline.precomputed_prompt_embeds = {}
    encoded = render_samples(settings, pipeline, prompts, tmp_path / "encoded")
    a, b = (np.asarray(Image.open(paths[0]), dtype=np.int16) for paths in (embedded, encoded))
    assert np.abs(a - b).max() <= 1
