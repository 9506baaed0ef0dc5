"""entrypoint.sh as the container runs it: several processes through accelerate, one process
directly (so SIGTERM from the kubelet reaches the job, which checkpoints and exits 143)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from jobrun import EXAMPLES, REPO, job_env

pytestmark = pytest.mark.slow  # each test runs the job end to end

ENTRYPOINT = REPO / "entrypoint.sh"

def instance_dir(tmp_path: Path) -> Path:
    """The example images, or a few generated ones when the examples are missing."""
    if list(EXAMPLES.glob("*.png")):
        return EXAMPLES
    from PIL import Image

    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(3):
        Image.new("RGB", (48, 48), (40 * i, 120, 200 - 40 * i)).save(folder / f"dog-{i}.png")
    return folder


def entrypoint_env(tmp_path: Path, **settings: str) -> dict[str, str]:
    """A tiny CPU fine-tune, with the venv's python and accelerate first on PATH (as in the image)."""
    venv_bin = str(Path(sys.executable).parent)
    env = job_env(
        tmp_path / "work",
        PATH=f"{venv_bin}:{os.environ.get('PATH', '')}",
        PYTHONPATH=str(REPO),
        OMP_NUM_THREADS="1",
        SDFT_INSTANCE_URI=str(instance_dir(tmp_path)),
        SDFT_OUTPUT_URI=str(tmp_path / "out"),
        SDFT_MAX_TRAIN_STEPS="4",
        SDFT_CHECKPOINT_EVERY_STEPS="2",
        SDFT_SAMPLE_INFERENCE_STEPS="2",
        SDFT_RUN_ID="entrypoint-test",
    )
    env.update(settings)
    return env


def events(stdout: str) -> list[dict]:
    return [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]


def test_two_processes_go_through_accelerate_and_finish(tmp_path: Path) -> None:
    # Every Python process started under this PYTHONPATH records the rank torchrun gave it, so the
    # test sees the two workers themselves, not just a successful output.
    probe = tmp_path / "probe"
    probe.mkdir()
    ranks_file = tmp_path / "ranks.txt"
    (probe / "sitecustomize.py").write_text(
        "import os\n"
        "if 'RANK' in os.environ and 'WORLD_SIZE' in os.environ:\n"
        f"    with open({str(ranks_file)!r}, 'a') as f:\n"
        "        f.write(f\"{os.environ['RANK']} {os.environ['WORLD_SIZE']} {os.getpid()}\\n\")\n"
    )
    env = entrypoint_env(tmp_path, SDFT_NUM_PROCESSES="2", SDFT_MAIN_PROCESS_PORT="29561")
    env["PYTHONPATH"] = f"{probe}:{REPO}"

    done = subprocess.run(
        [str(ENTRYPOINT), "run"], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=900
    )

    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    workers = {tuple(line.split()[:2]) for line in ranks_file.read_text().splitlines()}
    assert workers == {("0", "2"), ("1", "2")}
    assert len(set(ranks_file.read_text().split()[2::3])) == 2, "two distinct worker processes"
    out = tmp_path / "out"
    assert (out / "_SUCCESS").exists()
    assert (out / "lora" / "pytorch_lora_weights.safetensors").exists()
    assert json.loads((out / "manifest.json").read_text())["steps"] == 4
    # Only the main process logs.
    assert len([e for e in events(done.stdout) if e.get("event") == "job.start"]) == 1


def test_one_process_is_the_job_itself_and_sigterm_checkpoints(tmp_path: Path) -> None:
    env = entrypoint_env(tmp_path, SDFT_MAX_TRAIN_STEPS="100000", SDFT_CHECKPOINT_EVERY_STEPS="100000")
    proc = subprocess.Popen(
        [str(ENTRYPOINT), "run"], env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        # Wait until training is under way, reading the job's own log events.
        deadline = time.monotonic() + 600
        seen = []
        for line in proc.stdout:
            seen.append(line)
            if '"train.step"' in line or time.monotonic() > deadline:
                break
        assert any('"train.step"' in line for line in seen), "".join(seen)[-3000:]
        # exec: the entrypoint's PID is now Python running the job, no shell in between.
        comm = Path(f"/proc/{proc.pid}/comm").read_text().strip()
        assert comm.startswith("python"), comm

        os.kill(proc.pid, signal.SIGTERM)
        rest, stderr = proc.communicate(timeout=600)
    finally:
        if proc.poll() is None:
            proc.kill()

    assert proc.returncode == 143, stderr[-3000:]
    log = events("".join(seen) + rest)
    assert any(e.get("event") == "checkpoint.saved" for e in log)
    assert log[-1].get("event") == "job.failed" and log[-1].get("exit_code") == 143
    checkpoints = tmp_path / "out" / "checkpoints"
    assert any(checkpoints.rglob("*")), "a checkpoint was uploaded before exiting"
    assert json.loads((tmp_path / "out" / "status.json").read_text())["exit_code"] == 143


def test_two_processes_stopped_by_sigterm_exit_143_and_the_same_command_resumes(tmp_path: Path) -> None:
    from jobrun import WatchedJob
    from s3server import free_ports

    env = entrypoint_env(tmp_path, SDFT_NUM_PROCESSES="2", SDFT_MAIN_PROCESS_PORT=str(free_ports(1)[0]),
                         SDFT_MAX_TRAIN_STEPS="60", SDFT_CHECKPOINT_EVERY_STEPS="1000", SDFT_NUM_VALIDATION_IMAGES="0")
    job = WatchedJob(env, command=[str(ENTRYPOINT), "run"])
    assert job.wait_for("train.step", 600), job.output_tail
    job.process.send_signal(signal.SIGTERM)  # to entrypoint.sh, as tini delivers it
    stopped = job.finish(600)

    assert stopped.exit_code == 143, stopped.stdout[-3000:] + stopped.stderr[-3000:]
    [saved] = stopped.named("checkpoint.saved")
    step = saved["step"]
    assert 1 <= step < 60
    marker = json.loads((tmp_path / "out" / "checkpoints" / f"step-{step}" / "_COMPLETE").read_text())
    assert marker["step"] == step and marker["files"]  # complete: its marker lists every file
    assert json.loads((tmp_path / "out" / "status.json").read_text())["exit_code"] == 143

    again = subprocess.run([str(ENTRYPOINT), "run"], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=900)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    log = events(again.stdout)
    assert [e["step"] for e in log if e.get("event") == "checkpoint.resumed"] == [step]
    assert [e["step"] for e in log if e.get("event") == "train.step"][0] == step + 1
    assert (tmp_path / "out" / "_SUCCESS").exists()


def test_two_processes_failing_otherwise_keep_the_launcher_status(tmp_path: Path) -> None:
    # Only an all-143 ending is a preemption; ranks that exit 3 on an empty instance folder are not.
    from s3server import free_ports

    empty = tmp_path / "empty"
    empty.mkdir()
    env = entrypoint_env(tmp_path, SDFT_NUM_PROCESSES="2", SDFT_MAIN_PROCESS_PORT=str(free_ports(1)[0]),
                         SDFT_INSTANCE_URI=str(empty))
    done = subprocess.run([str(ENTRYPOINT), "run"], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=900)
    assert done.returncode not in (0, 143), done.stdout[-3000:] + done.stderr[-3000:]
    assert [e["exit_code"] for e in events(done.stdout) if e.get("event") == "job.failed"][0] == 3
