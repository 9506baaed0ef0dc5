"""Running the real job (`python -m job`) in a subprocess, the way a container or a pod does."""

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

# A fast, real fine-tune of builtin:tiny: the tests' common ground.
TINY = {
    "SDFT_BASE_MODEL": "builtin:tiny",
    "SDFT_INSTANCE_PROMPT": "a photo of sks dog",
    "SDFT_RESOLUTION": "32",
    "SDFT_MAX_TRAIN_STEPS": "6",
    "SDFT_CHECKPOINT_EVERY_STEPS": "3",
    "SDFT_NUM_VALIDATION_IMAGES": "1",
    "SDFT_SAMPLE_INFERENCE_STEPS": "3",
    "SDFT_RUN_ID": "test-run",
    "SDFT_LOG_FORMAT": "json",
}


@dataclass
class JobResult:
    exit_code: int
    stdout: str
    stderr: str

    @property
    def events(self) -> list[dict]:
        """The JSON log events on stdout (other lines, if any, are ignored)."""
        events = []
        for line in self.stdout.splitlines():
            if line.startswith("{"):
                try:
                    events.append(json.loads(line))
                except json.JSONDecodeError:
                    pass
        return events

    def named(self, event: str) -> list[dict]:
        return [e for e in self.events if e.get("event") == event]

    @property
    def failure(self) -> dict | None:
        failed = self.named("job.failed")
        return failed[-1] if failed else None


def job_env(work_dir: Path, **settings: str) -> dict[str, str]:
    """The environment of one run: this process's (already hermetic) plus the tiny defaults."""
    env = {**os.environ, **TINY, "SDFT_WORK_DIR": str(work_dir), "HF_HUB_OFFLINE": "1"}
    env.update(settings)
    return {k: v for k, v in env.items() if v is not None}


def run_job(env: dict[str, str], *args: str, timeout_s: float = 900) -> JobResult:
    """Runs the job to its end; `timeout_s` is wide: 2 shared cores under another suite run slowly."""
    completed = subprocess.run(
        [sys.executable, "-m", "job", *args], env=env, cwd=REPO, capture_output=True, text=True, timeout=timeout_s
    )
    return JobResult(completed.returncode, completed.stdout, completed.stderr)


class WatchedJob:
    """A job running in the background whose log lines are read as they come (for signalling it)."""

    def __init__(self, env: dict[str, str], *args: str, command: list[str] | None = None):
        """Starts `python -m job *args`, or `command` (e.g. an `accelerate launch` line)."""
        self.process = subprocess.Popen(command or [sys.executable, "-m", "job", *args], env=env, cwd=REPO,
                                        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.stdout: list[str] = []
        self.stderr: list[str] = []
        self._seen: set[str] = set()
        self._changed = threading.Condition()
        self._readers = [threading.Thread(target=self._read, daemon=True),
                         threading.Thread(target=lambda: self.stderr.extend(self.process.stderr), daemon=True)]
        for reader in self._readers:
            reader.start()

    def _read(self) -> None:
        for line in self.process.stdout:
            self.stdout.append(line)
            if line.startswith("{"):
                with self._changed:
                    self._seen.add(json.loads(line).get("event", ""))
                    self._changed.notify_all()
        with self._changed:  # end of output: the process is gone, nobody should wait any longer
            self._seen.add("<exit>")
            self._changed.notify_all()

    def wait_for(self, event: str, timeout_s: float) -> bool:
        """True once the job logged `event`; False if it exited first or `timeout_s` passed."""
        deadline = time.monotonic() + timeout_s
        with self._changed:
            while event not in self._seen and "<exit>" not in self._seen:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._changed.wait(remaining)
            return event in self._seen

    def finish(self, timeout_s: float) -> JobResult:
        """Waits for the exit (killing the job past `timeout_s`) and returns what it printed."""
        try:
            exit_code = self.process.wait(timeout_s)
        finally:
            if self.process.poll() is None:
                self.process.kill()
                self.process.wait()
            for reader in self._readers:
                reader.join(10)
        return JobResult(exit_code, "".join(self.stdout), "".join(self.stderr))

    @property
    def output_tail(self) -> str:
        return "".join(self.stdout[-20:] + self.stderr[-20:])

