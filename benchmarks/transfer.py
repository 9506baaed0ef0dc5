"""Transfer benchmark: sdft's storage layer beside `s5cmd`, same SeaweedFS server, same data.

200 objects of 1 MiB and one of 500 MiB, uploaded and downloaded by each tool in turn; the best
of `tries` runs counts (the first run of anything pays for cold caches). sdft is timed in process,
opening its store inside the timed span (a job opens one per transfer); s5cmd is timed as a
process, as a user would run it.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SMALL_COUNT, SMALL_BYTES, LARGE_BYTES = 200, 1 << 20, 500 << 20
TOOL_TIMEOUT_S = 600


def run_transfers(scratch: Path, tries: int) -> list[dict]:
    sys.path.insert(0, str(REPO / "tests"))
    from s3server import S3Server

    from job.storage import open_store

    shutil.rmtree(scratch / "seaweedfs", ignore_errors=True)  # a fresh server: no bucket left from a previous run
    server = S3Server(scratch / "seaweedfs")
    server.start()
    try:
        os.environ.update(server.env())
        bucket = server.create_bucket("bench")
        small, large = _make_data(scratch / "data")
        s5cmd = [str(Path(sys.executable).parent / "s5cmd"), "--endpoint-url", server.endpoint_url]

        def s5(*args: str) -> Callable[[Path], None]:
            return lambda dest: subprocess.run([*s5cmd, *[a.replace("{dest}", str(dest)) for a in args]], check=True,
                                               capture_output=True, timeout=TOOL_TIMEOUT_S)

        cases = [
            ("200x1MiB", "upload", "sdft", lambda _: open_store(f"s3://{bucket}/small-sdft").upload_tree(small)),
            ("200x1MiB", "upload", "s5cmd", s5("cp", f"{small}/*", f"s3://{bucket}/small-s5cmd/")),
            ("200x1MiB", "download", "sdft", lambda dest: open_store(f"s3://{bucket}/small-sdft").download_all(dest)),
            ("200x1MiB", "download", "s5cmd", s5("cp", f"s3://{bucket}/small-s5cmd/*", "{dest}/")),
            ("1x500MiB", "upload", "sdft", lambda _: open_store(f"s3://{bucket}/large-sdft").upload(large, large.name)),
            ("1x500MiB", "upload", "s5cmd", s5("cp", str(large), f"s3://{bucket}/large-s5cmd/")),
            ("1x500MiB", "download", "sdft", lambda dest: open_store(f"s3://{bucket}/large-sdft").download(large.name, dest / large.name)),
            ("1x500MiB", "download", "s5cmd", s5("cp", f"s3://{bucket}/large-s5cmd/{large.name}", "{dest}/")),
        ]
        results = []
        for data, direction, tool, transfer in cases:
            total = SMALL_COUNT * SMALL_BYTES if data.startswith("200") else LARGE_BYTES
            seconds = _best_of(transfer, scratch / "dest", tries)
            results.append({"config": f"transfer-{data}-{direction}-{tool}", "data": data, "direction": direction,
                            "tool": tool, "seconds": round(seconds, 3), "mb_per_s": round(total / 2**20 / seconds, 1)})
        return results
    finally:
        server.stop()


def _make_data(folder: Path) -> tuple[Path, Path]:
    small = folder / "small"
    small.mkdir(parents=True, exist_ok=True)
    for index in range(SMALL_COUNT):
        (small / f"{index:03d}.bin").write_bytes(os.urandom(SMALL_BYTES))
    large = folder / "large.bin"
    with large.open("wb") as handle:
        for _ in range(LARGE_BYTES // (16 << 20)):
            handle.write(os.urandom(16 << 20))
    return small, large


def _best_of(transfer: Callable[[Path], None], dest: Path, tries: int) -> float:
    best = float("inf")
    for _ in range(tries):
        shutil.rmtree(dest, ignore_errors=True)
        dest.mkdir(parents=True)
        started = time.perf_counter()
        transfer(dest)
        best = min(best, time.perf_counter() - started)
    shutil.rmtree(dest, ignore_errors=True)
    return best
