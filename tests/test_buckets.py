"""Aspect-ratio buckets (issue 13): portraits train tall, landscapes wide, nothing square-cropped.

In process: the bucket sets, which bucket a photo goes to, and how batches are drawn (one bucket per
batch, the same on every rank, each image once per epoch, small buckets kept, keyed so resume is
exact), and the size conditioning each batch carries for SDXL. End to end (`python -m job` on
builtin:tiny at 32 px): the manifest's buckets, loss falling, batch size 2, cached = uncached, and
resume after SIGTERM = the uninterrupted run.
"""

from __future__ import annotations

import json
import math
import signal
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from jobrun import EXAMPLES, WatchedJob, job_env, run_job
from models_util import denoising_loss, tiny_model_path

DOGS = sorted(EXAMPLES.glob("*.png"))
PROMPT = "a photo of sks dog"


def _photo(path: Path, size: tuple[int, int], dog: int = 0) -> Path:
    """A dog photo at `size` (width, height), cut from an example so it looks like one."""
    Image.open(DOGS[dog % len(DOGS)]).convert("RGB").resize(size, Image.Resampling.BICUBIC).save(path)
    return path


# In process: the bucket sets and the placement of photos.
@pytest.mark.parametrize("resolution", [32, 64, 128, 512, 768, 1024])
def test_every_resolution_has_a_tall_a_square_and_a_wide_bucket(resolution):
    from job.buckets import MAX_BUCKET_ASPECT, bucket_sizes, bucket_step_px

    sizes = bucket_sizes(resolution)
    step = bucket_step_px(resolution)
    assert (resolution, resolution) in sizes
    assert any(h > w for w, h in sizes) and any(w > h for w, h in sizes)
    assert sorted((h, w) for w, h in sizes) == sizes  # every tall bucket has its wide twin
    for w, h in sizes:
        assert w * h <= resolution**2 and w * h >= 0.85 * resolution**2  # area ≈ resolution², never more
        assert w % step == 0 and h % step == 0 and w % 8 == 0 and h % 8 == 0
        assert max(w, h) / min(w, h) <= MAX_BUCKET_ASPECT
    assert step == (64 if resolution >= 256 else resolution // 4)
    assert bucket_sizes(resolution, bucketing=False) == [(resolution, resolution)]


def test_sdxl_resolution_gives_sdxls_common_buckets():
    from job.buckets import bucket_sizes

    sizes = bucket_sizes(1024)
    for common in [(1024, 1024), (896, 1152), (1152, 896), (832, 1216), (1216, 832), (768, 1344), (1344, 768)]:
        assert common in sizes


@pytest.mark.parametrize(("size", "bucket_512", "bucket_32"), [
    ((3024, 4032), (448, 576), (24, 40)),  # phone portrait 3:4
    ((4032, 3024), (576, 448), (40, 24)),  # phone landscape 4:3
    ((1920, 1080), (640, 384), (40, 24)),  # 16:9
    ((1080, 1920), (384, 640), (24, 40)),
    ((3000, 3000), (512, 512), (32, 32)),
    ((6000, 2000), (768, 320), (40, 24)),  # a 3:1 panorama goes to the widest bucket
])
def test_photos_go_to_the_bucket_nearest_their_aspect_ratio(size, bucket_512, bucket_32):
    from job.buckets import place

    assert place(size, 512, True).bucket == bucket_512
    assert place(size, 32, True).bucket == bucket_32
    assert place(size, 512, False).bucket == (512, 512)


def test_images_enlarged_beyond_a_little_are_flagged_upscaled():
    from job.buckets import place

    assert place((48, 48), 128, True).upscaled  # 2.67x
    assert not place((120, 120), 128, True).upscaled  # 1.07x: a little
    assert not place((6000, 4000), 128, True).upscaled


def _image_set(folder: Path, sizes: list[tuple[int, int]], **options):
    from job.inputs import Example
    from job.training_data import ImageSet

    examples = []
    for i, size in enumerate(sizes):
        path = _photo(folder / f"img-{i}.png", size, i)
        examples.append(Example(str(path), path.name, "0" * 64, f"caption {i}"))
    settings = dict(resolution_px=32, bucketing=True, center_crop=True, random_flip=False, caption_dropout=0.0,
                    seed=0, role="instance")
    return ImageSet(examples, **{**settings, **options})


MIXED = [(60, 80)] * 5 + [(80, 60)] * 3 + [(64, 64)]  # 5 tall, 3 wide, 1 square


def test_every_rank_draws_one_bucket_per_micro_step_and_each_image_trains_once_per_epoch(tmp_path):
    images = _image_set(tmp_path, MIXED)
    batch, world = 2, 2
    epoch_micro_steps = sum(math.ceil(n / (batch * world)) for n in (5, 3, 1))  # 2 + 1 + 1 chunks
    seen, buckets = [], []
    for micro_step in range(epoch_micro_steps):
        per_rank = [images.draw(micro_step, rank, world, batch) for rank in range(world)]
        assert len({d.bucket for draws in per_rank for d in draws}) == 1  # one bucket on every rank
        assert len({len(draws) for draws in per_rank}) == 1 and 1 <= len(per_rank[0]) <= batch  # same count
        for draws in per_rank:
            assert all(images.placements[d.index].bucket == d.bucket for d in draws)
        seen += [d.index for draws in per_rank for d in draws]
        buckets.append(per_rank[0][0].bucket)
    assert set(seen) == set(range(len(MIXED)))  # every image, the lone square one too, within an epoch
    assert sorted(buckets) == [(24, 40), (24, 40), (32, 32), (40, 24)]


def test_a_bucket_smaller_than_the_batch_trains_in_short_batches(tmp_path):
    images = _image_set(tmp_path, MIXED)
    sizes = {}
    for micro_step in range(20):
        draws = images.draw(micro_step, 0, 1, 4)
        sizes.setdefault(draws[0].bucket, set()).add(len(draws))
    assert sizes == {(24, 40): {4, 1}, (40, 24): {3}, (32, 32): {1}}


def test_draws_are_keyed_so_a_resumed_run_sees_the_same_batches(tmp_path):
    first = _image_set(tmp_path, MIXED, random_flip=True, caption_dropout=0.5)
    again = _image_set(tmp_path, MIXED, random_flip=True, caption_dropout=0.5)
    for micro_step in (0, 7, 31):  # a fresh object asked straight for step 31, as after a resume
        a, b = first.draw(micro_step, 1, 2, 2), again.draw(micro_step, 1, 2, 2)
        assert [(d.index, d.key, d.bucket, d.flip) for d in a] == [(d.index, d.key, d.bucket, d.flip) for d in b]
        assert first.captions(a) == again.captions(b)
    flips = {d.flip for m in range(40) for d in first.draw(m, 0, 1, 2)}
    assert flips == {True, False}


def test_caption_dropout_replaces_captions_by_the_empty_prompt_at_its_rate(tmp_path):
    images = _image_set(tmp_path, MIXED, caption_dropout=0.3)
    captions = [c for m in range(300) for c in images.captions(images.draw(m, 0, 1, 2))]
    assert 0.2 < captions.count("") / len(captions) < 0.4
    assert all(c == "" or c.startswith("caption ") for c in captions)
    never = _image_set(tmp_path, MIXED)
    assert "" not in [c for m in range(50) for c in never.captions(never.draw(m, 0, 1, 2))]


@pytest.fixture(scope="module")
def tiny_vae(tmp_path_factory):
    from diffusers import AutoencoderKL

    return AutoencoderKL.from_pretrained(tiny_model_path(tmp_path_factory), subfolder="vae")


@pytest.mark.parametrize("cached", [True, False], ids=["cached", "uncached"])
def test_each_batch_carries_original_size_crop_and_target_size(tmp_path, tiny_vae, cached):
    """SDXL's time_ids: (original h, w), (crop top, left) in the photo resized to cover, (target h, w)."""
    images = _image_set(tmp_path, [(90, 120), (160, 90)], random_flip=True, center_crop=cached)
    if cached:
        images.cache_latents(tiny_vae, "cpu", torch.float32)
    seen = set()
    for micro_step in range(12):
        draws = images.draw(micro_step, 0, 1, 1)
        batch = images.latents(draws, None if cached else tiny_vae, "cpu", torch.float32, torch.Generator().manual_seed(0))
        (draw,) = draws
        width, height = draw.bucket
        assert batch.latents.shape == (1, 4, height // 8, width // 8)
        assert batch.target_size_hw == (height, width)
        if draw.index == 0:  # 90x120 → 24x40 bucket, covered at 30x40: only the left edge can move
            assert batch.original_sizes_hw == [(120, 90)]
            top, left = batch.crops_top_left[0]
            assert top == 0 and 0 <= left <= 6
            if cached:
                assert left == 3  # centred, and 30 - 3 - 24 = 3 mirrored
        else:  # 160x90 → 40x24 bucket, covered at 43x24
            assert batch.original_sizes_hw == [(90, 160)]
            top, left = batch.crops_top_left[0]
            assert top == 0 and 0 <= left <= 3
            if cached:
                assert left == (1 if not draw.flip else 2)  # centre 1; in the mirror 43 - 1 - 40 = 2
        seen.add((draw.index, draw.flip))
    assert len(seen) >= 3


# End to end: the real job on photos of three shapes.
BUCKETED = {"SDFT_NUM_VALIDATION_IMAGES": "0", "SDFT_CHECKPOINT_EVERY_STEPS": "1000"}
LEARN = {"SDFT_LEARNING_RATE": "3e-3", "SDFT_MAX_TRAIN_STEPS": "100"}  # as test_lora_s3: tiny measurably learns


def _shapes(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    _photo(folder / "portrait.jpg", (96, 128), 0)
    _photo(folder / "landscape.png", (160, 90), 1)
    _photo(folder / "square.png", (100, 100), 2)
    return folder


def _run(tmp: Path, folder: Path, **settings: str):
    env = job_env(tmp / "work", SDFT_INSTANCE_URI=str(folder), SDFT_OUTPUT_URI=str(tmp / "out"), **{**BUCKETED, **settings})
    result = run_job(env)
    assert result.exit_code == 0, result.stdout[-3000:] + result.stderr[-3000:]
    manifest = json.loads((tmp / "out" / "manifest.json").read_text())
    return result, manifest


@pytest.fixture(scope="module")
def learned(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bucketed")
    folder = _shapes(tmp / "photos")
    result, manifest = _run(tmp, folder, **LEARN)
    return folder, tmp / "out", result, manifest


@pytest.mark.slow
def test_portrait_landscape_and_square_photos_train_in_a_tall_a_wide_and_a_square_bucket(learned):
    _, _, result, manifest = learned
    buckets = {entry["path"]: tuple(entry["bucket"]) for entry in manifest["inputs"]}
    assert buckets == {"portrait.jpg": (24, 40), "landscape.png": (40, 24), "square.png": (32, 32)}
    assert not any(entry["upscaled"] for entry in manifest["inputs"])
    (event,) = result.named("data.buckets")
    assert event["buckets"] == {"24x40": 1, "32x32": 1, "40x24": 1}


@pytest.mark.slow
def test_bucketed_training_lowers_the_denoising_loss_in_each_bucket(learned, tmp_path_factory):
    from diffusers import StableDiffusionPipeline

    folder, out, _, manifest = learned
    pipeline = StableDiffusionPipeline.from_pretrained(tiny_model_path(tmp_path_factory), safety_checker=None)
    paths = [folder / entry["path"] for entry in manifest["inputs"]]
    sizes = [tuple(entry["bucket"]) for entry in manifest["inputs"]]
    before = denoising_loss(pipeline, paths, PROMPT, 32, sizes=sizes)
    pipeline.load_lora_weights(out / "lora")
    after = denoising_loss(pipeline, paths, PROMPT, 32, sizes=sizes)
    assert after < before * 0.95, (before, after)


@pytest.mark.slow
def test_without_bucketing_every_photo_trains_square(tmp_path):
    _, manifest = _run(tmp_path, _shapes(tmp_path / "photos"), SDFT_BUCKETING="false", SDFT_MAX_TRAIN_STEPS="2")
    assert {tuple(entry["bucket"]) for entry in manifest["inputs"]} == {(32, 32)}


# Several images per bucket, batches of 2, flips and caption dropout: cached, uncached, and resumed.
STEPS = 16
BATCHED = {"SDFT_TRAIN_BATCH_SIZE": "2", "SDFT_RANDOM_FLIP": "true", "SDFT_CAPTION_DROPOUT": "0.3",
           "SDFT_MAX_TRAIN_STEPS": str(STEPS), "SDFT_LEARNING_RATE": "1e-3"}


def _many(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(3):
        _photo(folder / f"tall-{i}.jpg", (72 + 4 * i, 128), i)
        _photo(folder / f"wide-{i}.png", (128, 70 + 4 * i), i + 1)
    _photo(folder / "square.png", (64, 64), 4)  # alone in its bucket: short batches, not dropped
    return folder


def _losses(out: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def batched(tmp_path_factory):
    runs = {}
    for cache in ("true", "false"):
        tmp = tmp_path_factory.mktemp(f"batched-{cache}")
        result, manifest = _run(tmp, _many(tmp / "photos"), SDFT_CACHE_LATENTS=cache, **BATCHED)
        runs[cache] = {"result": result, "manifest": manifest, "out": tmp / "out"}
    return runs


@pytest.mark.slow
def test_several_images_per_bucket_train_in_batches_of_two(batched):
    run = batched["true"]
    assert [e["step"] for e in run["result"].named("train.step")] == list(range(1, STEPS + 1))
    assert run["result"].named("data.buckets")[0]["buckets"] == {"24x40": 3, "32x32": 1, "40x24": 3}
    assert len(run["manifest"]["inputs"]) == 7


@pytest.mark.slow
def test_cached_and_uncached_bucketed_runs_give_the_same_loss_curve(batched):
    cached, uncached = _losses(batched["true"]["out"]), _losses(batched["false"]["out"])
    assert len(cached) == len(uncached) == STEPS
    assert cached == pytest.approx(uncached, rel=1e-4, abs=1e-6)
    assert len(set(cached)) > 1
    assert batched["true"]["result"].named("train.cache_ready")  # the cache really was used
    assert not batched["false"]["result"].named("train.cache_ready")


@pytest.mark.slow
def test_resume_after_sigterm_equals_the_uninterrupted_bucketed_run(batched, tmp_path):
    env = job_env(tmp_path / "work", SDFT_INSTANCE_URI=str(_many(tmp_path / "photos")),
                  SDFT_OUTPUT_URI=str(tmp_path / "out"), SDFT_CACHE_LATENTS="true", **{**BUCKETED, **BATCHED})
    job = WatchedJob(env)
    if not job.wait_for("train.step", 240):
        job.process.kill()
        pytest.fail("no train.step before the job ended:\n" + job.finish(10).stdout[-3000:])
    job.process.send_signal(signal.SIGTERM)
    stopped = job.finish(240)
    assert stopped.exit_code == 143, stopped.stdout[-3000:] + stopped.stderr[-3000:]
    step = stopped.named("checkpoint.saved")[-1]["step"]
    assert 1 <= step < STEPS, "the signal must land mid-training"

    resumed = run_job(env)
    assert resumed.exit_code == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert [e["step"] for e in resumed.named("checkpoint.resumed")] == [step]
    reference = load_file(batched["true"]["out"] / "lora" / "pytorch_lora_weights.safetensors")
    lora = load_file(tmp_path / "out" / "lora" / "pytorch_lora_weights.safetensors")
    assert reference.keys() == lora.keys()
    assert max(float((reference[k] - lora[k]).abs().max()) for k in reference) <= 1e-6
    assert _losses(tmp_path / "out") == pytest.approx(_losses(batched["true"]["out"]), rel=1e-6, abs=1e-7)
