"""The training loop, one for both methods: pick what trains, run the steps.

The loaded parts and the accelerator come from `job.model_parts`; the method-specific parts live in
`job.methods`; checkpoints in `job.checkpoints`; the per-step batches in `job.training_data`.
"""

import gc
import math
import resource
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import structlog
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import set_seed

from job import preemption
from job.families import with_family_defaults
from job.model_parts import Models, mixed_precision
from job.training_data import ImageSet, TextEmbeddings, keyed_generator, to_device
from job.errors import ConfigError, DivergedError, Preempted
from job.inputs import Dataset
from job.methods import select_trainable
from job.sampling import validation_prompts
from job.step_losses import StepLosses, logging_interval

if TYPE_CHECKING:
    from job.checkpoints import Checkpoints

log = structlog.get_logger()


@dataclass
class TrainResult:
    steps: int
    final_loss: float | None
    losses: list[float] = field(default_factory=list)
    seconds_to_first_step: float | None = None


def _ignore(*_) -> None:
    pass


@dataclass(frozen=True)
class Hooks:
    """What the loop tells its caller at step boundaries, and where it saves its state.

    `on_step(step, loss, parts)` at each logging point (step 1, every `log_every_steps`, the last,
    and before a sample or checkpoint; `parts`: the named losses and `lr`);
    `on_sample(step, unet, *text_encoders)` every `validation_every_steps` (the encoders the loop
    holds, in the family's order; none once released by the cache); `checkpoints` (a
    `job.checkpoints.Checkpoints`, or None) restores the state before the first step and saves it
    every `checkpoint_every_steps` and on SIGTERM.
    """

    on_step: Callable[[int, float, dict], None] = _ignore
    on_sample: Callable[..., None] = _ignore
    checkpoints: "Checkpoints | None" = None


@dataclass
class TrainingState:
    """What the loop steps: the prepared models and optimizer, the schedule, and the data."""

    unet: torch.nn.Module
    text_encoders: list[torch.nn.Module]  # the family's, in its order; empty once released by the cache
    optimizer: torch.optim.Optimizer
    lr_scheduler: object
    trainable: list[torch.nn.Parameter]
    embeddings: TextEmbeddings
    image_sets: list[ImageSet]
    start_step: int = 0


def use_cache(settings) -> bool:
    if settings.cache_latents == "auto":
        return settings.center_crop  # a random crop per step cannot be cached; a flip can (both variants)
    return settings.cache_latents == "true"


def train(settings, models: Models, accelerator: Accelerator, instance: Dataset, *, prior: Dataset | None = None,
          hooks: Hooks = Hooks()) -> TrainResult:
    """Runs the optimizer steps on `instance` (and `prior`'s class examples); see `Hooks` for what
    the caller is told along the way. Leaves the trained UNet (and text encoder) in `models`."""
    started = time.monotonic()
    settings = with_family_defaults(settings, models.family, models.prediction_type)
    set_seed(settings.seed)
    unet, text_encoders = models.unet, models.text_encoders
    trainable = select_trainable(settings, unet, text_encoders)
    if settings.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
        if settings.train_text_encoder:
            for text_encoder in text_encoders:
                text_encoder.gradient_checkpointing_enable()
    optimizer = _optimizer(settings, trainable)
    from diffusers.optimization import get_scheduler

    lr_scheduler = get_scheduler(
        settings.lr_scheduler,
        optimizer=optimizer,
        num_warmup_steps=settings.lr_warmup_steps,
        num_training_steps=settings.max_train_steps,
    )
    # The schedule is stepped once per optimizer step by us (a prepared one would step once per
    # process), and registered so that checkpoints carry it.
    accelerator.register_for_checkpointing(lr_scheduler)
    if settings.train_text_encoder:
        unet, *text_encoders, optimizer = accelerator.prepare(unet, *text_encoders, optimizer)
    else:
        unet, optimizer = accelerator.prepare(unet, optimizer)
    if settings.torch_compile:
        unet = torch.compile(unet)
    log.info("train.setup", device=str(accelerator.device), mixed_precision=accelerator.mixed_precision,
             grad_scaler=accelerator.scaler is not None, optimizer=type(optimizer.optimizer).__name__,
             torch_compile=settings.torch_compile, trainable_parameters=sum(p.numel() for p in trainable))

    # Data: cached latents and caption embeddings when nothing per-step makes them wrong; then what
    # the cache replaces (the VAE, and the text encoder when frozen) leaves memory.
    cache = use_cache(settings)
    image_sets = [_image_set(settings, instance, "instance")]
    if prior is not None:
        image_sets.append(_image_set(settings, prior, "class"))
    embeddings = TextEmbeddings(models.family, models.tokenizers, text_encoders, accelerator.device,
                                cache=cache and not settings.train_text_encoder)
    if cache:
        _cache_and_release(models, image_sets, embeddings, validation_prompts(settings, instance), accelerator.device)
        if models.text_encoder is None:
            text_encoders = []  # the last references go

    start_step = hooks.checkpoints.restore(accelerator) if hooks.checkpoints else 0
    state = TrainingState(unet, text_encoders, optimizer, lr_scheduler, trainable, embeddings, image_sets, start_step)
    with preemption.training():
        result = _loop(settings, models, accelerator, state=state, hooks=hooks)
    result.seconds_to_first_step = result.seconds_to_first_step and result.seconds_to_first_step - started
    _log_peak_memory(accelerator)
    models.unet = accelerator.unwrap_model(unet)
    for name, text_encoder in zip(models.family.text_encoder_names, text_encoders):
        setattr(models, name, accelerator.unwrap_model(text_encoder))
    return result


def _cache_and_release(models: Models, image_sets: list[ImageSet], embeddings: TextEmbeddings, prompts: list[str], device) -> None:
    """Encodes every image and (frozen encoders) embeds every caption and prompt once, then frees the encoders.

    After this, training needs neither the VAE nor frozen text encoders: dropping the last
    references returns their memory (host RAM on CPU, GPU memory on CUDA) for the rest of the run.
    """
    instance, *others = image_sets
    instance.cache_latents(models.vae, device, torch.float32)
    for image_set in others:  # class images train beside instance batches, in their buckets
        image_set.cache_latents(models.vae, device, torch.float32, into=instance.buckets)
    released = ["vae"]
    models.vae = None
    if embeddings.cache is not None:
        captions = [example.caption for image_set in image_sets for example in image_set.examples]
        embeddings.embed_up_front([*captions, *prompts, ""])
        models.prompt_embeds = {prompt: embeddings.cache[prompt] for prompt in [*prompts, ""]}
        embeddings.release_encoders()
        for name in models.family.text_encoder_names:
            setattr(models, name, None)
            released.append(name)
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    log.info("train.cache_ready", images=sum(len(s) for s in image_sets),
             captions=len(embeddings.cache or {}), released=released)


def _log_peak_memory(accelerator: Accelerator) -> None:
    """Peak host RSS of this process and peak CUDA memory, for sizing runs (and the benchmarks)."""
    peak_rss_mb = _peak_rss_kib() / 1024
    peak_cuda_mb = torch.cuda.max_memory_allocated(accelerator.device) / 2**20 if accelerator.device.type == "cuda" else None
    log.info("train.memory", peak_rss_mb=round(peak_rss_mb, 1), peak_cuda_mb=peak_cuda_mb and round(peak_cuda_mb, 1))


def _peak_rss_kib() -> int:
    """Peak resident memory of this process in KiB: VmHWM from /proc (Linux), else ru_maxrss.

    VmHWM counts this program only; ru_maxrss also keeps the peak of the process it was forked from
    before exec (a test runner, a shell holding a big array), which would hide the job's own peak.
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux


def _loop(settings, models, accelerator, *, state: TrainingState, hooks: Hooks) -> TrainResult:
    unet, text_encoders, optimizer, lr_scheduler = state.unet, state.text_encoders, state.optimizer, state.lr_scheduler
    trainable, embeddings, image_sets, start_step = state.trainable, state.embeddings, state.image_sets, state.start_step
    checkpoints, on_step, on_sample = hooks.checkpoints, hooks.on_step, hooks.on_sample
    stop = _PreemptionFlag(accelerator)
    result = TrainResult(steps=start_step, final_loss=None)
    rank, world = accelerator.process_index, accelerator.num_processes
    accum = settings.gradient_accumulation_steps
    # Losses stay on the device between logging points: no step waits for the GPU to catch up.
    losses = StepLosses(accelerator, logging_interval(settings.log_every_steps, accelerator.device))
    for step in range(start_step, settings.max_train_steps):
        unet.train()
        for text_encoder in text_encoders:
            text_encoder.train(settings.train_text_encoder)
        step_loss, step_parts = 0.0, {}
        for micro in range(accum):
            # Every process draws its share of one bucket's chunk; randomness is keyed by position.
            micro_step = step * accum + micro
            noise_generator = keyed_generator(settings.seed, "noise", step, micro, rank)
            torch.manual_seed(hash((settings.seed, step, micro, rank)) & 0xFFFFFFFF)  # dropout
            sync = micro == accum - 1
            with _maybe_no_sync(accelerator, [unet, *text_encoders], sync):
                loss, parts = _loss(settings, models, unet, embeddings, image_sets, (micro_step, rank, world), noise_generator, accelerator)
                accelerator.backward(loss / accum)
            step_loss = step_loss + loss.detach() / accum
            for key, value in parts.items():
                step_parts[key] = step_parts.get(key, 0.0) + value / accum
        accelerator.clip_grad_norm_(trainable, settings.max_grad_norm)
        optimizer.step()
        lr_scheduler.step()
        optimizer.zero_grad(set_to_none=True)

        # The step boundary: anything that reads the device (progress, samples, a checkpoint, the
        # cross-process preemption check) happens only at a logging point.
        done = step + 1
        losses.add(done, step_loss, step_parts)
        sample_due = bool(settings.validation_every_steps) and done % settings.validation_every_steps == 0 \
            and done < settings.max_train_steps
        # A SIGTERM on the last step still saves: the next pod then goes straight to sampling.
        checkpoint_due = checkpoints is not None and done % settings.checkpoint_every_steps == 0 \
            and done < settings.max_train_steps
        # One process checks its own flag every step (no device read); several agree on it only at
        # points every process reaches, so that the collective check lines up.
        local_stop = world == 1 and stop.is_set()
        if not (losses.due(done) or done == settings.max_train_steps or sample_due or checkpoint_due or local_stop):
            continue
        read = losses.read()
        if result.seconds_to_first_step is None:
            result.seconds_to_first_step = time.monotonic()  # after the read: the first step has really run
        # NaN/Inf on any rank or micro-step poisons the mean: every rank stops at this logging point,
        # naming the first step of the interval that diverged.
        diverged = next((r for r in read if not math.isfinite(r.loss)), None)
        if diverged is not None:
            raise DivergedError(_diverged_reason(settings, diverged.step, diverged.loss, done))
        result.losses.extend(r.loss for r in read)
        last = read[-1]
        result.steps, result.final_loss = done, last.loss
        on_step(done, last.loss, {**last.parts, "lr": lr_scheduler.get_last_lr()[0]})
        if sample_due:
            on_sample(done, accelerator.unwrap_model(unet), *(accelerator.unwrap_model(t) for t in text_encoders))
        preempted = local_stop or (world > 1 and stop.is_set())
        if checkpoints and (preempted or checkpoint_due):
            checkpoints.save(accelerator, done)
        if preempted:
            raise Preempted(f"stopped by SIGTERM at step {done}/{settings.max_train_steps}; checkpoint saved")
    return result


def _diverged_reason(settings, step: int, loss: float, noticed_step: int | None = None) -> str:
    hints = [f"lower SDFT_LEARNING_RATE (now {settings.effective_learning_rate:g})"]
    if mixed_precision(settings.mixed_precision) == "fp16":
        hints.append("SDFT_MIXED_PRECISION=bf16 instead of fp16 (fp16 overflows where bf16 does not)")
    hints.append(f"clip gradients harder with a lower SDFT_MAX_GRAD_NORM (now {settings.max_grad_norm:g})")
    noticed = "" if noticed_step in (None, step) else f" (read at step {noticed_step}: losses are read every SDFT_LOG_EVERY_STEPS)"
    return (f"training diverged: the loss became {loss} at step {step}/{settings.max_train_steps}{noticed}; nothing was "
            "published. Try: " + "; ".join(hints))


def _image_set(settings, dataset: Dataset, role: str) -> ImageSet:
    return ImageSet(
        dataset.examples,
        resolution_px=settings.resolution,
        bucketing=settings.bucketing,
        caption_dropout=settings.caption_dropout,
        center_crop=settings.center_crop,
        random_flip=settings.random_flip,
        seed=settings.seed,
        role=role,
    )


def _loss(settings, models, unet, embeddings, image_sets, where, noise_generator, accelerator):
    """Denoising loss on instance (and class) examples; returns the total and its named parts.

    `where` is (global micro-step, rank, world size): which examples this process draws.
    """
    device = accelerator.device
    micro_step, rank, world = where
    instance, *others = image_sets
    draws = [instance.draw(micro_step, rank, world, settings.train_batch_size)]
    draws += [s.draw_into(draws[0][0].bucket, micro_step, rank, world, settings.train_batch_size, len(draws[0])) for s in others]
    batches = [s.latents(d, models.vae, device, torch.float32, noise_generator) for s, d in zip(image_sets, draws)]
    latents = torch.cat([batch.latents for batch in batches])
    captions = [c for s, d in zip(image_sets, draws) for c in s.captions(d)]
    conditioning = embeddings.encode(captions, train=settings.train_text_encoder)
    # SDXL's size conditioning of each example: (original size, crop top-left, target size), as the data step cut it.
    crops = [(size, top_left, batch.target_size_hw)
             for batch in batches for size, top_left in zip(batch.original_sizes_hw, batch.crops_top_left)]
    noise = torch.randn(latents.shape, generator=noise_generator)
    if settings.noise_offset:
        # Offset noise: a per-channel shift lets the model learn very dark and very bright images.
        noise += settings.noise_offset * torch.randn((latents.shape[0], latents.shape[1], 1, 1), generator=noise_generator)
    noise = to_device(noise, device)
    scheduler = models.noise_scheduler
    timesteps = to_device(torch.randint(0, scheduler.config.num_train_timesteps, (latents.shape[0],), generator=noise_generator), device)
    noisy = scheduler.add_noise(latents, noise, timesteps)
    if scheduler.config.prediction_type == "v_prediction":
        target = scheduler.get_velocity(latents, noise, timesteps)
    else:
        target = noise
    # The family's conditioning: SD 1.x/2.x text states; SDXL also pooled text and size `time_ids`.
    unet_inputs = models.family.unet_inputs(conditioning, crops, device, models.dtype)
    with accelerator.autocast():
        prediction = unet(noisy, timesteps, **unet_inputs).sample
    per_example = F.mse_loss(prediction.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
    if settings.snr_gamma is not None:
        per_example = per_example * _min_snr_weights(scheduler, timesteps, settings.snr_gamma)
    # The parts stay on the device (detached): the loop reads them only at logging points.
    if len(image_sets) == 1:
        loss = per_example.mean()
        return loss, {"instance_loss": loss.detach()}
    instance_loss, prior_loss = per_example.chunk(2)
    instance_loss, prior_loss = instance_loss.mean(), prior_loss.mean()
    loss = instance_loss + settings.prior_loss_weight * prior_loss
    return loss, {"instance_loss": instance_loss.detach(), "prior_loss": prior_loss.detach()}


def _min_snr_weights(scheduler, timesteps, gamma: float) -> torch.Tensor:
    """Min-SNR-γ weighting (Hang et al. 2023): caps the weight of low-noise timesteps."""
    from diffusers.training_utils import compute_snr

    snr = compute_snr(scheduler, timesteps)
    capped = torch.clamp(snr, max=gamma)
    if scheduler.config.prediction_type == "v_prediction":
        return capped / (snr + 1)
    return capped / snr


def _optimizer(settings, parameters):
    lr = settings.effective_learning_rate
    if settings.use_8bit_adam:
        try:
            import bitsandbytes
        except ImportError as error:
            raise ConfigError("SDFT_USE_8BIT_ADAM=true needs bitsandbytes, which this image lacks") from error
        return bitsandbytes.optim.AdamW8bit(parameters, lr=lr, weight_decay=1e-2)
    # On CUDA the fused kernel: one launch per step, and with fp16 it takes the grad scaler's
    # inf check on the device, where the unfused step would read it on the host every step.
    fused = all(p.is_cuda for p in parameters) or None
    return torch.optim.AdamW(parameters, lr=lr, weight_decay=1e-2, fused=fused)


def _maybe_no_sync(accelerator, models: list, sync: bool):
    """Skips the gradient all-reduce on micro-steps that don't end an optimizer step."""
    from contextlib import ExitStack

    stack = ExitStack()
    if not sync and accelerator.num_processes > 1:
        for model in models:
            if model is not None and any(p.requires_grad for p in model.parameters()):
                stack.enter_context(accelerator.no_sync(model))
    return stack


class _PreemptionFlag:
    """SIGTERM only sets a flag; the loop acts on it at a step boundary, all ranks agreeing."""

    def __init__(self, accelerator: Accelerator):
        self.accelerator = accelerator

    def is_set(self) -> bool:
        if self.accelerator.num_processes == 1:
            return preemption.requested()  # a host flag: no device tensor to read
        if preemption.requested():
            self.accelerator.set_trigger()
        # `check_trigger` is collective: if any rank got SIGTERM, every rank stops at this step.
        return self.accelerator.check_trigger()
