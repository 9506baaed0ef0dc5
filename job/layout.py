"""Where everything sdft writes lives (CONTRACT.md §3): every output path comes from here.

Keys are '/'-separated and relative to `SDFT_OUTPUT_URI`; the run stages them under the same
relative paths in the work dir (`staging / key`) and uploads the tree as it is. The checkpoint and
class-image prefixes have their own (smaller) layouts, also here.
"""

import re

# Weights (one of the two, by method).
LORA_DIR = "lora"
DIFFUSERS_LORA = f"{LORA_DIR}/pytorch_lora_weights.safetensors"  # diffusers' default name: load_lora_weights(<dir>) finds it
MODEL_DIR = "model"  # dreambooth: a full diffusers pipeline (its own inner layout, by save_pretrained)

# Samples.
SAMPLES_DIR = "samples"
FINAL_SAMPLES_DIR = f"{SAMPLES_DIR}/final"
GRID = f"{SAMPLES_DIR}/grid.png"

# The run record; `_SUCCESS` is written last.
METRICS = "metrics.jsonl"
MANIFEST = "manifest.json"
MODEL_CARD = "README.md"
STATUS = "status.json"
SUCCESS = "_SUCCESS"

# Default prefixes under the output, when SDFT_CHECKPOINT_URI / SDFT_CLASS_URI are not set.
CHECKPOINTS_DIR = "checkpoints"
CLASS_IMAGES_DIR = "class_images"

# Under the checkpoint prefix: one folder per saved step, its completion marker written last.
CHECKPOINT_MARKER = "_COMPLETE"
_CHECKPOINT_STEP = re.compile(r"^step-(\d+)/")


def kohya_lora(run_id: str) -> str:
    """The kohya / A1111 / ComfyUI copy of the LoRA, named after the run."""
    return f"{LORA_DIR}/{run_id}.safetensors"


def step_samples_dir(step: int) -> str:
    """Intermediate samples rendered after optimizer step `step`."""
    return f"{SAMPLES_DIR}/step-{step}"


def sample_name(prompt_index: int | str, n: int | str) -> str:
    """A sample's file name inside its samples folder: image `n` of prompt `prompt_index` (strings
    give the pattern, for the model card)."""
    return f"{prompt_index}-{n}.png"


def class_image_name(sha256: str) -> str:
    """A generated class image's key under the class prefix: named by its content (the PNG's sha256),
    so jobs generating into one class prefix at the same time never overwrite each other's images."""
    return f"class-{sha256[:16]}.png"


def checkpoint_dir(step: int) -> str:
    """The folder (under the checkpoint prefix) of the checkpoint saved after step `step`."""
    return f"step-{step}"


def checkpoint_step(key: str) -> tuple[int, str] | None:
    """(step, key inside the step folder) of a key under the checkpoint prefix; None if not sdft's."""
    match = _CHECKPOINT_STEP.match(key)
    return (int(match.group(1)), key[match.end():]) if match else None


def output_files(method: str, run_id: str, prompts: int, images_per_prompt: int,
                 sample_steps: tuple[int, ...] = ()) -> set[str]:
    """Every key a successful run leaves in the output (§3); a dreambooth run's pipeline is `model/`.

    `prompts` validation prompts × `images_per_prompt` samples, at the end and after each of
    `sample_steps`. Checkpoints are gone after success; class images live under their own prefix.
    """
    weights = {DIFFUSERS_LORA, kohya_lora(run_id)} if method == "lora" else {MODEL_DIR + "/"}
    folders = [FINAL_SAMPLES_DIR, *(step_samples_dir(step) for step in sample_steps)]
    samples = {f"{folder}/{sample_name(p, n)}" for folder in folders for p in range(prompts)
               for n in range(images_per_prompt)}
    return weights | samples | {GRID, METRICS, MANIFEST, MODEL_CARD, STATUS, SUCCESS}
