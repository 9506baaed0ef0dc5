"""No host-device synchronisation in the training step between logging points (issue 15).

Both tests run the real job in process on builtin:tiny with `SDFT_LOG_EVERY_STEPS=5` over 12 steps,
so the logging points are steps 1, 5, 10 and 12, and every other step must not read the device:

- on the CPU, a torch function mode records every read of a tensor's value on the host (`.item()`,
  `float()`, `int()`, `bool()`, `.tolist()`, `.numpy()`, `.cpu()`) and the step it happened in;
- on a GPU (marker `gpu`), CUDA's own sync debug mode reports every synchronising call.

The step a read belongs to comes from the loop itself: each micro-step first draws its keyed noise
generator (`keyed_generator(seed, "noise", step, micro, rank)`), which the test watches.
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import pytest
import torch
from torch.overrides import TorchFunctionMode

from jobrun import EXAMPLES, TINY

pytestmark = pytest.mark.slow  # real fine-tunes, in process

STEPS, EVERY = 12, 5
LOGGING_POINTS = {1, 5, 10, 12}
READS = {"item", "tolist", "__float__", "__int__", "__bool__", "__index__", "numpy", "__array__", "cpu"}
# Reads of tensors that live on the CPU by design on every device: the keyed randomness that picks
# each step's examples and flips (drawn from CPU generators so that a resume sees the same draws),
# and the optimizer's step counters (CPU scalars for torch's AdamW unless fused).
CPU_BY_DESIGN = (str(Path("job") / "training_data.py"), str(Path("torch") / "optim"))


class _StepClock:
    """Which optimizer step (1-based) the loop is in, from its noise-generator draws."""

    def __init__(self, monkeypatch, on_first_step=None):
        import job.train

        self.step: int | None = None
        original = job.train.keyed_generator

        def watched(*keys):
            if len(keys) >= 3 and keys[1] == "noise":
                if self.step is None and on_first_step is not None:
                    on_first_step()
                self.step = keys[2] + 1
            return original(*keys)

        monkeypatch.setattr(job.train, "keyed_generator", watched)


def _settings(tmp_path: Path, **extra: str):
    from job.settings import Settings

    values = {**TINY, "SDFT_INSTANCE_URI": str(EXAMPLES), "SDFT_OUTPUT_URI": str(tmp_path / "out"),
              "SDFT_WORK_DIR": str(tmp_path / "work"), "SDFT_MAX_TRAIN_STEPS": str(STEPS),
              "SDFT_LOG_EVERY_STEPS": str(EVERY), "SDFT_CHECKPOINT_EVERY_STEPS": "1000",
              "SDFT_NUM_VALIDATION_IMAGES": "0", **extra}
    return Settings(**{name.removeprefix("SDFT_").lower(): value for name, value in values.items()})


def _logged_steps(out: Path) -> list[int]:
    import json

    return [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]


class _HostReads(TorchFunctionMode):
    """Records (step, caller) for every host read of a tensor value, except the CPU-by-design ones."""

    def __init__(self, clock: _StepClock | None):
        super().__init__()
        self.clock = clock
        self.reads: list[tuple[int | None, str]] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if getattr(func, "__name__", "") in READS:
            caller = sys._getframe(1)
            where = f"{caller.f_code.co_filename}:{caller.f_lineno}"
            if not any(part in caller.f_code.co_filename for part in CPU_BY_DESIGN):
                self.reads.append((self.clock.step, f"{func.__name__} at {where}"))
        return func(*args, **(kwargs or {}))


def test_the_step_reads_no_tensor_between_logging_points(tmp_path, monkeypatch):
    from job.run import run

    # The mode is entered at the first step (a function mode slows every op; set-up needs no watching).
    reads = _HostReads(None)
    clock = _StepClock(monkeypatch, on_first_step=reads.__enter__)
    reads.clock = clock
    try:
        run(_settings(tmp_path))
    finally:
        reads.__exit__(None, None, None)
    assert _logged_steps(tmp_path / "out") == sorted(LOGGING_POINTS)
    in_steps = [(step, where) for step, where in reads.reads if step is not None]
    assert {step for step, _ in in_steps} <= LOGGING_POINTS, [r for r in in_steps if r[0] not in LOGGING_POINTS]
    # At an interior logging point, the interval's losses come back in exactly one read.
    per_point = {step: [w for s, w in in_steps if s == step] for step in (5, 10)}
    assert all(len(found) == 1 and "tolist" in found[0] for found in per_point.values()), per_point


def test_every_step_is_logged_by_default_on_cpu(tmp_path, monkeypatch):
    from job.run import run

    run(_settings(tmp_path, SDFT_LOG_EVERY_STEPS=None))
    assert _logged_steps(tmp_path / "out") == list(range(1, STEPS + 1))


@pytest.mark.gpu  # conftest skips it without CUDA
def test_cuda_sync_debug_mode_sees_no_sync_between_logging_points(tmp_path, monkeypatch):
    from job.run import run

    clock = _StepClock(monkeypatch)
    settings = _settings(tmp_path, SDFT_MIXED_PRECISION="bf16")
    syncs: list[tuple[int | None, str]] = []

    def record(message, category, filename, lineno, file=None, line=None):
        if "synchroniz" in str(message):
            syncs.append((clock.step, f"{filename}:{lineno}: {message}"))

    with warnings.catch_warnings():
        warnings.simplefilter("always")
        monkeypatch.setattr(warnings, "showwarning", record)
        torch.cuda.set_sync_debug_mode("warn")
        try:
            run(settings)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    assert _logged_steps(tmp_path / "out") == sorted(LOGGING_POINTS)
    assert any(step in LOGGING_POINTS for step, _ in syncs), "the sync debug mode reported nothing at all"
    between = [(step, where) for step, where in syncs if step is not None and step not in LOGGING_POINTS]
    assert not between, between


def test_divergence_stops_at_the_logging_point_after_the_step_that_diverged(tmp_path):
    from jobrun import job_env, run_job

    out = tmp_path / "out"
    result = run_job(job_env(tmp_path / "work", SDFT_INSTANCE_URI=str(EXAMPLES), SDFT_OUTPUT_URI=str(out),
                             SDFT_LEARNING_RATE="1e8", SDFT_MAX_TRAIN_STEPS="20", SDFT_LOG_EVERY_STEPS=str(EVERY),
                             SDFT_CHECKPOINT_EVERY_STEPS="1000"))
    assert result.exit_code == 6, result.stdout[-3000:] + result.stderr[-3000:]
    reason = result.failure["reason"]
    diverged = int(reason.split(" at step ")[1].split("/")[0])
    noticed = int(reason.split("read at step ")[1].split(":")[0]) if "read at step " in reason else diverged
    # Read at the first logging point (1, 5, 10, …) at or after the step that diverged: within one interval.
    assert noticed == min(p for p in [1, *range(EVERY, 21, EVERY)] if p >= diverged), reason
    assert not (out / "_SUCCESS").exists() and not (out / "lora").exists()
    logged = [e["step"] for e in result.named("train.step")]
    assert all(step < diverged and (step == 1 or step % EVERY == 0) for step in logged), logged
