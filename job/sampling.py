"""Fixed-seed samples of the model being trained, and the grid a person looks at."""

from pathlib import Path

import torch
from PIL import Image, ImageDraw

from job import layout
from job.inputs import load_rgb


def validation_prompts(settings, dataset) -> list[str]:
    """The prompts rendered as samples: the setting, else the instance prompt (or first caption)."""
    return settings.validation_prompts or [dataset.instance_prompt or dataset.examples[0].caption]


def sample_pipeline(models, unet, text_encoder=None, text_encoder_2=None):
    """The family's pipeline (StableDiffusionPipeline, StableDiffusionXLPipeline) sharing the training
    run's parts: no copies, no safety checker, the trained prediction type.

    Parts that training released after caching (the VAE; frozen text encoders, passed as None) are
    loaded back from the base model onto the UNet's device: the samples decode with the VAE, and a
    full export needs all parts. The prompts' conditioning computed before the release travels with
    the pipeline (`precomputed_prompt_embeds`), so `render_samples` need not run the text encoders.
    """
    from job.families import load_vae

    device = unet.device
    family = models.family
    vae = models.vae
    if vae is None:
        vae = load_vae(models.model_path, models.vae_source).to(device)
    given = dict(zip(("text_encoder", "text_encoder_2"), (text_encoder, text_encoder_2)))
    text_parts = {
        name: given[name] if given.get(name) is not None else family.load_text_encoder(models.model_path, name, models.dtype).to(device)
        for name in family.text_encoder_names
    }
    text_parts.update(zip(family.tokenizer_names, models.tokenizers))
    pipeline = family.pipeline_class().from_pretrained(
        models.model_path, unet=unet, vae=vae, **text_parts, **family.pipeline_extras(), use_safetensors=True
    )
    # Samples (and a DreamBooth export) follow the prediction type trained, SDFT_PREDICTION_TYPE included.
    pipeline.scheduler = type(pipeline.scheduler).from_config(pipeline.scheduler.config, prediction_type=models.prediction_type)
    pipeline.set_progress_bar_config(disable=True)
    pipeline.precomputed_prompt_embeds = dict(getattr(models, "prompt_embeds", {}))
    pipeline.sdft_family = family
    return pipeline


def _prompt_arguments(pipeline, prompt: str, count: int) -> dict:
    """The conditioning (and the empty negative prompt's) when embedded up front, else the prompt itself."""
    embeds = getattr(pipeline, "precomputed_prompt_embeds", {})
    if prompt not in embeds or "" not in embeds:
        return {"prompt": [prompt] * count}
    negative = pipeline.sdft_family.negative_conditioning(embeds[""], pipeline.config)
    return {key: value[None].expand(count, *value.shape).clone() for key, value in {**embeds[prompt], **negative}.items()}


def render_samples(settings, pipeline, prompts: list[str], out_dir: Path) -> list[Path]:
    """Writes `layout.sample_name(prompt_index, n)` for each prompt; image n always uses seed `SDFT_SEED + n`."""
    out_dir.mkdir(parents=True, exist_ok=True)
    device = pipeline.unet.device
    was_training = pipeline.unet.training
    pipeline.unet.eval()
    for text_encoder in (pipeline.text_encoder, getattr(pipeline, "text_encoder_2", None)):
        if text_encoder is not None:
            text_encoder.eval()
    paths = []
    for prompt_index, prompt in enumerate(prompts):
        count = settings.num_validation_images
        if not count:
            continue
        generators = [torch.Generator(device).manual_seed(settings.seed + n) for n in range(count)]
        images = render(settings, pipeline, generators, **_prompt_arguments(pipeline, prompt, count))
        for n, image in enumerate(images):
            path = out_dir / layout.sample_name(prompt_index, n)
            image.save(path)
            paths.append(path)
    pipeline.unet.train(was_training)
    return paths


def render(settings, pipeline, generators: list[torch.Generator], **prompt) -> list[Image.Image]:
    """One image per generator from `pipeline` (`prompt`: its `prompt` or `prompt_embeds` arguments),
    at the run's resolution, denoising steps and guidance scale, without gradients, in the frozen
    weights' dtype. Samples and class images are both rendered here."""
    device = pipeline.unet.device
    dtype = pipeline.text_encoder.dtype  # the frozen compute dtype
    with torch.no_grad(), torch.autocast(device.type, dtype=dtype, enabled=device.type == "cuda" and dtype != torch.float32):
        return pipeline(
            **prompt,
            height=settings.resolution,
            width=settings.resolution,
            num_inference_steps=settings.sample_inference_steps,
            guidance_scale=settings.sample_guidance_scale,
            generator=generators,
        ).images


def make_grid(instance_paths: list[str], sample_paths: list[Path], prompts: list[str], out_path: Path, cell_px: int = 128) -> Path:
    """Instance images in the first row, then one row of samples per prompt, each row labelled."""
    label_px = 16
    rows = [("instance images", [load_rgb(p, at_least=(cell_px, cell_px)) for p in instance_paths[:8]])]
    for index, prompt in enumerate(prompts):
        names = {layout.sample_name(index, n) for n in range(len(sample_paths))}
        mine = sorted(p for p in sample_paths if p.name in names)
        rows.append((prompt, [Image.open(p).convert("RGB") for p in mine]))
    columns = max(1, max(len(images) for _, images in rows))
    grid = Image.new("RGB", (columns * cell_px, len(rows) * (cell_px + label_px)), "white")
    draw = ImageDraw.Draw(grid)
    for row, (label, images) in enumerate(rows):
        top = row * (cell_px + label_px)
        draw.text((4, top + 2), label[: columns * cell_px // 7], fill="black")
        for column, image in enumerate(images):
            grid.paste(image.resize((cell_px, cell_px)), (column * cell_px, top + label_px))
    out_path.parent.mkdir(parents=True, exist_ok=True)
    grid.save(out_path)
    return out_path
