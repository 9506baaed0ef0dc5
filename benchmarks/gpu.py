"""One GPU session's work in one run: the GPU tests, then the GPU benchmarks (see benchmarks/README.md).

Started by `benchmarks/gpu.sh [--dry-run] RESULTS_DIR`, which first makes the carried wheels
importable. Writes into RESULTS_DIR:

- `results.jsonl`: one JSON object per configuration (and one for the test run), as each finishes;
- `table.md`: the same as a Markdown table (also printed last);
- `tests.log`: pytest's output for the `gpu` tests (`tests/test_gpu.py`, `tests/test_step_sync.py`);
- `env.json`: GPU, driver-visible name, versions, the peak used for MFU.

Every configuration is a real `python -m job` fine-tune (benchmarks/training.py watches it); a
configuration that fails or runs out of time is recorded with its reason and the next one runs.
The whole run keeps to `--budget-s`; what does not fit is recorded as skipped, never left out.
`--dry-run` does the same on the CPU with tiny models and a few steps, so the suite can run it.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from dataclasses import asdict
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from flops import dense_bf16_peak_tflops, mfu, step_flops  # noqa: E402
from training import Config, run_config  # noqa: E402

# (builtin model, resolution px, method, batch size, steps): what a GPU session measures. A model
# missing from this tree's `job.builtin_models.BUILTINS` is recorded as skipped, so the list can
# name models before they land.
GPU_CONFIGS = [
    ("sd15-shape", 512, "lora", 1, 40),
    ("sd15-shape", 512, "lora", 4, 30),
    ("sd15-shape", 512, "lora", 8, 20),
    ("sd15-shape", 512, "dreambooth", 1, 30),
    ("sdxl-shape", 1024, "lora", 1, 20),
    ("sdxl-shape", 1024, "lora", 4, 12),
]
DRY_CONFIGS = [
    ("tiny", 64, "lora", 1, 3),
    ("tiny", 64, "lora", 4, 3),
    ("tiny", 64, "dreambooth", 1, 3),
    ("tiny-sdxl", 64, "lora", 1, 3),
]
COLUMNS = ["config", "status", "seconds_to_first_step", "steps_per_s", "images_per_s", "peak_cuda_mb",
           "gflops_per_step", "mfu"]
# The files holding `gpu` tests, named (collecting the whole suite would import test tools the GPU
# machine lacks).
GPU_TEST_FILES = ["tests/test_gpu.py", "tests/test_step_sync.py"]
TESTS_TIMEOUT_S = 200  # tests/test_gpu.py on an H200: a few tiny fine-tunes (each mostly start-up) and the OOM case
CONFIG_TIMEOUT_S = {False: 150, True: 240}  # per run, without / with torch.compile (which compiles first)
MIN_RUN_S = 40  # a run given less than this is skipped rather than started


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results_dir", type=Path, help="folder for results.jsonl, table.md, tests.log, env.json")
    parser.add_argument("--dry-run", action="store_true", help="CPU, tiny models, a few steps, no compile")
    parser.add_argument("--budget-s", type=float, default=None,
                        help="wall-clock budget of the whole run (default 440 on a GPU, 900 dry)")
    parser.add_argument("--work-dir", type=Path, default=None,
                        help="scratch for models and outputs (default $TMPDIR/sdft-gpu); never inside results_dir")
    parser.add_argument("--skip-tests", action="store_true", help="benchmarks only")
    args = parser.parse_args(argv)
    started = time.monotonic()
    budget_s = args.budget_s or (900.0 if args.dry_run else 440.0)
    if args.dry_run:
        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # children and this process alike see no GPU
    results_dir = args.results_dir.resolve()
    results_dir.mkdir(parents=True, exist_ok=True)
    work = (args.work_dir or Path(os.environ.get("TMPDIR", "/tmp")) / ("sdft-gpu-dry" if args.dry_run else "sdft-gpu")).resolve()
    work.mkdir(parents=True, exist_ok=True)
    results = results_dir / "results.jsonl"
    results.write_text("")

    env = _environment(args.dry_run)
    (results_dir / "env.json").write_text(json.dumps(env, indent=1) + "\n")
    print(json.dumps({"env": env}), flush=True)
    if not args.dry_run and not env["cuda"]:
        print("no CUDA device: run with --dry-run on a machine without a GPU", file=sys.stderr)
        return 2
    try:  # everything the job imports, before any time goes into models: a missing wheel shows here
        import job.run  # noqa: F401
    except ImportError as error:
        _record(results, {"config": "imports", "status": "failed", "reason": f"{error!r}: add it to benchmarks/gpu_wheels.sh"})
        return 3

    plan = _plan(args.dry_run)
    configs = [config for config, reason in plan if reason is None]
    rows = []
    # Models are built (random weights, saved once) in the background while the tests run.
    models = sorted({c.model for c in configs})
    prebuild = _start_prebuild(models, work)
    if not args.dry_run:  # the out-of-memory test uses the sd15-shape this run builds anyway
        os.environ["GPU_TEST_SD15_SHAPE_DIR"] = str(work / "models" / "builtin" / "sd15-shape")
    if not args.skip_tests:
        rows.insert(0, _record(results, _run_tests(results_dir / "tests.log", args.dry_run)))
    flops = _FlopCounts(work, configs, prebuild)
    for config, reason in plan:
        remaining = budget_s - (time.monotonic() - started)
        row = {"config": config.name, **asdict(config)}
        if reason is not None:
            rows.append(_record(results, {**row, "status": "skipped", "reason": reason}))
            continue
        if remaining < MIN_RUN_S:
            rows.append(_record(results, {**row, "status": "skipped", "reason": f"time budget ({budget_s:.0f} s) spent"}))
            continue
        failure = _wait_prebuild(prebuild, config.model, work, remaining)
        if failure:
            rows.append(_record(results, {**row, "status": "failed", "reason": failure}))
            continue
        flops.start()
        try:
            measured = run_config(config, work, min(remaining, CONFIG_TIMEOUT_S[config.compile]))
            row = {**measured, "status": "ok"}
        except Exception as error:  # one failing configuration must not stop the others
            row = {**row, "status": "failed", "reason": f"{type(error).__name__}: {error}"[-1500:]}
        per_step = flops.get(config)
        row["gflops_per_step"] = per_step and round(per_step / 1e9, 3)
        row["mfu"] = mfu(per_step, row.get("steps_per_s"), env["peak_dense_bf16_tflops"])
        row["mfu"] = row["mfu"] and round(row["mfu"], 4)
        rows.append(_record(results, row))
    prebuild.kill()
    table = _table(rows, env)
    (results_dir / "table.md").write_text(table)
    print("\n" + table, flush=True)
    return 0


def _plan(dry_run: bool) -> list[tuple[Config, str | None]]:
    """Every configuration in run order (without compile first, then with), each with the reason it
    is skipped, or None when it runs."""
    from job.builtin_models import BUILTINS

    plan = []
    for compile in (False, True):
        for model, resolution_px, method, batch_size, steps in DRY_CONFIGS if dry_run else GPU_CONFIGS:
            config = Config(f"builtin:{model}", resolution_px, method, True, steps, batch_size,
                            "no" if dry_run else "bf16", compile)
            reason = None
            if model not in BUILTINS:
                reason = f"builtin:{model} is not in this tree's job.builtin_models"
            elif compile and dry_run:
                reason = "dry run: torch.compile takes minutes on a CPU"
            plan.append((config, reason))
    return plan


def _environment(dry_run: bool) -> dict:
    import importlib.metadata as metadata
    import platform

    import torch

    cuda = torch.cuda.is_available()
    name = torch.cuda.get_device_name(0) if cuda else None
    versions = {}
    for package in ("torch", "diffusers", "transformers", "accelerate", "peft", "bitsandbytes", "pydantic"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = None
    return {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "dry_run": dry_run, "cuda": cuda, "gpu": name,
        "cuda_version": torch.version.cuda, "peak_dense_bf16_tflops": dense_bf16_peak_tflops(name) if name else None,
        "gpu_memory_gb": round(torch.cuda.get_device_properties(0).total_memory / 1e9, 1) if cuda else None,
        "cpus": os.cpu_count(), "python": platform.python_version(), "versions": versions,
    }


def _start_prebuild(models: list[str], work: Path) -> subprocess.Popen:
    """Builds each builtin model into the shared cache, one after the other, in a child process."""
    code = ("import sys; from pathlib import Path; from job.base_model import resolve_base_model\n"
            "for m in sys.argv[2:]:\n"
            "    resolve_base_model(m, Path(sys.argv[1]) / 'models'); print('built', m, flush=True)")
    return subprocess.Popen([sys.executable, "-c", code, str(work), *models], cwd=REPO)


def _wait_prebuild(prebuild: subprocess.Popen, model: str, work: Path, remaining_s: float) -> str | None:
    """Waits until `model` is built; the reason if it cannot be."""
    marker = work / "models" / "builtin" / model.removeprefix("builtin:") / ".complete"
    deadline = time.monotonic() + remaining_s
    while not marker.exists():
        if prebuild.poll() is not None and not marker.exists():
            return f"building {model} failed (exit {prebuild.returncode}); see the run's stderr"
        if time.monotonic() > deadline:
            return f"building {model} did not finish within the time budget"
        time.sleep(0.5)
    return None


class _FlopCounts:
    """FLOPs per step of each (model, resolution, method), counted once at batch 1 on a thread.

    The count runs on the meta device (CPU only, seconds), beside the GPU runs; `get` waits for it.
    """

    def __init__(self, work: Path, configs: list[Config], prebuild: subprocess.Popen):
        self.keys = list(dict.fromkeys((c.model, c.resolution_px, c.method) for c in configs))
        self.work = work
        self.prebuild = prebuild
        self.counts: dict[tuple, int | None] = {}
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._count, daemon=True)

    def start(self) -> None:
        if not self.thread.is_alive() and not self.done.is_set():
            self.thread.start()

    def _count(self) -> None:
        for model, resolution_px, method in self.keys:
            folder = self.work / "models" / "builtin" / model.removeprefix("builtin:")
            try:
                while not (folder / ".complete").exists():
                    if self.prebuild.poll() is not None and not (folder / ".complete").exists():
                        raise RuntimeError(f"{model} was not built")
                    time.sleep(0.5)
                self.counts[(model, resolution_px, method)] = step_flops(folder, resolution_px, method)
            except Exception as error:  # MFU is then unknown; the run's other numbers stand
                print(f"flop count failed for {model} {resolution_px} {method}: {error}", file=sys.stderr)
                self.counts[(model, resolution_px, method)] = None
        self.done.set()

    def get(self, config: Config, timeout_s: float = 120) -> int | None:
        deadline = time.monotonic() + timeout_s
        key = (config.model, config.resolution_px, config.method)
        while key not in self.counts and time.monotonic() < deadline and self.thread.is_alive():
            time.sleep(0.2)
        per_image = self.counts.get(key)
        return per_image and per_image * config.batch_size


def _run_tests(log_path: Path, dry_run: bool) -> dict:
    """`pytest -m gpu` over GPU_TEST_FILES; its summary line and exit status as a row."""
    command = [sys.executable, "-m", "pytest", "-q", "-rs", "-m", "gpu", "-p", "no:cacheprovider", *GPU_TEST_FILES]
    started = time.monotonic()
    try:
        completed = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=TESTS_TIMEOUT_S)
        output, code = completed.stdout + completed.stderr, completed.returncode
    except subprocess.TimeoutExpired as error:
        output, code = f"{error.stdout or ''}{error.stderr or ''}\ntimed out after {TESTS_TIMEOUT_S} s", None
        output = output if isinstance(output, str) else output.decode(errors="replace")
    log_path.write_text(output)
    summary = next((line.strip("= ") for line in reversed(output.splitlines()) if line.strip()), "no output")
    status = "ok" if code == 0 else "failed"  # skipped tests (no CUDA) exit 0; the summary says so
    return {"config": "gpu-tests", "status": status, "exit_code": code, "summary": summary,
            "seconds": round(time.monotonic() - started, 1)}


def _record(results: Path, row: dict) -> dict:
    with results.open("a") as handle:
        handle.write(json.dumps(row) + "\n")
    print(json.dumps(row), flush=True)
    return row


def _table(rows: list[dict], env: dict) -> str:
    head = (f"GPU: {env['gpu'] or 'none (CPU)'}; dense bf16 peak for MFU: {env['peak_dense_bf16_tflops'] or 'unknown'} "
            f"TFLOP/s; torch {env['versions']['torch']}; {env['date']}\n\n")
    lines = ["| " + " | ".join(COLUMNS) + " | reason |", "|" + "---|" * (len(COLUMNS) + 1)]
    for row in rows:
        cells = ["—" if row.get(c) is None else str(row[c]) for c in COLUMNS]
        reason = row.get("reason") or row.get("summary") or ""
        lines.append("| " + " | ".join(cells) + " | " + reason.replace("|", "/").replace("\n", " ")[:300] + " |")
    return head + "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
