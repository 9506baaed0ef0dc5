"""Finding the linters and tools the infrastructure tests run (venv first, then PATH)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent


def tool(name: str, *extra_places: Path) -> str:
    """The venv's copy of a tool (from PyPI, so a fresh CI machine has the same one), else PATH's."""
    for place in (VENV_BIN / name, *extra_places):
        if place.is_file():
            return str(place)
    found = shutil.which(name)
    if not found:
        pytest.skip(f"{name} is not installed (make test-deps installs it)")
    return found


def checkov() -> str:
    """checkov lives in its own venv (.venv/checkov): its pins (boto3, packaging, networkx) clash
    with the job's, so it cannot share .venv with them."""
    return tool("checkov", REPO / ".venv" / "checkov" / "bin" / "checkov")


def run_checkov(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [checkov(), "--config-file", str(REPO / ".checkov.yaml"), *args],
        cwd=REPO, capture_output=True, text=True, timeout=600,
    )


def shell_scripts() -> list[Path]:
    skip = {".git", ".venv", ".work", "outputs", "node_modules"}
    return sorted(
        p for p in REPO.rglob("*.sh") if not skip & set(p.relative_to(REPO).parts)
    )
