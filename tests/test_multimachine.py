"""Two machines on loopback, as a JobSet runs them: one entrypoint.sh per SDFT_MACHINE_RANK, each with
its own work dir (nothing shared but the network and the output location).

Every kind of base model must resolve on every machine, and a failure on machine rank 1 must be
told in machine rank 1's own output (its pod's log), not only as a broken connection on rank 0.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from jobrun import EXAMPLES, JobResult
from s3server import free_ports
from test_entrypoint import ENTRYPOINT, entrypoint_env

EXIT_WAIT_S = 900
pytestmark = pytest.mark.slow  # each test runs the job end to end, twice


def _two_machines(tmp_path: Path, work_dirs: tuple[Path, Path] | None = None, **settings: str) -> list[JobResult]:
    port = str(free_ports(1)[0])
    work_dirs = work_dirs or (tmp_path / "machine-0", tmp_path / "machine-1")
    machines = []
    for rank, work in enumerate(work_dirs):
        env = entrypoint_env(tmp_path, SDFT_NUM_MACHINES="2", SDFT_MACHINE_RANK=str(rank), SDFT_MAIN_PROCESS_IP="127.0.0.1",
                             SDFT_MAIN_PROCESS_PORT=port, SDFT_WORK_DIR=str(work), SDFT_NUM_VALIDATION_IMAGES="0", **settings)
        machines.append(subprocess.Popen([str(ENTRYPOINT), "run"], env=env, cwd=tmp_path, stdout=subprocess.PIPE,
                                         stderr=subprocess.PIPE, text=True))
    results = []
    for machine in machines:
        try:
            stdout, stderr = machine.communicate(timeout=EXIT_WAIT_S)
        finally:
            if machine.poll() is None:
                machine.kill()
                machine.communicate()
        results.append(JobResult(machine.returncode, stdout, stderr))
    return results


def _folder_model(tmp_path_factory) -> str:
    from models_util import tiny_model_path

    return str(tiny_model_path(tmp_path_factory))


def _s3_model(tmp_path_factory, s3_server) -> str:
    from models_util import tiny_model_path, upload_folder

    s3_server.start()
    return upload_folder(s3_server, s3_server.create_bucket("two-machines-model"), tiny_model_path(tmp_path_factory), "tiny")


@pytest.mark.parametrize("kind", ["builtin", "folder", "s3"])
def test_two_machines_fine_tune_with_every_kind_of_base_model(kind, tmp_path, tmp_path_factory, request):
    settings = {}
    if kind == "folder":
        settings["SDFT_BASE_MODEL"] = _folder_model(tmp_path_factory)
    if kind == "s3":
        s3_server = request.getfixturevalue("s3_server")
        settings = {"SDFT_BASE_MODEL": _s3_model(tmp_path_factory, s3_server), **s3_server.env()}
    main, other = _two_machines(tmp_path, **settings)
    assert main.exit_code == 0, main.stdout[-3000:] + main.stderr[-3000:]
    assert other.exit_code == 0, other.stdout[-3000:] + other.stderr[-3000:]
    out = tmp_path / "out"
    assert (out / "_SUCCESS").exists()
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["steps"] == 4 and manifest["hardware"]["processes"] == 2
    assert not other.events  # machine rank 1's routine events stay quiet
    # Each machine resolved the model into its own work dir (nothing was shared on disk).
    if kind != "folder":
        for machine in ("machine-0", "machine-1"):
            assert list((tmp_path / machine / "models").rglob("unet/*.safetensors")), machine


def test_a_failure_on_machine_rank_1_is_told_in_its_own_output(tmp_path):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where machine 1's work dir should be")
    main, other = _two_machines(tmp_path, work_dirs=(tmp_path / "machine-0", blocker / "work"))
    assert other.exit_code != 0 and main.exit_code != 0
    [failed] = other.named("job.failed")
    assert failed["rank"] == 1 and failed["exit_code"] == 2, failed
    assert "SDFT_WORK_DIR" in failed["reason"] and str(blocker / "work") in failed["reason"]
    assert [e["event"] for e in other.events] == ["job.failed"]  # nothing else from rank 1
    assert not (tmp_path / "out" / "_SUCCESS").exists()
