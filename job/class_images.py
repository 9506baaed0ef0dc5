"""Class images for prior preservation: reuse what `SDFT_CLASS_URI` holds, generate the rest once.

Missing images are generated with the base model from the class prompt (never the instance prompt),
each from its own fixed seed, and uploaded to the class URI so that the next run of the same class,
on any machine, reuses them instead of generating again. With several processes each generates its
share; every machine then fetches the full set. A generated image is named by its content
(`class-<sha256[:16]>.png`), so jobs sharing a class prefix at the same time never overwrite each
other's images: the prefix ends with the union (identical images get identical names and bytes).
"""

import hashlib
import shutil
from dataclasses import dataclass
from pathlib import Path

import structlog
import torch
from PIL.PngImagePlugin import PngInfo

from job import layout
from job.distributed import local_main_first, nothing
from job.errors import ConfigError, InputError
from job.inputs import DATASET_INFO, IMAGE_SUFFIXES, Dataset, Example, image_problem
from job.storage import Store, open_store
from job.digests import sha256_file

log = structlog.get_logger()

GENERATION_BATCH = 4  # images per pipeline call: fast on a GPU, small enough for 512 px at fp16


@dataclass(frozen=True)
class ClassImagePlan:
    """Which stored images are reused and which names are still to be generated (same on every rank)."""

    reused: list[str]
    to_generate: list[int]  # indices of the images still to render (each index has its own seed)


def prepare_class_images(settings, dataset: Dataset, models, accelerator, work_dir: Path) -> Dataset:
    """The class examples for the prior loss: `SDFT_NUM_CLASS_IMAGES` images captioned with the class prompt."""
    class_prompt = settings.class_prompt or dataset.class_prompt
    if not class_prompt:
        raise ConfigError(
            "SDFT_WITH_PRIOR_PRESERVATION=true needs a class prompt: set SDFT_CLASS_PROMPT "
            f"(e.g. `a photo of dog`) or give class_prompt in {DATASET_INFO}"
        )
    store = open_store(settings.effective_class_uri)
    folder = work_dir / "images"
    plan = plan_class_images(store, settings.num_class_images)

    def fetch_reused() -> None:
        shutil.rmtree(folder, ignore_errors=True)  # the store, not a previous run's leftovers, is the truth
        folder.mkdir(parents=True)
        _download_missing(store, plan.reused, folder)

    # Every rank has listed the store before any rank uploads, so all hold the same plan.
    local_main_first(accelerator, fetch_reused, others=nothing)

    mine = plan.to_generate[accelerator.process_index :: accelerator.num_processes]
    written = generate_class_images(settings, models, class_prompt, mine, folder) if mine else []
    for key, path in written:
        store.upload(path, key)
    generated = _gather_keys(accelerator, [key for key, _ in written])
    # Other machines' shares.
    local_main_first(accelerator, lambda: _download_missing(store, generated, folder), others=nothing)

    log.info("class_images.reused", count=len(plan.reused), uri=store.uri)
    log.info("class_images.generated", count=len(plan.to_generate), prompt=class_prompt, uri=store.uri)
    keys = plan.reused + generated
    examples = [Example(str(folder / key), key, sha256_file(folder / key), class_prompt) for key in keys]
    return Dataset(examples, instance_prompt=None, class_prompt=class_prompt)


def plan_class_images(store: Store, wanted: int) -> ClassImagePlan:
    """Reuses up to `wanted` stored images (sorted by key); the rest are generated, indices following on."""
    stored = sorted(o.key for o in store.list() if Path(o.key).suffix.lower() in IMAGE_SUFFIXES)
    reused = stored[:wanted]
    return ClassImagePlan(reused, list(range(len(reused), wanted)))


def _gather_keys(accelerator, keys: list[str]) -> list[str]:
    """Every process's generated keys, in process order (the same list on every process)."""
    if accelerator.num_processes == 1:
        return keys
    from accelerate.utils import gather_object

    return [key for keys_of_one in gather_object([keys]) for key in keys_of_one]


def class_image_seed(seed: int, class_prompt: str, index: int) -> int:
    """Image `index`'s own seed: the same image whatever the batch, the process or the machine."""
    digest = hashlib.sha256(f"{seed}\0{class_prompt}\0{index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def generate_class_images(settings, models, class_prompt: str, indices: list[int], folder: Path) -> list[tuple[str, Path]]:
    """Renders image `index` for each of `indices` with the base model, batched; returns (key, path)
    of each written file, keyed `class-<first 16 hex digits of the PNG's sha256>.png`."""
    from job.sampling import render, sample_pipeline

    pipeline = sample_pipeline(models, models.unet, *models.text_encoders)  # the family's pipeline, no safety checker
    written = []
    for start in range(0, len(indices), GENERATION_BATCH):
        batch = indices[start : start + GENERATION_BATCH]
        seeds = [class_image_seed(settings.seed, class_prompt, index) for index in batch]
        # CPU generators: the starting noise does not depend on the GPU model.
        generators = [torch.Generator().manual_seed(s) for s in seeds]
        images = render(settings, pipeline, generators, prompt=[class_prompt] * len(batch))
        for index, seed, image in zip(batch, seeds, images):
            rendered = folder / f".rendering-{index}.png"
            image.save(rendered, pnginfo=_provenance(settings, class_prompt, seed))
            key = layout.class_image_name(sha256_file(rendered))
            rendered.replace(folder / key)
            written.append((key, folder / key))
        log.debug("class_images.batch", done=start + len(batch), of=len(indices))
    return written


def _provenance(settings, class_prompt: str, seed: int) -> PngInfo:
    """What made the image, in the PNG's text chunks (where A1111 and ComfyUI users look for it)."""
    info = PngInfo()
    info.add_text("prompt", class_prompt)
    info.add_text("seed", str(seed))
    info.add_text("num_inference_steps", str(settings.sample_inference_steps))
    info.add_text("guidance_scale", str(settings.sample_guidance_scale))
    info.add_text("base_model", settings.base_model)
    return info


def _download_missing(store: Store, keys: list[str], folder: Path) -> None:
    missing = [key for key in keys if not (folder / key).is_file()]
    if missing:
        store.download_all(folder, missing)
    for key in keys:
        problem = image_problem(folder / key)
        if problem:
            raise InputError(f"class image {store.url(key)} is unusable ({problem}): delete or replace it")
