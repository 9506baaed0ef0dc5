"""`python -m job check` (CONTRACT §1, issue 4): everything short of training, same exit codes."""

from __future__ import annotations

import time

import pytest

from jobrun import EXAMPLES, job_env, run_job
from s3server import free_ports

pytestmark = pytest.mark.slow  # each test runs the job end to end

GOOD = sorted(EXAMPLES.glob("*.png"))
CHECK_BOUND_S = 300  # imports, listing, decoding and the tiny model; and storage retries when it is down


def _upload(client, bucket: str, files: dict[str, bytes]) -> None:
    for name, body in files.items():
        client.put_object(Bucket=bucket, Key=f"instance/{name}", Body=body)


def _timed_check(env: dict[str, str]):
    started = time.monotonic()
    result = run_job(env, "check", timeout_s=CHECK_BOUND_S)
    return result, time.monotonic() - started


def test_check_passes_a_good_setup_without_training_or_writing(s3_server, s3_env, bucket, tmp_path):
    client = s3_server.client()
    _upload(client, bucket, {p.name: p.read_bytes() for p in GOOD} | {"notes.pdf": b"%PDF"})
    result, seconds = _timed_check(job_env(tmp_path / "work", SDFT_INSTANCE_URI=f"s3://{bucket}/instance/",
                                           SDFT_OUTPUT_URI=f"s3://{bucket}/out/"))
    assert result.exit_code == 0, result.stdout[-3000:] + result.stderr[-3000:]
    ok = result.named("check.ok")[0]
    assert ok["images"] == len(GOOD) and ok["base_model"] == "builtin:tiny"
    assert [s["path"] for s in ok["skipped"]] == ["notes.pdf"]
    assert not result.named("train.step") and result.events[-1]["event"] == "job.done"
    assert seconds < CHECK_BOUND_S
    keys = [o["Key"] for o in client.list_objects_v2(Bucket=bucket).get("Contents", [])]
    assert not [k for k in keys if k.startswith("out/")]  # a preflight leaves the output alone


# id, instance files (None: the good ones), settings, exit code, fragment of the reason
BAD = [
    ("invalid settings", None, {"SDFT_RESOLUTION": "33", "SDFT_SEED": "-1"}, 2, "SDFT_RESOLUTION"),
    ("missing output bucket", None, {"SDFT_OUTPUT_URI": "s3://no-such-bucket-sdft/out"}, 2, "does not exist"),
    ("no decodable image", {"a.jpg": b"", "b.png": b"not a png"}, {}, 3, "no usable instance images"),
    ("empty input prefix", {}, {}, 3, "no files at SDFT_INSTANCE_URI"),
    ("unknown base model", None, {"SDFT_BASE_MODEL": "builtin:nope"}, 4, "unknown builtin model"),
    ("storage down", None, {"AWS_ENDPOINT_URL_S3": "http://127.0.0.1:{closed_port}"}, 75, "storage unreachable"),
]


@pytest.mark.parametrize(("files", "settings", "exit_code", "fragment"), [row[1:] for row in BAD],
                         ids=[row[0] for row in BAD])
def test_check_rejects_a_bad_setup_with_the_contract_exit_code(files, settings, exit_code, fragment,
                                                               s3_server, s3_env, bucket, tmp_path):
    _upload(s3_server.client(), bucket, {p.name: p.read_bytes() for p in GOOD} if files is None else files)
    settings = {k: v.format(closed_port=free_ports(1)[0]) for k, v in settings.items()}
    env = job_env(tmp_path / "work", **{"SDFT_INSTANCE_URI": f"s3://{bucket}/instance/",
                                        "SDFT_OUTPUT_URI": f"s3://{bucket}/out/", **settings})
    result, seconds = _timed_check(env)
    assert result.exit_code == exit_code, result.stdout[-3000:] + result.stderr[-3000:]
    assert fragment in result.failure["reason"]
    assert result.events[-1]["event"] == "job.failed"
    assert not result.named("train.step")
    assert seconds < CHECK_BOUND_S
