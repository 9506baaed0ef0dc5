"""Base models: resolve a reference to a local diffusers folder, and build the offline `builtin:` ones.

A reference is a Hub id (`id` or `id@revision`), a local diffusers folder, an `s3://` prefix holding a
diffusers folder, a single-file `.safetensors` checkpoint (local or `s3://`), `builtin:tiny`, or `builtin:sd15-shape`
(SD 1.5's architecture, random weights, for benchmarks).
Only safetensors weights are ever loaded: nothing from a bucket or the Hub is unpickled.
"""

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import structlog
import torch

from job.errors import ConfigError, ModelError, TransientError
from job.storage import open_store
from job.digests import sha256_file

log = structlog.get_logger()

PICKLE_SUFFIXES = (".bin", ".ckpt", ".pt", ".pth", ".pkl")
BUILTIN_SEED = 1234


@dataclass(frozen=True)
class BaseModel:
    """A base model ready to load: a local diffusers folder, and what it was resolved from."""

    reference: str
    path: Path
    revision: str  # Hub commit, content hash, or "builtin"


def resolve_base_model(reference: str, cache_dir: Path) -> BaseModel:
    """Makes `reference` available as a local diffusers folder (downloading if needed)."""
    if reference.startswith("builtin:"):
        return _builtin(reference.removeprefix("builtin:"), cache_dir)
    if reference.startswith("s3://"):
        return _from_store(reference, cache_dir)
    local = Path(reference.removeprefix("file://"))
    if local.exists():
        if local.is_file():
            return _single_file(reference, local, cache_dir)
        _require_diffusers_folder(local, reference)
        return BaseModel(reference, local, revision="local")
    if reference.endswith((".safetensors", *PICKLE_SUFFIXES)) or reference.startswith(("/", ".")):
        raise ModelError(f"base model {reference} not found: no such file or folder")
    return _from_hub(reference)


def _require_diffusers_folder(path: Path, reference: str) -> None:
    if not (path / "model_index.json").is_file():
        raise ModelError(
            f"base model {reference} is not a diffusers pipeline folder (no model_index.json); "
            "give a diffusers folder, a single-file .safetensors checkpoint or a Hub id"
        )
    for component in ("unet", "vae", "text_encoder"):
        folder = path / component
        if not any(folder.glob("*.safetensors")):
            pickled = [p.name for p in folder.glob("*") if p.suffix in PICKLE_SUFFIXES]
            if pickled:
                raise ModelError(
                    f"base model {reference} has only pickle weights in {component}/ ({', '.join(pickled)}); "
                    "sdft loads safetensors only: convert the model to safetensors first"
                )
            raise ModelError(f"base model {reference} has no safetensors weights in {component}/")


def _from_store(reference: str, cache_dir: Path) -> BaseModel:
    store = open_store(reference)
    objects = store.list()
    if not objects:
        raise ModelError(f"base model {reference} not found: nothing under that prefix")
    if len(objects) == 1 and objects[0].key.endswith((".safetensors", *PICKLE_SUFFIXES)):
        # A single-file checkpoint in the bucket.
        target = cache_dir / "downloads" / objects[0].key
        store.download(objects[0].key, target)
        return _single_file(reference, target, cache_dir)
    pickled = [o.key for o in objects if o.key.endswith(PICKLE_SUFFIXES)]
    wanted = [o.key for o in objects if not o.key.endswith(PICKLE_SUFFIXES)]
    etag = _content_id(objects)
    target = cache_dir / "s3" / etag
    if not (target / ".complete").exists():
        store.download_all(target, wanted)
        (target / ".complete").touch()
    try:
        _require_diffusers_folder(target, reference)
    except ModelError:
        if pickled:
            raise ModelError(
                f"base model {reference} has only pickle weights ({', '.join(pickled[:3])}); "
                "sdft loads safetensors only: convert the model to safetensors first"
            ) from None
        raise
    return BaseModel(reference, target, revision=etag)


def _content_id(objects) -> str:
    import hashlib

    digest = hashlib.sha256()
    for item in objects:
        digest.update(f"{item.key}:{item.size}\n".encode())
    return digest.hexdigest()[:16]


def _single_file(reference: str, path: Path, cache_dir: Path) -> BaseModel:
    if path.suffix != ".safetensors":
        raise ModelError(
            f"base model {reference} is a {path.suffix} file; sdft loads .safetensors only "
            "(pickle checkpoints can run arbitrary code): convert it to safetensors first"
        )
    from diffusers import StableDiffusionPipeline

    digest = sha256_file(path)
    target = cache_dir / "single-file" / digest
    if not (target / "model_index.json").exists():
        try:
            pipeline = StableDiffusionPipeline.from_single_file(str(path), local_files_only=True)
        except Exception as error:  # diffusers raises many kinds for a file it cannot map
            raise ModelError(
                f"base model {reference} is not a Stable Diffusion 1.x/2.x checkpoint diffusers can read: {error}"
            ) from error
        _save_pipeline(pipeline, target)
    return BaseModel(reference, target, revision=digest)


def _from_hub(reference: str) -> BaseModel:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    repo_id, _, revision = reference.partition("@")
    try:
        # Only safetensors and configs: pickle weights are never even downloaded.
        path = snapshot_download(
            repo_id,
            revision=revision or None,
            allow_patterns=["*.json", "*.txt", "*.safetensors"],
            ignore_patterns=["*.fp16.safetensors", "*non_ema*", "*.ckpt"],
        )
    except (RepositoryNotFoundError, RevisionNotFoundError) as error:
        raise ModelError(f"base model {reference} not found on the Hugging Face Hub: {error}") from error
    except GatedRepoError as error:
        raise ConfigError(
            f"base model {reference} is gated: accept its licence on the Hub and set HF_TOKEN"
        ) from error
    except LocalEntryNotFoundError as error:
        raise TransientError(
            f"could not download base model {reference} from the Hub (offline or unreachable; "
            "HF_HUB_OFFLINE=1 needs it in the HF_HOME cache)"
        ) from error
    path = Path(path)
    _require_diffusers_folder(path, reference)
    return BaseModel(reference, path, revision=path.name)


# The builtin models are random but deterministic: the same bytes on every machine, built offline.
def _builtin(name: str, cache_dir: Path) -> BaseModel:
    builders = {"tiny": _tiny_configs, "sd15-shape": sd15_shape_configs}
    if name not in builders:
        raise ModelError(f"unknown builtin model builtin:{name}; known: " + ", ".join(f"builtin:{n}" for n in builders))
    target = cache_dir / "builtin" / name
    if not (target / ".complete").exists():
        shutil.rmtree(target, ignore_errors=True)
        _save_pipeline(build_builtin_pipeline(builders[name]()), target)
        (target / ".complete").touch()
    return BaseModel(f"builtin:{name}", target, revision="builtin")


def _save_pipeline(pipeline, target: Path) -> None:
    partial = target.with_name(target.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    pipeline.save_pretrained(partial, safe_serialization=True)
    shutil.rmtree(target, ignore_errors=True)
    os.replace(partial, target)


def _tiny_configs() -> dict:
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
