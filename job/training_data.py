"""What the UNet sees at each step: latents and text embeddings, cached or computed fresh.

All randomness is keyed by (seed, step, micro-step, rank) rather than drawn from a running generator,
so a run resumed at step N sees exactly the batches, noise and augmentations an uninterrupted run
sees from step N on, with no generator state to save.

Batches come from aspect-ratio buckets (`job.buckets`): at each micro-step every process draws its
share of one chunk of a single bucket, so every rank trains at the same size at the same micro-step.
"""

import hashlib
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

import structlog

from job.buckets import UPSCALE_TOLERANCE, Placement, Size, cover_size, histogram, place
from job.captions import find_truncated
from job.inputs import Example, display_size, load_rgb

log = structlog.get_logger()


def keyed_generator(*keys) -> torch.Generator:
    """A CPU generator seeded from `keys` (stable across processes and Python runs)."""
    digest = hashlib.sha256(repr(keys).encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))


def to_device(tensor: torch.Tensor, device) -> torch.Tensor:
    """A host tensor on `device`. To a GPU through pinned memory without blocking: a plain copy from
    pageable memory makes the host wait for the GPU's queue, once per tensor per step."""
    if torch.device(device).type != "cuda" or tensor.device.type != "cpu":
        return tensor.to(device)
    return tensor.pin_memory().to(device, non_blocking=True)


def to_pixels(image: Image.Image) -> torch.Tensor:
    """An RGB image as a CHW float tensor in [-1, 1], the VAE's input range."""
    array = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


def crop_origin(covered: Size, bucket: Size, generator: torch.Generator | None) -> tuple[int, int]:
    """(top, left) of a `bucket`-sized crop of an image of size `covered`: centred, or at random with a generator."""
    if generator is None:
        return (covered[1] - bucket[1]) // 2, (covered[0] - bucket[0]) // 2
    left = int(torch.randint(0, covered[0] - bucket[0] + 1, (1,), generator=generator))
    top = int(torch.randint(0, covered[1] - bucket[1] + 1, (1,), generator=generator))
    return top, left


@dataclass(frozen=True)
class Draw:
    """One training example as drawn at one micro-step."""

    index: int  # into `ImageSet.examples`
    key: int  # unique per (micro-step, rank, slot): keys this draw's crop, flip and caption dropout
    bucket: Size  # (width, height) in pixels it trains at
    flip: bool
    generator: torch.Generator  # its random crop, when crops are random


@dataclass
class LatentBatch:
    """Scaled latents of one batch (all of one bucket) and the SDXL size conditioning of each example.

    `original_sizes_hw[i]`, `crops_top_left[i]` and `target_size_hw` are exactly SDXL's
    `original_size`, `crops_coords_top_left` and `target_size` (its `add_time_ids`, in that order):
    the photo's size as displayed, before any resize; where the crop starts in the photo resized to
    cover the bucket (measured in the flipped image for a flipped example); and the bucket.
    """

    latents: torch.Tensor  # [N, C, height/8, width/8]
    original_sizes_hw: list[tuple[int, int]]  # (height, width) px
    crops_top_left: list[tuple[int, int]]  # (top, left) px
    target_size_hw: tuple[int, int]  # (height, width) px of the bucket


class ImageSet:
    """The images of one role (instance or class) and how to turn them into latents.

    Each image is placed in a bucket (`job.buckets.place`) from its header alone. With `cache_latents`,
    each image is decoded once at the size it needs, encoded per (bucket, flip), and dropped; without
    the cache, the image resized to cover its bucket (never the full photo) is kept and cropped and
    encoded at every step. Both paths sample latents from the distribution in the same way, so they
    give the same loss. Memory therefore depends on the resolution, not on the photos' size.
    """

    def __init__(self, examples: list[Example], *, resolution_px: int, bucketing: bool, center_crop: bool,
                 random_flip: bool, caption_dropout: float, seed: int, role: str):
        self.examples = examples
        self.center_crop = center_crop
        self.random_flip = random_flip
        self.caption_dropout = caption_dropout
        self.seed = seed
        self.role = role
        self.sizes = [display_size(e.path) for e in examples]  # (width, height) as displayed
        self.placements = [place(size, resolution_px, bucketing) for size in self.sizes]
        # (index, bucket) → per flip variant: latent mean, std and crop (top, left)
        self.cached: dict[tuple[int, Size], list[tuple[torch.Tensor, torch.Tensor, tuple[int, int]]]] | None = None
        self.covered: dict[tuple[int, Size], Image.Image] = {}  # uncached: images resized to cover a bucket
        self.scaling_factor: float | None = None
        self._epoch_chunks: tuple[tuple, list[tuple[Size, list[int]]]] | None = None

    def __len__(self) -> int:
        return len(self.examples)

    @property
    def buckets(self) -> list[Size]:
        """The buckets this set's images are placed in, sorted."""
        return sorted({p.bucket for p in self.placements})

    def cache_latents(self, vae, device, dtype, into: list[Size] | None = None) -> None:
        """Encodes every image (and its mirror when flipping) once per bucket, in its own bucket or
        in each of `into` (class images join the instance batches' buckets); then drops the pixels.
        The VAE is not needed after this.
        """
        self.scaling_factor = vae.config.scaling_factor
        self.cached = {}
        for index in range(len(self)):
            buckets = into or [self.placements[index].bucket]
            image = self._decode(index, buckets)
            for bucket in buckets:
                covered = image.resize(cover_size(self.sizes[index], bucket), Image.Resampling.BICUBIC)
                top, left = crop_origin(covered.size, bucket, None)
                pixels = to_pixels(covered.crop((left, top, left + bucket[0], top + bucket[1])))
                variants = [pixels, pixels.flip(-1)] if self.random_flip else [pixels]
                with torch.no_grad():
                    dist = vae.encode(torch.stack(variants).to(device, dtype)).latent_dist
                crops = [(top, left), (top, covered.width - left - bucket[0])]
                self.cached[(index, bucket)] = [(dist.mean[i].cpu(), dist.std[i].cpu(), crops[i]) for i in range(len(variants))]
            del image  # the decoded pixels go; only latents stay

    def draw(self, micro_step: int, rank: int, world: int, batch_size: int) -> list[Draw]:
        """This process's examples at global `micro_step`: its share of one chunk of one bucket.

        An epoch shuffles each bucket's images, cuts them into chunks of `batch_size × world`, and
        shuffles the chunks; micro-step g takes chunk g of the epoch. Each process takes
        ceil(len(chunk) / world) examples of it (wrapping round a short chunk), so every rank trains
        the same bucket and the same count; a bucket smaller than a batch still trains, in short batches.
        """
        bucket, members = self._chunks(micro_step, batch_size * world)
        share = -(-len(members) // world)
        first = (micro_step * world + rank) * batch_size
        return [self._draw(members[(rank * share + slot) % len(members)], first + slot, bucket) for slot in range(share)]

    def draw_into(self, bucket: Size, micro_step: int, rank: int, world: int, batch_size: int, count: int) -> list[Draw]:
        """`count` examples from the epoch-shuffled stream of all images, cut to `bucket` (class images
        beside an instance batch of that bucket)."""
        first = (micro_step * world + rank) * batch_size
        draws = []
        for key in range(first, first + count):
            epoch, offset = divmod(key, len(self))
            order = torch.randperm(len(self), generator=keyed_generator(self.seed, self.role, "epoch", epoch))
            draws.append(self._draw(int(order[offset]), key, bucket))
        return draws

    def latents(self, draws: list[Draw], vae, device, dtype, noise_generator: torch.Generator) -> LatentBatch:
        """Samples scaled latents for `draws` (all of one bucket; `vae` may be None once cached)."""
        means, stds, crops = [], [], []
        for draw in draws:
            if self.cached is not None:
                mean, std, crop = self.cached[(draw.index, draw.bucket)][int(draw.flip)]
            else:
                covered = self._cover(draw.index, draw.bucket)
                top, left = crop_origin(covered.size, draw.bucket, None if self.center_crop else draw.generator)
                pixels = to_pixels(covered.crop((left, top, left + draw.bucket[0], top + draw.bucket[1])))
                pixels = pixels.flip(-1) if draw.flip else pixels
                crop = (top, covered.width - left - draw.bucket[0]) if draw.flip else (top, left)
                with torch.no_grad():
                    dist = vae.encode(to_device(pixels[None], device).to(dtype)).latent_dist
                mean, std = dist.mean[0], dist.std[0]  # stay on the device: the noise comes to them
            means.append(mean)
            stds.append(std)
            crops.append(crop)
        mean, std = torch.stack(means), torch.stack(stds)
        eps = torch.randn(mean.shape, generator=noise_generator, dtype=mean.dtype)  # keyed, so drawn on the CPU
        sample = mean + std * (eps if mean.device.type == "cpu" else to_device(eps, mean.device))
        scaling_factor = self.scaling_factor if self.cached is not None else vae.config.scaling_factor
        width, height = draws[0].bucket
        return LatentBatch(to_device(sample * scaling_factor, device), [self.sizes[d.index][::-1] for d in draws], crops,
                           (height, width))

    def captions(self, draws: list[Draw]) -> list[str]:
        """The captions of `draws`; each replaced by the empty prompt with probability `caption_dropout`."""
        captions = []
        for draw in draws:
            dropped = self.caption_dropout > 0 and bool(
                torch.rand((), generator=keyed_generator(self.seed, self.role, "caption_dropout", draw.key)) < self.caption_dropout)
            captions.append("" if dropped else self.examples[draw.index].caption)
        return captions

    def _draw(self, index: int, key: int, bucket: Size) -> Draw:
        generator = keyed_generator(self.seed, self.role, "augment", key)
        flip = self.random_flip and bool(torch.rand((), generator=generator) < 0.5)
        return Draw(index, key, bucket, flip, generator)

    def _chunks(self, micro_step: int, chunk_size: int) -> tuple[Size, list[int]]:
        by_bucket: dict[Size, list[int]] = {}
        for index, placement in enumerate(self.placements):
            by_bucket.setdefault(placement.bucket, []).append(index)
        per_epoch = sum(-(-len(members) // chunk_size) for members in by_bucket.values())
        epoch, number = divmod(micro_step, per_epoch)
        if self._epoch_chunks is None or self._epoch_chunks[0] != (epoch, chunk_size):
            chunks = []
            for bucket, members in sorted(by_bucket.items()):
                order = torch.randperm(len(members), generator=keyed_generator(self.seed, self.role, "epoch", epoch, bucket))
                shuffled = [members[i] for i in order]
                chunks += [(bucket, shuffled[s : s + chunk_size]) for s in range(0, len(shuffled), chunk_size)]
            order = torch.randperm(len(chunks), generator=keyed_generator(self.seed, self.role, "chunks", epoch))
            self._epoch_chunks = ((epoch, chunk_size), [chunks[i] for i in order])
        return self._epoch_chunks[1][number]

    def _decode(self, index: int, buckets: list[Size]) -> Image.Image:
        """Image `index` decoded no larger than its largest cover of `buckets` needs (see `load_rgb`)."""
        covers = [cover_size(self.sizes[index], bucket) for bucket in buckets]
        return load_rgb(self.examples[index].path, at_least=(max(c[0] for c in covers), max(c[1] for c in covers)))

    def _cover(self, index: int, bucket: Size) -> Image.Image:
        if (index, bucket) not in self.covered:
            image = self._decode(index, [bucket])
            self.covered[(index, bucket)] = image.resize(cover_size(self.sizes[index], bucket), Image.Resampling.BICUBIC)
        return self.covered[(index, bucket)]


def place_inputs(examples: list[Example], resolution_px: int, bucketing: bool) -> list[Placement]:
    """Each example's bucket (from its header); logs `data.buckets` (images per bucket) and an
    `input.upscaled` warning for each image enlarged by more than `UPSCALE_TOLERANCE` to fill its bucket."""
    placements = [place(display_size(e.path), resolution_px, bucketing) for e in examples]
    log.info("data.buckets", resolution_px=resolution_px, bucketing=bucketing, buckets=histogram(placements))
    for example, placement in zip(examples, placements):
        if placement.upscaled:
            log.warning("input.upscaled", path=example.source, size=list(display_size(example.path)),
                        bucket=list(placement.bucket), scale=round(placement.scale, 3),
                        reason=f"enlarged {placement.scale:.2f}x (more than {UPSCALE_TOLERANCE}x) to fill its "
                               f"{placement.bucket[0]}x{placement.bucket[1]} bucket: it will train blurry; "
                               "use a larger photo or a lower SDFT_RESOLUTION")
    return placements


def describe_inputs(examples: list[Example], *, resolution_px: int, bucketing: bool, tokenizer,
                    prompts: dict[str, str]) -> list[dict]:
    """The manifest's `inputs`: per example `path`, `sha256`, `caption`, `caption_truncated`, `bucket`
    ([width, height] px) and `upscaled`.

    Logs what a user should know before the steps start: the buckets and upscaled images
    (`place_inputs`), and a `caption.truncated` warning for each caption, or prompt in `prompts`
    (text → the name it is reported under), longer than `tokenizer` reads.
    """
    placements = place_inputs(examples, resolution_px, bucketing)
    sources: dict[str, list[str]] = {}
    for example in examples:
        sources.setdefault(example.caption, []).append(example.caption_file or "SDFT_INSTANCE_PROMPT")
    named = {text: ", ".join(list(dict.fromkeys(names))[:3]) + (" and more" if len(set(names)) > 3 else "")
             for text, names in sources.items()}
    truncated = find_truncated(tokenizer, {**prompts, **named})
    return [{"path": e.source, "sha256": e.sha256, "caption": e.caption, "caption_truncated": e.caption in truncated,
             "bucket": list(p.bucket), "upscaled": p.upscaled} for e, p in zip(examples, placements)]


class TextEmbeddings:
    """Caption → conditioning (the family's dict of tensors), computed once per caption when the encoders are frozen.

    With the cache on, `embed_up_front` embeds every caption the run will need (training captions,
    validation prompts, the empty negative prompt); `release_encoders` then lets the encoders go.
    """

    EMBED_BATCH = 16  # captions per text-encoder call when embedding up front

    def __init__(self, family, tokenizers: list, text_encoders: list, device, cache: bool):
        self.family = family
        self.tokenizers = tokenizers
        self.text_encoders = text_encoders
        self.device = device
        self.cache: dict[str, dict[str, torch.Tensor]] | None = {} if cache else None

    def embed_up_front(self, texts: list[str]) -> None:
        """Fills the cache with every one of `texts` not yet in it."""
        assert self.cache is not None, "embedding up front needs the cache (frozen text encoders)"
        missing = [t for t in dict.fromkeys(texts) if t not in self.cache]
        for start in range(0, len(missing), self.EMBED_BATCH):
            self._embed(missing[start : start + self.EMBED_BATCH])

    def release_encoders(self) -> None:
        """Drops this object's references to the text encoders; every caption must be cached by now."""
        self.text_encoders = None

    def encode(self, captions: list[str], train: bool = False) -> dict[str, torch.Tensor]:
        """Conditioning for `captions` (batch first); with `train` the graph is kept for the encoders' gradients."""
        if train or self.cache is None:
            with torch.set_grad_enabled(train):
                return self.family.encode(self.tokenizers, self.text_encoders, captions, self.device)
        missing = [c for c in dict.fromkeys(captions) if c not in self.cache]
        if missing:
            self._embed(missing)
        return {key: torch.stack([self.cache[c][key] for c in captions]) for key in self.cache[captions[0]]}

    def _embed(self, captions: list[str]) -> None:
        assert self.text_encoders is not None, f"caption {captions[0]!r} was not embedded before the text encoders were released"
        with torch.no_grad():
            batch = self.family.encode(self.tokenizers, self.text_encoders, captions, self.device)
        self.cache.update({c: {key: value[i].detach() for key, value in batch.items()} for i, c in enumerate(captions)})
