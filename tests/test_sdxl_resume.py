"""SDXL resume and caching (issue 11): a run stopped by SIGTERM and run again ends with the LoRA of the
uninterrupted run, and cached latents and embeddings (pooled ones included) give the uncached loss curve."""

from __future__ import annotations

import json
import uuid

import pytest

from jobrun import EXAMPLES, job_env, run_job
from test_resume import _lora, _max_abs_diff, _sigterm_after_first_step, _upload_instance

pytestmark = pytest.mark.slow  # each test runs the job end to end

STEPS = 6
SDXL = {"SDFT_BASE_MODEL": "builtin:tiny-sdxl", "SDFT_RESOLUTION": "64", "SDFT_MAX_TRAIN_STEPS": str(STEPS),
        "SDFT_NUM_VALIDATION_IMAGES": "0", "SDFT_CHECKPOINT_EVERY_STEPS": "1000", "SDFT_LEARNING_RATE": "1e-3"}


def _run(s3_server, tmp_path_factory, name: str, signal_first: bool, **extra: str):
    client, bucket = s3_server.client(), s3_server.create_bucket(f"sdxl-{name}-{uuid.uuid4().hex[:8]}")
    _upload_instance(client, bucket)
    env = job_env(tmp_path_factory.mktemp(name), SDFT_INSTANCE_URI=f"s3://{bucket}/instance/",
                  SDFT_OUTPUT_URI=f"s3://{bucket}/out/", **SDXL, **extra, **s3_server.env())
    stopped = _sigterm_after_first_step(env)[0] if signal_first else None
    result = run_job(env)
    assert result.exit_code == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return {"stopped": stopped, "result": result, "lora": _lora(client, bucket)}


def test_sdxl_resume_after_sigterm_equals_the_uninterrupted_run(s3_server, tmp_path_factory):
    # The text encoders train too, so their adapters and optimizer state must travel in the checkpoint.
    uninterrupted = _run(s3_server, tmp_path_factory, "whole", False, SDFT_TRAIN_TEXT_ENCODER="true")
    interrupted = _run(s3_server, tmp_path_factory, "stopped", True, SDFT_TRAIN_TEXT_ENCODER="true")
    stopped = interrupted["stopped"]
    assert stopped.exit_code == 143, stopped.stdout[-3000:] + stopped.stderr[-3000:]
    [saved] = stopped.named("checkpoint.saved")
    assert 1 <= saved["step"] < STEPS, "the signal must land mid-training"
    resumed = interrupted["result"]
    assert [e["step"] for e in resumed.named("checkpoint.resumed")] == [saved["step"]]
    assert [e["step"] for e in resumed.named("train.step")] == list(range(saved["step"] + 1, STEPS + 1))
    assert any(key.startswith("text_encoder_2.") for key in interrupted["lora"])
    assert _max_abs_diff(interrupted["lora"], uninterrupted["lora"]) <= 1e-6


def _losses(tmp_path, cache: str) -> list[float]:
    env = job_env(tmp_path / "work", SDFT_INSTANCE_URI=str(EXAMPLES), SDFT_OUTPUT_URI=str(tmp_path / "out"),
                  SDFT_CACHE_LATENTS=cache, SDFT_RANDOM_FLIP="true", **SDXL)
    result = run_job(env)
    assert result.exit_code == 0, result.stderr[-2000:]
    if cache == "true":
        [ready] = result.named("train.cache_ready")
        assert ready["released"] == ["vae", "text_encoder", "text_encoder_2"]
    return [json.loads(line)["loss"] for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]


def test_cached_and_uncached_sdxl_runs_give_the_same_loss_curve(tmp_path_factory):
    cached = _losses(tmp_path_factory.mktemp("sdxl-cached"), "true")
    uncached = _losses(tmp_path_factory.mktemp("sdxl-uncached"), "false")
    assert len(cached) == len(uncached) == STEPS
    assert cached == pytest.approx(uncached, rel=1e-4, abs=1e-6)
    assert len(set(cached)) > 1
