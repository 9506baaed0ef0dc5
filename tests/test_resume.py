"""Preemption, resume and idempotency through the real S3 server (issue 4).

Three real fine-tunes of builtin:tiny share this module: an uninterrupted run, a run stopped by
SIGTERM and run again (which must resume and end with the same LoRA), and a forced re-run.
"""

from __future__ import annotations

import json
import signal
import time
import uuid

import pytest
from safetensors.torch import load

from jobrun import EXAMPLES, JobResult, WatchedJob, job_env, run_job

pytestmark = pytest.mark.slow  # each test runs the job end to end

LORA = "lora/pytorch_lora_weights.safetensors"
STEPS = 16
SIGNAL_WAIT_S = 600  # the job starts (imports, model) and reaches its first step within this
EXIT_WAIT_S = 600  # ...and after SIGTERM saves a checkpoint and exits within this


def _settings(bucket: str, **extra: str) -> dict[str, str]:
    return {"SDFT_INSTANCE_URI": f"s3://{bucket}/instance/", "SDFT_OUTPUT_URI": f"s3://{bucket}/out/",
            "SDFT_MAX_TRAIN_STEPS": str(STEPS), **extra}


def _upload_instance(client, bucket: str) -> None:
    for path in sorted(EXAMPLES.glob("*.png")):
        client.put_object(Bucket=bucket, Key=f"instance/{path.name}", Body=path.read_bytes())


def _keys(client, bucket: str, prefix: str = "") -> list[str]:
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
    return sorted(o["Key"] for page in pages for o in page.get("Contents", []))


def _get(client, bucket: str, key: str) -> bytes:
    return client.get_object(Bucket=bucket, Key=key)["Body"].read()


def _lora(client, bucket: str) -> dict:
    return load(_get(client, bucket, f"out/{LORA}"))


def _max_abs_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


def _sigterm_after_first_step(env: dict[str, str], event: str = "train.step") -> tuple[JobResult, float]:
    """Runs the job, sends SIGTERM as soon as it logs its first `event`, waits for the exit."""
    job = WatchedJob(env)
    if not job.wait_for(event, SIGNAL_WAIT_S):
        job.process.kill()
        pytest.fail(f"no {event} event before the job ended:\n" + job.finish(10).stdout[-3000:])
    job.process.send_signal(signal.SIGTERM)
    signalled = time.monotonic()
    result = job.finish(EXIT_WAIT_S)
    return result, time.monotonic() - signalled


@pytest.fixture(scope="module")
def uninterrupted(module_s3_env, s3_server, tmp_path_factory):
    """A run that is never stopped, checkpointing every 5 steps; the reference LoRA."""
    client, bucket = s3_server.client(), s3_server.create_bucket(f"resume-a-{uuid.uuid4().hex[:8]}")
    _upload_instance(client, bucket)
    work = tmp_path_factory.mktemp("uninterrupted")
    result = run_job(job_env(work, **_settings(bucket, SDFT_CHECKPOINT_EVERY_STEPS="5")))
    assert result.exit_code == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return {"bucket": bucket, "client": client, "result": result, "work": work, "lora": _lora(client, bucket)}


@pytest.fixture(scope="module")
def interrupted(module_s3_env, s3_server, tmp_path_factory):
    """A run stopped by SIGTERM mid-training, then the same command again with bad checkpoints planted."""
    client, bucket = s3_server.client(), s3_server.create_bucket(f"resume-b-{uuid.uuid4().hex[:8]}")
    _upload_instance(client, bucket)
    env = job_env(tmp_path_factory.mktemp("interrupted"), **_settings(bucket, SDFT_CHECKPOINT_EVERY_STEPS="1000"))
    stopped, stop_seconds = _sigterm_after_first_step(env)
    saved = stopped.named("checkpoint.saved")
    after_stop = _snapshot(client, bucket, saved[-1]["step"] if saved else None)
    planted = _plant_bad_checkpoints(client, bucket, saved[-1]["step"]) if saved else {}
    resumed = run_job(env)
    return {"bucket": bucket, "client": client, "stopped": stopped, "stop_seconds": stop_seconds,
            "after_stop": after_stop, "planted": planted, "resumed": resumed}


def _snapshot(client, bucket: str, step: int | None) -> dict:
    """What the bucket holds right after the stop: keys, status.json, the checkpoint's marker and sizes."""
    keys = _keys(client, bucket)
    read = lambda key: json.loads(_get(client, bucket, key)) if key in keys else None  # noqa: E731
    prefix = f"out/checkpoints/step-{step}/"
    sizes = {o["Key"].removeprefix(prefix): o["Size"]
             for o in client.list_objects_v2(Bucket=bucket, Prefix=prefix).get("Contents", [])}
    return {"keys": keys, "status": read("out/status.json"), "marker": read(prefix + "_COMPLETE"), "sizes": sizes}


def _plant_bad_checkpoints(client, bucket: str, step: int) -> dict[str, int]:
    """Copies of the real checkpoint at newer steps, each broken in one way; all must be ignored."""
    source = f"out/checkpoints/step-{step}/"
    marker = json.loads(_get(client, bucket, source + "_COMPLETE"))
    planted = {"truncated": step + 1, "no marker": step + 2, "other settings": step + 3}
    for kind, bad_step in planted.items():
        target = f"out/checkpoints/step-{bad_step}/"
        for name in marker["files"]:
            body = _get(client, bucket, source + name)
            if kind == "truncated" and name.endswith(".safetensors"):
                body = body[: len(body) // 2]
            client.put_object(Bucket=bucket, Key=target + name, Body=body)
        if kind != "no marker":
            fingerprint = "0" * 64 if kind == "other settings" else marker["fingerprint"]
            client.put_object(Bucket=bucket, Key=target + "_COMPLETE",
                              Body=json.dumps({**marker, "fingerprint": fingerprint, "step": bad_step}).encode())
    return planted


def test_sigterm_mid_training_exits_143_with_a_complete_checkpoint_in_the_bucket(interrupted):
    stopped = interrupted["stopped"]
    assert stopped.exit_code == 143, stopped.stdout[-3000:] + stopped.stderr[-3000:]
    assert interrupted["stop_seconds"] < EXIT_WAIT_S
    saved = stopped.named("checkpoint.saved")
    assert len(saved) == 1 and 1 <= saved[0]["step"] < STEPS, "the signal must land mid-training"
    step = saved[0]["step"]
    assert stopped.events[-1]["event"] == "job.failed"
    assert stopped.events[-1]["exit_code"] == 143 and f"step {step}/{STEPS}" in stopped.events[-1]["reason"]

    after_stop = interrupted["after_stop"]
    marker = after_stop["marker"]
    assert marker is not None and marker["step"] == step
    assert any(name.endswith(".safetensors") for name in marker["files"])  # the LoRA weights being trained
    assert any("optimizer" in name for name in marker["files"])
    assert {name: f["bytes"] for name, f in marker["files"].items()} == {
        name: size for name, size in after_stop["sizes"].items() if name != "_COMPLETE"}
    assert "out/_SUCCESS" not in after_stop["keys"]
    status = after_stop["status"]
    assert status["state"] == "failed" and status["exit_code"] == 143 and status["step"] == step
    assert "SIGTERM" in status["reason"]


def test_the_same_command_resumes_and_ends_with_the_uninterrupted_lora(interrupted, uninterrupted):
    resumed = interrupted["resumed"]
    assert resumed.exit_code == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    step = interrupted["stopped"].named("checkpoint.saved")[-1]["step"]
    assert [e["step"] for e in resumed.named("checkpoint.resumed")] == [step]
    steps_trained = [e["step"] for e in resumed.named("train.step")]
    assert steps_trained == list(range(step + 1, STEPS + 1))  # nothing redone, nothing skipped

    diff = _max_abs_diff(_lora(interrupted["client"], interrupted["bucket"]), uninterrupted["lora"])
    assert diff <= 1e-6
    manifest = json.loads(_get(interrupted["client"], interrupted["bucket"], "out/manifest.json"))
    assert manifest["steps"] == STEPS
    # The metrics of the steps before the interruption travelled in the checkpoint.
    metrics = _get(interrupted["client"], interrupted["bucket"], "out/metrics.jsonl").decode().splitlines()
    assert [json.loads(line)["step"] for line in metrics] == list(range(1, STEPS + 1))


def test_a_checkpoint_without_marker_truncated_or_from_other_settings_is_not_used(interrupted):
    resumed, planted = interrupted["resumed"], interrupted["planted"]
    assert planted, "the interrupted run saved no checkpoint"
    ignored = {e["step"]: e["reason"] for e in interrupted["resumed"].named("checkpoint.ignored")}
    assert set(ignored) == set(planted.values())
    assert "no completion marker" in ignored[planted["no marker"]]
    assert "does not match its recorded checksum" in ignored[planted["truncated"]]
    assert "other settings or inputs" in ignored[planted["other settings"]]
    assert resumed.named("checkpoint.resumed")[0]["step"] < min(planted.values())


def test_checkpoints_are_saved_pruned_and_removed_after_success(uninterrupted, interrupted):
    result = uninterrupted["result"]
    assert [e["step"] for e in result.named("checkpoint.saved")] == [5, 10, 15]
    for run in (uninterrupted, interrupted):
        keys = _keys(run["client"], run["bucket"])
        assert "out/_SUCCESS" in keys
        assert not [k for k in keys if k.startswith("out/checkpoints/")]


def test_an_identical_second_run_exits_0_without_training_and_force_trains(uninterrupted, s3_env):
    client, bucket = uninterrupted["client"], uninterrupted["bucket"]
    success_before = client.head_object(Bucket=bucket, Key="out/_SUCCESS")["LastModified"]
    env = job_env(uninterrupted["work"], **_settings(bucket, SDFT_CHECKPOINT_EVERY_STEPS="5"))

    started = time.monotonic()
    again = run_job(env)
    seconds = time.monotonic() - started
    assert again.exit_code == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert again.named("job.already_succeeded")
    assert not again.named("train.step")
    assert "train" not in [e["stage"] for e in again.named("stage.start")]
    assert seconds < 60  # imports and the input listing; no model load, no training
    assert client.head_object(Bucket=bucket, Key="out/_SUCCESS")["LastModified"] == success_before
    status = json.loads(_get(client, bucket, "out/status.json"))
    assert status["state"] == "succeeded" and status["exit_code"] == 0

    forced = run_job({**env, "SDFT_FORCE": "true"})
    assert forced.exit_code == 0, forced.stdout[-3000:] + forced.stderr[-3000:]
    assert not forced.named("job.already_succeeded")
    assert [e["step"] for e in forced.named("train.step")] == list(range(1, STEPS + 1))
    assert _max_abs_diff(_lora(client, bucket), uninterrupted["lora"]) <= 1e-6  # same seed, same weights
    assert "out/_SUCCESS" in _keys(client, bucket)


def test_a_changed_setting_is_not_mistaken_for_the_finished_run(uninterrupted, tmp_path, s3_env):
    # Another seed is another result: the old _SUCCESS must not satisfy it. An invalid base model
    # makes the run stop right after that decision, so nothing is trained here.
    bucket = uninterrupted["bucket"]
    result = run_job(job_env(tmp_path / "work", **_settings(bucket, SDFT_SEED="7", SDFT_BASE_MODEL="builtin:nope")))
    assert result.exit_code == 4, result.stdout[-3000:]
    assert not result.named("job.already_succeeded")
    assert "out/_SUCCESS" not in _keys(uninterrupted["client"], bucket)  # withdrawn before anything is rewritten


def test_sigterm_before_training_also_exits_143_and_says_why(s3_server, s3_env, bucket, tmp_path):
    client = s3_server.client()
    _upload_instance(client, bucket)
    stopped, _ = _sigterm_after_first_step(job_env(tmp_path / "work", **_settings(bucket)), event="stage.start")
    assert stopped.exit_code == 143, stopped.stdout[-3000:] + stopped.stderr[-3000:]
    assert stopped.events[-1]["event"] == "job.failed" and "SIGTERM" in stopped.events[-1]["reason"]
    status = json.loads(_get(client, bucket, "out/status.json"))
    assert (status["state"], status["exit_code"]) == ("failed", 143)
    assert "out/_SUCCESS" not in _keys(client, bucket)
