"""sdft: fine-tune Stable Diffusion (DreamBooth or LoRA) as a batch job."""

__version__ = "0.1.0"
