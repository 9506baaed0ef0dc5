"""Base models: resolve a reference to a local diffusers folder (the `builtin:` ones come from `job.builtin_models`).

A reference is a Hub id (`id` or `id@revision`), a local diffusers folder, an `s3://` prefix holding a
diffusers folder, a single-file `.safetensors` checkpoint (local or `s3://`, converted offline by
`job.single_file`), or a `builtin:` model (`job.builtin_models`: tiny SD 1.x / SD 2.x / SDXL pipelines
for tests, full-size shapes for benchmarks). Folders are checked and fp16-only folders presented by
`job.model_folder`; the family's own checks (`job.families.detect_family`) run on every folder too.
Only safetensors weights are ever loaded: nothing from a bucket or the Hub is unpickled.
"""

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import structlog

from job.errors import ConfigError, ModelError, TransientError
from job.model_folder import (
    PICKLE_SUFFIXES, check_pipeline_config, inspect_folder, pickle_refused, pipeline_files, read_json, variant_view,
)
from job.storage import open_store
from job.digests import sha256_file

log = structlog.get_logger()



@dataclass(frozen=True)
class BaseModel:
    """A base model ready to load: a local diffusers folder, and what it was resolved from."""

    reference: str
    path: Path
    revision: str  # Hub commit, content hash (a single file's sha256), or "builtin"
    variant: str | None = None  # "fp16" when some component only had fp16 weights
    source_format: str = "diffusers"  # "diffusers" or "single_file"

    def manifest_fields(self) -> dict:
        """The manifest's `base_model` fields besides reference and revision."""
        fields = {"format": self.source_format}
        if self.variant:
            fields["variant"] = self.variant
        return fields


def resolve_base_model(reference: str, cache_dir: Path, prediction_type: str = "auto",
                       verify_weights: bool = True) -> BaseModel:
    """Makes `reference` available as a local diffusers folder (downloading or converting if needed).

    `prediction_type` (`SDFT_PREDICTION_TYPE`) decides an SD 2.x single file's target. Raises
    ModelError (exit 4) for a model sdft cannot train, naming what it is; TransientError when the Hub
    cannot be reached; ConfigError for a gated model without a token.
    With `verify_weights`, every tensor is read once and a NaN or Inf in any of them is `ModelError`
    (a broken model would otherwise train to NaN and, before exit 6 existed, publish black images).
    """
    model = _resolve(reference, cache_dir, prediction_type)
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


def _resolve(reference: str, cache_dir: Path, prediction_type: str) -> BaseModel:
    if reference.startswith("builtin:"):
        return _builtin(reference.removeprefix("builtin:"), cache_dir)
    if reference.startswith("s3://"):
        return _from_store(reference, cache_dir, prediction_type)
    local = Path(reference.removeprefix("file://"))
    if local.exists():
        if local.is_file():
            return _single_file(reference, local, cache_dir, prediction_type)
        return _diffusers_folder(reference, local, "local", cache_dir)
    if reference.endswith((".safetensors", *PICKLE_SUFFIXES)) or reference.startswith(("/", ".")):
        raise ModelError(f"base model {reference} not found: no such file or folder")
    return _from_hub(reference, cache_dir)


def _diffusers_folder(reference: str, path: Path, revision: str, cache_dir: Path) -> BaseModel:
    from job.families import detect_family

    variants = inspect_folder(path, reference)
    detect_family(path)  # the families' own refusals too (an SDXL refiner, …)
    variant = next((v for v in variants.values() if v), None)
    if variant:
        log.info("base_model.variant", reference=reference, variant=variant,
                 components=sorted(c for c, v in variants.items() if v))
    return BaseModel(reference, variant_view(path, variants, cache_dir), revision=revision, variant=variant)


def _from_store(reference: str, cache_dir: Path, prediction_type: str) -> BaseModel:
    store = open_store(reference)
    objects = store.list()
    if not objects:
        raise ModelError(f"base model {reference} not found: nothing under that prefix")
    if len(objects) == 1 and objects[0].key.endswith((".safetensors", *PICKLE_SUFFIXES)):
        # A single-file checkpoint in the bucket.
        target = cache_dir / "downloads" / objects[0].key
        store.download(objects[0].key, target)
        return _single_file(reference, target, cache_dir, prediction_type)
    keys = [o.key for o in objects]
    if "model_index.json" not in keys:
        raise ModelError(
            f"base model {reference} is not a diffusers pipeline folder (no model_index.json under that prefix); "
            "give a diffusers folder, a single-file .safetensors checkpoint or a Hub id"
        )
    pickled = [k for k in keys if k.endswith(PICKLE_SUFFIXES)]
    etag = _content_id(objects)
    target = cache_dir / "s3" / etag
    if not (target / ".complete").exists():
        # The pipeline's class first: another architecture is refused before any weights move.
        store.download("model_index.json", target / "model_index.json")
        model_index = read_json(target / "model_index.json")
        check_pipeline_config(model_index, reference)
        # As from the Hub: only the components sdft loads, plain weights else the fp16 variant.
        store.download_all(target, pipeline_files(keys, model_index))
        (target / ".complete").touch()
    try:
        return _diffusers_folder(reference, target, etag, cache_dir)
    except ModelError as error:
        if pickled and "pickle" not in str(error) and "safetensors" in str(error):
            raise pickle_refused(reference, f"has only pickle weights ({', '.join(pickled[:3])})") from None
        raise


def _content_id(objects) -> str:
    import hashlib

    digest = hashlib.sha256()
    for item in objects:
        digest.update(f"{item.key}:{item.size}\n".encode())
    return digest.hexdigest()[:16]


def _single_file(reference: str, path: Path, cache_dir: Path, prediction_type: str) -> BaseModel:
    if path.suffix != ".safetensors":
        raise pickle_refused(reference, f"is a {path.suffix} file")
    from job.single_file import convert_single_file, inspect_single_file

    model = inspect_single_file(path, reference, prediction_type)  # from the header: fails fast
    digest = sha256_file(path)
    target = cache_dir / "single-file" / f"{digest}-{model.prediction_type}"
    if not (target / ".complete").exists():
        log.info("base_model.converting", reference=reference, family=model.family, prediction_type=model.prediction_type)
        pipeline = convert_single_file(path, model, cache_dir / "single-file-configs")
        _save_pipeline(pipeline, target)
        del pipeline
        (target / ".complete").touch()
    return BaseModel(reference, target, revision=digest, source_format="single_file")


def _from_hub(reference: str, cache_dir: Path) -> BaseModel:
    import huggingface_hub
    from huggingface_hub import constants
    from huggingface_hub.errors import (
        EntryNotFoundError,
        GatedRepoError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    repo_id, _, revision = reference.partition("@")
    try:
        # The pipeline's class first (a few bytes): another architecture is refused before any weights.
        index_path = huggingface_hub.hf_hub_download(repo_id, "model_index.json", revision=revision or None)
        check_pipeline_config(json.loads(Path(index_path).read_text()), reference)
        if constants.HF_HUB_OFFLINE:
            # Offline: the snapshot already in HF_HOME (no listing to choose from).
            path = huggingface_hub.snapshot_download(repo_id, revision=revision or None, local_files_only=True)
        else:
            listing = huggingface_hub.list_repo_files(repo_id, revision=revision or None)
            model_index = json.loads(Path(index_path).read_text())
            path = huggingface_hub.snapshot_download(
                repo_id, revision=revision or None, allow_patterns=pipeline_files(listing, model_index)
            )
    except GatedRepoError as error:  # before its base class, RepositoryNotFoundError
        raise ConfigError(
            f"base model {reference} is gated: accept its licence on the Hub and set HF_TOKEN"
        ) from error
    except (RepositoryNotFoundError, RevisionNotFoundError) as error:
        raise ModelError(f"base model {reference} not found on the Hugging Face Hub: {error}") from error
    except LocalEntryNotFoundError as error:  # before its base class, EntryNotFoundError
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
    return _diffusers_folder(reference, path, path.name, cache_dir)


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
