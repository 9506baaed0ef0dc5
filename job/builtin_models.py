"""The offline `builtin:` base models: random but deterministic SD pipelines, built from configs.

`builtin:tiny` is a few-MB SD 1.x pipeline for demos and tests; `builtin:sd15-shape` has SD 1.5's
exact architecture with random weights, for benchmarks. The same seed gives the same bytes on every
machine, so nothing is downloaded.
"""

import torch

BUILTIN_SEED = 1234


def tiny_configs() -> dict:
    width = 32  # text hidden size = cross-attention size
    return {
        "unet": dict(
            sample_size=8,
            in_channels=4,
            out_channels=4,
            block_out_channels=(32, 64),
            layers_per_block=1,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=width,
            attention_head_dim=8,
            norm_num_groups=32,
        ),
        "vae": dict(
            in_channels=3,
            out_channels=3,
            block_out_channels=(16, 16, 32, 32),
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            layers_per_block=1,
            latent_channels=4,
            norm_num_groups=8,
            sample_size=64,
        ),
        "text_encoder": dict(
            hidden_size=width,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=77,
        ),
    }


def sd15_shape_configs() -> dict:
    """Stable Diffusion 1.5's architecture (the configs of stable-diffusion-v1-5), for benchmarks.

    UNet (860 M parameters), VAE (84 M) and CLIP ViT-L/14 text encoder are layer for layer those of
    SD 1.5, so compute and activation memory are the real model's. One difference: the tokenizer is
    builtin:tiny's byte-level one (514 tokens, built offline), so the token-embedding table has 514
    rows instead of 49,408 (37.6 M fewer parameters, 150 MB in fp32) — a lookup that costs no
    compute; the encoder layers are unchanged.
    """
    return {
        "unet": dict(
            sample_size=64,
            in_channels=4,
            out_channels=4,
            block_out_channels=(320, 640, 1280, 1280),
            layers_per_block=2,
            down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
            cross_attention_dim=768,
            attention_head_dim=8,
            norm_num_groups=32,
        ),
        "vae": dict(
            in_channels=3,
            out_channels=3,
            block_out_channels=(128, 256, 512, 512),
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            layers_per_block=2,
            latent_channels=4,
            norm_num_groups=32,
            sample_size=512,
        ),
        "text_encoder": dict(
            hidden_size=768,
            intermediate_size=3072,
            num_hidden_layers=12,
            num_attention_heads=12,
            max_position_embeddings=77,
            projection_dim=768,
            hidden_act="quick_gelu",
        ),
    }


def byte_level_vocab() -> tuple[dict[str, int], list[str]]:
    """A CLIP BPE vocabulary with no merges: every byte is a token (with and without `</w>`)."""
    # The byte-to-printable-character table of byte-level BPE: printable Latin-1 bytes stand for
    # themselves, the other bytes are shifted past 255 so that every byte has a visible symbol.
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    shifted = iter(range(256, 512))
    symbols = [chr(b) if b in printable else chr(next(shifted)) for b in range(256)]
    tokens = symbols + [s + "</w>" for s in symbols] + ["<|startoftext|>", "<|endoftext|>"]
    return {token: index for index, token in enumerate(tokens)}, []


def build_builtin_pipeline(configs: dict):
    """Builds a randomly initialised StableDiffusionPipeline from `configs`, seeded."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    vocab, merges = byte_level_vocab()
    tokenizer = CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77)
    text_config = CLIPTextConfig(
        vocab_size=len(vocab),
        bos_token_id=vocab["<|startoftext|>"],
        eos_token_id=vocab["<|endoftext|>"],
        pad_token_id=vocab["<|endoftext|>"],
        **configs["text_encoder"],
    )
    torch.manual_seed(BUILTIN_SEED)
    unet = UNet2DConditionModel(**configs["unet"])
    torch.manual_seed(BUILTIN_SEED + 1)
    vae = AutoencoderKL(**configs["vae"])
    torch.manual_seed(BUILTIN_SEED + 2)
    text_encoder = CLIPTextModel(text_config)
    scheduler = DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )
    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


# Name after `builtin:` → the configs of its three trained parts.
BUILTINS = {"tiny": tiny_configs, "sd15-shape": sd15_shape_configs}
