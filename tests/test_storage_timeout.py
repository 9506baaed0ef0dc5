"""SDFT_STORAGE_TIMEOUT_S: one total time bound per storage request, retries included (issue 9).

A storage endpoint that accepts TCP connections and never answers (a hung proxy, a black-holed load
balancer) must end the job with exit 75 within the bound plus a small margin, not after botocore's
attempts × read timeout.
"""

from __future__ import annotations

import socket
import threading
import time
from datetime import datetime

import pytest

from jobrun import job_env, run_job

pytestmark = pytest.mark.slow  # runs the job in a subprocess

BOUND_S = 6  # SDFT_STORAGE_TIMEOUT_S in the test; the default (300) would run 5 attempts × 60 s
STATUS_BOUND_S = 6  # the failure report's own request to the same dead endpoint is bounded as well
MARGIN_S = 15  # connecting, the accelerator, and a loaded machine


class SilentServer:
    """Accepts TCP connections on 127.0.0.1 and never sends a byte; stops (and closes every
    connection) when the `with` block ends. The accept loop wakes every 0.2 s to check for that."""

    def __init__(self) -> None:
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(0.2)
        self.url = f"http://127.0.0.1:{self._listener.getsockname()[1]}"
        self.accepted: list[socket.socket] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                connection, _ = self._listener.accept()
            except TimeoutError:
                continue
            self.accepted.append(connection)  # held open, never read from or answered

    def __enter__(self) -> SilentServer:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        for connection in [*self.accepted, self._listener]:
            connection.close()
        assert not self._thread.is_alive()


def _seconds_between(first: dict, last: dict) -> float:
    return (datetime.fromisoformat(last["timestamp"]) - datetime.fromisoformat(first["timestamp"])).total_seconds()


def test_an_endpoint_that_never_answers_ends_in_exit_75_within_the_bound(tmp_path):
    with SilentServer() as server:
        env = job_env(tmp_path / "work", SDFT_INSTANCE_URI="s3://photos/rex/", SDFT_OUTPUT_URI="s3://photos/out/",
                      SDFT_STORAGE_TIMEOUT_S=str(BOUND_S), AWS_ENDPOINT_URL_S3=server.url, AWS_ACCESS_KEY_ID="test",
                      AWS_SECRET_ACCESS_KEY="test-secret", AWS_REGION="us-east-1")
        started = time.monotonic()
        result = run_job(env, timeout_s=600)
        wall_s = time.monotonic() - started
        assert server.accepted, "the job reached the silent endpoint"

    assert result.exit_code == 75, result.stdout[-3000:] + result.stderr[-3000:]
    reason = result.failure["reason"]
    assert f"SDFT_STORAGE_TIMEOUT_S={BOUND_S}" in reason and "s3://photos/" in reason, reason
    # From the first storage request (status.json as fetching the inputs starts) to the failure: the request's bound, the
    # status report's, and the margin.
    [fetch] = [e for e in result.named("stage.start") if e["stage"] == "fetch_inputs"]
    took_s = _seconds_between(fetch, result.failure)
    assert took_s <= BOUND_S + STATUS_BOUND_S + MARGIN_S, (took_s, wall_s)
    assert result.named("status.unwritable")  # the report to the same endpoint gave up quickly too
