"""`benchmarks/gpu.sh --dry-run` end to end on the CPU, so the one-shot GPU script cannot rot.

The dry run is the real script (the same shell wrapper, the same Python, the same job runs and
FLOP counts) with tiny models, a few steps and no CUDA; only torch.compile is left out (minutes on
a CPU), and its rows must say so. A GPU session runs the same file without `--dry-run`.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from jobrun import REPO

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    results = tmp_path_factory.mktemp("results")
    env = {**os.environ, "PYTHON": sys.executable, "TMPDIR": str(tmp_path_factory.mktemp("tmp"))}
    completed = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu.sh"), "--dry-run", str(results)],
                               env=env, cwd=REPO, capture_output=True, text=True, timeout=1500)
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    rows = [json.loads(line) for line in (results / "results.jsonl").read_text().splitlines()]
    return {"results": results, "rows": {row["config"]: row for row in rows}, "order": [r["config"] for r in rows],
            "stdout": completed.stdout}


def test_every_configuration_has_one_json_line(dry_run):
    from job.builtin_models import BUILTINS

    rows = dry_run["rows"]
    assert len(rows) == len(dry_run["order"]), "one line per configuration"
    runs = [name for name in rows if name != "gpu-tests"]
    assert len(runs) == 8  # 4 configurations, without and with torch.compile
    for name in runs:
        row = rows[name]
        if row["model"].removeprefix("builtin:") not in BUILTINS:
            assert row["status"] == "skipped" and "not in this tree" in row["reason"]  # lands with issue 11
        elif row["compile"]:
            assert row["status"] == "skipped" and "compile" in row["reason"]
        else:
            assert row["status"] == "ok", row


def test_measured_rows_carry_rates_memory_and_flops(dry_run):
    measured = [row for row in dry_run["rows"].values() if row.get("status") == "ok" and row["config"] != "gpu-tests"]
    assert {(r["method"], r["batch_size"]) for r in measured} >= {("lora", 1), ("lora", 4), ("dreambooth", 1)}
    for row in measured:
        assert row["seconds_to_first_step"] > 0 and row["steps_per_s"] > 0
        assert row["images_per_s"] == pytest.approx(row["steps_per_s"] * row["batch_size"], rel=1e-3)
        assert row["gflops_per_step"] > 0
        assert row["peak_cuda_mb"] is None and row["mfu"] is None  # no GPU: no CUDA memory, no peak to divide by
    by = {(r["model"], r["method"], r["batch_size"]): r["gflops_per_step"] for r in measured}
    # DreamBooth's backward also computes every weight's gradient.
    assert by[("builtin:tiny", "dreambooth", 1)] > by[("builtin:tiny", "lora", 1)]


def test_step_flops_are_linear_in_the_batch(tmp_path_factory):
    """gpu.py counts at batch 1 and multiplies: that holds only if no op mixes samples."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    from flops import step_flops
    from models_util import tiny_model_path

    model = tiny_model_path(tmp_path_factory)
    one, four = step_flops(model, 64, "lora"), step_flops(model, 64, "lora", batch_size=4)
    assert one > 0 and four == 4 * one


def test_the_tests_ran_and_skipped_without_cuda(dry_run):
    row = dry_run["rows"]["gpu-tests"]
    assert row["status"] == "ok" and "skipped" in row["summary"], row
    assert "needs CUDA" in (dry_run["results"] / "tests.log").read_text()


def test_the_table_and_environment_are_written(dry_run):
    results = dry_run["results"]
    table = (results / "table.md").read_text()
    assert table.count("\n| ") == len(dry_run["rows"]) + 1  # header + one line per row
    for name in dry_run["rows"]:
        assert f"| {name} |" in table
    assert table in dry_run["stdout"]
    env = json.loads((results / "env.json").read_text())
    assert env["dry_run"] is True and env["cuda"] is False and env["versions"]["torch"]


def test_mfu_uses_the_dense_bf16_peak_of_the_named_gpu():
    sys.path.insert(0, str(REPO / "benchmarks"))
    from flops import dense_bf16_peak_tflops, mfu

    assert dense_bf16_peak_tflops("NVIDIA H200") == 989.4
    assert dense_bf16_peak_tflops("NVIDIA H100 80GB HBM3") == 989.4
    assert dense_bf16_peak_tflops("NVIDIA H100 PCIe") == 756.5
    assert dense_bf16_peak_tflops("NVIDIA A100-SXM4-80GB") == 312.0
    assert dense_bf16_peak_tflops("NVIDIA L4") == 121.0
    assert dense_bf16_peak_tflops("NVIDIA A10G") is None  # no published figure: no guessed MFU
    assert dense_bf16_peak_tflops("Tesla T4") is None
    assert mfu(1e12, 2.0, 1000.0) == pytest.approx(0.002)
    assert mfu(None, 2.0, 1000.0) is None and mfu(1e12, 2.0, None) is None


def test_the_script_refuses_a_real_run_without_cuda(tmp_path):
    env = {**os.environ, "PYTHON": sys.executable, "CUDA_VISIBLE_DEVICES": "", "TMPDIR": str(tmp_path)}
    completed = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu.sh"), str(tmp_path / "results")],
                               env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert completed.returncode == 2 and "--dry-run" in completed.stderr
