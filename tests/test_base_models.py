"""Base model references beyond builtin:tiny: a Hub id (from a pre-filled HF_HOME cache, offline) and
single files, which must be safetensors."""

import pytest
import shutil

from jobrun import EXAMPLES, job_env, run_job
from models_util import tiny_model_path

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def _fill_hub_cache(hf_home, model_dir, repo_id: str) -> None:
    """Lays out `model_dir` as the Hub cache does for `repo_id` at `main` (what a download leaves)."""
    repo = hf_home / "hub" / ("models--" + repo_id.replace("/", "--"))
    shutil.copytree(model_dir, repo / "snapshots" / COMMIT, ignore=shutil.ignore_patterns(".*"))
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(COMMIT)


@pytest.mark.slow
def test_a_hub_id_resolves_from_the_hf_home_cache_offline(tmp_path, tmp_path_factory):
    _fill_hub_cache(tmp_path / "hf", tiny_model_path(tmp_path_factory), "sdft-tests/tiny-sd")
    result = run_job(job_env(tmp_path / "work", SDFT_BASE_MODEL="sdft-tests/tiny-sd", SDFT_INSTANCE_URI=str(EXAMPLES),
                             SDFT_OUTPUT_URI=str(tmp_path / "out"), SDFT_MAX_TRAIN_STEPS="2", HF_HOME=str(tmp_path / "hf")))
    assert result.exit_code == 0, result.stdout[-3000:] + result.stderr[-3000:]
    import json

    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["base_model"] == {"reference": "sdft-tests/tiny-sd", "revision": COMMIT, "family": "sd1",
                                      "prediction_type": "epsilon", "format": "diffusers"}


@pytest.mark.slow
def test_an_unknown_hub_id_offline_is_not_a_bug(tmp_path):
    result = run_job(job_env(tmp_path / "work", SDFT_BASE_MODEL="sdft-tests/not-there", SDFT_INSTANCE_URI=str(EXAMPLES),
                             SDFT_OUTPUT_URI=str(tmp_path / "out"), HF_HOME=str(tmp_path / "hf")), "check")
    assert result.exit_code in (4, 75), result.stdout[-2000:]  # offline: not found in the cache, or unreachable
    assert "sdft-tests/not-there" in result.failure["reason"]


@pytest.mark.slow
def test_a_pickle_single_file_checkpoint_is_refused_with_4(tmp_path):
    checkpoint = tmp_path / "model.ckpt"
    checkpoint.write_bytes(b"not even opened")
    result = run_job(job_env(tmp_path / "work", SDFT_BASE_MODEL=str(checkpoint), SDFT_INSTANCE_URI=str(EXAMPLES),
                             SDFT_OUTPUT_URI=str(tmp_path / "out")), "check")
    assert result.exit_code == 4
    assert ".safetensors only" in result.failure["reason"]


@pytest.mark.slow
def test_a_safetensors_file_that_is_not_stable_diffusion_is_refused_with_4(tmp_path):
    import torch
    from safetensors.torch import save_file

    checkpoint = tmp_path / "weights.safetensors"
    save_file({"linear.weight": torch.zeros(2, 2)}, str(checkpoint))
    result = run_job(job_env(tmp_path / "work", SDFT_BASE_MODEL=str(checkpoint), SDFT_INSTANCE_URI=str(EXAMPLES),
                             SDFT_OUTPUT_URI=str(tmp_path / "out")), "check")
    assert result.exit_code == 4, result.stdout[-2000:]
    assert "weights.safetensors" in result.failure["reason"]
    assert "not Stable Diffusion" in result.failure["reason"] and "this file holds 1 tensor (linear.weight)" in result.failure["reason"]


@pytest.mark.slow
def test_a_junk_safetensors_file_is_exit_4_could_not_be_read(tmp_path):
    checkpoint = tmp_path / "download.safetensors"
    checkpoint.write_bytes(b"<html>rate limited</html>")  # what a failed download often leaves
    result = run_job(job_env(tmp_path / "work", SDFT_BASE_MODEL=str(checkpoint), SDFT_INSTANCE_URI=str(EXAMPLES),
                             SDFT_OUTPUT_URI=str(tmp_path / "out")), "check")
    assert result.exit_code == 4, result.stdout[-2000:]
    assert "could not be read" in result.failure["reason"] and "this file holds" not in result.failure["reason"]


def test_every_pickle_refusal_says_safetensors_only_in_process(tmp_path):
    import pytest

    from job.base_model import resolve_base_model
    from job.errors import ModelError

    single = tmp_path / "model.ckpt"
    single.write_bytes(b"not even opened")
    folder = tmp_path / "pickled"
    for component in ("unet", "vae", "text_encoder"):
        (folder / component).mkdir(parents=True)
        (folder / component / "diffusion_pytorch_model.bin").write_bytes(b"pickle")
    (folder / "model_index.json").write_text("{}")
    for reference, found in ((single, "is a .ckpt file"), (folder, "only pickle weights in unet/")):
        with pytest.raises(ModelError) as refused:
            resolve_base_model(str(reference), tmp_path / "cache")
        assert refused.value.exit_code == 4
        assert found in str(refused.value) and ".safetensors only" in str(refused.value)
