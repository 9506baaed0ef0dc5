"""Photos of any size and shape (issue 13): memory that does not grow with megapixels, strips
skipped, small images flagged.

The memory check runs the real job twice on 12 photos, once at 6000×4000 and once at 600×400, and
compares the peak RSS each reports (`train.memory`): decoding at the size training needs and
keeping no full-resolution image must hold the difference to 300 MB (12 decoded 24-megapixel photos
alone are 864 MB).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from jobrun import EXAMPLES, job_env, run_job

DOG = sorted(EXAMPLES.glob("*.png"))[0]
PHOTOS = 12
RSS_BOUND_MB = 300


def _photo(size: tuple[int, int]) -> Image.Image:
    """A photo-like RGB image: the dog over gradients and fine noise (so JPEG has detail to keep).

    Built band by band in 8 bits, so that making a 24-megapixel photo costs this process little.
    """
    width, height = size
    gradient = Image.linear_gradient("L").resize(size)
    image = Image.merge("RGB", (gradient, Image.effect_noise(size, 24), gradient.transpose(Image.Transpose.FLIP_LEFT_RIGHT)))
    side = min(size) // 2
    image.paste(Image.open(DOG).convert("RGB").resize((side, side)), (width // 4, height // 4))
    return image


def test_a_jpeg_is_decoded_at_the_size_training_needs_not_at_full_resolution(tmp_path):
    from job.inputs import load_rgb

    _photo((6000, 4000)).save(tmp_path / "big.jpg", quality=90)
    for at_least in [(60, 40), (400, 300), (1600, 1000)]:
        width, height = load_rgb(tmp_path / "big.jpg", at_least=at_least).size
        assert width >= at_least[0] and height >= at_least[1]  # never smaller than needed...
        assert width < 2 * at_least[0] or height < 2 * at_least[1]  # ...and not much larger
        assert width / height == pytest.approx(1.5, rel=0.02)
    assert load_rgb(tmp_path / "big.jpg").size == (6000, 4000)


def _peak_rss_mb(tmp: Path, size: tuple[int, int]) -> float:
    folder = tmp / "photos"
    folder.mkdir(parents=True)
    data = _encoded(size)
    for i in range(PHOTOS):
        (folder / f"IMG_{i:04d}.jpg").write_bytes(data)
    env = job_env(tmp / "work", SDFT_INSTANCE_URI=str(folder), SDFT_OUTPUT_URI=str(tmp / "out"),
                  SDFT_MAX_TRAIN_STEPS="2", SDFT_NUM_VALIDATION_IMAGES="0", SDFT_TRAIN_BATCH_SIZE="2")
    result = run_job(env)
    assert result.exit_code == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert len(json.loads((tmp / "out" / "manifest.json").read_text())["inputs"]) == PHOTOS
    (memory,) = result.named("train.memory")
    return memory["peak_rss_mb"]


def _encoded(size: tuple[int, int]) -> bytes:
    import io

    buffer = io.BytesIO()
    _photo(size).save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


@pytest.mark.slow
def test_peak_memory_does_not_grow_with_the_photos_megapixels(tmp_path):
    small = _peak_rss_mb(tmp_path / "small", (600, 400))
    large = _peak_rss_mb(tmp_path / "large", (6000, 4000))
    print(f"peak RSS: 12 photos of 600x400 {small} MB, of 6000x4000 {large} MB")
    assert large - small <= RSS_BOUND_MB, (small, large)


def _strip_png() -> bytes:
    import io

    buffer = io.BytesIO()
    Image.new("L", (40000, 1)).save(buffer, "PNG", optimize=True)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def odd_shapes(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("odd")
    folder = tmp / "photos"
    folder.mkdir()
    (folder / "strip.png").write_bytes(_strip_png())
    Image.open(DOG).convert("RGB").resize((48, 48)).save(folder / "small.png")
    Image.open(DOG).convert("RGB").resize((300, 400)).save(folder / "portrait.jpg")
    env = job_env(tmp / "work", SDFT_INSTANCE_URI=str(folder), SDFT_OUTPUT_URI=str(tmp / "out"), SDFT_RESOLUTION="128",
                  SDFT_MAX_TRAIN_STEPS="2", SDFT_NUM_VALIDATION_IMAGES="0")
    checked = run_job(env, "check")
    result = run_job(env)
    assert result.exit_code == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return checked, result, json.loads((tmp / "out" / "manifest.json").read_text())


@pytest.mark.slow
def test_a_40000x1_strip_is_skipped_with_its_reason_in_check_and_run_while_the_others_train(odd_shapes):
    checked, result, manifest = odd_shapes
    assert len(_strip_png()) < 400  # the famous 199-byte file's kind: tiny on disk, absurd in shape
    assert checked.exit_code == 0, checked.stdout[-3000:] + checked.stderr[-3000:]
    (ok,) = checked.named("check.ok")
    assert [s["path"] for s in ok["skipped"]] == ["strip.png"] and "degenerate shape (40000x1" in ok["skipped"][0]["reason"]
    assert ok["buckets"] == {"96x160": 1, "128x128": 1}
    assert [e["path"] for e in checked.named("input.upscaled")] == ["small.png"]  # check tells before training
    assert [s["path"] for s in manifest["skipped"]] == ["strip.png"]
    assert "degenerate shape (40000x1 pixels" in manifest["skipped"][0]["reason"]
    assert {e["path"] for e in manifest["inputs"]} == {"small.png", "portrait.jpg"}
    assert [e["path"] for e in result.named("input.skipped")] == ["strip.png"]


@pytest.mark.slow
def test_a_48px_image_at_128px_trains_flagged_upscaled_with_a_warning(odd_shapes):
    _, result, manifest = odd_shapes
    inputs = {e["path"]: e for e in manifest["inputs"]}
    assert inputs["small.png"]["upscaled"] is True and inputs["small.png"]["bucket"] == [128, 128]
    assert inputs["portrait.jpg"]["upscaled"] is False and inputs["portrait.jpg"]["bucket"] == [96, 160]
    (warning,) = result.named("input.upscaled")
    assert warning["path"] == "small.png" and warning["level"] == "warning" and warning["scale"] > 2.5
