"""The spine, end to end through a real S3 server: images and base model in a bucket, LoRA out."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from safetensors.torch import load_file

from jobrun import EXAMPLES, job_env, run_job
from models_util import INSTANCE_PROMPT as PROMPT
from models_util import contract_files, denoising_loss, download_prefix, render, tiny_model_path, upload_folder

pytestmark = pytest.mark.slow  # each test runs the job end to end

LEARN = {"SDFT_LEARNING_RATE": "3e-3", "SDFT_MAX_TRAIN_STEPS": "100", "SDFT_CHECKPOINT_EVERY_STEPS": "50"}


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    return tiny_model_path(tmp_path_factory)


@pytest.fixture(scope="module")
def s3_run(s3_server, tiny_model, tmp_path_factory):
    """One real LoRA run: instance images and the base model both come from the bucket."""
    bucket = s3_server.create_bucket("spine")
    instance_uri = upload_folder(s3_server, bucket, EXAMPLES, "subjects/dog")
    model_uri = upload_folder(s3_server, bucket, tiny_model, "models/tiny")
    env = job_env(tmp_path_factory.mktemp("work"), SDFT_BASE_MODEL=model_uri, SDFT_INSTANCE_URI=instance_uri,
                  SDFT_OUTPUT_URI=f"s3://{bucket}/runs/dog/", **LEARN, **s3_server.env())
    result = run_job(env)
    assert result.exit_code == 0, result.stdout[-3000:] + result.stderr[-3000:]
    download = tmp_path_factory.mktemp("download")
    keys = download_prefix(s3_server, bucket, "runs/dog", download)
    return {"result": result, "keys": keys, "out": download, "bucket": bucket}


def test_the_exact_contract_file_set_lands_in_the_bucket(s3_run):
    assert s3_run["keys"] == contract_files("lora")  # checkpoints were removed after success


def test_run_record(s3_run):
    out = s3_run["out"]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["run_id"] == "test-run"
    assert manifest["steps"] == 100 and manifest["final_loss"] > 0
    assert manifest["base_model"]["reference"].startswith("s3://")
    assert sorted(i["path"] for i in manifest["inputs"]) == sorted(p.name for p in EXAMPLES.glob("*.png"))
    assert all(len(i["sha256"]) == 64 and i["caption"] == PROMPT for i in manifest["inputs"])
    assert {a["path"] for a in manifest["artifacts"]} >= {"lora/pytorch_lora_weights.safetensors", "samples/grid.png"}
    assert set(manifest["versions"]) >= {"python", "torch", "diffusers", "transformers", "accelerate", "peft", "sdft"}
    status = json.loads((out / "status.json").read_text())
    assert status["state"] == "succeeded" and status["exit_code"] == 0 and status["step"] == 100
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == list(range(1, 101))
    assert all({"loss", "lr", "seconds"} <= set(m) for m in metrics)
    events = [e["event"] for e in s3_run["result"].events]
    assert events[0] == "job.start" and events[-1] == "job.done"
    assert {"stage.start", "stage.done", "train.step", "checkpoint.saved"} <= set(events)
    assert all(e.get("run_id") == "test-run" for e in s3_run["result"].events)


def test_diffusers_loads_the_lora_and_it_changes_the_image(s3_run, tiny_model):
    from diffusers import StableDiffusionPipeline

    pipeline = StableDiffusionPipeline.from_pretrained(tiny_model, safety_checker=None)
    pipeline.set_progress_bar_config(disable=True)
    before = render(pipeline, PROMPT, 32)
    pipeline.load_lora_weights(s3_run["out"] / "lora")
    after = render(pipeline, PROMPT, 32)
    assert np.abs(after - before).max() > 1 / 255


def test_training_lowers_the_denoising_loss(s3_run, tiny_model):
    from diffusers import StableDiffusionPipeline

    pipeline = StableDiffusionPipeline.from_pretrained(tiny_model, safety_checker=None)
    images = sorted(EXAMPLES.glob("*.png"))
    before = denoising_loss(pipeline, images, PROMPT, 32)
    pipeline.load_lora_weights(s3_run["out"] / "lora")
    after = denoising_loss(pipeline, images, PROMPT, 32)
    assert after < before * 0.95, (before, after)


def test_same_seed_gives_a_byte_identical_lora(s3_run, tmp_path):
    """A second run (local storage this time) with the same seed and settings: the same bytes."""
    out = tmp_path / "out"
    shutil.copytree(EXAMPLES, tmp_path / "dog")
    bucket = s3_run["bucket"]
    env = job_env(tmp_path / "work", SDFT_BASE_MODEL="builtin:tiny", SDFT_INSTANCE_URI=str(tmp_path / "dog"),
                  SDFT_OUTPUT_URI=str(out), **LEARN)
    first = run_job(env)
    assert first.exit_code == 0, first.stdout[-2000:]
    again = run_job({**env, "SDFT_OUTPUT_URI": str(tmp_path / "again")})
    assert again.exit_code == 0
    name = "lora/pytorch_lora_weights.safetensors"
    assert (out / name).read_bytes() == (tmp_path / "again" / name).read_bytes()
    # The base model from the bucket is the same builtin:tiny, so the S3 run trained the same weights.
    s3_weights, local_weights = load_file(s3_run["out"] / name), load_file(out / name)
    assert s3_weights.keys() == local_weights.keys() and bucket
    assert all(np.array_equal(s3_weights[k].numpy(), local_weights[k].numpy()) for k in s3_weights)


def test_empty_input_prefix_exits_3(s3_server, tmp_path):
    bucket = s3_server.create_bucket("empty-input")
    result = run_job(job_env(tmp_path, SDFT_INSTANCE_URI=f"s3://{bucket}/nothing-here/",
                             SDFT_OUTPUT_URI=f"s3://{bucket}/out/", **s3_server.env()))
    assert result.exit_code == 3
    assert "nothing-here" in result.failure["reason"]


def test_wrong_credentials_are_a_clear_error(s3_server, tmp_path):
    env = {**s3_server.env(), "AWS_SECRET_ACCESS_KEY": "definitely-not-the-secret"}
    result = run_job(job_env(tmp_path, SDFT_INSTANCE_URI="s3://spine/subjects/dog/", SDFT_OUTPUT_URI="s3://spine/x/", **env))
    assert result.exit_code == 2
    reason = result.failure["reason"]
    assert "AWS_SECRET_ACCESS_KEY" in reason and "definitely-not-the-secret" not in result.stdout + result.stderr
    assert "Traceback" not in result.stdout + result.stderr
