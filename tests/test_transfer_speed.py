"""sdft's storage layer against `s5cmd` on the same server and data, measured in the same run (issue 6).

A benchmark check, not a timing assertion with a fixed number: both tools download the same 200
small objects from the SeaweedFS test server, best of 3 each, and sdft must reach 0.8× s5cmd's
throughput. The full transfer benchmark (1 MB objects, a 500 MB object, uploads) is
`python benchmarks/run.py --only transfer`.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from job.storage import open_store

# Two tools racing on a shared 2-core machine: the ratio swings (0.69x to 1.04x seen for the same code),
# so this comparison does not gate CI; it runs where someone asks for it. The ratios measured so far
# are in benchmarks/README.md.
pytestmark = pytest.mark.skipif(
    os.environ.get("BENCHMARK_CHECKS") != "1",
    reason="timing comparison with s5cmd; run with BENCHMARK_CHECKS=1 on a quiet machine",
)

OBJECTS = 200
OBJECT_BYTES = 1 << 20  # 1 MiB, as in the issue
TRIES = 3
TOOL_TIMEOUT_S = 120


def _s5cmd() -> str:
    found = Path(sys.executable).parent / "s5cmd"
    return str(found) if found.exists() else (shutil.which("s5cmd") or pytest.skip("s5cmd is not installed"))


@pytest.fixture
def small_objects(s3_server, s3_env, bucket) -> str:
    client = s3_server.client()
    for index in range(OBJECTS):
        client.put_object(Bucket=bucket, Key=f"small/{index:03d}.bin", Body=os.urandom(OBJECT_BYTES))
    return f"s3://{bucket}/small"


def _best_mb_per_s(download, dest_root: Path) -> float:
    best_s = float("inf")
    for attempt in range(TRIES):
        dest = dest_root / str(attempt)
        started = time.perf_counter()
        download(dest)
        best_s = min(best_s, time.perf_counter() - started)
        files = list(dest.rglob("*.bin"))
        assert len(files) == OBJECTS and all(f.stat().st_size == OBJECT_BYTES for f in files)
        shutil.rmtree(dest)
    return OBJECTS * OBJECT_BYTES / 2**20 / best_s


def test_storage_downloads_many_small_objects_at_least_0_8x_s5cmd(small_objects, s3_env, tmp_path):
    s5cmd = _s5cmd()

    def with_s5cmd(dest: Path) -> None:
        subprocess.run([s5cmd, "--endpoint-url", s3_env["AWS_ENDPOINT_URL_S3"], "cp", f"{small_objects}/*", f"{dest}/"],
                       check=True, capture_output=True, timeout=TOOL_TIMEOUT_S)

    def with_storage(dest: Path) -> None:
        open_store(small_objects).download_all(dest)

    s5cmd_mb_s = _best_mb_per_s(with_s5cmd, tmp_path / "s5cmd")
    sdft_mb_s = _best_mb_per_s(with_storage, tmp_path / "sdft")
    print(f"{OBJECTS} x {OBJECT_BYTES // 1024} KiB download: sdft {sdft_mb_s:.1f} MB/s, s5cmd {s5cmd_mb_s:.1f} MB/s")
    assert sdft_mb_s >= 0.8 * s5cmd_mb_s, f"sdft {sdft_mb_s:.1f} MB/s < 0.8 x s5cmd {s5cmd_mb_s:.1f} MB/s"
