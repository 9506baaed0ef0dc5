"""The orchestrator: fetch inputs → prepare data → load model → train → sample → publish.

`run` is the whole job for already-validated settings; `check` is everything short of training.
Neither knows about environment variables or exit codes: failures are raised as `JobError`s.
"""

import shutil
import time
from contextlib import contextmanager
from pathlib import Path

import structlog

from job import layout, preemption, strict_json
from job.checkpoints import Checkpoints
from job.distributed import local_main_first
from job.errors import ConfigError, JobError, OutOfMemoryError, find_job_error
from job.inputs import Dataset, fetch_inputs, prepare_dataset
from job.methods import export_weights
from job.base_model import resolve_base_model
from job.families import detect_family, family_for, scheduler_prediction_type, with_family_defaults
from job.kohya import LoraFacts
from job.model_card import write_model_card
from job.publish import publish
from job.run_record import StatusFile, already_succeeded, fingerprint, manifest
from job.sampling import make_grid, render_samples, sample_pipeline, validation_prompts
from job.settings import Settings
from job.storage import open_store, set_operation_timeout
from job.model_parts import load_models, make_accelerator
from job.train import Hooks, train
from job.buckets import histogram
from job.training_data import describe_inputs, place_inputs

log = structlog.get_logger()

STATUS_TIMEOUT_S = 15.0  # the failure report's own bound: the store may be what failed
OOM_HINT = "lower SDFT_TRAIN_BATCH_SIZE or SDFT_RESOLUTION, or set SDFT_GRADIENT_CHECKPOINTING=true / SDFT_USE_8BIT_ADAM=true"


class Stages:
    """Times each stage, logs `stage.start` / `stage.done`, and keeps status.json's phase current."""

    def __init__(self, status: StatusFile | None = None):
        self.status = status
        self.seconds: dict[str, float] = {}

    @contextmanager
    def __call__(self, name: str):
        preemption.stop_if_requested()  # a SIGTERM that a library swallowed still stops the job here
        log.info("stage.start", stage=name)
        if self.status:
            self.status.update(phase=name)
        started = time.monotonic()
        yield
        self.seconds[name] = round(time.monotonic() - started, 3)
        log.info("stage.done", stage=name, seconds=self.seconds[name])
        preemption.stop_if_requested()


def run(settings: Settings) -> None:
    set_operation_timeout(settings.storage_timeout_s)
    work = Path(settings.work_dir)
    output = open_store(settings.output_uri)
    accelerator = make_accelerator(settings)
    main = accelerator.is_main_process
    status = StatusFile(output, settings.max_train_steps) if main else None
    stage = Stages(status)
    try:
        _make_work_dir(work)  # after the accelerator: a rank failing here ends the others' barrier, not their rendezvous
        # Inputs: one process per machine fetches and decodes; the others read its decision.
        with stage("fetch_inputs"):
            handoff = work / "dataset.json"
            dataset = local_main_first(accelerator, lambda: _prepare_inputs(settings, work, handoff),
                                       others=lambda: Dataset.load(handoff))
        # Prompts from dataset_info.json count as if they had been set (model card, kohya header).
        settings = settings.model_copy(update={"instance_prompt": dataset.instance_prompt, "class_prompt": dataset.class_prompt})
        inputs = [{"path": e.source, "sha256": e.sha256, "caption": e.caption} for e in dataset.examples]
        run_fingerprint = fingerprint(settings, inputs)
        if not settings.force and already_succeeded(output, run_fingerprint):
            log.info("job.already_succeeded", uri=output.uri, fingerprint=run_fingerprint)
            if status:
                status.finish("succeeded", 0, phase="already_succeeded")
            return
        if main:
            output.delete([layout.SUCCESS])  # from here until the end, the output is not a complete result

        with stage("load_model"):
            base = local_main_first(accelerator, lambda: resolve_base_model(
                settings.base_model, work / "models", settings.prediction_type,
                verify_weights=accelerator.is_local_main_process))
            models = load_models(base.path, accelerator, settings.prediction_type, settings.vae)
            settings = with_family_defaults(settings, models.family, models.prediction_type)
            log.info("model.family", family=models.family.name, prediction_type=models.prediction_type,
                     resolution=settings.resolution)
        # Each image's bucket, and whether its caption fits the text encoder: warned now, in the manifest later.
        prompts = validation_prompts(settings, dataset)
        described = describe_inputs(dataset.examples, resolution_px=settings.resolution, bucketing=settings.bucketing,
                                    tokenizer=models.tokenizer, prompts=_prompt_names(settings, prompts))

        prior = None
        if settings.with_prior_preservation:
            from job.class_images import prepare_class_images

            with stage("class_images"):
                prior = prepare_class_images(settings, dataset, models, accelerator, work / "class_images")

        with stage("train"):
            staging = work / "output"
            if main:
                shutil.rmtree(staging, ignore_errors=True)
                staging.mkdir(parents=True)
            metrics = staging / layout.METRICS  # carried in checkpoints: a resumed run keeps every step's line
            checkpoints = Checkpoints(open_store(settings.effective_checkpoint_uri), run_fingerprint, work / "checkpoints", carry=[metrics])
            progress = _Progress(settings, status, metrics)

            def sample_at(step, unet, *text_encoders):
                if main:
                    render_samples(settings, sample_pipeline(models, unet, *text_encoders), prompts, staging / layout.step_samples_dir(step))

            started_at = time.time()
            hooks = Hooks(on_step=progress.on_step, on_sample=sample_at, checkpoints=checkpoints)
            result = train(settings, models, accelerator, dataset, prior=prior, hooks=hooks)

        if not main:
            accelerator.wait_for_everyone()
            return
        with stage("sample"):
            pipeline = sample_pipeline(models, models.unet, *models.text_encoders)
            samples = render_samples(settings, pipeline, prompts, staging / layout.FINAL_SAMPLES_DIR)
            make_grid([e.path for e in dataset.examples], samples, prompts, staging / layout.GRID)
        with stage("publish"):
            facts = LoraFacts(base.reference, models.family, models.prediction_type, result.steps,
                              [e.caption for e in dataset.examples], started_at)
            export_weights(settings, pipeline, facts, staging)
            write_model_card(settings, staging, base.reference, result.steps, prompts, models.family)
            record = manifest(settings, run_fingerprint, base, described, dataset.skipped, result, stage.seconds,
                              accelerator.num_processes, family=models.family.name, prediction_type=models.prediction_type)
            publish(output, staging, record)
            status.finish("succeeded", 0)
            output.put(layout.SUCCESS, b"")
            checkpoints.clear()
        accelerator.wait_for_everyone()
    except Exception as error:
        failure = _as_job_error(error)
        if status:
            _report_failure(settings.output_uri, status, failure, settings.storage_timeout_s)
        raise failure from error


def _report_failure(output_uri: str, status: StatusFile, failure: JobError, timeout_s: float) -> None:
    """Writes the failure to status.json, quickly and at best: the output store may be what failed,
    and neither a second error nor another round of retries may hide or delay the first reason."""
    try:
        quick = open_store(output_uri, max_attempts=2, connect_timeout_s=5.0, read_timeout_s=10.0,
                           operation_timeout_s=min(timeout_s, STATUS_TIMEOUT_S))
        status.finish("failed", failure.exit_code, " ".join(str(failure).split()), store=quick)
    except Exception as error:
        log.warning("status.unwritable", uri=output_uri, reason=f"{type(error).__name__}: {error}")


def _make_work_dir(work: Path) -> None:
    try:
        work.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise ConfigError(f"SDFT_WORK_DIR {work} is not a writable folder on this machine ({error}); "
                          "point it at a writable volume") from error


def _prompt_names(settings: Settings, prompts: list[str]) -> dict[str, str]:
    """Each prompt the text encoder will read, by the setting it comes from (for truncation warnings)."""
    named = {prompt: f"SDFT_VALIDATION_PROMPTS[{i}]" for i, prompt in enumerate(prompts)}
    if settings.with_prior_preservation and settings.class_prompt:
        named[settings.class_prompt] = "SDFT_CLASS_PROMPT"
    return named


def _prepare_inputs(settings: Settings, work: Path, handoff: Path | None = None) -> Dataset:
    """Fetches and decodes the instance images; with `handoff`, also saves the decision there."""
    folder = fetch_inputs(settings.instance_uri, work / "inputs")
    dataset = prepare_dataset(folder, settings.instance_prompt, settings.class_prompt)
    log.info("inputs.ready", images=len(dataset.examples), skipped=len(dataset.skipped))
    if handoff is not None:
        dataset.save(handoff)
    return dataset


def _as_job_error(error: Exception) -> JobError:
    import torch

    wrapped = find_job_error(error)
    if wrapped is not None:
        return wrapped
    if isinstance(error, torch.OutOfMemoryError):
        return OutOfMemoryError(f"out of GPU memory at these settings: {OOM_HINT}")
    failure = JobError(f"{type(error).__name__}: {error}")
    failure.__cause__ = error
    return failure


class _Progress:
    """After each step: the `train.step` event, a metrics line, and status.json (main process only)."""

    def __init__(self, settings: Settings, status: StatusFile | None, metrics_path: Path):
        self.settings = settings
        self.status = status
        self.metrics_path = metrics_path
        self.started = time.monotonic()
        self.first_step: int | None = None

    def on_step(self, step: int, loss: float, parts: dict) -> None:
        if self.status is None:
            return
        if self.first_step is None:
            self.first_step, self.started = step, time.monotonic()  # rate measured from the first step on
        elapsed = time.monotonic() - self.started
        it_per_s = (step - self.first_step) / elapsed if elapsed > 0 and step > self.first_step else None
        eta = round((self.settings.max_train_steps - step) / it_per_s, 1) if it_per_s else None
        lr = parts.pop("lr")
        log.info("train.step", step=step, max_steps=self.settings.max_train_steps, loss=round(loss, 6), lr=lr,
                 it_per_s=it_per_s and round(it_per_s, 3), eta_seconds=eta, **{k: round(v, 6) for k, v in parts.items()})
        with self.metrics_path.open("a") as metrics:
            metrics.write(strict_json.dumps({"step": step, "loss": loss, "lr": lr, "seconds": round(elapsed, 3), **parts}) + "\n")
        checkpointed = step % self.settings.checkpoint_every_steps == 0
        self.status.update(force=checkpointed, phase="train", step=step, loss=loss, eta_seconds=eta)


def check(settings: Settings) -> dict:
    """Preflight: settings, storage access, every input image decoded, base model resolved."""
    from job.model_parts import check_device_settings

    check_device_settings(settings)
    set_operation_timeout(settings.storage_timeout_s)
    work = Path(settings.work_dir) / "check"
    output = open_store(settings.output_uri)
    output.exists(layout.SUCCESS)  # reaches the output bucket with these credentials
    stage = Stages()
    with stage("fetch_inputs"):
        dataset = _prepare_inputs(settings, work)
    with stage("resolve_model"):
        base = resolve_base_model(settings.base_model, Path(settings.work_dir) / "models", settings.prediction_type)
        family = family_for(detect_family(base.path))  # exit 4 here for inpainting, refiners, other pipelines
        prediction_type = scheduler_prediction_type(base.path) if settings.prediction_type == "auto" else settings.prediction_type
    resolution = settings.resolution or family.native_resolution(prediction_type)
    placements = place_inputs(dataset.examples, resolution, settings.bucketing)
    summary = {"images": len(dataset.examples), "skipped": dataset.skipped, "buckets": histogram(placements),
               "base_model": base.reference, "revision": base.revision, "family": family.name,
               "prediction_type": prediction_type, "resolution": resolution}
    log.info("check.ok", **summary)
    return summary
