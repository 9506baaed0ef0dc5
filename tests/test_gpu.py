"""CUDA-only checks (marked `gpu`, skipped without CUDA): what a CPU run cannot show.

`benchmarks/gpu.sh` runs this file first in a GPU session. Each test is a real `python -m job`
fine-tune of builtin:tiny (sd15-shape for the out-of-memory case) with local input and output
folders, so nothing here needs the S3 server or the network.
"""

from __future__ import annotations

import json
import math
import os
import signal
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from jobrun import EXAMPLES, WatchedJob, job_env, run_job
from models_util import INSTANCE_PROMPT, denoising_loss, render, tiny_model_path

pytestmark = pytest.mark.gpu  # conftest skips these without CUDA

LORA = Path("lora/pytorch_lora_weights.safetensors")
# builtin:tiny learns measurably in these steps at this rate (as in the CPU tests), at 32 px.
LEARN = {"SDFT_LEARNING_RATE": "3e-3", "SDFT_MAX_TRAIN_STEPS": "100", "SDFT_CHECKPOINT_EVERY_STEPS": "1000"}
# Resume vs uninterrupted in bf16: cuDNN's convolution backward may sum in a different order from
# run to run, so two bf16 runs need not match bit for bit (the CPU test demands 1e-6). The trained
# half of each LoRA pair (lora_B / lora.up, zero at the start, so all of it is training) must agree
# to within 2% of its norm: a resume that redid, skipped or reordered a step, or lost the optimizer
# state, is off by far more (each step moves these weights by ~lr, i.e. 1/STEPS of their norm or more).
RESUME_RELATIVE_TOLERANCE = 0.02
RESUME_STEPS = 60


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    return tiny_model_path(tmp_path_factory)


def _run(tmp_path: Path, **settings: str):
    out = tmp_path / "out"
    env = job_env(tmp_path / "work", **{"SDFT_INSTANCE_URI": str(EXAMPLES), "SDFT_OUTPUT_URI": str(out), **settings})
    return run_job(env, timeout_s=600), out


def _detail(result) -> str:
    return result.stdout[-3000:] + result.stderr[-3000:]


def _assert_learned(out: Path, tiny_model: Path) -> None:
    """diffusers loads the LoRA, it changes the image, and it lowers the denoising loss (CPU, fp32)."""
    from diffusers import StableDiffusionPipeline

    pipeline = StableDiffusionPipeline.from_pretrained(tiny_model, safety_checker=None)
    pipeline.set_progress_bar_config(disable=True)
    images = sorted(EXAMPLES.glob("*.png"))
    before_image, before_loss = render(pipeline, INSTANCE_PROMPT, 32), denoising_loss(pipeline, images, INSTANCE_PROMPT, 32)
    pipeline.load_lora_weights(out / "lora")
    after_image, after_loss = render(pipeline, INSTANCE_PROMPT, 32), denoising_loss(pipeline, images, INSTANCE_PROMPT, 32)
    assert np.abs(after_image - before_image).max() > 1 / 255
    assert after_loss < before_loss * 0.95, (before_loss, after_loss)


def _setup_event(result) -> dict:
    [setup] = result.named("train.setup")
    return setup


def test_bf16_lora_end_to_end(tmp_path, tiny_model):
    result, out = _run(tmp_path, SDFT_MIXED_PRECISION="bf16", **LEARN)
    assert result.exit_code == 0, _detail(result)
    setup = _setup_event(result)
    assert setup["device"].startswith("cuda") and setup["mixed_precision"] == "bf16" and not setup["grad_scaler"]
    assert (out / "_SUCCESS").exists() and (out / LORA).exists()
    [memory] = result.named("train.memory")
    assert memory["peak_cuda_mb"] > 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["settings"]["mixed_precision"] == "bf16" and math.isfinite(manifest["final_loss"])
    _assert_learned(out, tiny_model)


def test_uncached_latents_train_on_the_gpu(tmp_path):
    # The VAE runs every step (a random crop cannot be cached); its latents stay on the device.
    result, out = _run(tmp_path, SDFT_MIXED_PRECISION="bf16", SDFT_CENTER_CROP="false", SDFT_CACHE_LATENTS="false",
                       SDFT_MAX_TRAIN_STEPS="12")
    assert result.exit_code == 0, _detail(result)
    assert math.isfinite(json.loads((out / "manifest.json").read_text())["final_loss"])


def test_fp16_trains_through_the_grad_scaler(tmp_path, tiny_model):
    result, out = _run(tmp_path, SDFT_MIXED_PRECISION="fp16", **LEARN)
    assert result.exit_code == 0, _detail(result)
    setup = _setup_event(result)
    assert setup["mixed_precision"] == "fp16" and setup["grad_scaler"]
    # Trainable weights stay fp32 under the scaler (fp16 Adam updates underflow); the export is fp32 too.
    assert all(t.dtype == torch.float32 for t in load_file(out / LORA).values())
    _assert_learned(out, tiny_model)


def test_8bit_adamw(tmp_path, tiny_model):
    pytest.importorskip("bitsandbytes", reason="bitsandbytes is in the image (docker/requirements.lock); "
                        "a GPU session must carry it (benchmarks/README.md)")
    result, out = _run(tmp_path, SDFT_MIXED_PRECISION="bf16", SDFT_USE_8BIT_ADAM="true", **LEARN)
    assert result.exit_code == 0, _detail(result)
    assert _setup_event(result)["optimizer"] == "AdamW8bit"
    _assert_learned(out, tiny_model)


def _trained_half(lora: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    trained = {k: v.float() for k, v in lora.items() if "lora_B" in k or "lora.up" in k or "lora_up" in k}
    assert trained, sorted(lora)[:5]
    return trained


def test_resume_equals_uninterrupted_within_bf16_tolerance(tmp_path):
    # Intermediate samples every 20 steps make a pause (pipeline load + render) in which SIGTERM,
    # sent at the first step, lands before the run could finish on a fast GPU.
    settings = {"SDFT_MIXED_PRECISION": "bf16", "SDFT_MAX_TRAIN_STEPS": str(RESUME_STEPS),
                "SDFT_CHECKPOINT_EVERY_STEPS": "1000", "SDFT_VALIDATION_EVERY_STEPS": "20"}
    straight, straight_out = _run(tmp_path / "straight", **settings)
    assert straight.exit_code == 0, _detail(straight)

    out = tmp_path / "resumed" / "out"
    env = job_env(tmp_path / "resumed" / "work", SDFT_INSTANCE_URI=str(EXAMPLES), SDFT_OUTPUT_URI=str(out), **settings)
    job = WatchedJob(env)
    assert job.wait_for("train.step", 300), job.output_tail
    job.process.send_signal(signal.SIGTERM)
    stopped = job.finish(300)
    assert stopped.exit_code == 143, _detail(stopped)
    [saved] = stopped.named("checkpoint.saved")
    assert saved["step"] < RESUME_STEPS
    resumed = run_job(env, timeout_s=600)
    assert resumed.exit_code == 0, _detail(resumed)
    assert [e["step"] for e in resumed.named("checkpoint.resumed")] == [saved["step"]]

    a, b = _trained_half(load_file(straight_out / LORA)), _trained_half(load_file(out / LORA))
    assert a.keys() == b.keys()
    for key in a:
        norm = float(a[key].norm())
        assert norm > 0, f"{key} never trained"
        assert float((a[key] - b[key]).norm()) <= RESUME_RELATIVE_TOLERANCE * norm, key


def _sd15_shape() -> Path:
    """SD 1.5's architecture: gpu.sh builds it beside the tests and names the folder; else built here."""
    folder = os.environ.get("GPU_TEST_SD15_SHAPE_DIR")
    if folder:
        deadline = time.monotonic() + 400
        while not (Path(folder) / ".complete").exists():
            assert time.monotonic() < deadline, f"{folder} was not built in time"
            time.sleep(1)
        return Path(folder)
    from job.base_model import resolve_base_model

    return resolve_base_model("builtin:sd15-shape", Path(os.environ.get("TMPDIR", "/tmp")) / "sdft-gpu-test-models").path


def test_an_impossible_batch_size_exits_5_with_the_hint(tmp_path):
    # SD 1.5 at 1024 px needs gigabytes of activations per image: 64 of them fit on no GPU. 64
    # distinct square images (one bucket), so that the batch really holds 64.
    from PIL import Image

    images = tmp_path / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    for index in range(64):
        Image.fromarray(rng.integers(0, 256, (128, 128, 3), dtype=np.uint8)).save(images / f"{index:02d}.png")
    result, out = _run(tmp_path, SDFT_BASE_MODEL=str(_sd15_shape()), SDFT_RESOLUTION="1024", SDFT_INSTANCE_URI=str(images),
                       SDFT_TRAIN_BATCH_SIZE="64", SDFT_MIXED_PRECISION="bf16", SDFT_MAX_TRAIN_STEPS="2")
    assert result.exit_code == 5, _detail(result)
    reason = result.failure["reason"]
    assert "out of GPU memory" in reason and "SDFT_TRAIN_BATCH_SIZE" in reason, reason
    assert "Traceback" not in result.stdout + result.stderr
    status = json.loads((out / "status.json").read_text())
    assert status["state"] == "failed" and status["exit_code"] == 5
    assert not (out / "_SUCCESS").exists()


def test_on_cuda_auto_precision_is_half_and_a_tiny_run_trains_on_the_gpu(tmp_path):
    from job.base_model import resolve_base_model
    from job.inputs import prepare_dataset
    from job.settings import Settings
    from job.model_parts import load_models, make_accelerator, mixed_precision
    from job.train import train

    settings = Settings(base_model="builtin:tiny", instance_uri=str(EXAMPLES), instance_prompt="a photo of sks dog",
                        output_uri=str(tmp_path / "out"), resolution=32, max_train_steps=3)
    assert mixed_precision("auto") == ("bf16" if torch.cuda.is_bf16_supported() else "fp16")
    accelerator = make_accelerator(settings)
    models = load_models(resolve_base_model("builtin:tiny", tmp_path / "models").path, accelerator)
    result = train(settings, models, accelerator, prepare_dataset(EXAMPLES, "a photo of sks dog"))
    assert result.steps == 3 and all(math.isfinite(loss) for loss in result.losses)
    assert models.unet.device.type == "cuda"
    # Trainable LoRA weights stay fp32 under half-precision autocast (Adam updates underflow in half).
    assert {p.dtype for p in models.unet.parameters() if p.requires_grad} == {torch.float32}
