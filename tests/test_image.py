"""The built image (make image), started the way users start it and checked from outside.

Every test runs `docker run` against the image (default sdft:local; SDFT_TEST_IMAGE picks another)
with a read-only root filesystem, tmpfs /tmp and /work, and reads what the container left behind:
its exit code, its JSON log lines, the files in a mounted folder or in the suite's S3 server.
Marked `image` (make test-image runs them; plain make test deselects them). Without a Docker
engine or the image they skip, except in CI (CI=true), where they fail.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from jobrun import EXAMPLES, TINY, JobResult, WatchedJob
from models_util import contract_files, download_prefix, upload_folder

pytestmark = pytest.mark.image

IMAGE = os.environ.get("SDFT_TEST_IMAGE", "sdft:local")
UID = 10001
RUN_TIMEOUT_S = 900  # a tiny fine-tune takes well under a minute; the machine may be busy
STOP_GRACE_S = 120  # docker stop's wait before SIGKILL: the checkpoint upload must fit in it


def docker(*args: str, timeout_s: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(["docker", *args], capture_output=True, text=True, timeout=timeout_s)


@pytest.fixture(scope="module")
def image() -> str:
    """The image's name, once a Docker engine answers and has the image; else skip (CI: fail)."""
    problem = None
    if not shutil.which("docker"):
        problem = "no docker client on PATH"
    elif (info := docker("info", "--format", "{{.ServerVersion}}")).returncode:
        problem = f"no Docker engine answers: {info.stderr.strip()[-300:]}"
    elif docker("image", "inspect", IMAGE).returncode:
        problem = f"the image {IMAGE} is missing: make image builds it"
    if problem:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"{problem} (CI: image tests must run)")
        pytest.skip(problem)
    return IMAGE


@pytest.fixture
def containers() -> Iterator[Callable[[], str]]:
    """Hands out container names; every container by those names is removed after the test."""
    names: list[str] = []

    def new_name() -> str:
        names.append(f"sdft-test-{uuid.uuid4().hex[:12]}")
        return names[-1]

    yield new_name
    for name in names:
        docker("rm", "--force", name, timeout_s=120)


def writable_folder(path: Path) -> Path:
    """A host folder the container's user (uid 10001) can write into."""
    path.mkdir(parents=True, exist_ok=True)
    path.chmod(0o777)
    return path


def run_args(name: str, *options: str, **settings: str) -> list[str]:
    """`docker run` as the README shows it: read-only root, tmpfs for scratch, settings as -e."""
    env = {**TINY, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", **settings}
    return [
        "docker", "run", "--rm", "--name", name, "--read-only", "--tmpfs", "/tmp", "--tmpfs", "/work",
        *options, *(arg for key, value in env.items() for arg in ("--env", f"{key}={value}")), IMAGE, "run",
    ]  # fmt: skip


def run_container(args: list[str], env: dict[str, str] | None = None) -> JobResult:
    """Runs `docker run …` to the end; `env` adds to the docker client's environment."""
    done = subprocess.run(args, env={**os.environ, **(env or {})}, capture_output=True, text=True,
                          timeout=RUN_TIMEOUT_S)
    return JobResult(done.returncode, done.stdout, done.stderr)


def local_run_args(name: str, out: Path, *options: str, **settings: str) -> list[str]:
    """A run with the example images mounted read-only and `out` mounted as the output folder."""
    mounts = ["--network", "none", "--volume", f"{EXAMPLES}:/data/instance:ro", "--volume", f"{out}:/out"]
    return run_args(name, *mounts, *options, SDFT_INSTANCE_URI="/data/instance", SDFT_OUTPUT_URI="/out", **settings)


def files_under(folder: Path) -> set[str]:
    return {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()}


def test_settings_prints_the_table_and_the_image_runs_as_10001_under_tini(image: str) -> None:
    from job.settings import settings_table

    done = docker("run", "--rm", "--network", "none", image, "settings")

    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip() == settings_table().strip(), "the image's settings differ from this tree: make image"
    config = json.loads(docker("image", "inspect", "--format", "{{json .Config}}", image).stdout)
    assert config["User"] in (str(UID), f"{UID}:{UID}")
    assert config["Entrypoint"][0] == "/usr/bin/tini"


def test_lora_fine_tune_read_only_without_network_writes_the_contract_files_as_10001(
    image: str, tmp_path: Path, containers
) -> None:
    out = writable_folder(tmp_path / "out")

    result = run_container(local_run_args(containers(), out))

    assert result.exit_code == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert files_under(out) == contract_files("lora")
    assert {(p.stat().st_uid, p.stat().st_gid) for p in out.rglob("*")} == {(UID, UID)}
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["steps"] == int(TINY["SDFT_MAX_TRAIN_STEPS"]) and manifest["hardware"]["processes"] == 1
    assert [e["event"] for e in result.events][-1] == "job.done"


def test_s3_in_and_out_through_the_host_network(image: str, s3_server, bucket: str, containers) -> None:
    instance_uri = upload_folder(s3_server, bucket, EXAMPLES, "subjects/dog")

    # As the README shows it: the credentials pass by name from the client's environment.
    credentials = s3_server.env()
    result = run_container(run_args(
        containers(), "--network", "host", *(f"--env={name}" for name in credentials),
        SDFT_INSTANCE_URI=instance_uri, SDFT_OUTPUT_URI=f"s3://{bucket}/out/",
    ), env=credentials)

    assert result.exit_code == 0, result.stdout[-3000:] + result.stderr[-3000:]
    inputs = json.loads(s3_server.client().get_object(Bucket=bucket, Key="out/manifest.json")["Body"].read())["inputs"]
    assert sorted(Path(i["path"]).name for i in inputs) == sorted(p.name for p in EXAMPLES.glob("*.png"))
    keys = {o["Key"] for o in s3_server.client().list_objects_v2(Bucket=bucket, Prefix="out/")["Contents"]}
    assert {k.removeprefix("out/") for k in keys} == contract_files("lora")


def test_docker_stop_checkpoints_exits_143_and_the_same_run_resumes(
    image: str, tmp_path: Path, containers
) -> None:
    steps = 200
    out = writable_folder(tmp_path / "out")
    args = local_run_args(containers(), out, SDFT_MAX_TRAIN_STEPS=str(steps), SDFT_CHECKPOINT_EVERY_STEPS="1000")
    name = args[args.index("--name") + 1]

    job = WatchedJob({**os.environ}, command=args)
    try:
        assert job.wait_for("train.step", timeout_s=RUN_TIMEOUT_S), job.output_tail
        # Checked from outside while it trains: PID 1 is tini, the job runs as 10001.
        pid1 = docker("exec", name, "cat", "/proc/1/comm")
        assert pid1.stdout.strip() == "tini", pid1.stdout + pid1.stderr
        uids = docker("exec", name, "sh", "-c", "awk '/^Uid:/ {print $2}' /proc/[0-9]*/status | sort -u")
        assert uids.stdout.split() == [str(UID)], uids.stdout + uids.stderr
        stop = docker("stop", "--time", str(STOP_GRACE_S), name, timeout_s=STOP_GRACE_S + 60)
        assert stop.returncode == 0, stop.stderr
    finally:
        stopped = job.finish(timeout_s=STOP_GRACE_S + 60)

    assert stopped.exit_code == 143, stopped.stdout[-3000:] + stopped.stderr[-3000:]
    saved = stopped.named("checkpoint.saved")
    assert len(saved) == 1 and 1 <= saved[0]["step"] < steps, "stopped mid-training"
    step = saved[0]["step"]
    checkpoint = out / "checkpoints" / f"step-{step}"
    marker = json.loads((checkpoint / "_COMPLETE").read_text())
    assert {name: f["bytes"] for name, f in marker["files"].items()} == {
        p.relative_to(checkpoint).as_posix(): p.stat().st_size for p in checkpoint.rglob("*")
        if p.is_file() and p.name != "_COMPLETE"}
    assert json.loads((out / "status.json").read_text())["exit_code"] == 143
    assert not (out / "_SUCCESS").exists()

    resumed = run_container(args)

    assert resumed.exit_code == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert [e["step"] for e in resumed.named("checkpoint.resumed")] == [step]
    assert resumed.named("train.step")[0]["step"] == step + 1
    assert json.loads((out / "manifest.json").read_text())["steps"] == steps
    assert files_under(out) == contract_files("lora")


def test_two_processes_in_the_container_finish_a_fine_tune(image: str, tmp_path: Path, containers) -> None:
    out = writable_folder(tmp_path / "out")

    result = run_container(local_run_args(containers(), out, SDFT_NUM_PROCESSES="2"))

    assert result.exit_code == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert files_under(out) == contract_files("lora")
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["steps"] == int(TINY["SDFT_MAX_TRAIN_STEPS"])
    assert manifest["hardware"]["processes"] == 2
    assert len(result.named("job.start")) == 1, "only the main process logs"
