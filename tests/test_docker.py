"""The image recipe: linters, and the facts issue 5 asks of it (no Docker engine needed)."""

from __future__ import annotations

import json
import re
import subprocess

from tools import REPO, run_checkov, shell_scripts, tool

DOCKERFILE = REPO / "Dockerfile"


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    pairs = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            pairs.append((word.upper(), rest.strip()))
    return pairs


def test_hadolint_passes() -> None:
    done = subprocess.run([tool("hadolint"), str(DOCKERFILE)], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


def test_shellcheck_passes_on_every_script() -> None:
    scripts = shell_scripts()
    assert REPO / "entrypoint.sh" in scripts
    done = subprocess.run([tool("shellcheck"), *map(str, scripts)], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


def test_checkov_passes_on_the_dockerfile() -> None:
    done = run_checkov("-f", "Dockerfile", "--framework", "dockerfile")
    assert done.returncode == 0, done.stdout + done.stderr


def test_base_image_is_a_build_arg_pinned_by_tag_and_digest() -> None:
    steps = instructions()
    base = next(rest for word, rest in steps if word == "ARG" and rest.startswith("BASE_IMAGE="))
    assert re.fullmatch(r"BASE_IMAGE=[\w./-]+:[\w.-]+@sha256:[0-9a-f]{64}", base), base
    assert steps[[w for w, _ in steps].index("FROM")][1].startswith("${BASE_IMAGE}")
    assert len([w for w, _ in steps if w == "FROM"]) >= 2, "multi-stage"


def test_dependencies_are_installed_with_hashes_before_the_code() -> None:
    steps = instructions()
    runs = [i for i, (w, rest) in enumerate(steps) if w == "RUN" and "--require-hashes" in rest]
    code = [i for i, (w, rest) in enumerate(steps) if w == "COPY" and rest.startswith("job/")]
    assert runs and code and runs[0] < code[0]


def test_runtime_stage_is_non_root_with_tini_and_no_healthcheck() -> None:
    steps = instructions()
    final = steps[max(i for i, (w, _) in enumerate(steps) if w == "FROM"):]
    user = [rest for w, rest in final if w == "USER"][-1]
    assert re.fullmatch(r"[1-9]\d*(:\d+)?", user), "numeric, non-root user"
    entrypoint = json.loads([rest for w, rest in final if w == "ENTRYPOINT"][-1])
    assert entrypoint[0] == "/usr/bin/tini" and entrypoint[-1] == "/app/entrypoint.sh"
    assert not [w for w, _ in steps if w == "HEALTHCHECK"]
    labels = " ".join(rest for w, rest in final if w == "LABEL")
    for key in ("version", "revision", "source"):
        assert f"org.opencontainers.image.{key}=" in labels
    env = " ".join(rest for w, rest in final if w == "ENV")
    assert "HF_HOME=/cache/huggingface" in env and "SDFT_WORK_DIR=/work" in env


def test_entrypoint_is_strict_and_execs_the_job_for_one_process() -> None:
    lines = [l for l in (REPO / "entrypoint.sh").read_text().splitlines() if l.strip() and not l.startswith("#")]
    assert "set -euo pipefail" in lines
    # One process: the job itself replaces the shell, so `docker stop` reaches it directly.
    assert any(l.strip() == 'exec python -m job "$@"' for l in lines)
    # Several: the launcher runs as a child so that its status can become 143 after a preemption.
    launch = next(l.strip() for l in lines if "accelerate launch" in l)
    assert launch.startswith("accelerate launch --multi_gpu")
    assert lines[-1].strip() == 'exit "${status}"'


def test_dockerignore_lets_in_only_what_the_image_needs() -> None:
    lines = (REPO / ".dockerignore").read_text().splitlines()
    patterns = [line.strip() for line in lines if line.strip() and not line.startswith("#")]
    assert patterns[0] == "*", "ignore everything, then let in what the build copies"
    assert "!docker/requirements.lock" in patterns and "!job/" in patterns


def pins(text: str) -> dict[str, str]:
    found = {}
    for name, version in re.findall(r"^([A-Za-z0-9_.-]+)==([^\s;\\]+)", text, re.M):
        found[re.sub(r"[-_.]+", "-", name).lower()] = version.split("+")[0]
    return found


def test_image_lock_hashes_every_pin_and_agrees_with_requirements_lock() -> None:
    text = (REPO / "docker" / "requirements.lock").read_text()
    image = pins(text)
    for block in re.split(r"\n(?=[A-Za-z0-9])", text):
        if "==" in block and not block.startswith("#"):
            assert "--hash=sha256:" in block, block
    for name, version in pins((REPO / "requirements.lock").read_text()).items():
        assert image.get(name) == version, f"{name}: {image.get(name)} in the image, {version} in requirements.lock"
    for name, version in pins((REPO / "docker" / "image-only.txt").read_text()).items():
        assert image.get(name) == version, f"{name}: {image.get(name)} in the image, {version} in image-only.txt"
    for name, version in pins((REPO / "requirements-data.lock").read_text()).items():
        assert image.get(name) == version, f"{name}: {image.get(name)} in the image, {version} in requirements-data.lock"
    assert image["torch"] == "2.13.0"
    assert any(name.startswith("nvidia-") for name in image), "torch's CUDA wheels are locked too"


def test_no_syntax_line_so_the_build_needs_no_registry() -> None:
    # BuildKit fetches a "# syntax=" frontend from a registry; the built-in one reads this file.
    assert not re.search(r"^#\s*syntax\s*=", DOCKERFILE.read_text(), re.M | re.I)


def test_plain_build_installs_from_pypi_and_make_image_from_the_hashed_wheelhouse() -> None:
    steps = instructions()
    assert ("ARG", "DEPS=index") in steps[: [w for w, _ in steps].index("FROM")], "a plain docker build uses PyPI"
    stages = {rest.split(" AS ")[-1]: i for i, (w, rest) in enumerate(steps) if w == "FROM"}
    assert {"deps-index", "deps-wheelhouse"} <= set(stages)
    assert any(w == "FROM" and rest.startswith("deps-${DEPS} ") for w, rest in steps)
    wheelhouse_run = next(rest for w, rest in steps[stages["deps-wheelhouse"]:] if w == "RUN")
    assert "--mount=type=bind,source=.work/image/wheels," in wheelhouse_run
    assert "--no-index" in wheelhouse_run and "--require-hashes" in wheelhouse_run
    assert "!.work/image/wheels/" in (REPO / ".dockerignore").read_text().splitlines()
