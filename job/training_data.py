"""What the UNet sees at each step: latents and text embeddings, cached or computed fresh.

All randomness is keyed by (seed, step, micro-step, rank) rather than drawn from a running generator,
so a run resumed at step N sees exactly the batches, noise and augmentations an uninterrupted run
sees from step N on, with no generator state to save.
"""

import hashlib

import numpy as np
import torch
from PIL import Image

from job.inputs import Example, load_rgb


def keyed_generator(*keys) -> torch.Generator:
    """A CPU generator seeded from `keys` (stable across processes and Python runs)."""
    digest = hashlib.sha256(repr(keys).encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))


def to_device(tensor: torch.Tensor, device) -> torch.Tensor:
    """A host tensor on `device`. To a GPU through pinned memory without blocking: a plain copy from
    pageable memory makes the host wait for the GPU's queue, once per tensor per step."""
    if torch.device(device).type != "cuda":
        return tensor.to(device)
    return tensor.pin_memory().to(device, non_blocking=True)


def to_pixels(image: Image.Image) -> torch.Tensor:
    """An RGB image as a CHW float tensor in [-1, 1], the VAE's input range."""
    array = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


def resize_and_crop(image: Image.Image, size_px: int, generator: torch.Generator | None) -> Image.Image:
    """Resizes the short side to `size_px`, then crops a square: centred, or at random with a generator."""
    scale = size_px / min(image.size)
    width, height = max(size_px, round(image.width * scale)), max(size_px, round(image.height * scale))
    image = image.resize((width, height), Image.Resampling.BICUBIC)
    if generator is None:
        left, top = (width - size_px) // 2, (height - size_px) // 2
    else:
        left = int(torch.randint(0, width - size_px + 1, (1,), generator=generator))
        top = int(torch.randint(0, height - size_px + 1, (1,), generator=generator))
    return image.crop((left, top, left + size_px, top + size_px))


class ImageSet:
    """The images of one role (instance or class) and how to turn them into latents.

    With `cache` on, each image (and its mirror when flipping) is encoded once and its latent
    distribution kept; without it, images are decoded, augmented and encoded at every step. Both
    paths sample latents from the distribution in the same way, so they give the same loss.
    """

    def __init__(self, examples: list[Example], *, resolution_px: int, center_crop: bool, random_flip: bool, seed: int, role: str):
        self.examples = examples
        self.resolution_px = resolution_px
        self.center_crop = center_crop
        self.random_flip = random_flip
        self.seed = seed
        self.role = role
        self.images = [load_rgb(e.path) for e in examples]
        self.cached: list[list[tuple[torch.Tensor, torch.Tensor]]] | None = None
        self.scaling_factor: float | None = None

    def __len__(self) -> int:
        return len(self.examples)

    def cache_latents(self, vae, device, dtype) -> None:
        """Encodes every image (and its mirror when flipping) once; the VAE is not needed after this."""
        self.scaling_factor = vae.config.scaling_factor
        self.cached = []
        for image in self.images:
            pixels = to_pixels(resize_and_crop(image, self.resolution_px, None))
            variants = [pixels, pixels.flip(-1)] if self.random_flip else [pixels]
            with torch.no_grad():
                dist = vae.encode(torch.stack(variants).to(device, dtype)).latent_dist
            self.cached.append([(dist.mean[i].cpu(), dist.std[i].cpu()) for i in range(len(variants))])

    def pick(self, position: int) -> tuple[int, bool, torch.Generator]:
        """Which example sits at global `position` of the epoch-shuffled stream, and its flip."""
        epoch, offset = divmod(position, len(self))
        order = torch.randperm(len(self), generator=keyed_generator(self.seed, self.role, "epoch", epoch))
        generator = keyed_generator(self.seed, self.role, "augment", position)
        flip = self.random_flip and bool(torch.rand((), generator=generator) < 0.5)
        return int(order[offset]), flip, generator

    def latents(self, positions: list[int], vae, device, dtype, noise_generator: torch.Generator) -> torch.Tensor:
        """Samples scaled latents for the examples at `positions` (`vae` may be None once cached)."""
        means, stds = [], []
        for position in positions:
            index, flip, generator = self.pick(position)
            if self.cached is not None:
                mean, std = self.cached[index][int(flip)]
            else:
                crop = resize_and_crop(self.images[index], self.resolution_px, None if self.center_crop else generator)
                pixels = to_pixels(crop)
                pixels = pixels.flip(-1) if flip else pixels
                with torch.no_grad():
                    dist = vae.encode(to_device(pixels[None], device).to(dtype)).latent_dist
                mean, std = dist.mean[0], dist.std[0]  # stay on the device: the noise comes to them
            means.append(mean)
            stds.append(std)
        mean, std = torch.stack(means), torch.stack(stds)
        eps = torch.randn(mean.shape, generator=noise_generator, dtype=mean.dtype)  # keyed, so drawn on the CPU
        sample = mean + std * (eps if mean.device.type == "cpu" else to_device(eps, mean.device))
        scaling_factor = self.scaling_factor if self.cached is not None else vae.config.scaling_factor
        return to_device(sample * scaling_factor, device)

    def captions(self, positions: list[int]) -> list[str]:
        return [self.examples[self.pick(p)[0]].caption for p in positions]


class TextEmbeddings:
    """Caption → text-encoder hidden states, computed once per caption when the encoder is frozen.

    With the cache on, `embed_up_front` embeds every caption the run will need (training captions,
    validation prompts, the empty negative prompt); `release_encoder` then lets the encoder go.
    """

    EMBED_BATCH = 16  # captions per text-encoder call when embedding up front

    def __init__(self, tokenizer, text_encoder, device, cache: bool):
        self.tokenizer = tokenizer
        self.text_encoder = text_encoder
        self.device = device
        self.cache: dict[str, torch.Tensor] | None = {} if cache else None

    def token_ids(self, captions: list[str]) -> torch.Tensor:
        return self.tokenizer(
            captions, padding="max_length", max_length=self.tokenizer.model_max_length, truncation=True, return_tensors="pt"
        ).input_ids

    def embed_up_front(self, texts: list[str]) -> None:
        """Fills the cache with every one of `texts` not yet in it."""
        assert self.cache is not None, "embedding up front needs the cache (frozen text encoder)"
        missing = [t for t in dict.fromkeys(texts) if t not in self.cache]
        for start in range(0, len(missing), self.EMBED_BATCH):
            self._embed(missing[start : start + self.EMBED_BATCH])

    def release_encoder(self) -> None:
        """Drops this object's reference to the text encoder; every caption must be cached by now."""
        self.text_encoder = None

    def encode(self, captions: list[str], train: bool = False) -> torch.Tensor:
        """Hidden states for `captions`; with `train` the graph is kept for the text encoder's gradients."""
        if train or self.cache is None:
            with torch.set_grad_enabled(train):
                return self.text_encoder(self.token_ids(captions).to(self.device))[0]
        missing = [c for c in dict.fromkeys(captions) if c not in self.cache]
        if missing:
            self._embed(missing)
        return torch.stack([self.cache[c] for c in captions])

    def _embed(self, captions: list[str]) -> None:
        assert self.text_encoder is not None, f"caption {captions[0]!r} was not embedded before the text encoder was released"
        with torch.no_grad():
            states = self.text_encoder(self.token_ids(captions).to(self.device))[0]
        self.cache.update({c: s.detach() for c, s in zip(captions, states)})
