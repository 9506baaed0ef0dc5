"""The layering of `job/` (edge → orchestrator → stages → storage / settings → foundations, no cycles,
botocore only in storage, storage backends on the base only) is kept by import-linter's contracts in
pyproject.toml; these tests run it, and show that it catches a violation."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from jobrun import REPO

# import-linter is a test dependency (requirements-test.txt): without it these fail, not skip.
LINT = [sys.executable, "-c", "import sys; from importlinter.cli import lint_imports_command; sys.exit(lint_imports_command())"]


def _lint(root: Path) -> subprocess.CompletedProcess:
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(root)}
    return subprocess.run([*LINT, "--no-cache", "--no-logo"], cwd=root, env=env, capture_output=True, text=True,
                          timeout=300)


def test_the_import_layers_are_kept():
    result = _lint(REPO)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "4 kept, 0 broken" in result.stdout


@pytest.mark.parametrize("module, bad_import, broken", [
    ("storage/base.py", "import job.train", "edge -> orchestrator -> stages"),  # storage imports a stage
    ("sampling.py", "import job.class_images", "no two modules of job import each other"),  # a cycle
    ("storage/local.py", "import job.storage.s3", "each storage backend imports only the base"),
    ("checkpoints.py", "import botocore", "nothing outside job.storage talks to botocore"),
])
def test_the_check_fails_on_a_violation(tmp_path, module, bad_import, broken):
    shutil.copytree(REPO / "job", tmp_path / "job", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "pyproject.toml", tmp_path)
    path = tmp_path / "job" / module
    path.write_text(path.read_text() + f"\n{bad_import}  # injected\n")
    result = _lint(tmp_path)
    assert result.returncode != 0
    verdicts = [line for line in result.stdout.splitlines() if line.endswith(("KEPT", "BROKEN"))]
    assert next(v for v in verdicts if v.startswith(broken)).endswith("BROKEN"), result.stdout
