"""Storage faults through the real S3 server (issue 4): a flaky store is survived with identical
outputs; a store that goes away ends the job with exit 75, within a bounded time, and no `_SUCCESS`."""

from __future__ import annotations

import json
import time
import uuid

import pytest
from safetensors.torch import load

from faultproxy import FaultProxy
from jobrun import EXAMPLES, WatchedJob, job_env, run_job

pytestmark = pytest.mark.slow  # each test runs the job end to end

LORA, KOHYA = "lora/pytorch_lora_weights.safetensors", "lora/test-run.safetensors"
SETTINGS = {"SDFT_MAX_TRAIN_STEPS": "4", "SDFT_CHECKPOINT_EVERY_STEPS": "2"}
# Output files whose bytes depend on wall-clock time; all the others must be identical.
TIMED = {"metrics.jsonl"}
STOPPED_EXIT_BOUND_S = 300  # botocore's bounded retries (5 attempts, backoff ≤ 15 s) plus a step or two


def _prepare(s3_server, name: str) -> tuple[object, str]:
    client, bucket = s3_server.client(), s3_server.create_bucket(f"{name}-{uuid.uuid4().hex[:8]}")
    for path in sorted(EXAMPLES.glob("*.png")):
        client.put_object(Bucket=bucket, Key=f"instance/{path.name}", Body=path.read_bytes())
    return client, bucket


def _uris(bucket: str) -> dict[str, str]:
    return {"SDFT_INSTANCE_URI": f"s3://{bucket}/instance", "SDFT_OUTPUT_URI": f"s3://{bucket}/out"}


def _outputs(client, bucket: str) -> dict:
    keys = sorted(o["Key"] for o in client.list_objects_v2(Bucket=bucket, Prefix="out/").get("Contents", []))
    manifest = json.loads(client.get_object(Bucket=bucket, Key="out/manifest.json")["Body"].read())
    return {"keys": keys, "artifacts": {a["path"]: a["sha256"] for a in manifest["artifacts"] if a["path"] not in TIMED},
            "inputs": manifest["inputs"],
            "lora": load(client.get_object(Bucket=bucket, Key=f"out/{LORA}")["Body"].read())}


def _max_abs_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


@pytest.fixture(scope="module")
def clean(module_s3_env, s3_server, tmp_path_factory):
    client, bucket = _prepare(s3_server, "clean")
    result = run_job(job_env(tmp_path_factory.mktemp("clean"), **_uris(bucket), **SETTINGS))
    assert result.exit_code == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return _outputs(client, bucket)


def test_a_flaky_store_is_survived_with_identical_outputs(clean, s3_server, s3_env, tmp_path):
    client, bucket = _prepare(s3_server, "flaky")
    with FaultProxy(s3_server.endpoint_url, fault_rate=0.3, seed=4) as proxy:
        env = job_env(tmp_path / "work", **_uris(bucket), **SETTINGS, AWS_ENDPOINT_URL_S3=proxy.url)
        result = run_job(env)
    assert result.exit_code == 0, result.stdout[-3000:] + result.stderr[-3000:]
    # Every kind of fault really happened, on a fair share of the job's requests.
    assert all(proxy.injected[kind] >= 2 for kind in ("503", "reset", "slow")), proxy.injected
    assert sum(proxy.injected.values()) >= 0.15 * proxy.requests
    flaky = _outputs(client, bucket)
    assert flaky["keys"] == clean["keys"] and flaky["inputs"] == clean["inputs"]
    assert flaky["artifacts"].keys() == clean["artifacts"].keys()
    assert {p for p, sha in flaky["artifacts"].items() if sha != clean["artifacts"][p]} <= {LORA, KOHYA}
    diff = _max_abs_diff(flaky["lora"], clean["lora"])
    assert diff <= 1e-6
    assert "out/_SUCCESS" in flaky["keys"] and not [k for k in flaky["keys"] if "checkpoints/" in k]


def test_a_store_that_goes_away_mid_run_ends_in_exit_75_within_a_bounded_time(s3_server, s3_env, tmp_path):
    client, bucket = _prepare(s3_server, "outage")
    env = job_env(tmp_path / "work", **_uris(bucket), SDFT_MAX_TRAIN_STEPS="200", SDFT_CHECKPOINT_EVERY_STEPS="2")
    job = WatchedJob(env)
    if not job.wait_for("train.step", 240):
        job.process.kill()
        pytest.fail("no train.step event before the job ended:\n" + job.finish(10).stdout[-3000:])
    try:
        s3_server.stop()
        stopped = time.monotonic()
        result = job.finish(STOPPED_EXIT_BOUND_S)
        seconds = time.monotonic() - stopped
    finally:
        s3_server.start()
    exit_code = result.exit_code

    assert exit_code == 75, result.stdout[-3000:] + result.stderr[-3000:]
    assert seconds < STOPPED_EXIT_BOUND_S
    failed = result.events[-1]
    assert failed["event"] == "job.failed" and failed["exit_code"] == 75
    assert "storage unreachable" in failed["reason"] and f"s3://{bucket}/out" in failed["reason"]
    assert result.named("status.unwritable")  # said so, instead of hiding the first reason
    assert not result.named("job.done")
    keys = [o["Key"] for o in client.list_objects_v2(Bucket=bucket).get("Contents", [])]
    assert "out/_SUCCESS" not in keys


def test_an_upload_damaged_in_transit_is_refused_by_its_checksum_and_ends_in_exit_75(s3_server, s3_env, tmp_path):
    client, bucket = _prepare(s3_server, "corrupt")
    with FaultProxy(s3_server.endpoint_url, corrupt_uploads=1) as proxy:  # the first upload: status.json
        result = run_job(job_env(tmp_path / "work", **_uris(bucket), **SETTINGS, AWS_ENDPOINT_URL_S3=proxy.url))
    assert proxy.injected["corrupt"] == 1
    assert result.exit_code == 75, result.stdout[-3000:] + result.stderr[-3000:]
    assert "checksum did not match" in result.failure["reason"] and "status.json" in result.failure["reason"]
    # What the store holds is the failure report sent afterwards, never the damaged bytes.
    status = json.loads(client.get_object(Bucket=bucket, Key="out/status.json")["Body"].read())
    assert (status["state"], status["exit_code"]) == ("failed", 75)
    assert "out/_SUCCESS" not in [o["Key"] for o in client.list_objects_v2(Bucket=bucket).get("Contents", [])]


# Failures before the output store is reachable: the first reason is the one reported.
@pytest.mark.parametrize(("output_uri", "endpoint", "exit_code", "fragment"), [
    ("s3://no-such-bucket-sdft/out", None, 2, "bucket 'no-such-bucket-sdft' does not exist"),
    (None, "http://127.0.0.1:{closed_port}", 75, "storage unreachable"),
], ids=["output bucket missing", "storage down from the start"])
def test_a_failure_before_the_output_is_reachable_reports_its_own_reason(
        output_uri, endpoint, exit_code, fragment, s3_server, s3_env, tmp_path):
    from s3server import free_ports

    _, bucket = _prepare(s3_server, "early")
    settings = {**_uris(bucket), **({"SDFT_OUTPUT_URI": output_uri} if output_uri else {})}
    if endpoint:
        settings["AWS_ENDPOINT_URL_S3"] = endpoint.format(closed_port=free_ports(1)[0])
    started = time.monotonic()
    result = run_job(job_env(tmp_path / "work", **settings, **SETTINGS), timeout_s=STOPPED_EXIT_BOUND_S)
    assert time.monotonic() - started < STOPPED_EXIT_BOUND_S
    assert result.exit_code == exit_code, result.stdout[-3000:] + result.stderr[-3000:]
    assert fragment in result.failure["reason"]
    assert result.events[-1]["event"] == "job.failed"
    assert result.named("status.unwritable")  # the status write failed too, and did not take over
    assert not result.named("train.step")
