"""Training benchmark: real `python -m job` runs, watched from outside.

Each configuration is one fine-tune in a subprocess, of `instance_folder`'s 40 images. The parent
timestamps every log event as it
arrives and samples the child's resident memory (`/proc/<pid>/status`, every 50 ms), so the numbers
include everything a user waits for: imports, model load, caching, then the steps.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "examples" / "dog"
RSS_POLL_S = 0.05


@dataclass(frozen=True)
class Config:
    model: str  # a base model reference: builtin:tiny, builtin:sd15-shape, builtin:sdxl-shape, s3://…
    resolution_px: int
    method: str  # lora or dreambooth
    cache: bool
    steps: int
    batch_size: int = 1
    precision: str = "auto"
    compile: bool = False  # SDFT_TORCH_COMPILE
    label: str | None = None  # names the model in `name` instead of the reference (e.g. for an s3:// one)

    @property
    def name(self) -> str:
        cache = "cache" if self.cache else "nocache"
        suffix = "-compile" if self.compile else ""
        model = self.label or self.model.removeprefix("builtin:")
        return f"{model}-{self.resolution_px}px-{self.method}-{cache}-b{self.batch_size}{suffix}"


def prebuild(model: str, work_dir: Path) -> None:
    """Builds a builtin model once, outside the timed runs (they share `work_dir`'s model cache)."""
    code = "import sys; from pathlib import Path; from job.base_model import resolve_base_model; " \
           "resolve_base_model(sys.argv[1], Path(sys.argv[2]) / 'models')"
    subprocess.run([sys.executable, "-c", code, model, str(work_dir)], cwd=REPO, check=True)


# Instance images of a benchmark run: examples/dog's 5 photos in their 8 orientations (flips and
# quarter turns), so that a batch of up to 8 is full at every step: with aspect-ratio buckets, a
# bucket holding fewer images than a batch trains in short batches, and images/s would overstate.
INSTANCE_IMAGES = 40


def instance_folder(work_dir: Path) -> Path:
    """`INSTANCE_IMAGES` distinct square images (all one bucket), written once under `work_dir`."""
    from PIL import Image

    folder = work_dir / "instance-40"
    if len(list(folder.glob("*.png"))) == INSTANCE_IMAGES:
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    turns = [None, Image.Transpose.ROTATE_90, Image.Transpose.ROTATE_180, Image.Transpose.ROTATE_270]
    for path in sorted(EXAMPLES.glob("*.png")):
        image = Image.open(path).convert("RGB")
        for flip in (False, True):
            for index, turn in enumerate(turns):
                variant = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if flip else image
                variant = variant.transpose(turn) if turn is not None else variant
                variant.save(folder / f"{path.stem}-{int(flip)}{index}.png")
    return folder


def run_config(config: Config, work_dir: Path, timeout_s: float) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SDFT_")}
    env.update({
        "SDFT_BASE_MODEL": config.model, "SDFT_METHOD": config.method, "SDFT_RESOLUTION": str(config.resolution_px),
        "SDFT_MAX_TRAIN_STEPS": str(config.steps), "SDFT_TRAIN_BATCH_SIZE": str(config.batch_size),
        "SDFT_CACHE_LATENTS": str(config.cache).lower(), "SDFT_MIXED_PRECISION": config.precision,
        "SDFT_TORCH_COMPILE": str(config.compile).lower(),
        "SDFT_INSTANCE_URI": str(instance_folder(work_dir)), "SDFT_INSTANCE_PROMPT": "a photo of sks dog",
        "SDFT_OUTPUT_URI": str(work_dir / "out" / config.name), "SDFT_WORK_DIR": str(work_dir),
        "SDFT_CHECKPOINT_EVERY_STEPS": "1000000", "SDFT_NUM_VALIDATION_IMAGES": "0", "SDFT_FORCE": "true",
        "SDFT_RUN_ID": config.name, "SDFT_LOG_FORMAT": "json", "HF_HUB_OFFLINE": "1",
    })
    started = time.perf_counter()
    child = subprocess.Popen([sys.executable, "-m", "job"], cwd=REPO, env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    events: list[tuple[float, dict]] = []
    rss: list[tuple[float, int]] = []
    stderr: list[str] = []
    readers = [threading.Thread(target=_read_events, args=(child, started, events), daemon=True),
               threading.Thread(target=lambda: stderr.extend(child.stderr), daemon=True),
               threading.Thread(target=_poll_rss, args=(child, started, rss), daemon=True)]
    for reader in readers:
        reader.start()
    try:
        child.wait(timeout=timeout_s)
    finally:
        child.kill()
    for reader in readers:
        reader.join(timeout=10)
    if child.returncode != 0:
        failed = [e for _, e in events if e.get("event") == "job.failed"]
        reason = failed[-1].get("reason") if failed else "".join(stderr)[-2000:]
        raise RuntimeError(f"{config.name} exited {child.returncode}: {reason}")
    return {"config": config.name, **config.__dict__, **_measure(config, events, rss)}


def _read_events(child: subprocess.Popen, started: float, events: list) -> None:
    for line in child.stdout:
        if line.startswith("{"):
            events.append((time.perf_counter() - started, json.loads(line)))


def _poll_rss(child: subprocess.Popen, started: float, samples: list) -> None:
    status = Path(f"/proc/{child.pid}/status")
    while child.poll() is None:
        try:
            kib = next(int(line.split()[1]) for line in status.read_text().splitlines() if line.startswith("VmRSS:"))
        except (OSError, StopIteration):
            break
        samples.append((time.perf_counter() - started, kib * 1024))
        time.sleep(RSS_POLL_S)


def _measure(config: Config, events: list, rss: list) -> dict:
    def first(name: str, **match) -> tuple[float, dict]:
        return next((t, e) for t, e in events if e["event"] == name and all(e.get(k) == v for k, v in match.items()))

    steps = [(t, e) for t, e in events if e["event"] == "train.step"]
    # Steady training memory: from the first step's end (setup, caching and warm-up are behind) on.
    train_from = steps[0][0]
    train_to = first("stage.done", stage="train")[0]
    memory = first("train.memory")[1]
    # Steady rate: the job's own measure from the first step on (the first step pays warm-up).
    steps_per_s = steps[-1][1]["it_per_s"]
    in_training = [b for t, b in rss if train_from <= t <= train_to]
    return {
        "seconds_to_first_step": round(steps[0][0], 2),
        "steps_per_s": steps_per_s,
        "images_per_s": steps_per_s and round(steps_per_s * config.batch_size, 4),
        "peak_rss_train_mb": round(max(in_training) / 2**20) if in_training else None,
        "peak_rss_mb": round(max(b for _, b in rss) / 2**20) if rss else None,
        "peak_cuda_mb": memory.get("peak_cuda_mb"),
        "final_loss": steps[-1][1]["loss"],
        "stage_seconds": {e["stage"]: e["seconds"] for _, e in events if e["event"] == "stage.done"},
        # When each stage started, seconds after process start (imports are what precedes the first).
        "stage_started_s": {e["stage"]: round(t, 2) for t, e in events if e["event"] == "stage.start"},
    }
