"""Bad and odd inputs through the real S3 server (issue 4), table-driven.

FILES: one bucket holds one file per row beside a good image; one real run decides, and each row
checks that its file was used or skipped (with the reason) in manifest.json and the log.
FATAL: layouts in which nothing usable remains, or the base model is unusable; each row checks the
exit code and the message of its own run.
"""

from __future__ import annotations

import io
import json
import uuid
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from faultproxy import FaultProxy
from jobrun import EXAMPLES, job_env, run_job

GOOD = sorted(EXAMPLES.glob("*.png"))[0]


def _encode(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def _photo(mode: str = "RGB", size: tuple[int, int] = (48, 40)) -> Image.Image:
    return Image.open(GOOD).convert("RGB").resize(size).convert(mode)


def cmyk_jpeg() -> bytes:
    return _encode(_photo("CMYK"), "JPEG")


def png_16_bit() -> bytes:
    values = (np.asarray(_photo("L"), dtype=np.uint16) * 257).astype(np.uint16)
    image = Image.fromarray(values)  # uint16 → mode I;16
    assert image.mode == "I;16"
    return _encode(image, "PNG")


def palette_with_alpha_png() -> bytes:
    image = _photo("RGB").quantize(16)
    return _encode(image, "PNG", transparency=0)


def exif_rotated_jpeg() -> bytes:
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90° clockwise to display
    return _encode(_photo("RGB"), "JPEG", exif=exif)


def grayscale_jpeg() -> bytes:
    return _encode(_photo("L"), "JPEG")


def rgba_png() -> bytes:
    return _encode(_photo("RGBA"), "PNG")


def corrupt_jpeg() -> bytes:
    valid = _encode(_photo("RGB"), "JPEG")
    scan = valid.find(b"\xff\xda") + 20  # into the compressed pixels, past the start-of-scan header
    return valid[:scan] + b"\xff\xc0\xff\xc0" + valid[scan + 4:]  # markers where data should be


def truncated_png() -> bytes:
    valid = GOOD.read_bytes()
    return valid[: len(valid) // 2]


def bomb_png(width: int = 10_000, height: int = 10_000) -> bytes:
    """A real, valid 100-megapixel grayscale PNG that is only ~100 KB on disk."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return len(data).to_bytes(4, "big") + kind + data + zlib.crc32(kind + data).to_bytes(4, "big")

    compressor = zlib.compressobj(9)
    row = b"\x00" * (width + 1)  # filter byte + black pixels
    idat = b"".join(compressor.compress(row) for _ in range(height)) + compressor.flush()
    header = width.to_bytes(4, "big") + height.to_bytes(4, "big") + bytes([8, 0, 0, 0, 0])
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


# name in the bucket, content, None if it must be used, else a fragment of the skip reason
FILES: list[tuple[str, Callable[[], bytes], str | None]] = [
    ("cmyk.jpg", cmyk_jpeg, None),
    ("deep.png", png_16_bit, None),
    ("palette_alpha.png", palette_with_alpha_png, None),
    ("rotated.jpg", exif_rotated_jpeg, None),
    ("gray.jpg", grayscale_jpeg, None),
    ("rgba.PNG", rgba_png, None),
    ("corrupt.jpg", corrupt_jpeg, "corrupt image"),
    ("truncated.png", truncated_png, "corrupt image"),
    ("empty.jpg", lambda: b"", "empty file"),
    ("bomb.png", bomb_png, "too large (10000x10000 pixels"),
    ("notes.pdf", lambda: b"%PDF-1.4 not an image", "not an image (.pdf"),
    ("disguised.png", lambda: b"<html>this is not a png</html>", "not a decodable image"),
]


def _upload(client, bucket: str, files: dict[str, bytes], prefix: str = "instance/") -> None:
    for name, body in files.items():
        client.put_object(Bucket=bucket, Key=prefix + name, Body=body)


@pytest.fixture(scope="module")
def mixed(module_s3_env, s3_server, tmp_path_factory):
    client, bucket = s3_server.client(), s3_server.create_bucket(f"mixed-{uuid.uuid4().hex[:8]}")
    _upload(client, bucket, {"good.png": GOOD.read_bytes(), **{name: make() for name, make, _ in FILES}})
    result = run_job(job_env(tmp_path_factory.mktemp("mixed"), SDFT_INSTANCE_URI=f"s3://{bucket}/instance/",
                             SDFT_OUTPUT_URI=f"s3://{bucket}/out/", SDFT_MAX_TRAIN_STEPS="2"))
    assert result.exit_code == 0, result.stdout[-3000:] + result.stderr[-3000:]
    manifest = json.loads(client.get_object(Bucket=bucket, Key="out/manifest.json")["Body"].read())
    return result, manifest


@pytest.mark.slow
@pytest.mark.parametrize(("name", "make", "skip_reason"), FILES, ids=[row[0] for row in FILES])
def test_each_file_is_used_or_skipped_with_its_reason(mixed, name, make, skip_reason):
    result, manifest = mixed
    used = {entry["path"] for entry in manifest["inputs"]}
    skipped = {entry["path"]: entry["reason"] for entry in manifest["skipped"]}
    warned = {event["path"]: event["reason"] for event in result.named("input.skipped")}
    if skip_reason is None:
        assert name in used and name not in skipped
    else:
        assert name not in used
        assert skip_reason in skipped[name]
        assert warned[name] == skipped[name]  # a warning names it while the run goes on


@pytest.mark.slow
def test_only_the_good_and_the_odd_but_valid_files_were_trained_on(mixed):
    _, manifest = mixed
    expected = {"good.png"} | {name for name, _, reason in FILES if reason is None}
    assert {entry["path"] for entry in manifest["inputs"]} == expected
    assert all(len(entry["sha256"]) == 64 and entry["caption"] == "a photo of sks dog" for entry in manifest["inputs"])


def test_odd_images_are_converted_as_a_viewer_shows_them(tmp_path):
    from job.inputs import load_rgb

    for name, make in (("rotated.jpg", exif_rotated_jpeg), ("deep.png", png_16_bit), ("cmyk.jpg", cmyk_jpeg),
                       ("palette_alpha.png", palette_with_alpha_png), ("gray.jpg", grayscale_jpeg)):
        (tmp_path / name).write_bytes(make())
        image = load_rgb(tmp_path / name)
        assert image.mode == "RGB", name
        assert image.size == ((40, 48) if name == "rotated.jpg" else (48, 40)), name
    # 16-bit values are scaled to 8 bits, not clipped: the picture keeps its shades.
    deep = np.asarray(load_rgb(tmp_path / "deep.png"))
    gray = np.asarray(_photo("L"))
    assert np.abs(deep[..., 0].astype(int) - gray.astype(int)).max() <= 1


def _pickle_only_model(tmp_path: Path) -> dict[str, bytes]:
    """The builtin tiny pipeline saved the old way: every weight file a `.bin` pickle, no safetensors.

    (save_pretrained(safe_serialization=False) no longer does it: transformers writes safetensors
    regardless, so the weights are re-saved with torch.save under the classic names.)
    """
    import torch
    from safetensors.torch import load_file

    from job.base_model import resolve_base_model

    safe = resolve_base_model("builtin:tiny", tmp_path / "models").path
    files = {}
    for path in sorted(p for p in safe.rglob("*") if p.is_file() and p.name != ".complete"):
        name = path.relative_to(safe).as_posix()
        if path.suffix == ".safetensors":
            buffer = io.BytesIO()
            torch.save(load_file(path), buffer)
            name = str(Path(name).with_name({"model.safetensors": "pytorch_model.bin"}.get(path.name, path.stem + ".bin")))
            files[name] = buffer.getvalue()
        else:
            files[name] = path.read_bytes()
    assert not [n for n in files if n.endswith(".safetensors")] and [n for n in files if n.endswith(".bin")]
    return files


# id, files under instance/, extra settings, exit code, fragments of the reason
FATAL = [
    ("empty prefix", {}, {}, 3, ["no files at SDFT_INSTANCE_URI", "/instance/"]),
    ("only non-images", {"readme.md": b"# hi", "data.csv": b"a,b\n1,2\n"}, {}, 3,
     ["no usable instance images", "data.csv: not an image (.csv", "readme.md: not an image (.md"]),
    ("only undecodable", {"empty.jpg": b"", "bomb.png": None, "truncated.png": None}, {}, 3,
     ["no usable instance images", "empty.jpg: empty file", "bomb.png: too large", "truncated.png: corrupt image"]),
    ("key with ..", {"good.png": GOOD.read_bytes(), "evil.png": GOOD.read_bytes()}, {"proxy": "rename evil"}, 3,
     ["refusing unsafe object key", "../evil.png"]),
    ("pickle-only model", {"good.png": GOOD.read_bytes()}, {"model": "pickle"}, 4,
     ["only pickle weights", "safetensors"]),
]


@pytest.mark.slow
@pytest.mark.parametrize(("files", "extra", "exit_code", "fragments"), [row[1:] for row in FATAL],
                         ids=[row[0] for row in FATAL])
def test_unusable_inputs_stop_the_job_with_the_reason(files, extra, exit_code, fragments, s3_server, s3_env, bucket, tmp_path):
    client = s3_server.client()
    makers = {"bomb.png": bomb_png, "truncated.png": truncated_png}
    _upload(client, bucket, {name: body if body is not None else makers[name]() for name, body in files.items()})
    settings = {"SDFT_INSTANCE_URI": f"s3://{bucket}/instance/", "SDFT_OUTPUT_URI": f"s3://{bucket}/out/"}
    if extra.get("model") == "pickle":
        _upload(client, bucket, _pickle_only_model(tmp_path), prefix="model/")
        settings["SDFT_BASE_MODEL"] = f"s3://{bucket}/model/"
    work = tmp_path / "work"
    if extra.get("proxy"):
        # SeaweedFS refuses keys with `..` (AWS S3 accepts them): the proxy plays such a server
        # by renaming the object in the listing it returns.
        rename = {"<Key>instance/evil.png</Key>".encode(): "<Key>instance/../evil.png</Key>".encode()}
        with FaultProxy(s3_server.endpoint_url, rewrite=rename) as proxy:
            result = run_job(job_env(work, **settings, AWS_ENDPOINT_URL_S3=proxy.url))
        assert not list(tmp_path.rglob("evil.png")), "a file was written outside the download folder"
    else:
        result = run_job(job_env(work, **settings))

    assert result.exit_code == exit_code, result.stdout[-3000:] + result.stderr[-3000:]
    reason = result.failure["reason"]
    for fragment in fragments:
        assert fragment in reason
    assert result.events[-1]["event"] == "job.failed"
    status = json.loads(client.get_object(Bucket=bucket, Key="out/status.json")["Body"].read())
    assert (status["state"], status["exit_code"], status["reason"]) == ("failed", exit_code, reason)
    keys = [o["Key"] for o in client.list_objects_v2(Bucket=bucket, Prefix="out/").get("Contents", [])]
    assert "out/_SUCCESS" not in keys and "out/manifest.json" not in keys
