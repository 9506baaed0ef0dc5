"""Settings: every problem reported at once with exit code 2, before anything is downloaded."""

import json
import re
import subprocess
import sys

import pytest
import torch

from job.errors import ConfigError
from job.settings import load_settings
from jobrun import REPO, job_env


def _refusal(monkeypatch, **env: str | None) -> str:
    """The ConfigError (exit 2) that these variables get from `load_settings`, in process."""
    for name, value in env.items():
        if value is None:
            monkeypatch.delenv(name, raising=False)
        else:
            monkeypatch.setenv(name, value)
    with pytest.raises(ConfigError) as refused:
        load_settings()
    assert refused.value.exit_code == 2
    return str(refused.value)


def test_unknown_setting_is_named_and_exits_2_before_torch_is_imported(tmp_path):
    # The real edge: exit code, last event, nothing written, and no heavy library loaded on the way.
    probe = ("import sys, job.__main__ as edge; code = edge.main(['check']); "
             "heavy = sorted(m for m in ('torch', 'diffusers', 'transformers', 'accelerate', 'boto3', 'botocore') "
             "if m in sys.modules); print('HEAVY', heavy); sys.exit(code)")
    env = job_env(tmp_path, SDFT_INSTANCE_URI=str(tmp_path), SDFT_OUTPUT_URI=str(tmp_path / "out"), SDFT_FOO="1")
    result = subprocess.run([sys.executable, "-c", probe], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    failed = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    assert result.returncode == 2, result.stdout + result.stderr
    assert failed[-1]["event"] == "job.failed" and "SDFT_FOO" in failed[-1]["reason"]
    assert "HEAVY []" in result.stdout
    assert not (tmp_path / "out").exists(), "nothing may be written when the settings are invalid"


def test_every_bad_value_is_listed_at_once(monkeypatch, tmp_path):
    reason = _refusal(
        monkeypatch,
        SDFT_OUTPUT_URI=str(tmp_path / "out"),
        SDFT_RESOLUTION="100",
        SDFT_METHOD="textual-inversion",
        SDFT_LEARNING_RATE="-1",
        SDFT_RANDOM_FLIP="perhaps",
        SDFT_VALIDATION_PROMPTS="not json",
    )
    for name in ("SDFT_INSTANCE_URI", "SDFT_RESOLUTION", "SDFT_METHOD", "SDFT_LEARNING_RATE", "SDFT_RANDOM_FLIP", "SDFT_VALIDATION_PROMPTS"):
        assert name in reason, f"{name} missing from: {reason}"
    assert "multiple of 8" in reason


def test_unknown_variables_and_batch_keys_are_refused_with_the_rest(monkeypatch, tmp_path):
    monkeypatch.setenv("SDFT_LERNING_RATE", "1")
    with pytest.raises(ConfigError) as refused:
        load_settings({"instance_uri": "s3://b/in", "output_uri": "s3://b/out", "learning_rat": 1, "seed": -1})
    for fragment in ("SDFT_LERNING_RATE", "'learning_rat'", "SDFT_SEED"):
        assert fragment in str(refused.value)


def test_a_batch_line_overrides_the_environment(monkeypatch):
    monkeypatch.setenv("SDFT_INSTANCE_URI", "s3://b/env/")
    monkeypatch.setenv("SDFT_OUTPUT_URI", "s3://b/out/")
    monkeypatch.setenv("SDFT_SEED", "1")
    settings = load_settings({"instance_uri": "s3://b/line/", "seed": 7})
    assert (settings.instance_uri, settings.seed, settings.output_uri) == ("s3://b/line/", 7, "s3://b/out/")


def test_settings_command_prints_the_table_and_the_readme_has_it():
    table = subprocess.run([sys.executable, "-m", "job", "settings"], cwd=REPO, capture_output=True, text=True, check=True).stdout
    assert table.startswith("| variable | default | meaning |")
    for name in ("SDFT_METHOD", "SDFT_BASE_MODEL", "SDFT_INSTANCE_URI", "SDFT_OUTPUT_URI", "SDFT_LORA_RANK", "SDFT_BATCH_URI"):
        assert f"`{name}`" in table
    readme = (REPO / "README.md").read_text()
    block = re.search(r"<!-- settings-table:start -->\n(.*?)\n<!-- settings-table:end -->", readme, re.S)
    assert block, "README.md must hold the settings table between the settings-table markers"
    assert block.group(1).strip() == table.strip(), "README's settings table drifted: run `make settings-table`"


def test_contract_settings_all_exist():
    """Every variable of CONTRACT.md §2 is a real setting (so manifests and docs can rely on it)."""
    from job.settings import Settings, env_name

    names = {env_name(field) for field in Settings.model_fields}
    for name in (
        "SDFT_METHOD", "SDFT_BASE_MODEL", "SDFT_INSTANCE_URI", "SDFT_INSTANCE_PROMPT", "SDFT_OUTPUT_URI",
        "SDFT_CHECKPOINT_URI", "SDFT_WITH_PRIOR_PRESERVATION", "SDFT_CLASS_PROMPT", "SDFT_CLASS_URI",
        "SDFT_NUM_CLASS_IMAGES", "SDFT_PRIOR_LOSS_WEIGHT", "SDFT_RESOLUTION", "SDFT_CENTER_CROP",
        "SDFT_RANDOM_FLIP", "SDFT_TRAIN_BATCH_SIZE", "SDFT_GRADIENT_ACCUMULATION_STEPS", "SDFT_MAX_TRAIN_STEPS",
        "SDFT_LEARNING_RATE", "SDFT_LR_SCHEDULER", "SDFT_LR_WARMUP_STEPS", "SDFT_SEED", "SDFT_MIXED_PRECISION",
        "SDFT_GRADIENT_CHECKPOINTING", "SDFT_USE_8BIT_ADAM", "SDFT_TRAIN_TEXT_ENCODER", "SDFT_LORA_RANK",
        "SDFT_LORA_ALPHA", "SDFT_LORA_DROPOUT", "SDFT_SNR_GAMMA", "SDFT_NOISE_OFFSET", "SDFT_CACHE_LATENTS",
        "SDFT_CHECKPOINT_EVERY_STEPS", "SDFT_VALIDATION_PROMPTS", "SDFT_NUM_VALIDATION_IMAGES",
        "SDFT_VALIDATION_EVERY_STEPS", "SDFT_SAMPLE_INFERENCE_STEPS", "SDFT_SAMPLE_GUIDANCE_SCALE", "SDFT_RUN_ID",
        "SDFT_WORK_DIR", "SDFT_FORCE", "SDFT_BATCH_URI", "SDFT_LOG_FORMAT", "SDFT_LOG_LEVEL",
        "SDFT_NUM_PROCESSES", "SDFT_NUM_MACHINES", "SDFT_MACHINE_RANK", "SDFT_MAIN_PROCESS_IP",
        "SDFT_MAIN_PROCESS_PORT",
    ):
        assert name in names


def test_derived_defaults(monkeypatch):
    monkeypatch.setenv("SDFT_INSTANCE_URI", "s3://b/in/")
    monkeypatch.setenv("SDFT_OUTPUT_URI", "s3://b/out/")
    monkeypatch.setenv("SDFT_LORA_RANK", "8")
    lora = load_settings()
    assert lora.effective_learning_rate == 1e-4 and lora.effective_lora_alpha == 8
    assert lora.effective_checkpoint_uri == "s3://b/out/checkpoints"
    assert lora.effective_class_uri == "s3://b/out/class_images"
    monkeypatch.setenv("SDFT_METHOD", "dreambooth")
    assert load_settings().effective_learning_rate == 5e-6
    monkeypatch.setenv("SDFT_VALIDATION_PROMPTS", '["a", "b c"]')
    assert load_settings().validation_prompts == ["a", "b c"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_settings_this_machine_cannot_honour_are_refused_with_2(monkeypatch):
    """On a machine without CUDA: half precision and 8-bit Adam are refused (by `check`, and by
    `run` before any download)."""
    from job.model_parts import check_device_settings

    monkeypatch.setenv("SDFT_INSTANCE_URI", "s3://never-reached/in/")
    monkeypatch.setenv("SDFT_OUTPUT_URI", "s3://never-reached/out/")
    monkeypatch.setenv("SDFT_MIXED_PRECISION", "bf16")
    monkeypatch.setenv("SDFT_USE_8BIT_ADAM", "true")
    with pytest.raises(ConfigError) as refused:
        check_device_settings(load_settings())
    assert "SDFT_MIXED_PRECISION=bf16" in str(refused.value) and "SDFT_USE_8BIT_ADAM" in str(refused.value)


def test_cache_with_random_crop_is_refused(monkeypatch, tmp_path):
    reason = _refusal(monkeypatch, SDFT_INSTANCE_URI=str(tmp_path), SDFT_OUTPUT_URI=str(tmp_path / "o"),
                      SDFT_CACHE_LATENTS="true", SDFT_CENTER_CROP="false")
    assert "SDFT_CENTER_CROP=false" in reason
