"""sdft benchmarks: `python benchmarks/run.py` (see benchmarks/README.md).

Prints one JSON line per configuration as it finishes, then a table. Training: LoRA and DreamBooth,
cache on and off, on builtin:tiny and builtin:sd15-shape (256 px on CPU; 512 px, bf16, batch 1
and 4 when CUDA is present), and LoRA on builtin:sdxl-shape (256 px on CPU; 1024 px, bf16, batch 1
and 4 when CUDA is present; opt in with `--models sdxl-shape`). Transfers: sdft's storage layer beside s5cmd.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from training import Config, prebuild, run_config  # noqa: E402
from transfer import run_transfers  # noqa: E402

TRAIN_COLUMNS = ["config", "seconds_to_first_step", "steps_per_s", "images_per_s", "peak_rss_train_mb", "peak_rss_mb", "peak_cuda_mb"]
TRANSFER_COLUMNS = ["config", "seconds", "mb_per_s"]
STEP_COLUMNS = ["config", "sdft_steps_per_s", "bare_steps_per_s", "ratio"]


def training_configs(models: list[str], tiny_steps: int, sd15_steps: int, sdxl_steps: int = 3) -> list[Config]:
    import torch

    configs = []
    for method in ("lora", "dreambooth"):
        for cache in (True, False):
            if "tiny" in models:
                configs.append(Config("builtin:tiny", 64, method, cache, tiny_steps))
            if "sd15-shape" in models:
                configs.append(Config("builtin:sd15-shape", 256, method, cache, sd15_steps, precision="no"))
                if torch.cuda.is_available():
                    for batch in (1, 4):
                        configs.append(Config("builtin:sd15-shape", 512, method, cache, 30, batch, "bf16"))
            # SDXL: LoRA only (DreamBooth's fp32 AdamW state for 2.6 B UNet parameters is ~41 GB).
            if "sdxl-shape" in models and method == "lora":
                configs.append(Config("builtin:sdxl-shape", 256, method, cache, sdxl_steps, precision="no"))
                if torch.cuda.is_available():
                    for batch in (1, 4):
                        configs.append(Config("builtin:sdxl-shape", 1024, method, cache, 30, batch, "bf16"))
    return configs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=["training", "transfer", "step"],
                        help="run one part only (step: sdft's sd15-shape LoRA step beside the bare UNet step)")
    parser.add_argument("--models", default="tiny,sd15-shape", help="comma-separated builtin models")
    parser.add_argument("--methods", default="lora,dreambooth", help="comma-separated methods")
    parser.add_argument("--tiny-steps", type=int, default=30)
    parser.add_argument("--sd15-steps", type=int, default=4, help="steps at 256 px on CPU (a few: each takes seconds)")
    parser.add_argument("--sdxl-steps", type=int, default=3, help="sdxl-shape steps at 256 px on CPU")
    parser.add_argument("--tries", type=int, default=3, help="transfer runs per case; the best counts")
    parser.add_argument("--work-dir", type=Path, default=Path(tempfile.gettempdir()) / "sdft-bench")
    parser.add_argument("--timeout-s", type=float, default=3600, help="per training configuration")
    args = parser.parse_args()
    args.work_dir.mkdir(parents=True, exist_ok=True)

    results = []
    if args.only in (None, "training"):
        models = args.models.split(",")
        for model in models:
            prebuild(f"builtin:{model}", args.work_dir)
        methods = args.methods.split(",")
        for config in training_configs(models, args.tiny_steps, args.sd15_steps, args.sdxl_steps):
            if config.method in methods:
                results.append(run_config(config, args.work_dir, args.timeout_s))
                print(json.dumps(results[-1]), flush=True)
    if args.only == "step" or (args.only is None and "sd15-shape" in args.models and "lora" in args.methods):
        results.append(compare_with_bare_step(results, args.work_dir, args.sd15_steps, args.timeout_s))
        print(json.dumps(results[-1]), flush=True)
    if args.only in (None, "transfer"):
        for result in run_transfers(args.work_dir / "transfer", args.tries):
            results.append(result)
            print(json.dumps(result), flush=True)
    _print_table([r for r in results if "steps_per_s" in r], TRAIN_COLUMNS)
    _print_table([r for r in results if "mb_per_s" in r], TRANSFER_COLUMNS)
    _print_table([r for r in results if "ratio" in r], STEP_COLUMNS)


def compare_with_bare_step(results: list[dict], work_dir: Path, steps: int, timeout_s: float) -> dict:
    """sdft's steady LoRA step rate (sd15-shape, 256 px, cached, batch 1, fp32) ÷ the bare UNet's.

    Both are measured in this run, one after the other: the sdft row from `results` if the training
    part ran it, else a run made here; then `benchmarks/bare_step.py` on the same UNet folder.
    """
    config = Config("builtin:sd15-shape", 256, "lora", True, steps, precision="no")
    sdft = next((r for r in results if r.get("config") == config.name), None)
    if sdft is None:
        prebuild(config.model, work_dir)
        sdft = run_config(config, work_dir, timeout_s)
        print(json.dumps(sdft), flush=True)
    model_dir = work_dir / "models" / "builtin" / "sd15-shape"
    bare = subprocess.run([sys.executable, str(Path(__file__).resolve().parent / "bare_step.py"), str(model_dir), "256",
                           str(steps)], cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True,
                          timeout=timeout_s, check=True)
    bare_rate = json.loads(bare.stdout.strip().splitlines()[-1])["steps_per_s"]
    return {"config": "sd15-shape-256px-lora-b1-vs-bare-unet", "sdft_steps_per_s": sdft["steps_per_s"],
            "bare_steps_per_s": bare_rate, "ratio": round(sdft["steps_per_s"] / bare_rate, 3), "steps": steps}


def _print_table(rows: list[dict], columns: list[str]) -> None:
    if not rows:
        return
    cells = [columns] + [["—" if row.get(c) is None else str(row[c]) for c in columns] for row in rows]
    widths = [max(len(line[i]) for line in cells) for i in range(len(columns))]
    print()
    for index, line in enumerate(cells):
        print(" | ".join(cell.ljust(width) for cell, width in zip(line, widths)))
        if index == 0:
            print("-|-".join("-" * width for width in widths))


if __name__ == "__main__":
    main()
