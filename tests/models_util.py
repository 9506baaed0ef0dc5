"""Helpers shared by the DreamBooth, prior, kohya and archive tests: real runs through the S3 server.

`s3_run` runs the real job once per name per test session (several modules compare against the
same run), with the instance images and the outputs in a bucket, and downloads the output.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from jobrun import EXAMPLES, JobResult, job_env, run_job

INSTANCE_PROMPT = "a photo of sks dog"
CLASS_PROMPT = "a photo of dog"
# Settings under which builtin:tiny measurably learns in a few seconds of CPU.
LEARN = {"SDFT_LEARNING_RATE": "1e-3", "SDFT_MAX_TRAIN_STEPS": "30", "SDFT_CHECKPOINT_EVERY_STEPS": "1000"}
# The DreamBooth run test_dreambooth checks and test_prior compares against (one run per session).
DREAMBOOTH_LEARN = {"SDFT_METHOD": "dreambooth", "SDFT_VALIDATION_EVERY_STEPS": "15", **LEARN}

_runs: dict[str, Run] = {}


@dataclass
class Run:
    result: JobResult
    bucket: str
    prefix: str  # output prefix in the bucket, no trailing slash
    keys: set[str]  # output keys relative to the prefix
    out: Path  # the downloaded output


def tiny_model_path(tmp_path_factory, name: str = "tiny") -> Path:
    """The diffusers folder of `builtin:<name>` (built once per session)."""
    from job.base_model import resolve_base_model

    return resolve_base_model(f"builtin:{name}", tmp_path_factory.getbasetemp() / "models").path


def upload_folder(s3_server, bucket: str, folder: Path, prefix: str) -> str:
    client = s3_server.client()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        client.upload_file(str(path), bucket, f"{prefix}/{path.relative_to(folder).as_posix()}")
    return f"s3://{bucket}/{prefix}/"


def download_prefix(s3_server, bucket: str, prefix: str, dest: Path) -> set[str]:
    """Downloads everything under `prefix` into `dest`; returns the keys relative to the prefix."""
    client = s3_server.client()
    objects = client.list_objects_v2(Bucket=bucket, Prefix=prefix + "/").get("Contents", [])
    keys = set()
    for item in objects:
        key = item["Key"].removeprefix(prefix + "/")
        target = dest / key
        target.parent.mkdir(parents=True, exist_ok=True)
        client.download_file(bucket, item["Key"], str(target))
        keys.add(key)
    return keys


def s3_run(name: str, s3_server, tmp_path_factory, **settings: str) -> Run:
    """The job run `name` with `settings` (tiny defaults, the dog images from the bucket), run once per session."""
    if name in _runs:
        return _runs[name]
    s3_server.start()
    bucket = s3_server.create_bucket(f"run-{name}")
    instance_uri = upload_folder(s3_server, bucket, EXAMPLES, "subjects/dog")
    env = job_env(tmp_path_factory.mktemp(f"work-{name}"), SDFT_INSTANCE_URI=instance_uri,
                  SDFT_OUTPUT_URI=f"s3://{bucket}/out/", **s3_server.env())
    env.update(settings)
    result = run_job(env)
    assert result.exit_code == 0, result.stdout[-3000:] + result.stderr[-3000:]
    out = tmp_path_factory.mktemp(f"out-{name}")
    keys = download_prefix(s3_server, bucket, "out", out)
    _runs[name] = Run(result, bucket, "out", keys, out)
    return _runs[name]


def contract_files(method: str, run_id: str = "test-run", prompts: int = 1, images: int = 1, sample_steps=()) -> set[str]:
    """The exact output file set of CONTRACT.md §3 for one run (without `class_images/`)."""
    if method == "lora":
        weights = {"lora/pytorch_lora_weights.safetensors", f"lora/{run_id}.safetensors"}
    else:
        weights = {f"model/{p}" for p in (
            "model_index.json", "scheduler/scheduler_config.json", "text_encoder/config.json",
            "text_encoder/model.safetensors", "tokenizer/tokenizer.json", "tokenizer/tokenizer_config.json",
            "unet/config.json", "unet/diffusion_pytorch_model.safetensors", "vae/config.json",
            "vae/diffusion_pytorch_model.safetensors",
        )}
    samples = {f"samples/{folder}/{p}-{n}.png" for folder in ["final", *(f"step-{s}" for s in sample_steps)]
               for p in range(prompts) for n in range(images)}
    record = {"samples/grid.png", "metrics.jsonl", "manifest.json", "README.md", "status.json", "_SUCCESS"}
    return weights | samples | record


# Measuring a pipeline independently of a run's own random draws: the same images, timesteps and noise.
TIMESTEPS = (100, 300, 500, 700, 900)


def denoising_loss(pipeline, image_paths: list[Path], prompt: str, resolution_px: int, seed: int = 123,
                   sizes: list[tuple[int, int]] | None = None) -> float:
    """Mean noise-prediction error of `pipeline` on the images at TIMESTEPS, with seeded noise.

    Images are squashed to `resolution_px` squares, or with `sizes` each is resized to cover its own
    (width, height) and centre-cropped (as a bucketed run trains it).
    """
    if sizes is not None:
        losses = [_denoising_loss(pipeline, [p], prompt, size, seed) for p, size in zip(image_paths, sizes)]
        return sum(losses) / len(losses)
    return _denoising_loss(pipeline, image_paths, prompt, (resolution_px, resolution_px), seed)


def _denoising_loss(pipeline, image_paths: list[Path], prompt: str, size: tuple[int, int], seed: int) -> float:
    import numpy as np
    import torch
    import torch.nn.functional as F
    from diffusers import DDPMScheduler
    from PIL import Image, ImageOps

    scheduler = DDPMScheduler.from_config(pipeline.scheduler.config)
    pixels = torch.stack([
        torch.from_numpy(np.asarray(ImageOps.fit(Image.open(p).convert("RGB"), size, Image.Resampling.BICUBIC),
                                    dtype=np.float32) / 127.5 - 1).permute(2, 0, 1)
        for p in image_paths
    ])
    tokens = pipeline.tokenizer([prompt], padding="max_length", max_length=pipeline.tokenizer.model_max_length,
                                truncation=True, return_tensors="pt").input_ids
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        latents = pipeline.vae.encode(pixels).latent_dist.mean * pipeline.vae.config.scaling_factor
        latents = latents.repeat_interleave(len(TIMESTEPS), dim=0)
        timesteps = torch.tensor(TIMESTEPS * len(image_paths))
        noise = torch.randn(latents.shape, generator=generator)
        hidden = pipeline.text_encoder(tokens)[0].expand(len(latents), -1, -1)
        prediction = pipeline.unet(scheduler.add_noise(latents, noise, timesteps), timesteps, hidden).sample
    return F.mse_loss(prediction, noise).item()


def render(pipeline, prompt: str, resolution_px: int, seed: int = 0):
    """One image as floats in [0, 1] (HWC numpy), from a fixed seed."""
    import torch

    return pipeline(prompt, height=resolution_px, width=resolution_px, num_inference_steps=4, guidance_scale=7.5,
                    generator=torch.Generator().manual_seed(seed), output_type="np").images[0]


def text_states(pipeline, prompt: str = INSTANCE_PROMPT):
    """The text encoder's hidden states for `prompt` (to tell whether the encoder changed)."""
    import torch

    tokens = pipeline.tokenizer([prompt], padding="max_length", max_length=pipeline.tokenizer.model_max_length,
                                return_tensors="pt").input_ids
    with torch.no_grad():
        return pipeline.text_encoder(tokens)[0]



def sdxl_denoising_loss(pipeline, image_paths: list[Path], prompt: str, resolution_px: int, seed: int = 123) -> float:
    """`denoising_loss` for an SDXL pipeline: the same images, TIMESTEPS and seeded noise, with SDXL's
    conditioning (both encoders' states, pooled embedding, time_ids of a whole-image resize)."""
    import numpy as np
    import torch
    import torch.nn.functional as F
    from diffusers import DDPMScheduler
    from PIL import Image

    scheduler = DDPMScheduler.from_config(pipeline.scheduler.config)
    images = [Image.open(p).convert("RGB") for p in image_paths]
    pixels = torch.stack([
        torch.from_numpy(np.asarray(image.resize((resolution_px, resolution_px), Image.Resampling.BICUBIC),
                                    dtype=np.float32) / 127.5 - 1).permute(2, 0, 1)
        for image in images
    ])
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        prompt_embeds, _, pooled, _ = pipeline.encode_prompt(prompt, device="cpu", do_classifier_free_guidance=False)
        latents = pipeline.vae.encode(pixels).latent_dist.mean * pipeline.vae.config.scaling_factor
        latents = latents.repeat_interleave(len(TIMESTEPS), dim=0)
        timesteps = torch.tensor(TIMESTEPS * len(image_paths))
        noise = torch.randn(latents.shape, generator=generator)
        time_ids = torch.tensor([[image.height, image.width, 0, 0, resolution_px, resolution_px]
                                 for image in images for _ in TIMESTEPS], dtype=torch.float32)
        count = len(latents)
        prediction = pipeline.unet(
            scheduler.add_noise(latents, noise, timesteps), timesteps, prompt_embeds.expand(count, -1, -1),
            added_cond_kwargs={"text_embeds": pooled.expand(count, -1), "time_ids": time_ids},
        ).sample
    return F.mse_loss(prediction, noise).item()
