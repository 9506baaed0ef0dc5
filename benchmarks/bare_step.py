"""The bare UNet LoRA step: the limit sdft's steady LoRA step rate is measured against.

Forward + backward + AdamW on fixed latents and text states, nothing else: the same UNet folder,
resolution, batch, LoRA rank and targets (`job.methods.UNET_LORA_TARGETS`) and optimizer settings
as the job's cached-latents LoRA run, but no data pipeline, no noise schedule, no accelerate, no
logging. Run as its own process (`python benchmarks/bare_step.py MODEL_DIR RESOLUTION STEPS`) so
that it starts as cold as the job does; prints one JSON object. The rate is taken from the end of
the first step to the end of the last, as the job's `it_per_s` is.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path


def bare_lora_rate(model_dir: Path, resolution_px: int, steps: int, batch_size: int = 1, lora_rank: int = 16) -> dict:
    import torch
    import torch.nn.functional as F
    from diffusers import UNet2DConditionModel
    from peft import LoraConfig

    from job.methods import UNET_LORA_TARGETS

    torch.manual_seed(0)
    unet = UNet2DConditionModel.from_pretrained(model_dir, subfolder="unet", use_safetensors=True)
    unet.requires_grad_(False)
    unet.add_adapter(LoraConfig(r=lora_rank, lora_alpha=lora_rank, init_lora_weights="gaussian",
                                target_modules=UNET_LORA_TARGETS))
    trainable = [p for p in unet.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-4, weight_decay=1e-2)
    side = resolution_px // 8
    latents = torch.randn(batch_size, unet.config.in_channels, side, side)
    text = torch.randn(batch_size, 77, unet.config.cross_attention_dim)
    unet.train()
    ends = []
    for _ in range(steps):
        noise = torch.randn_like(latents)
        timesteps = torch.randint(0, 1000, (batch_size,))
        prediction = unet(latents + noise, timesteps, text).sample
        F.mse_loss(prediction.float(), noise).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        ends.append(time.perf_counter())
    rate = (len(ends) - 1) / (ends[-1] - ends[0]) if len(ends) > 1 else None
    return {"steps": steps, "steps_per_s": rate and round(rate, 4), "batch_size": batch_size}


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    model_dir, resolution, steps = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
    print(json.dumps(bare_lora_rate(model_dir, resolution, steps)))
