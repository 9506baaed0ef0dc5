"""Cold start from the bucket: the base model in SeaweedFS, sdft beside `s5cmd cp` + a bare load.

`python benchmarks/cold_start.py` (see benchmarks/README.md). Puts builtin:sd15-shape (SD 1.5's
architecture, ~4 GB of fp32 safetensors) under `s3://bench/sd15-shape/` on a local SeaweedFS
server, then measures, in this order:

1. download rate, best of `--tries` each, alternating: sdft's storage layer (`download_all`, in
   process, store opened inside the timed span) and `s5cmd cp 's3://…/*' dest/` (as a process);
2. the bare load: a fresh process loading UNet, VAE and text encoder from the downloaded folder
   with diffusers / transformers `from_pretrained` (timed from after the imports);
3. tiny start-up: seconds from process start to the first step of a `builtin:tiny` job (64 px);
4. sdft cold start: seconds from process start to the first step of a job whose
   `SDFT_BASE_MODEL` is the bucket prefix, with an empty work dir (so it downloads), LoRA at 64 px
   (the first step's own compute is then a small share: this measures start-up, not the model).

The reference for (4) is s5cmd's download seconds + the bare load + the tiny start-up. Every
folder it writes is removed at the end (the server's data too): the model is read ~4 times over.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO / "benchmarks"))

from training import Config, prebuild, run_config  # noqa: E402

BUCKET = "bench"
TOOL_TIMEOUT_S = 1200
BARE_LOAD = """
import json, sys, time
from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import CLIPTextModel
started = time.perf_counter()
folder = sys.argv[1]
UNet2DConditionModel.from_pretrained(folder, subfolder="unet", use_safetensors=True)
AutoencoderKL.from_pretrained(folder, subfolder="vae", use_safetensors=True)
CLIPTextModel.from_pretrained(folder, subfolder="text_encoder", use_safetensors=True)
print(json.dumps({"seconds": time.perf_counter() - started}))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work-dir", type=Path, default=Path(tempfile.gettempdir()) / "sdft-bench-cold",
                        help="scratch: the server's data, downloads, the cold job (removed at the end)")
    parser.add_argument("--models-dir", type=Path, default=Path(tempfile.gettempdir()) / "sdft-bench",
                        help="where the builtin models are built once and kept (benchmarks/run.py's work dir)")
    parser.add_argument("--tries", type=int, default=2, help="downloads per tool; the best counts")
    parser.add_argument("--model", default="sd15-shape", help="the builtin model put in the bucket (tiny: a quick check)")
    args = parser.parse_args()
    from s3server import S3Server

    work = args.work_dir.resolve()
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    prebuild(f"builtin:{args.model}", args.models_dir)
    model = args.models_dir / "models" / "builtin" / args.model
    total = sum(p.stat().st_size for p in model.rglob("*") if p.is_file() and p.name != ".complete")
    server = S3Server(work / "seaweedfs")
    server.start()
    rows = []
    try:
        os.environ.update(server.env())
        server.create_bucket(BUCKET)
        s5cmd = [str(Path(sys.executable).parent / "s5cmd"), "--endpoint-url", server.endpoint_url]
        uri = f"s3://{BUCKET}/{args.model}"
        subprocess.run([*s5cmd, "cp", "--exclude", ".complete", f"{model}/*", f"{uri}/"],
                       check=True, capture_output=True, timeout=TOOL_TIMEOUT_S)

        def sdft_download(dest: Path) -> None:
            from job.storage import open_store

            open_store(uri).download_all(dest)

        def s5cmd_download(dest: Path) -> None:
            subprocess.run([*s5cmd, "cp", f"{uri}/*", f"{dest}/"], check=True, capture_output=True, timeout=TOOL_TIMEOUT_S)

        best = {"sdft": float("inf"), "s5cmd": float("inf")}
        dest = work / "download"
        for _ in range(args.tries):
            for tool, download in (("s5cmd", s5cmd_download), ("sdft", sdft_download)):
                shutil.rmtree(dest, ignore_errors=True)
                dest.mkdir()
                started = time.perf_counter()
                download(dest)
                best[tool] = min(best[tool], time.perf_counter() - started)
                downloaded = sum(p.stat().st_size for p in dest.rglob("*") if p.is_file())
                assert downloaded == total, f"{tool} downloaded {downloaded} bytes of {total}"
        for tool in ("sdft", "s5cmd"):
            rows.append({"config": f"download-{tool}", "bytes": total, "seconds": round(best[tool], 2),
                         "mb_per_s": round(total / 2**20 / best[tool], 1)})
        rows.append({"config": "download-sdft-vs-s5cmd", "ratio": round(best["s5cmd"] / best["sdft"], 3)})

        bare = subprocess.run([sys.executable, "-c", BARE_LOAD, str(dest)], cwd=REPO, capture_output=True,
                              text=True, check=True, timeout=TOOL_TIMEOUT_S)
        bare_s = json.loads(bare.stdout.strip().splitlines()[-1])["seconds"]
        rows.append({"config": "bare-load", "seconds": round(bare_s, 2)})
        shutil.rmtree(dest, ignore_errors=True)

        prebuild("builtin:tiny", work)  # outside the timed run, as a cached model would be
        tiny = run_config(Config("builtin:tiny", 64, "lora", True, 2), work, TOOL_TIMEOUT_S)
        rows.append({"config": "tiny-start-up", "seconds": tiny["seconds_to_first_step"],
                     "stage_started_s": tiny["stage_started_s"]})
        cold_work = work / "cold"  # empty: no model cache, so the job downloads
        cold = run_config(Config(uri, 64, "lora", True, 2, label=f"{args.model}-from-bucket"), cold_work, TOOL_TIMEOUT_S)
        reference = best["s5cmd"] + bare_s + tiny["seconds_to_first_step"]
        rows.append({"config": "sdft-cold-start", "seconds": cold["seconds_to_first_step"],
                     "stage_seconds": cold["stage_seconds"], "stage_started_s": cold["stage_started_s"]})
        rows.append({"config": "reference (s5cmd + bare load + tiny start-up)", "seconds": round(reference, 2)})
        rows.append({"config": "cold-start-vs-reference", "ratio": round(cold["seconds_to_first_step"] / reference, 3)})
    finally:
        server.stop()
        shutil.rmtree(work, ignore_errors=True)
    for row in rows:
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
