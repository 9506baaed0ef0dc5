"""Two processes through `accelerate launch` (gloo DDP on CPU), the way entrypoint.sh starts them (issue 6).

A complete two-process LoRA fine-tune of builtin:tiny must leave one set of outputs written by one
process; a two-process run stopped by SIGTERM must leave a checkpoint that a single-process run
resumes from. The launch line is entrypoint.sh's: `--multi_gpu` selects accelerate's torchrun
launcher, which on a machine without CUDA runs gloo processes (`--cpu` would run one process only).
"""

from __future__ import annotations

import json
import signal
import sys
from pathlib import Path

import pytest

from jobrun import EXAMPLES, JobResult, WatchedJob, job_env, run_job
from s3server import free_ports

pytestmark = pytest.mark.slow  # each test runs the job end to end

STEPS = 6
EXIT_WAIT_S = 600


def _launch_command() -> list[str]:
    launcher = Path(sys.executable).parent / "accelerate"
    return [str(launcher), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
            "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(free_ports(1)[0]),
            "-m", "job"]


def _settings(tmp: Path, **extra: str) -> dict[str, str]:
    return job_env(tmp / "work", SDFT_INSTANCE_URI=str(EXAMPLES), SDFT_OUTPUT_URI=str(tmp / "out"), **extra)


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory) -> tuple[JobResult, Path]:
    tmp = tmp_path_factory.mktemp("ddp")
    job = WatchedJob(_settings(tmp, SDFT_MAX_TRAIN_STEPS=str(STEPS)), command=_launch_command())
    return job.finish(EXIT_WAIT_S), tmp / "out"


def test_two_processes_train_end_to_end_into_one_set_of_outputs(two_processes):
    result, out = two_processes
    assert result.exit_code == 0, result.stderr[-3000:]
    files = {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()}
    assert files == {
        "lora/pytorch_lora_weights.safetensors", "lora/test-run.safetensors", "samples/final/0-0.png",
        "samples/grid.png", "metrics.jsonl", "manifest.json", "README.md", "status.json", "_SUCCESS",
    }
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["steps"] == STEPS
    assert json.loads((out / "status.json").read_text())["state"] == "succeeded"


def test_only_the_main_process_logs_and_writes(two_processes):
    result, out = two_processes
    assert len(result.named("job.start")) == 1 and len(result.named("job.done")) == 1
    assert [e["step"] for e in result.named("train.step")] == list(range(1, STEPS + 1))
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines] == list(range(1, STEPS + 1))  # a second writer would repeat steps


def test_a_two_process_checkpoint_resumes_in_one_process(tmp_path):
    env = _settings(tmp_path, SDFT_MAX_TRAIN_STEPS="20", SDFT_CHECKPOINT_EVERY_STEPS="2", SDFT_NUM_VALIDATION_IMAGES="0")
    job = WatchedJob(env, command=_launch_command())
    # SIGTERM to the launcher alone, as tini delivers it: torchrun passes it on to both ranks.
    if job.wait_for("checkpoint.saved", EXIT_WAIT_S) and job.process.poll() is None:
        job.process.send_signal(signal.SIGTERM)
    stopped = job.finish(EXIT_WAIT_S)
    failure = stopped.failure
    assert failure is not None and failure["exit_code"] == 143, stopped.stderr[-3000:]
    stopped_at = int(failure["reason"].split(" at step ")[1].split("/")[0])
    assert stopped_at < 20

    resumed = run_job(env)
    assert resumed.exit_code == 0, resumed.stderr[-3000:]
    assert [e["step"] for e in resumed.named("checkpoint.resumed")] == [stopped_at]
    assert resumed.named("train.step")[0]["step"] == stopped_at + 1
    assert (tmp_path / "out" / "_SUCCESS").exists()


def test_resume_is_exact_with_accumulation_a_trained_text_encoder_and_two_processes(tmp_path):
    from safetensors.torch import load_file

    exact = {"SDFT_MAX_TRAIN_STEPS": "12", "SDFT_GRADIENT_ACCUMULATION_STEPS": "2", "SDFT_TRAIN_TEXT_ENCODER": "true",
             "SDFT_CHECKPOINT_EVERY_STEPS": "1000", "SDFT_NUM_VALIDATION_IMAGES": "0", "SDFT_LEARNING_RATE": "1e-3"}
    whole = WatchedJob(_settings(tmp_path / "whole", **exact), command=_launch_command()).finish(EXIT_WAIT_S)
    assert whole.exit_code == 0, whole.stderr[-3000:]

    env = _settings(tmp_path / "parts", **exact)
    job = WatchedJob(env, command=_launch_command())
    if job.wait_for("train.step", EXIT_WAIT_S) and job.process.poll() is None:
        job.process.send_signal(signal.SIGTERM)
    stopped = job.finish(EXIT_WAIT_S)
    assert stopped.failure is not None and stopped.failure["exit_code"] == 143, stopped.stderr[-3000:]
    resumed = WatchedJob(env, command=_launch_command()).finish(EXIT_WAIT_S)
    assert resumed.exit_code == 0, resumed.stderr[-3000:]
    [event] = resumed.named("checkpoint.resumed")
    assert 1 <= event["step"] < 12

    weights = [load_file(tmp_path / run / "out" / "lora" / "pytorch_lora_weights.safetensors") for run in ("whole", "parts")]
    assert weights[0].keys() == weights[1].keys()
    assert any(key.startswith("text_encoder") for key in weights[0])  # the text encoder was trained
    worst = max((weights[0][k].float() - weights[1][k].float()).abs().max().item() for k in weights[0])
    assert worst <= 1e-6, worst
