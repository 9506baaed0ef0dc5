"""Model FLOPs of one training step, and the GPU peaks that turn a step rate into MFU.

The step is what the job runs per optimizer step with cached latents: the UNet forward at the
latent size (resolution / 8) and the backward through it (for LoRA, gradients flow through every
frozen layer to the adapters; for DreamBooth, every weight gets a gradient too). The UNet is built
from the model folder's `unet/config.json` on PyTorch's `meta` device, so nothing is allocated or
computed: `torch.utils.flop_counter.FlopCounterMode` counts each matmul, convolution and attention
from its shapes. The text encoder and VAE do not run per step when latents are cached; the
optimizer's element-wise update and the loss are left out (well under 0.1% of the total).

MFU (model FLOPs utilisation, PaLM paper, Chowdhery et al. 2022, appendix B) = FLOPs per step ×
steps/s ÷ the GPU's dense bf16 peak. Every op of the UNet is per sample, so FLOPs scale exactly
with the batch: one count at batch 1, times the batch size.
"""

from __future__ import annotations

import json
from pathlib import Path

# Dense (not 2:4-sparse) bf16 tensor-core peaks in TFLOP/s, from NVIDIA's datasheets (the sparse
# figure they print first is twice these). The first name that is a substring of
# `torch.cuda.get_device_name()` wins, so the specific variants come before the plain names.
# A GPU not listed gets no MFU (null), never a guessed peak.
DENSE_BF16_PEAK_TFLOPS = [
    ("H200 NVL", 835.5),   # H200 NVL datasheet: 1,671 TFLOPS bf16 with sparsity
    ("H200", 989.4),       # H200 SXM: 1,979 with sparsity (the H100 SXM's tensor cores)
    ("GH200", 989.4),      # Grace Hopper: the H100 SXM's figure
    ("H100 NVL", 835.5),   # H100 NVL: 1,671 with sparsity
    ("H100 PCIe", 756.5),  # H100 PCIe: 1,513 with sparsity
    ("H100", 989.4),       # H100 SXM: 1,979 with sparsity
    ("B200", 2250.0),      # HGX B200: 36 PFLOPS sparse for 8 GPUs = 4.5 per GPU sparse
    ("A100", 312.0),       # A100 (SXM and PCIe): 312 dense, 624 sparse
    ("L40S", 362.05),      # L40S: 733 with sparsity
    ("L4", 121.0),         # L4: 242 with sparsity
    ("A10", 125.0),        # A10: 250 with sparsity (the A10G's figure is not published: it matches "A10"
                           #   only by name, so it is listed apart below and gets no MFU)
    ("RTX 4090", 165.2),   # GeForce RTX 4090 (Ada whitepaper): bf16 with fp32 accumulate, dense
]
UNPUBLISHED = ("A10G",)  # names that would otherwise match a row above by substring


def dense_bf16_peak_tflops(device_name: str) -> float | None:
    """The dense bf16 peak of a GPU named like `torch.cuda.get_device_name()`; None if unknown."""
    if any(name in device_name for name in UNPUBLISHED):
        return None
    return next((peak for name, peak in DENSE_BF16_PEAK_TFLOPS if name in device_name), None)


def mfu(flops_per_step: float | None, steps_per_s: float | None, peak_tflops: float | None) -> float | None:
    """Fraction of the dense bf16 peak the step rate achieves; None when a term is unknown."""
    if not flops_per_step or not steps_per_s or not peak_tflops:
        return None
    return flops_per_step * steps_per_s / (peak_tflops * 1e12)


def step_flops(model_dir: Path, resolution_px: int, method: str, lora_rank: int = 16, batch_size: int = 1) -> int:
    """FLOPs of one training step (UNet forward + backward) at `resolution_px`, `batch_size` images.

    `model_dir` is a diffusers folder (its `unet/config.json` is read); `method` is `lora` (rank
    `lora_rank` adapters on the attention projections, as `job.methods` adds them) or `dreambooth`.
    Runs on the meta device: a few seconds of CPU, no memory.
    """
    import torch
    from diffusers import UNet2DConditionModel
    from peft import LoraConfig
    from torch.utils.flop_counter import FlopCounterMode

    from job.methods import UNET_LORA_TARGETS

    config = json.loads((Path(model_dir) / "unet" / "config.json").read_text())
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(config)
    unet.requires_grad_(method != "lora")
    if method == "lora":
        unet.add_adapter(LoraConfig(r=lora_rank, lora_alpha=lora_rank, init_lora_weights="gaussian",
                                    target_modules=UNET_LORA_TARGETS))
    side = resolution_px // 8
    meta = dict(device="meta")
    latents = torch.randn(batch_size, unet.config.in_channels, side, side, **meta)
    timesteps = torch.randint(0, 1000, (batch_size,), **meta)
    text = torch.randn(batch_size, 77, unet.config.cross_attention_dim, **meta)
    extra = {}
    if unet.config.addition_embed_type == "text_time":
        # SDXL: the pooled text embedding and the six size/crop numbers, in the widths the config implies.
        time_ids = 6
        pooled = unet.config.projection_class_embeddings_input_dim - time_ids * unet.config.addition_time_embed_dim
        extra["added_cond_kwargs"] = {"text_embeds": torch.randn(batch_size, pooled, **meta),
                                      "time_ids": torch.randn(batch_size, time_ids, **meta)}
    with FlopCounterMode(display=False) as counter:
        prediction = unet(latents, timesteps, text, **extra).sample
        prediction.float().pow(2).mean().backward()
    return int(counter.get_total_flops())


def main() -> None:
    """`python benchmarks/flops.py MODEL_DIR RESOLUTION METHOD [...]`: prints the count as JSON."""
    import argparse

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("model_dir", type=Path)
    parser.add_argument("resolution_px", type=int)
    parser.add_argument("method", choices=["lora", "dreambooth"])
    parser.add_argument("--lora-rank", type=int, default=16)
    args = parser.parse_args()
    print(json.dumps({"flops_per_image_step": step_flops(args.model_dir, args.resolution_px, args.method, args.lora_rank)}))


if __name__ == "__main__":
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    main()
