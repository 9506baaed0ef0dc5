"""The model card: `README.md` beside the weights, saying what was trained, from what, and how to load it."""

from pathlib import Path, PurePosixPath

from job import __version__, layout
from job.logs import redact
from job.settings import Settings


def write_model_card(settings: Settings, staging: Path, base_model: str, steps: int, prompts: list[str], family=None) -> Path:
    """`README.md` beside the weights: what was trained, from what, how to load it, what it makes.

    `family` (`job.families`, default SD 1.x) names the pipeline class in the loading code.
    """
    from job.families import family_for

    family = family or family_for("sd1")
    name = "LoRA" if settings.method == "lora" else "DreamBooth"
    rows = [
        ("method", f"{settings.method}" + (" + text encoder" if settings.train_text_encoder else "")),
        ("instance prompt", settings.instance_prompt or "(per-image captions)"),
        ("prior preservation", _prior_summary(settings)),
        ("steps / batch size × accumulation", f"{steps} / {settings.train_batch_size} × {settings.gradient_accumulation_steps}"),
        ("learning rate / schedule", f"{settings.effective_learning_rate} / {settings.lr_scheduler}"),
        ("resolution", f"{settings.resolution} px"),
        ("min-SNR γ / noise offset", f"{settings.snr_gamma or '—'} / {settings.noise_offset}"),
        ("seed", str(settings.seed)),
    ]
    if settings.method == "lora":
        rows.insert(1, ("LoRA rank / alpha", f"{settings.lora_rank} / {settings.effective_lora_alpha}"))
    table = "\n".join(f"| {key} | {value} |" for key, value in rows)
    sample_prompts = "\n".join(f"{i}. `{p}`" for i, p in enumerate(prompts))
    card = f"""---
library_name: diffusers
base_model: {base_model}
tags: [stable-diffusion, {_FAMILY_TAGS[family.name]}text-to-image, {settings.method}, sdft]
---

# {settings.run_id}

A {name} fine-tune of `{base_model}` ({_FAMILY_LABELS[family.name]}) made by sdft {__version__}.

| setting | value |
|---|---|
{table}

## How to load it

{_loading_instructions(settings, base_model, prompts[0], family.pipeline_class().__name__)}
## Samples

Prompts (`{layout.FINAL_SAMPLES_DIR}/{layout.sample_name('<prompt>', '<n>')}`, image n from seed {settings.seed} + n):

{sample_prompts}

Instance images in the first row, fixed-seed samples of the trained model below:

![samples]({layout.GRID})
"""
    path = staging / layout.MODEL_CARD
    path.write_text(redact(card))
    return path


def _prior_summary(settings: Settings) -> str:
    if not settings.with_prior_preservation:
        return "off"
    return (f"class prompt `{settings.class_prompt or '(from dataset_info.json)'}`, "
            f"{settings.num_class_images} class images, weight {settings.prior_loss_weight}")


_FAMILY_LABELS = {"sd1": "Stable Diffusion 1.x", "sd2": "Stable Diffusion 2.x", "sdxl": "Stable Diffusion XL"}
_FAMILY_TAGS = {"sd1": "", "sd2": "", "sdxl": "stable-diffusion-xl, "}


def _loading_instructions(settings: Settings, base_model: str, prompt: str, pipeline_class: str = "StableDiffusionPipeline") -> str:
    """Diffusers code, then which file ComfyUI, AUTOMATIC1111 and InvokeAI take."""
    code = f"```python\nimport torch\nfrom diffusers import {pipeline_class}\n\n"
    if settings.method == "lora":
        return (
            code + f'pipe = {pipeline_class}.from_pretrained("{base_model}", torch_dtype=torch.float16).to("cuda")\n'
            f'pipe.load_lora_weights("./{layout.LORA_DIR}")  # the folder holding {PurePosixPath(layout.DIFFUSERS_LORA).name}\n'
            f'image = pipe("{prompt}").images[0]\n```\n\n'
            f"ComfyUI / AUTOMATIC1111: copy `{layout.kohya_lora(settings.run_id)}` (kohya layout, training facts in "
            f"its header) into `models/loras/` (ComfyUI: a LoraLoader node; A1111: `<lora:{settings.run_id}:1>` "
            "in the prompt), on top of the same base model. InvokeAI: import that one file "
            f"(`{layout.kohya_lora(settings.run_id)}`), not the `{layout.LORA_DIR}/` folder (its importer refuses "
            "a folder holding two weight files).\n"
        )
    return (
        code + f'pipe = {pipeline_class}.from_pretrained("./{layout.MODEL_DIR}", torch_dtype=torch.float16).to("cuda")\n'
        f'image = pipe("{prompt}").images[0]\n```\n\n'
        f"ComfyUI: copy the `{layout.MODEL_DIR}/` folder into `models/diffusers/` and load it with the DiffusersLoader node. "
        f"InvokeAI: import the `{layout.MODEL_DIR}/` folder (a diffusers pipeline). "
        f"AUTOMATIC1111 loads single-file checkpoints only: convert `{layout.MODEL_DIR}/` with diffusers' "
        "`scripts/convert_diffusers_to_original_stable_diffusion.py --use_safetensors` "
        "(SDXL: `convert_diffusers_to_original_sdxl.py`) first.\n"
    )
