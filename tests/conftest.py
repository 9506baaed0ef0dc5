"""Shared fixtures. The S3 server class lives in tests/s3server.py; keep this file to fixtures."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from s3server import S3Server


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path_factory: pytest.TempPathFactory) -> None:
    """Hermetic environment: no SDFT_* / AWS_* from the developer's shell, no ~/.aws files, and
    no instance-metadata probing (which would add seconds to every missing-credentials case)."""
    _make_hermetic(monkeypatch, tmp_path_factory)


def _make_hermetic(monkeypatch: pytest.MonkeyPatch, tmp_path_factory: pytest.TempPathFactory) -> None:
    for name in list(os.environ):
        if name.startswith(("SDFT_", "AWS_")):
            monkeypatch.delenv(name)
    missing = tmp_path_factory.getbasetemp() / "no-aws-config"
    monkeypatch.setenv("AWS_CONFIG_FILE", str(missing))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(missing))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    """A SeaweedFS S3 server on 127.0.0.1 for the whole session; stop()/start() work mid-test."""
    server = S3Server(Path(tmp_path_factory.mktemp("seaweedfs")))
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def s3_env(s3_server: S3Server, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """Point this test process at the server through the standard AWS variables."""
    env = s3_server.env()
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    return env


@pytest.fixture(scope="module")
def module_s3_env(s3_server: S3Server, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """`clean_env` + `s3_env` for module-scoped fixtures (one expensive job run shared by a
    module's tests), which are set up before the function-scoped `clean_env` runs."""
    with pytest.MonkeyPatch.context() as monkeypatch:
        _make_hermetic(monkeypatch, tmp_path_factory)
        env = s3_server.env()
        for name, value in env.items():
            monkeypatch.setenv(name, value)
        yield env


@pytest.fixture
def bucket(s3_server: S3Server) -> str:
    """A fresh, empty bucket with a unique name (restarting the server if a test stopped it)."""
    s3_server.start()
    return s3_server.create_bucket(f"t-{uuid.uuid4().hex[:16]}")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """`gpu` tests need CUDA: without it they are skipped (and say so), never run on the CPU."""
    gpu_items = [item for item in items if item.get_closest_marker("gpu")]
    if not gpu_items:
        return
    import torch

    if torch.cuda.is_available():
        return
    for item in gpu_items:
        item.add_marker(pytest.mark.skip(reason="needs CUDA (marked gpu)"))
