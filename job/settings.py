"""The job's settings: every `SDFT_*` environment variable, declared and documented once.

This is the only module that reads the environment for settings. `load_settings` turns the
environment (plus, for fan-out jobs, one line of a batch file) into a frozen `Settings`, or raises a
`ConfigError` that lists every problem at once, before anything is downloaded or trained.
"""

import json
import os
import socket
from dataclasses import dataclass
from typing import Literal

from pydantic import Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from job import layout
from job.errors import ConfigError
from job.locations import overlap_problems

ENV_PREFIX = "SDFT_"


class Settings(BaseSettings):
    """One fine-tuning run. Field `x` is read from the environment variable `SDFT_X`."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, frozen=True, extra="forbid")

    # What to train, from what, into where.
    method: Literal["lora", "dreambooth"] = Field(
        "lora",
        description="`lora` (adapters on the UNet attention, optionally the text encoder) or "
        "`dreambooth` (full UNet fine-tune, optionally the text encoder)",
    )
    base_model: str = Field(
        "stable-diffusion-v1-5/stable-diffusion-v1-5",
        description="An SD 1.x, SD 2.x or SDXL model: Hub id (optionally `id@revision`; only the "
        "pipeline's component folders are fetched), local diffusers folder, `s3://` prefix holding a "
        "diffusers folder (an fp16-variant-only folder too), single-file `.safetensors` checkpoint "
        "(local or `s3://`, loaded fully offline), or a `builtin:` model built offline: `tiny`, "
        "`tiny-sd2`, `tiny-sdxl` (small random SD 1.x / SD 2.x v-prediction / SDXL pipelines, for demos "
        "and tests), `sd15-shape`, `sdxl-shape` (random, with SD 1.5's / SDXL base's exact architecture, "
        "for benchmarks). The family (SD 1.x, SD 2.x, SDXL) is detected from the model; inpainting, "
        "instruct-pix2pix and other architectures are refused",
    )
    prediction_type: Literal["auto", "epsilon", "v_prediction"] = Field(
        "auto",
        description="What the UNet predicts: `auto` (from the base model: its scheduler config, e.g. "
        "`v_prediction` for the 768 px SD 2.x models; for a single file its family and metadata, an "
        "SD 2.x file that does not say being taken as the 768 v-prediction model), `epsilon` or "
        "`v_prediction`",
    )
    vae: str | None = Field(
        None,
        description="A replacement VAE (local diffusers VAE folder or Hub id, safetensors), e.g. "
        "`madebyollin/sdxl-vae-fp16-fix`; default the base model's own",
    )
    instance_uri: str = Field(
        description="Instance images: an `s3://` prefix or object, a local folder or file, or a "
        "`.zip`/`.tar`/`.tar.gz` archive. Images are `.jpg .jpeg .png .webp .bmp .heic .heif .avif` "
        "(any case); a same-stem `.txt` or `.caption` file (any case; UTF-8 with or without BOM, or "
        "UTF-16 with BOM) is the image's caption; an optional `dataset_info.json` may give "
        "`instance_prompt` and `class_prompt`",
    )
    instance_prompt: str | None = Field(
        None,
        description="Caption of every image without its own caption file, e.g. `a photo of sks dog`; "
        "required unless every image has a caption or `dataset_info.json` gives it",
    )
    output_uri: str = Field(description="Prefix that receives weights, samples and the run record")
    checkpoint_uri: str | None = Field(
        None, description=f"Where resumable training state goes; default `<OUTPUT_URI>/{layout.CHECKPOINTS_DIR}/`"
    )

    # Prior preservation (DreamBooth's class-preserving loss).
    with_prior_preservation: bool = Field(False, description="Add the prior-preservation loss")
    class_prompt: str | None = Field(
        None, description="e.g. `a photo of dog`; required with prior preservation"
    )
    class_uri: str | None = Field(
        None,
        description="Class images, used if present and topped up by generation; "
        f"default `<OUTPUT_URI>/{layout.CLASS_IMAGES_DIR}/`",
    )
    num_class_images: int = Field(100, ge=1, description="Class images wanted for prior preservation")
    prior_loss_weight: float = Field(1.0, ge=0, description="Weight of the prior-preservation loss")

    # Data.
    resolution: int | None = Field(
        None,
        ge=8,
        description="Training resolution in pixels, a multiple of 8: the side of the square, or with "
        "bucketing the side of a square of the same area as each bucket; default the family's native "
        "size (512 SD 1.x, 768 SD 2.x v-prediction, 512 SD 2.x epsilon, 1024 SDXL)",
        json_schema_extra={"default_text": "family's native size"},
    )
    bucketing: bool = Field(
        True,
        description="Aspect-ratio buckets: each image trains at the bucket nearest its aspect ratio "
        "(area ≈ resolution², sides in steps of 64 px, or resolution/4 below 256 px; at most 5:2), "
        "resized to cover it and cropped, instead of a square crop; every batch comes from one bucket",
    )
    caption_dropout: float = Field(
        0.0, ge=0, le=1,
        description="Probability that a training example's caption is replaced by the empty prompt",
    )
    center_crop: bool = Field(True, description="Center crop (else random crop) after resizing")
    random_flip: bool = Field(False, description="Randomly flip images horizontally")

    # Optimisation.
    train_batch_size: int = Field(1, ge=1, description="Images per step per process")
    gradient_accumulation_steps: int = Field(1, ge=1, description="Micro-batches per optimizer step")
    max_train_steps: int = Field(500, ge=1, description="Optimizer steps")
    learning_rate: float | None = Field(
        None, gt=0, description="Default `1e-4` for lora, `5e-6` for dreambooth"
    )
    lr_scheduler: Literal[
        "constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial"
    ] = Field("constant", description="Learning-rate schedule (diffusers' `get_scheduler` names)")
    lr_warmup_steps: int = Field(0, ge=0, description="Warm-up steps of the schedule")
    max_grad_norm: float = Field(1.0, gt=0, description="Gradient clipping norm")
    seed: int = Field(
        0, ge=0, description="Same seed + inputs + settings ⇒ same weights (on the same hardware)"
    )
    mixed_precision: Literal["auto", "no", "fp16", "bf16"] = Field(
        "auto", description="`auto`: bf16 where supported, else fp16 on CUDA, none on CPU"
    )
    gradient_checkpointing: bool = Field(False, description="Trade compute for activation memory")
    use_8bit_adam: bool = Field(False, description="8-bit AdamW from bitsandbytes (CUDA only)")
    torch_compile: bool = Field(False, description="Compile the UNet with `torch.compile`")
    train_text_encoder: bool = Field(
        False, description="Also train the text encoder (LoRA for lora, full for dreambooth)"
    )

    # LoRA.
    lora_rank: int = Field(16, ge=1, description="LoRA rank")
    lora_alpha: float | None = Field(None, gt=0, description="LoRA alpha; default the rank")
    lora_dropout: float = Field(0.0, ge=0, lt=1, description="LoRA dropout")

    # Loss options.
    snr_gamma: float | None = Field(None, gt=0, description="Min-SNR weighting gamma; unset = off")
    noise_offset: float = Field(0.0, ge=0, description="Offset-noise strength")
    cache_latents: Literal["auto", "true", "false"] = Field(
        "auto",
        description="Encode each image once and train on cached latents (and text embeddings when "
        "the text encoder is frozen); `auto` = on unless an augmentation makes it wrong",
    )

    # Checkpoints and samples.
    checkpoint_every_steps: int = Field(100, ge=1, description="Checkpoint interval; also saved on SIGTERM")
    validation_prompts: list[str] | None = Field(
        None, description="Prompts rendered as samples (JSON array); default the instance prompt"
    )
    num_validation_images: int = Field(4, ge=0, description="Samples per prompt")
    validation_every_steps: int = Field(0, ge=0, description="Intermediate samples interval; 0 = only at the end")
    sample_inference_steps: int = Field(30, ge=1, description="Denoising steps per sample")
    sample_guidance_scale: float = Field(7.5, ge=0, description="Classifier-free guidance scale of samples")

    # Running.
    run_id: str = Field(
        default_factory=lambda: socket.gethostname(),
        description="Names the run in logs and the manifest; default the hostname (the "
        "Kubernetes manifests set it to the Job name)",
        json_schema_extra={"default_text": "hostname"},
    )
    work_dir: str = Field("/tmp/sdft", description="Local scratch folder")
    force: bool = Field(False, description="Re-run even though the output already holds a successful run")
    storage_timeout_s: float = Field(
        300.0, gt=0, description="Total time one storage operation may take, retries included, before "
        "the job gives up with exit 75",
    )
    batch_uri: str | None = Field(
        None,
        description="JSON Lines file; with `JOB_COMPLETION_INDEX=N` line N's keys (setting names "
        "without the prefix, lower case) override the other settings",
    )
    log_format: Literal["auto", "json", "console"] = Field(
        "auto", description="`auto` = JSON when stdout is not a terminal"
    )
    log_level: Literal["debug", "info", "warning", "error"] = Field("info", description="Log level")
    log_every_steps: int | None = Field(
        None,
        ge=1,
        description="Steps between progress reads: `train.step` events, metrics lines, "
        "status updates and the divergence check (exit 6 within this many steps of a non-finite "
        "loss). In between, losses stay on the device and the step never waits for the GPU. "
        "Default 1 on CPU (a read costs nothing there), 10 on a GPU",
        json_schema_extra={"default_text": "1 on CPU, 10 on GPU"},
    )

    # Read by entrypoint.sh to start several processes / machines with `accelerate launch`.
    num_processes: int = Field(1, ge=1, description="Processes (GPUs) per machine")
    num_machines: int = Field(1, ge=1, description="Machines")
    machine_rank: int = Field(0, ge=0, description="This machine's rank")
    main_process_ip: str | None = Field(None, description="Address of the rank-0 machine")
    main_process_port: int = Field(29500, ge=1, le=65535, description="Port of the rank-0 machine")

    @field_validator("resolution")
    @classmethod
    def _multiple_of_8(cls, value: int | None) -> int | None:
        if value is not None and value % 8:
            raise ValueError(f"must be a multiple of 8 (try {value - value % 8 or 8})")
        return value

    @field_validator("output_uri", "instance_uri", "base_model")
    @classmethod
    def _not_blank(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("must not be empty")
        return value.strip()

    @model_validator(mode="after")
    def _consistent(self) -> "Settings":
        if self.with_prior_preservation and self.num_class_images < 1:
            raise ValueError("num_class_images must be at least 1 with prior preservation")
        if self.cache_latents == "true" and not self.center_crop:
            raise ValueError(
                "SDFT_CACHE_LATENTS=true cannot be used with SDFT_CENTER_CROP=false (a random crop per "
                "step has no single latent to cache); use `auto` or `false`"
            )
        if self.validation_prompts is not None and not self.validation_prompts:
            raise ValueError("validation_prompts must not be an empty list")
        return self

    # Values that depend on other settings.
    @property
    def effective_learning_rate(self) -> float:
        if self.learning_rate is not None:
            return self.learning_rate
        return 1e-4 if self.method == "lora" else 5e-6

    @property
    def effective_lora_alpha(self) -> float:
        return self.lora_alpha if self.lora_alpha is not None else float(self.lora_rank)

    @property
    def effective_checkpoint_uri(self) -> str:
        return self.checkpoint_uri or _join(self.output_uri, layout.CHECKPOINTS_DIR)

    @property
    def effective_class_uri(self) -> str:
        return self.class_uri or _join(self.output_uri, layout.CLASS_IMAGES_DIR)


def _join(prefix: str, name: str) -> str:
    return prefix.rstrip("/") + "/" + name


def env_name(field: str) -> str:
    return ENV_PREFIX + field.upper()


@dataclass(frozen=True)
class BatchLineSource:
    """Where a fan-out pod's settings line is: the batch file, the pod's index, the run id to derive from."""

    uri: str
    index_text: str | None  # JOB_COMPLETION_INDEX, set by Kubernetes in every pod of an Indexed Job
    default_run_id: str


def batch_line_source() -> BatchLineSource | None:
    """The batch line this pod must read (`SDFT_BATCH_URI` set), or None. Reads only the environment;
    the edge fetches the line (`job.fanout.read_batch_line`) and passes it to `load_settings`."""
    uri = os.environ.get(env_name("batch_uri"))
    if not uri:
        return None
    return BatchLineSource(uri, os.environ.get("JOB_COMPLETION_INDEX"),
                           os.environ.get(env_name("run_id")) or socket.gethostname())


def load_settings(batch_line: dict | None = None) -> Settings:
    """Builds the settings from the environment and, for a fan-out pod, its line of the batch file
    (whose keys take precedence). No I/O but reading the environment.

    Every problem (unknown variables or batch keys, bad values, missing required ones) is collected
    and raised as one `ConfigError`.
    """
    problems = [
        f"unknown setting {name} (not one of sdft's settings; `python -m job settings` lists them)"
        for name in sorted(os.environ)
        if name.upper().startswith(ENV_PREFIX) and name[len(ENV_PREFIX) :].lower() not in Settings.model_fields
    ]
    batch_line = dict(batch_line or {})
    for key in sorted(batch_line):
        if key not in Settings.model_fields:
            problems.append(f"unknown key {key!r} in the batch line (keys are setting names, lower case)")
            del batch_line[key]
    settings = None
    try:
        settings = Settings(**batch_line)  # keyword arguments take precedence over the environment
    except ValidationError as error:
        problems.extend(_describe(error))
    if settings is not None:
        # The class prefix only matters when class images are read or written.
        class_uri = settings.effective_class_uri if settings.with_prior_preservation or settings.class_uri else None
        problems.extend(overlap_problems(settings.instance_uri, settings.output_uri,
                                         settings.effective_checkpoint_uri, class_uri))
    if problems:
        raise ConfigError("invalid settings: " + "; ".join(problems))
    return settings


def _describe(error: ValidationError) -> list[str]:
    problems = []
    for item in error.errors():
        field = str(item["loc"][0]) if item["loc"] else ""
        name = env_name(field) if field else "settings"
        message = item["msg"].removeprefix("Value error, ")
        if item["type"] == "missing":
            message = "is required"
        if item["type"] != "missing":
            message += f" (got {item.get('input')!r})"
        problems.append(f"{name}: {message}")
    return problems


def settings_table() -> str:
    """The Markdown settings reference; the README's table is exactly this output."""
    rows = ["| variable | default | meaning |", "|---|---|---|"]
    for name, field in Settings.model_fields.items():
        extra = field.json_schema_extra or {}
        if "default_text" in extra:
            default = extra["default_text"]
        elif field.is_required():
            default = "required"
        elif field.default is None:
            default = "—"
        else:
            default = json.dumps(field.default) if not isinstance(field.default, str) else field.default
        rows.append(f"| `{env_name(name)}` | `{default}` | {field.description} |")
    return "\n".join(rows)


def public_settings(settings: Settings) -> dict:
    """The settings as recorded in the manifest: secrets removed, derived defaults filled in."""
    data = settings.model_dump(mode="json")
    for name, field in Settings.model_fields.items():
        if (field.json_schema_extra or {}).get("secret"):
            data.pop(name, None)
    data["learning_rate"] = settings.effective_learning_rate
    data["lora_alpha"] = settings.effective_lora_alpha
    data["checkpoint_uri"] = settings.effective_checkpoint_uri
    data["class_uri"] = settings.effective_class_uri
    return data
