"""Captions as people write them, and photos as phones save them (issue 13).

In process: how caption bytes become text and which file captions which image. End to end: one
real run on a folder of Windows, Notepad, kohya and phone files, whose manifest must show the
caption each image trained on; a cp1252 caption stops the job with exit 3 naming the file and byte.
"""

from __future__ import annotations

import codecs
import json
from pathlib import Path

import pytest
from PIL import Image
from structlog.testing import capture_logs

from jobrun import EXAMPLES, job_env, run_job

DOG = sorted(EXAMPLES.glob("*.png"))[0]
PROMPT = "a photo of sks dog"
LONG = " ".join(["sks"] + ["a fluffy brown dog sitting on a red sofa in the afternoon sun"] * 5) + " trigger"
assert len(LONG) >= 300


def _dog(path: Path, size: tuple[int, int] = (64, 64), **options) -> Path:
    Image.open(DOG).convert("RGB").resize(size).save(path, **options)
    return path


# How bytes become a caption: (file bytes, the caption trained on).
DECODED = [
    ("utf-8", "a photo of sks dog\n".encode(), PROMPT),
    ("utf-8 bom + crlf", codecs.BOM_UTF8 + "a photo of sks dog\r\non a sofa\r\n".encode(), "a photo of sks dog on a sofa"),
    ("utf-16-le bom", "a photo of sks dög".encode("utf-16"), "a photo of sks dög"),  # Python writes LE + BOM
    ("utf-16-be bom", codecs.BOM_UTF16_BE + "ünïcode caption\r\n".encode("utf-16-be"), "ünïcode caption"),
    ("utf-8 non-ascii", "photo de sks chien, café".encode(), "photo de sks chien, café"),
]


@pytest.mark.parametrize(("data", "caption"), [row[1:] for row in DECODED], ids=[row[0] for row in DECODED])
def test_captions_decode_as_written(tmp_path, data, caption):
    from job.captions import read_caption

    (tmp_path / "x.txt").write_bytes(data)
    assert read_caption(tmp_path / "x.txt", "x.txt") == caption


def test_a_cp1252_caption_is_refused_naming_the_file_and_the_byte(tmp_path):
    from job.captions import read_caption
    from job.errors import InputError

    (tmp_path / "cafe.txt").write_bytes("a photo of sks dog in a café".encode("cp1252"))
    with pytest.raises(InputError) as error:
        read_caption(tmp_path / "cafe.txt", "photos/cafe.txt")
    assert error.value.exit_code == 3
    assert "photos/cafe.txt" in str(error.value) and "byte 0xE9 at offset 27" in str(error.value)


def test_captions_pair_by_stem_in_any_case_and_orphans_are_warned(tmp_path):
    from job.inputs import prepare_dataset

    _dog(tmp_path / "IMG_0001.JPG", format="JPEG")
    (tmp_path / "IMG_0001.TXT").write_text("camera caption")
    _dog(tmp_path / "Kohya.png")
    (tmp_path / "kohya.caption").write_text("kohya caption")
    _dog(tmp_path / "both.png")
    (tmp_path / "both.txt").write_text("txt wins")
    (tmp_path / "both.caption").write_text("caption loses")
    _dog(tmp_path / "plain.webp", format="WEBP")
    (tmp_path / "orphan.txt").write_text("nobody's caption")
    (tmp_path / "dataset_info.json").write_bytes(codecs.BOM_UTF8 + json.dumps({"instance_prompt": PROMPT}).encode())
    with capture_logs() as logs:
        dataset = prepare_dataset(tmp_path, None)
    assert {e.source: e.caption for e in dataset.examples} == {
        "IMG_0001.JPG": "camera caption", "Kohya.png": "kohya caption", "both.png": "txt wins", "plain.webp": PROMPT}
    assert not dataset.skipped  # caption files are not "not an image"
    orphaned = {e["path"]: e["reason"] for e in logs if e["event"] == "input.caption_orphaned"}
    assert set(orphaned) == {"orphan.txt", "both.caption"}
    assert "both.txt" in orphaned["both.caption"]


def test_overflowing_text_reports_its_token_count_and_the_dropped_words(tmp_path):
    from transformers import CLIPTokenizer

    from job.base_model import resolve_base_model
    from job.captions import overflow

    tokenizer = CLIPTokenizer.from_pretrained(resolve_base_model("builtin:tiny", tmp_path).path, subfolder="tokenizer")
    assert overflow(tokenizer, PROMPT) is None
    tokens, dropped = overflow(tokenizer, LONG)
    assert tokens > tokenizer.model_max_length
    assert dropped.endswith("trigger") and len(dropped) < len(LONG)


# End to end: one folder as people hand it over.
def _phone_folder(folder: Path) -> dict[str, str | None]:
    """Writes the folder; returns each image's expected caption (None: from dataset_info.json)."""
    import pillow_heif

    folder.mkdir(parents=True)
    _dog(folder / "IMG_0001.JPG", (96, 128), format="JPEG")
    (folder / "IMG_0001.TXT").write_bytes(b"windows camera caption\r\n")
    _dog(folder / "notepad_bom.png")
    (folder / "notepad_bom.txt").write_bytes(codecs.BOM_UTF8 + b"utf-8 with bom\r\nand crlf\r\n")
    _dog(folder / "kohya.png")
    (folder / "kohya.caption").write_bytes(b"kohya style caption")
    _dog(folder / "unicode.png")
    (folder / "unicode.txt").write_bytes("notepad unicode caption ✓".encode("utf-16"))
    _dog(folder / "long.png")
    (folder / "long.txt").write_text(LONG)
    # A real HEIC (HEVC in HEIF, as an iPhone writes it) and a real AVIF (AV1), portrait and landscape.
    pillow_heif.from_pillow(Image.open(DOG).convert("RGB").resize((90, 120))).save(folder / "IMG_0002.HEIC", quality=90)
    _dog(folder / "IMG_0003.avif", (160, 90), format="AVIF")
    (folder / "orphan.txt").write_text("a caption whose image was deleted")
    (folder / "dataset_info.json").write_bytes(codecs.BOM_UTF8 + json.dumps({"instance_prompt": PROMPT}).encode())
    return {
        "IMG_0001.JPG": "windows camera caption",
        "notepad_bom.png": "utf-8 with bom and crlf",
        "kohya.png": "kohya style caption",
        "unicode.png": "notepad unicode caption ✓",
        "long.png": LONG,
        "IMG_0002.HEIC": PROMPT,
        "IMG_0003.avif": PROMPT,
    }


@pytest.fixture(scope="module")
def phone_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("phone")
    expected = _phone_folder(tmp / "photos")
    env = job_env(tmp / "work", SDFT_INSTANCE_URI=str(tmp / "photos"), SDFT_OUTPUT_URI=str(tmp / "out"),
                  SDFT_INSTANCE_PROMPT=None, SDFT_MAX_TRAIN_STEPS="2", SDFT_NUM_VALIDATION_IMAGES="0")
    result = run_job(env)
    assert result.exit_code == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result, json.loads((tmp / "out" / "manifest.json").read_text()), expected


@pytest.mark.slow
def test_each_image_trains_on_the_caption_its_file_holds(phone_run):
    _, manifest, expected = phone_run
    assert {entry["path"]: entry["caption"] for entry in manifest["inputs"]} == expected
    assert manifest["skipped"] == []


@pytest.mark.slow
def test_a_caption_longer_than_the_text_encoder_reads_trains_truncated_with_a_warning(phone_run):
    result, manifest, _ = phone_run
    assert {entry["path"] for entry in manifest["inputs"] if entry["caption_truncated"]} == {"long.png"}
    (warning,) = result.named("caption.truncated")
    assert warning["path"] == "long.txt" and warning["tokens"] > warning["limit"] == 77
    assert warning["dropped"].endswith("trigger") and warning["level"] == "warning"


@pytest.mark.slow
def test_an_orphan_caption_is_warned_about(phone_run):
    result, _, _ = phone_run
    assert [e["path"] for e in result.named("input.caption_orphaned")] == ["orphan.txt"]


@pytest.mark.slow
def test_heic_and_avif_photos_are_used_in_their_buckets(phone_run):
    _, manifest, _ = phone_run
    buckets = {entry["path"]: entry["bucket"] for entry in manifest["inputs"]}
    assert buckets["IMG_0002.HEIC"] == [24, 40] and buckets["IMG_0003.avif"] == [40, 24]


@pytest.mark.slow
def test_a_cp1252_caption_stops_the_run_with_exit_3_naming_the_file_and_the_byte(tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    _dog(folder / "dog.png")
    (folder / "dog.txt").write_bytes("a photo of sks dog in a café".encode("cp1252"))
    result = run_job(job_env(tmp_path / "work", SDFT_INSTANCE_URI=str(folder), SDFT_OUTPUT_URI=str(tmp_path / "out")))
    assert result.exit_code == 3, result.stdout[-3000:] + result.stderr[-3000:]
    assert "caption dog.txt is not UTF-8 text: byte 0xE9 at offset 27" in result.failure["reason"]
