"""How well a pipeline denoises given images: the training loss, measured at fixed timesteps and noise.

Comparing it before and after training (same images, timesteps and noise) says whether a model
learned, independent of the run's own random draws.
"""

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

TIMESTEPS = (100, 300, 500, 700, 900)


def denoising_loss(pipeline, image_paths: list[Path], prompt: str, resolution_px: int, seed: int = 123) -> float:
    """Mean noise-prediction error of `pipeline` on `image_paths` at TIMESTEPS with seeded noise."""
    from diffusers import DDPMScheduler

    scheduler = DDPMScheduler.from_config(pipeline.scheduler.config)
    generator = torch.Generator().manual_seed(seed)
    tokens = pipeline.tokenizer([prompt], padding="max_length", max_length=pipeline.tokenizer.model_max_length,
                                truncation=True, return_tensors="pt").input_ids
    losses = []
    with torch.no_grad():
        hidden = pipeline.text_encoder(tokens)[0]
        for path in image_paths:
            image = Image.open(path).convert("RGB").resize((resolution_px, resolution_px), Image.Resampling.BICUBIC)
            pixels = torch.from_numpy(np.asarray(image, dtype=np.float32) / 127.5 - 1).permute(2, 0, 1)[None]
            latents = pipeline.vae.encode(pixels).latent_dist.mean * pipeline.vae.config.scaling_factor
            for t in TIMESTEPS:
                noise = torch.randn(latents.shape, generator=generator)
                timestep = torch.tensor([t])
                noisy = scheduler.add_noise(latents, noise, timestep)
                prediction = pipeline.unet(noisy, timestep, hidden).sample
                losses.append(F.mse_loss(prediction, noise).item())
    return float(np.mean(losses))


def render(pipeline, prompt: str, resolution_px: int, seed: int = 0) -> np.ndarray:
    """One image as floats in [0, 1], from a fixed seed."""
    return pipeline(prompt, height=resolution_px, width=resolution_px, num_inference_steps=4, guidance_scale=7.5,
                    generator=torch.Generator().manual_seed(seed), output_type="np").images[0]
