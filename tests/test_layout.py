"""The output layout (CONTRACT.md §3) has one home, `job.layout`: its file set is the contract's,
and no other module spells an output path itself."""

import ast
import re
from pathlib import Path

import pytest

from job import layout
from models_util import contract_files

JOB = Path(__file__).resolve().parents[1] / "job"
# What an output path spelled outside job.layout would look like.
OUTPUT_NAME = re.compile(
    r"_SUCCESS|_COMPLETE|manifest\.json|status\.json|metrics\.jsonl|grid\.png|pytorch_lora_weights"
    r"|(^|/)(samples|lora|model|checkpoints|class_images)/|^step-|^class-"
)


@pytest.mark.parametrize("method", ["lora", "dreambooth"])
@pytest.mark.parametrize("prompts, images, sample_steps", [(1, 1, ()), (2, 3, (10, 20))])
def test_the_layout_lists_exactly_the_contract_files(method, prompts, images, sample_steps):
    listed = layout.output_files(method, "run-7", prompts, images, sample_steps)
    expected = contract_files(method, "run-7", prompts, images, sample_steps)
    if method == "dreambooth":  # the pipeline folder's inside is diffusers' save_pretrained layout
        expected = {p for p in expected if not p.startswith("model/")} | {"model/"}
    assert listed == expected


def test_checkpoint_keys_round_trip():
    assert layout.checkpoint_step(layout.checkpoint_dir(40) + "/" + layout.CHECKPOINT_MARKER) == (40, "_COMPLETE")
    assert layout.checkpoint_step("step-x/_COMPLETE") is None
    assert layout.checkpoint_step("notes/step-3/a") is None


def _string_constants(tree: ast.AST):
    docstrings = {id(node.body[0].value) for node in ast.walk(tree)
                  if isinstance(node, (ast.Module, ast.FunctionDef, ast.ClassDef)) and node.body
                  and isinstance(node.body[0], ast.Expr) and isinstance(node.body[0].value, ast.Constant)}
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings:
            yield node


def test_no_module_but_the_layout_spells_an_output_path():
    found = [f"{path.relative_to(JOB)}:{node.lineno}: {node.value!r}"
             for path in sorted(JOB.rglob("*.py")) if path.name != "layout.py"
             for node in _string_constants(ast.parse(path.read_text()))
             if OUTPUT_NAME.search(node.value)]
    assert found == []


def test_the_scan_would_see_a_hard_coded_output_path():
    tree = ast.parse('def f(staging):\n    """Writes manifest.json."""\n    return staging / "samples/grid.png"\n')
    assert [n.value for n in _string_constants(tree) if OUTPUT_NAME.search(n.value)] == ["samples/grid.png"]
