"""SD 2.x through the real S3 server: a v-prediction base trains as one, and tools are told so (issue 11).

builtin:tiny-sd2 carries SD 2.x's traits (linear projections, `upcast_attention`, a v-prediction
scheduler); one LoRA run as the model says, and one with `SDFT_PREDICTION_TYPE=epsilon`.
"""

import json

import pytest
import torch
from safetensors import safe_open

from jobrun import EXAMPLES, job_env, run_job
from models_util import contract_files, s3_run, tiny_model_path

SD2 = {"SDFT_BASE_MODEL": "builtin:tiny-sd2", "SDFT_MAX_TRAIN_STEPS": "4", "SDFT_CHECKPOINT_EVERY_STEPS": "1000",
       "SDFT_SNR_GAMMA": "5"}


@pytest.fixture(scope="module")
def v_run(s3_server, tmp_path_factory):
    return s3_run("sd2-v", s3_server, tmp_path_factory, **SD2)


@pytest.fixture(scope="module")
def epsilon_run(s3_server, tmp_path_factory):
    return s3_run("sd2-epsilon", s3_server, tmp_path_factory, **SD2, SDFT_PREDICTION_TYPE="epsilon")


def _header(run) -> dict:
    with safe_open(run.out / "lora" / "test-run.safetensors", "pt") as kohya:
        return kohya.metadata()


@pytest.mark.slow
def test_a_v_prediction_base_trains_as_v_prediction_and_says_so(v_run):
    assert v_run.keys == contract_files("lora")
    manifest = json.loads((v_run.out / "manifest.json").read_text())
    assert manifest["base_model"]["family"] == "sd2"
    assert manifest["base_model"]["prediction_type"] == "v_prediction"
    header = _header(v_run)
    assert header["ss_v2"] == "True" and header["ss_v_parameterization"] == "True"
    assert header["ss_base_model_version"] == "sd_v2_v"
    assert header["modelspec.architecture"] == "stable-diffusion-v2-768-v/lora"


@pytest.mark.slow
def test_sdft_prediction_type_overrides_the_scheduler_config(epsilon_run, v_run):
    manifest = json.loads((epsilon_run.out / "manifest.json").read_text())
    assert manifest["base_model"]["prediction_type"] == "epsilon"
    header = _header(epsilon_run)
    assert header["ss_v2"] == "True" and header["ss_v_parameterization"] == "False"
    assert header["modelspec.architecture"] == "stable-diffusion-v2-512/lora"
    # Another target, another loss curve from the same batches and noise.
    losses = [[json.loads(line)["loss"] for line in (run.out / "metrics.jsonl").read_text().splitlines()]
              for run in (v_run, epsilon_run)]
    assert losses[0] != pytest.approx(losses[1], rel=1e-3)


def test_the_loaded_unet_keeps_sd2s_attention_upcast(tmp_path_factory):
    from job.settings import Settings
    from job.model_parts import load_models, make_accelerator

    settings = Settings(instance_uri=str(EXAMPLES), output_uri="/unused")
    models = load_models(tiny_model_path(tmp_path_factory, "tiny-sd2"), make_accelerator(settings))
    attention = [m for m in models.unet.modules() if type(m).__name__ == "Attention"]
    assert models.unet.config.upcast_attention is True
    assert attention and all(m.upcast_attention for m in attention)
    assert models.family.name == "sd2" and models.noise_scheduler.config.prediction_type == "v_prediction"


def test_min_snr_weighting_for_v_prediction_divides_by_snr_plus_one():
    from diffusers import DDPMScheduler
    from diffusers.training_utils import compute_snr

    from job.train import _min_snr_weights

    timesteps = torch.tensor([10, 500, 990])
    for prediction_type, denominator in (("v_prediction", 1.0), ("epsilon", 0.0)):
        scheduler = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                  prediction_type=prediction_type)
        snr = compute_snr(scheduler, timesteps)
        expected = torch.clamp(snr, max=5.0) / (snr + denominator)
        torch.testing.assert_close(_min_snr_weights(scheduler, timesteps, 5.0), expected)


@pytest.mark.slow
@pytest.mark.parametrize("model, extra, resolution", [
    ("builtin:tiny", {}, 512),
    ("builtin:tiny-sd2", {}, 768),
    ("builtin:tiny-sd2", {"SDFT_PREDICTION_TYPE": "epsilon"}, 512),
    ("builtin:tiny-sdxl", {}, 1024),
])
def test_check_reports_the_family_and_its_native_resolution(tmp_path, model, extra, resolution):
    result = run_job(job_env(tmp_path / "work", SDFT_BASE_MODEL=model, SDFT_RESOLUTION=None, SDFT_INSTANCE_URI=str(EXAMPLES),
                             SDFT_OUTPUT_URI=str(tmp_path / "out"), **extra), "check")
    assert result.exit_code == 0, result.stdout[-2000:]
    [ok] = result.named("check.ok")
    assert ok["resolution"] == resolution
    assert ok["family"] == {"builtin:tiny": "sd1", "builtin:tiny-sd2": "sd2", "builtin:tiny-sdxl": "sdxl"}[model]
