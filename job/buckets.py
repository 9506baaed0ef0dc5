"""Aspect-ratio buckets: which (width, height) each image trains at, and how it is cut to it.

A bucket is a training size of about `resolution²` pixels; each image goes to the bucket nearest its
aspect ratio, is resized to cover it and cropped (centred, or at random), so a portrait keeps its head
and feet instead of losing them to a square crop. Every batch is drawn from one bucket (the UNet
needs one latent size per batch). The scheme is NovelAI's aspect-ratio bucketing as kohya sd-scripts
and SDXL use it (SDXL paper, appendix "Multi-aspect training").

The bucket set, for a resolution R (pixels):

- sides are multiples of a step: 64 px from R = 256 up; smaller, test-sized resolutions use R/4
  rounded down to a multiple of 8 (at least 8): 32 px → 8, 64 px → 16, 128 px → 32. Thus even a
  32 px run has a tall (24×40), a square (32×32) and a wide (40×24) bucket;
- for each short side s (a multiple of the step up to R), the long side is the largest multiple of
  the step with s × long ≤ R² (no bucket costs more memory than the square);
- pairs whose long/short ratio exceeds `MAX_BUCKET_ASPECT` (5:2) are dropped; the square (R, R) is
  always there; each pair gives a tall and a wide bucket.

At 512 px that is 320×768, 384×640, 448×576, 512×512 and their transposes; at 1024 px, 640×1600 …
1024×1024 (13 buckets), close to SDXL's published list.
"""

import math
from collections import Counter
from dataclasses import dataclass

MAX_BUCKET_ASPECT = 2.5  # long/short side of the most elongated bucket (5:2; a phone's 16:9 fits within)
UPSCALE_TOLERANCE = 1.25  # an image enlarged by more than this factor to fill its bucket is flagged `upscaled`

Size = tuple[int, int]  # (width, height) in pixels


def bucket_step_px(resolution_px: int) -> int:
    """The side step of the buckets: 64 px from 256 px up, else resolution/4 (a multiple of 8, ≥ 8)."""
    return min(64, max(8, resolution_px // 4 // 8 * 8))


def bucket_sizes(resolution_px: int, bucketing: bool = True) -> list[Size]:
    """The buckets for `resolution_px`, as (width, height), sorted; just the square without bucketing."""
    if not bucketing:
        return [(resolution_px, resolution_px)]
    step = bucket_step_px(resolution_px)
    area = resolution_px * resolution_px
    sizes = {(resolution_px, resolution_px)}
    for short in range(step, resolution_px + 1, step):
        long = area // short // step * step
        if short < long <= short * MAX_BUCKET_ASPECT:
            sizes |= {(short, long), (long, short)}
    return sorted(sizes)


def nearest_bucket(size: Size, buckets: list[Size]) -> Size:
    """The bucket whose aspect ratio is nearest that of `size` (width, height), by log ratio.

    Log ratios make 2:1 and 1:2 equally far from square; ties go to the first bucket in the list.
    """
    aspect = math.log(size[0] / size[1])
    return min(buckets, key=lambda bucket: abs(math.log(bucket[0] / bucket[1]) - aspect))


def cover_size(size: Size, bucket: Size) -> Size:
    """The size `size` is resized to so that it covers `bucket` with its aspect ratio kept."""
    scale = cover_scale(size, bucket)
    return max(bucket[0], round(size[0] * scale)), max(bucket[1], round(size[1] * scale))


def cover_scale(size: Size, bucket: Size) -> float:
    """The resize factor from `size` to the smallest size covering `bucket` (> 1: enlarged)."""
    return max(bucket[0] / size[0], bucket[1] / size[1])


@dataclass(frozen=True)
class Placement:
    """Where one image trains: its bucket (width, height) and whether it had to be enlarged to fill it."""

    bucket: Size
    scale: float  # the resize factor to cover the bucket
    upscaled: bool  # scale > UPSCALE_TOLERANCE: the image is smaller than what it trains at


def place(size: Size, resolution_px: int, bucketing: bool) -> Placement:
    """The bucket of an image of `size` (width, height as displayed) at `resolution_px`."""
    bucket = nearest_bucket(size, bucket_sizes(resolution_px, bucketing))
    scale = cover_scale(size, bucket)
    return Placement(bucket, scale, scale > UPSCALE_TOLERANCE)


def histogram(placements: list[Placement]) -> dict[str, int]:
    """Images per bucket, keyed `"<width>x<height>"` (the `data.buckets` event)."""
    counts = Counter(p.bucket for p in placements)
    return {f"{w}x{h}": counts[(w, h)] for w, h in sorted(counts)}
