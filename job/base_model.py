"""Base models: resolve a reference to a local diffusers folder (the `builtin:` ones come from `job.builtin_models`).

A reference is a Hub id (`id` or `id@revision`), a local diffusers folder, an `s3://` prefix holding a
diffusers folder, a single-file `.safetensors` checkpoint (local or `s3://`), or a `builtin:` model
(`job.builtin_models`: tiny SD 1.x / SD 2.x / SDXL pipelines for tests, full-size shapes for benchmarks).
Only safetensors weights are ever loaded: nothing from a bucket or the Hub is unpickled.
"""

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import structlog

from job.errors import ConfigError, ModelError, TransientError
from job.storage import open_store
from job.digests import sha256_file

log = structlog.get_logger()

PICKLE_SUFFIXES = (".bin", ".ckpt", ".pt", ".pth", ".pkl")


@dataclass(frozen=True)
class BaseModel:
    """A base model ready to load: a local diffusers folder, and what it was resolved from."""

    reference: str
    path: Path
    revision: str  # Hub commit, content hash, or "builtin"


def resolve_base_model(reference: str, cache_dir: Path, verify_weights: bool = True) -> BaseModel:
    """Makes `reference` available as a local diffusers folder (downloading if needed).

    With `verify_weights`, every tensor is read once and a NaN or Inf in any of them is `ModelError`
    (a broken model would otherwise train to NaN and, before exit 6 existed, publish black images).
    """
    model = _resolve(reference, cache_dir)
    if verify_weights:
        require_finite_weights(model)
    return model


def require_finite_weights(model: BaseModel) -> None:
    """Raises `ModelError` naming the first file and tensor holding a NaN or Inf (one pass, tensor by tensor)."""
    import torch
    from safetensors import safe_open

    for path in sorted(model.path.glob("*/*.safetensors")):
        with safe_open(str(path), framework="pt") as weights:
            for name in weights.keys():
                if not torch.isfinite(weights.get_tensor(name)).all():
                    raise ModelError(
                        f"base model {model.reference} has non-finite weights (NaN or Inf) in "
                        f"{path.parent.name}/{path.name}, tensor {name}: the file is damaged or was saved "
                        "after training diverged; use an intact copy of the model"
                    )


def _resolve(reference: str, cache_dir: Path) -> BaseModel:
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
    from job.families import detect_family

    family = detect_family(path)  # exit 4 for inpainting, refiners and other pipelines
    for component in ("unet", "vae", "text_encoder", *(("text_encoder_2",) if family == "sdxl" else ())):
        folder = path / component
        if not any(folder.glob("*.safetensors")):
            pickled = [p.name for p in folder.glob("*") if p.suffix in PICKLE_SUFFIXES]
            if pickled:
                raise _pickle_refused(reference, f"has only pickle weights in {component}/ ({', '.join(pickled)})")
            raise ModelError(f"base model {reference} has no safetensors weights in {component}/")


def _pickle_refused(reference: str, what: str) -> ModelError:
    """The one refusal of pickle weights (exit 4): `what` says what was found."""
    return ModelError(
        f"base model {reference} {what}; sdft loads .safetensors only (pickle weights can run arbitrary "
        "code when loaded): convert the model to safetensors first"
    )


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
            raise _pickle_refused(reference, f"has only pickle weights ({', '.join(pickled[:3])})") from None
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
        raise _pickle_refused(reference, f"is a {path.suffix} file")
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
    import json

    from huggingface_hub import hf_hub_download, snapshot_download
    from huggingface_hub.errors import (
        EntryNotFoundError,
        GatedRepoError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    repo_id, _, revision = reference.partition("@")
    try:
        index = json.loads(Path(hf_hub_download(repo_id, "model_index.json", revision=revision or None)).read_text())
        # Only the pipeline's component folders, and in them only safetensors and configs: pickle
        # weights are never even downloaded, nor the single-file checkpoints some repos keep beside
        # the folders (SDXL base: two of 6.9 GB).
        components = [name for name, value in index.items() if isinstance(value, list) and value[0] is not None]
        path = snapshot_download(
            repo_id,
            revision=revision or None,
            allow_patterns=["model_index.json", *(f"{c}/*{ext}" for c in components for ext in (".json", ".txt", ".safetensors"))],
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
    except EntryNotFoundError as error:  # after its subclass LocalEntryNotFoundError (offline: transient)
        raise ModelError(
            f"base model {reference} on the Hub is not a diffusers pipeline (no model_index.json); "
            "give a diffusers repository or a single-file .safetensors checkpoint"
        ) from error
    path = Path(path)
    _require_diffusers_folder(path, reference)
    return BaseModel(reference, path, revision=path.name)


# The builtin models are random but deterministic: the same bytes on every machine, built offline.
def _builtin(name: str, cache_dir: Path) -> BaseModel:
    from job.builtin_models import BUILTINS, build_builtin_pipeline

    if name not in BUILTINS:
        raise ModelError(f"unknown builtin model builtin:{name}; known: " + ", ".join(f"builtin:{n}" for n in BUILTINS))
    target = cache_dir / "builtin" / name
    if not (target / ".complete").exists():
        shutil.rmtree(target, ignore_errors=True)
        _save_pipeline(build_builtin_pipeline(BUILTINS[name]()), target)
        (target / ".complete").touch()
    return BaseModel(f"builtin:{name}", target, revision="builtin")


def _save_pipeline(pipeline, target: Path) -> None:
    from transformers import PreTrainedModel

    partial = target.with_name(target.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    # Under torch.distributed, transformers saves a model's config and weights on global rank 0 only
    # (`should_save_on_this_rank`), but every machine builds its own copy into its own work dir: on
    # machine rank 1 the text encoder's folder stayed empty. These objects are this process's own.
    for component in pipeline.components.values():
        if isinstance(component, PreTrainedModel):
            component.should_save_on_this_rank = lambda is_main_process: is_main_process
    pipeline.save_pretrained(partial, safe_serialization=True)
    shutil.rmtree(target, ignore_errors=True)
    os.replace(partial, target)
