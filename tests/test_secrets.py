"""Secrets never appear in logs, records or files (issue 4, CONTRACT §5), through the real S3 server.

The server's own secret key is random per session and recognisable; the Hub token and the session
token are fake ones. Each test then searches everything the job could have written.
"""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest

import job.__main__ as edge
from jobrun import EXAMPLES, job_env, run_job

pytestmark = pytest.mark.slow  # each test runs the job end to end

HF_TOKEN = "hf_FAKEtokenDoNotLeak" + uuid.uuid4().hex
SESSION_TOKEN = "FwoGZXIvYXdzFAKEsessionDoNotLeak" + uuid.uuid4().hex
FAKE_SECRET_KEY = "FAKEsecretKeyDoNotLeak/" + uuid.uuid4().hex


def _leaks(secrets: list[str], texts: dict[str, bytes]) -> list[str]:
    """'where: which secret' for every secret found in any of `texts`."""
    return [f"{where}: {secret[:12]}…" for where, text in texts.items() for secret in secrets
            if secret.encode() in text]


def _local_files(*roots: Path) -> dict[str, bytes]:
    return {str(p): p.read_bytes() for root in roots if root.exists() for p in root.rglob("*") if p.is_file()}


def _bucket_objects(client, bucket: str) -> dict[str, bytes]:
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=bucket)
    keys = [o["Key"] for page in pages for o in page.get("Contents", [])]
    return {f"s3://{bucket}/{k}": client.get_object(Bucket=bucket, Key=k)["Body"].read() for k in keys}


def test_a_successful_run_leaks_no_secret(s3_server, s3_env, bucket, tmp_path):
    client = s3_server.client()
    for path in sorted(EXAMPLES.glob("*.png")):
        client.put_object(Bucket=bucket, Key=f"instance/{path.name}", Body=path.read_bytes())
    work = tmp_path / "work"
    # Debug logging, so that the libraries' chattiest output is searched too.
    env = job_env(work, SDFT_INSTANCE_URI=f"s3://{bucket}/instance", SDFT_OUTPUT_URI=f"s3://{bucket}/out",
                  SDFT_MAX_TRAIN_STEPS="2", SDFT_CHECKPOINT_EVERY_STEPS="1", HF_TOKEN=HF_TOKEN,
                  HUGGING_FACE_HUB_TOKEN=HF_TOKEN, SDFT_LOG_LEVEL="debug")
    result = run_job(env)
    assert result.exit_code == 0, result.stdout[-3000:] + result.stderr[-3000:]

    objects = _bucket_objects(client, bucket)
    assert f"s3://{bucket}/out/_SUCCESS" in objects and f"s3://{bucket}/out/manifest.json" in objects
    written = {"stdout": result.stdout.encode(), "stderr": result.stderr.encode(),
               **_local_files(work), **{k: v for k, v in objects.items() if "/instance/" not in k}}
    assert _leaks([HF_TOKEN, s3_server.secret_key], written) == []


def test_a_refused_run_leaks_neither_the_secret_key_nor_the_session_token(s3_server, s3_env, bucket, tmp_path):
    work = tmp_path / "work"
    env = job_env(work, SDFT_INSTANCE_URI=f"s3://{bucket}/instance", SDFT_OUTPUT_URI=f"s3://{bucket}/out",
                  AWS_SECRET_ACCESS_KEY=FAKE_SECRET_KEY, AWS_SESSION_TOKEN=SESSION_TOKEN, HF_TOKEN=HF_TOKEN)
    result = run_job(env)
    assert result.exit_code == 2, result.stdout[-3000:] + result.stderr[-3000:]
    assert "storage refused access" in result.failure["reason"]
    written = {"stdout": result.stdout.encode(), "stderr": result.stderr.encode(), **_local_files(work),
               **_bucket_objects(s3_server.client(), bucket)}
    assert _leaks([FAKE_SECRET_KEY, SESSION_TOKEN, HF_TOKEN], written) == []


def test_a_secret_echoed_in_an_error_is_masked_in_the_log_and_the_termination_message(
        s3_env, monkeypatch, tmp_path, capsys):
    # A secret pasted into the wrong variable: the settings error quotes the value it rejects.
    termination_log = tmp_path / "termination-log"
    termination_log.write_text("")
    monkeypatch.setattr(edge, "TERMINATION_LOG", termination_log)
    monkeypatch.setenv("HF_TOKEN", HF_TOKEN)
    monkeypatch.setenv("AWS_SESSION_TOKEN", SESSION_TOKEN)
    monkeypatch.setenv("SDFT_INSTANCE_URI", "examples/dog")
    monkeypatch.setenv("SDFT_OUTPUT_URI", str(tmp_path / "out"))
    monkeypatch.setenv("SDFT_SEED", HF_TOKEN)
    monkeypatch.setenv("SDFT_RUN_ID", SESSION_TOKEN)
    monkeypatch.setenv("SDFT_LOG_FORMAT", "json")

    assert edge.main(["run"]) == 2
    out, err = capsys.readouterr()
    reason = termination_log.read_text()
    assert "SDFT_SEED" in reason and "***" in reason
    assert _leaks([HF_TOKEN, SESSION_TOKEN], {"stdout": out.encode(), "stderr": err.encode(),
                                              "termination-log": reason.encode()}) == []
    assert not (tmp_path / "out").exists()


@pytest.fixture(autouse=True)
def _restore_logging():
    """The in-process test reconfigures logging; leave the next test the default setup."""
    import logging

    handlers = logging.getLogger().handlers[:]
    yield
    logging.getLogger().handlers[:] = handlers
