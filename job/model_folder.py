"""Diffusers pipeline folders: what sdft loads from them, what it refuses, and fp16-only folders.

A folder is checked from its JSON configs alone, before any weight is read (so `check` refuses what
`run` would fail on): the pipeline class in `model_index.json`, the UNet's input channels
(inpainting 9, instruct-pix2pix 8) and its cross-attention width against the text encoder(s)'
hidden sizes, and the safetensors weights of each component that sdft loads.

A component that holds only a variant (`diffusion_pytorch_model.fp16.safetensors`, as
`save_pretrained(variant="fp16")` and many Hub repositories write) is presented to the loaders
under the plain name: `variant_view` links such a folder's files into a second folder with the
variant infix dropped, so everything downstream loads a plain diffusers folder.
"""

import hashlib
import json
import os
import re
import shutil
from pathlib import Path

from job.errors import ModelError

# The parts sdft loads; everything else in a pipeline (safety checker, feature extractor, …) is skipped.
LOADED_COMPONENTS = ("unet", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler")
WEIGHTED_COMPONENTS = ("unet", "vae", "text_encoder", "text_encoder_2")
TRAINABLE_PIPELINES = {
    "StableDiffusionPipeline", "StableDiffusionImg2ImgPipeline",
    "StableDiffusionXLPipeline", "StableDiffusionXLImg2ImgPipeline",
}
OTHER_PIPELINES = {
    "StableDiffusionInpaintPipeline": "an SD inpainting pipeline",
    "StableDiffusionXLInpaintPipeline": "an SDXL inpainting pipeline",
    "StableDiffusionInstructPix2PixPipeline": "an instruct-pix2pix pipeline",
    "StableDiffusionUpscalePipeline": "an SD upscaler",
    "StableDiffusion3Pipeline": "Stable Diffusion 3",
    "FluxPipeline": "FLUX",
    "KandinskyPipeline": "Kandinsky 2.1",
    "KandinskyV22Pipeline": "Kandinsky 2.2",
    "Kandinsky3Pipeline": "Kandinsky 3",
    "PixArtAlphaPipeline": "PixArt-α",
    "PixArtSigmaPipeline": "PixArt-Σ",
    "IFPipeline": "DeepFloyd IF",
    "StableCascadeCombinedPipeline": "Stable Cascade",
    "LatentConsistencyModelPipeline": "a latent consistency model",
}
PICKLE_SUFFIXES = (".bin", ".ckpt", ".pt", ".pth", ".pkl")
# `<name>[.<variant>][-00001-of-00002].safetensors` and `<name>.safetensors.index[.<variant>].json`.
WEIGHT_FILE = re.compile(r"^(?P<stem>[^.]+?)(?:\.(?P<variant>[A-Za-z0-9_]+))?(?P<shard>-\d{5}-of-\d{5})?\.safetensors$")
INDEX_FILE = re.compile(r"^(?P<stem>[^.]+)\.safetensors\.index(?:\.(?P<variant>[A-Za-z0-9_]+))?\.json$")
VARIANT = "fp16"


def weight_variant(name: str) -> str | None | bool:
    """The variant of a weight or index file name: None for plain weights, e.g. "fp16", or False if not weights."""
    match = WEIGHT_FILE.match(name) or INDEX_FILE.match(name)
    return match["variant"] if match else False


def choose_variant(names: list[str]) -> str | None | bool:
    """Which weights of one component to load: None (the plain ones), "fp16", or False (no safetensors)."""
    variants = {weight_variant(n) for n in names if n.endswith(".safetensors")}
    if None in variants:
        return None
    if VARIANT in variants:
        return VARIANT
    return False


def wanted_files(names: list[str], variant: str | None) -> list[str]:
    """The files of one component folder that sdft loads: configs, tokenizer files, the chosen weights."""
    wanted = []
    for name in names:
        kind = weight_variant(name)
        if kind is False:
            if name.endswith((".json", ".txt")):
                wanted.append(name)
        elif kind == variant:
            wanted.append(name)
    return wanted


def pipeline_files(listing: list[str], model_index: dict) -> list[str]:
    """The files of a pipeline (a Hub repository or a bucket prefix) that sdft downloads, from its listing.

    `model_index.json` and, for each component sdft loads (UNet, VAE, text encoder(s), tokenizer(s),
    scheduler), its configs and its plain safetensors weights, or the fp16 variant's when the plain
    ones are absent. Never the root-level single-file checkpoints, the safety checker, the feature
    extractor, pickles or other variants (a full SD 1.5 download is ~4.3 GB instead of ~19.6 GB).
    """
    folders: dict[str, list[str]] = {}
    for name in listing:
        component, _, file = name.partition("/")
        if file and "/" not in file and component in LOADED_COMPONENTS and component in model_index:
            folders.setdefault(component, []).append(file)
    chosen = ["model_index.json"]
    for component, names in sorted(folders.items()):
        variant = choose_variant(names)
        chosen += [f"{component}/{n}" for n in wanted_files(names, variant or None)]
    return chosen


def read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def pickle_refused(reference: str, what: str) -> ModelError:
    """The one refusal of pickle weights (exit 4): `what` says what was found."""
    return ModelError(
        f"base model {reference} {what}; sdft loads .safetensors only (pickle weights can run arbitrary "
        "code when loaded): convert the model to safetensors first"
    )


def check_pipeline_config(model_index: dict, reference: str) -> None:
    """Refuses a pipeline class sdft cannot train, from `model_index.json` alone (raises ModelError).

    A model_index.json without a class name passes here; the family detection judges its parts.
    """
    name = model_index.get("_class_name", "")
    if not name or name in TRAINABLE_PIPELINES:
        return
    what = OTHER_PIPELINES.get(name) or f"a {name}"
    raise ModelError(
        f"base model {reference} is not a Stable Diffusion 1.x/2.x/SDXL text-to-image model: it is {what} "
        f"(model_index.json _class_name {name!r}); sdft fine-tunes SD 1.x, SD 2.x and SDXL base models"
    )


def inspect_folder(path: Path, reference: str) -> dict[str, str | None]:
    """Checks a diffusers folder sdft is about to load; returns each weighted component's variant.

    Raises ModelError, naming what the model is, for: no model_index.json, another pipeline class, an
    inpainting (9) or instruct-pix2pix (8) UNet, a UNet whose cross-attention width does not match
    its text encoder(s), and components without safetensors weights (pickles are never loaded).
    """
    if not (path / "model_index.json").is_file():
        raise ModelError(
            f"base model {reference} is not a diffusers pipeline folder (no model_index.json); "
            "give a diffusers folder, a single-file .safetensors checkpoint or a Hub id"
        )
    model_index = read_json(path / "model_index.json")
    sdxl = "text_encoder_2" in model_index or (path / "text_encoder_2").is_dir()
    family = "SDXL" if sdxl else "SD"
    unet = read_json(path / "unet" / "config.json")
    channels = unet.get("in_channels", 4)
    if channels != 4:
        kind = {9: "an inpainting model", 8: "an instruct-pix2pix model"}.get(channels, "not a text-to-image model")
        raise ModelError(
            f"base model {reference} is {kind} ({family} UNet with {channels} input channels); sdft fine-tunes "
            "text-to-image models (4 input channels): use the base text-to-image model"
        )
    check_pipeline_config(model_index, reference)
    encoders = ["text_encoder", "text_encoder_2"] if sdxl else ["text_encoder"]
    widths = [read_json(path / e / "config.json").get("hidden_size") for e in encoders]
    cross_attention = unet.get("cross_attention_dim")
    if all(widths) and cross_attention is not None and cross_attention != sum(widths):
        raise ModelError(
            f"base model {reference} does not fit together: its {family} UNet's cross-attention width is "
            f"{cross_attention} but its text encoder(s) give {' + '.join(map(str, widths))}; "
            "was a component swapped for one of another model family?"
        )
    variants = {}
    for component in WEIGHTED_COMPONENTS:
        if component == "text_encoder_2" and not sdxl:
            continue
        folder = path / component
        names = [p.name for p in folder.iterdir()] if folder.is_dir() else []
        variant = choose_variant(names)
        if variant is False:
            pickled = [n for n in names if n.endswith(PICKLE_SUFFIXES)]
            if pickled:
                raise pickle_refused(reference, f"has only pickle weights in {component}/ ({', '.join(sorted(pickled))})")
            raise ModelError(f"base model {reference} has no safetensors weights in {component}/")
        variants[component] = variant
    return variants


def variant_view(path: Path, variants: dict[str, str | None], cache_dir: Path) -> Path:
    """`path` itself when every component has plain weights, else a folder of links to its files in
    which each variant-only component's weights carry the plain names (the variant infix dropped)."""
    if not any(variants.values()):
        return path
    source = path.resolve()
    files = sorted(p for p in source.rglob("*") if p.is_file())
    identity = hashlib.sha256(str(source).encode())
    for item in files:
        stat = item.stat()
        identity.update(f"{item.relative_to(source)}:{stat.st_size}:{stat.st_mtime_ns}\n".encode())
    target = cache_dir / "variant-view" / identity.hexdigest()[:16]
    if (target / ".complete").exists():
        return target  # made before (by this process or another one of the same run)
    partial = target.with_name(target.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    for item in files:
        relative = item.relative_to(source)
        variant = variants.get(relative.parts[0]) if len(relative.parts) > 1 else None
        if variant and weight_variant(item.name) is None:
            continue  # not loaded (the component's plain weights are absent anyway)
        name = item.name
        if variant and weight_variant(name) == variant:
            # x.fp16.safetensors, x.fp16-00001-of-00002.safetensors, x.safetensors.index.fp16.json
            name = name.replace(f".{variant}.", ".").replace(f".{variant}-", "-")
        link = partial / relative.parent / name
        link.parent.mkdir(parents=True, exist_ok=True)
        os.symlink(item.resolve(), link)
    _rewrite_shard_indexes(partial, variants)
    (partial / ".complete").touch()
    shutil.rmtree(target, ignore_errors=True)
    os.replace(partial, target)
    return target


def _rewrite_shard_indexes(view: Path, variants: dict[str, str | None]) -> None:
    """A sharded index names its shard files: point it at the renamed links."""
    for component, variant in variants.items():
        if not variant:
            continue
        for index in (view / component).glob("*.safetensors.index.json"):
            content = json.loads(index.read_text())
            content["weight_map"] = {
                key: file.replace(f".{variant}-", "-").replace(f".{variant}.", ".")
                for key, file in content.get("weight_map", {}).items()
            }
            index.unlink()  # a link to the original: replace it, never write through it
            index.write_text(json.dumps(content))
