"""The offline `builtin:` base models: random but deterministic SD pipelines, built from configs.

`builtin:tiny` (SD 1.x), `builtin:tiny-sd2` (SD 2.x, v-prediction) and `builtin:tiny-sdxl` are
few-MB pipelines for demos and tests; `builtin:sd15-shape` and `builtin:sdxl-shape` have SD 1.5's /
SDXL base's exact architecture with random weights, for benchmarks. The same seed gives the same
bytes on every machine, so nothing is downloaded.
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


def tiny_sd2_configs() -> dict:
    """builtin:tiny with SD 2.x's distinguishing traits: linear transformer projections, attention
    upcast to fp32 (`upcast_attention`, as stable-diffusion-2-1's UNet), GELU text encoder, v-prediction."""
    configs = tiny_configs()
    configs["unet"].update(use_linear_projection=True, upcast_attention=True)
    configs["text_encoder"].update(hidden_act="gelu")
    configs["scheduler"] = dict(_SD_SCHEDULER, prediction_type="v_prediction")
    return configs


def tiny_sdxl_configs() -> dict:
    """A few-MB SDXL pipeline: SDXL's block layout (no attention at the top level, deeper transformers
    below), two text encoders whose widths add up to the cross-attention width, size conditioning, and
    the SDXL VAE's scaling factor."""
    text_width = 32
    time_embed_dim = 8
    return {
        "pipeline": "sdxl",
        "unet": dict(
            sample_size=8,
            in_channels=4,
            out_channels=4,
            block_out_channels=(32, 64),
            layers_per_block=1,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            transformer_layers_per_block=(1, 2),
            attention_head_dim=(2, 4),
            use_linear_projection=True,
            cross_attention_dim=2 * text_width,  # both encoders' hidden states, concatenated
            addition_embed_type="text_time",
            addition_time_embed_dim=time_embed_dim,
            projection_class_embeddings_input_dim=6 * time_embed_dim + text_width,  # 6 time ids + pooled text
            norm_num_groups=32,
        ),
        "vae": dict(tiny_configs()["vae"], scaling_factor=0.13025, force_upcast=True),
        "text_encoder": dict(
            hidden_size=text_width, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            max_position_embeddings=77, hidden_act="gelu",
        ),
        "text_encoder_2": dict(
            hidden_size=text_width, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            max_position_embeddings=77, hidden_act="gelu", projection_dim=text_width,
        ),
        "scheduler": _SDXL_SCHEDULER,
    }


def sdxl_shape_configs() -> dict:
    """SDXL base 1.0's architecture (the configs of stabilityai/stable-diffusion-xl-base-1.0), for benchmarks.

    UNet (2.57 B parameters), VAE (84 M, scaling factor 0.13025), CLIP ViT-L and OpenCLIP bigG text
    encoders layer for layer as SDXL base. As for sd15-shape, the tokenizers are the byte-level one
    (514 tokens instead of 49,408), so both token-embedding tables are smaller; the layers are unchanged.
    """
    sd15 = sd15_shape_configs()
    return {
        "pipeline": "sdxl",
        "unet": dict(
            sample_size=128,
            in_channels=4,
            out_channels=4,
            block_out_channels=(320, 640, 1280),
            layers_per_block=2,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            transformer_layers_per_block=(1, 2, 10),
            attention_head_dim=(5, 10, 20),
            use_linear_projection=True,
            cross_attention_dim=2048,
            addition_embed_type="text_time",
            addition_time_embed_dim=256,
            projection_class_embeddings_input_dim=2816,  # 6 × 256 + 1280
            norm_num_groups=32,
        ),
        "vae": dict(sd15["vae"], sample_size=1024, scaling_factor=0.13025, force_upcast=True),
        "text_encoder": sd15["text_encoder"],
        "text_encoder_2": dict(
            hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
            max_position_embeddings=77, projection_dim=1280, hidden_act="gelu",
        ),
        "scheduler": _SDXL_SCHEDULER,
    }


# The schedulers the real models ship: SD 1.x/2.x's DDIM / PNDM betas, SDXL base's Euler config.
_SD_SCHEDULER = dict(
    beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False, set_alpha_to_one=False,
    steps_offset=1,
)
_SDXL_SCHEDULER = dict(
    beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1, timestep_spacing="leading",
    interpolation_type="linear", use_karras_sigmas=False, prediction_type="epsilon",
)


def byte_level_vocab() -> tuple[dict[str, int], list[str]]:
    """A CLIP BPE vocabulary with no merges: every byte is a token (with and without `</w>`)."""
    # The byte-to-printable-character table of byte-level BPE: printable Latin-1 bytes stand for
    # themselves, the other bytes are shifted past 255 so that every byte has a visible symbol.
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    shifted = iter(range(256, 512))
    symbols = [chr(b) if b in printable else chr(next(shifted)) for b in range(256)]
    tokens = symbols + [s + "</w>" for s in symbols] + ["<|startoftext|>", "<|endoftext|>"]
    return {token: index for index, token in enumerate(tokens)}, []


def text_config(settings: dict):
    """A CLIPTextConfig over the byte-level vocabulary with the given layer settings."""
    from transformers import CLIPTextConfig

    vocab, _ = byte_level_vocab()
    return CLIPTextConfig(
        vocab_size=len(vocab),
        bos_token_id=vocab["<|startoftext|>"],
        eos_token_id=vocab["<|endoftext|>"],
        pad_token_id=vocab["<|endoftext|>"],
        **settings,
    )


def build_builtin_pipeline(configs: dict):
    """Builds a randomly initialised StableDiffusionPipeline (or, with `pipeline: sdxl`, a
    StableDiffusionXLPipeline) from `configs`, seeded."""
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTokenizer

    vocab, merges = byte_level_vocab()
    tokenizer = CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77)
    torch.manual_seed(BUILTIN_SEED)
    unet = UNet2DConditionModel(**configs["unet"])
    torch.manual_seed(BUILTIN_SEED + 1)
    vae = AutoencoderKL(**configs["vae"])
    if configs.get("pipeline") == "sdxl":
        return _sdxl_pipeline(configs, unet, vae, tokenizer)
    from diffusers import StableDiffusionPipeline
    from transformers import CLIPTextModel

    torch.manual_seed(BUILTIN_SEED + 2)
    text_encoder = CLIPTextModel(text_config(configs["text_encoder"]))
    scheduler = DDIMScheduler(**configs.get("scheduler", _SD_SCHEDULER))
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


def _sdxl_pipeline(configs: dict, unet, vae, tokenizer):
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(BUILTIN_SEED + 2)
    text_encoder = CLIPTextModel(text_config(configs["text_encoder"]))
    torch.manual_seed(BUILTIN_SEED + 3)
    text_encoder_2 = CLIPTextModelWithProjection(text_config(configs["text_encoder_2"]))
    return StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer,
        unet=unet,
        scheduler=EulerDiscreteScheduler(**configs["scheduler"]),
        force_zeros_for_empty_prompt=True,  # as SDXL base
    )


# Name after `builtin:` → the configs of its parts (and, for SDXL, `pipeline: sdxl`).
BUILTINS = {
    "tiny": tiny_configs,
    "tiny-sd2": tiny_sd2_configs,
    "tiny-sdxl": tiny_sdxl_configs,
    "sd15-shape": sd15_shape_configs,
    "sdxl-shape": sdxl_shape_configs,
}
