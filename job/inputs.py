"""Instance and class images: fetch them, unpack archives safely, decode and caption every image.

`fetch_inputs` brings the data into the work dir; `prepare_dataset` decides which files are usable
images and what each one's caption is, and writes that decision to `dataset.json` for later stages.
"""

import gzip
import json
import lzma
import shutil
import zlib
import tarfile
import warnings
import zipfile
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path, PurePosixPath

import numpy as np
import structlog
from PIL import ExifTags, Image, ImageOps, UnidentifiedImageError
from pillow_heif import register_heif_opener

from job.captions import caption_for, caption_files, decode_text, is_caption_file, read_caption, warn_orphans
from job.errors import InputError
from job.storage import open_store
from job.digests import sha256_file

log = structlog.get_logger()

# iPhones' HEIC through the pillow-heif plugin; AVIF Pillow (11.3+) decodes itself.
register_heif_opener()

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".heic", ".heif", ".avif"}
ARCHIVE_SUFFIXES = (".zip", ".tar", ".tar.gz", ".tgz")
# Decompression bombs: a 40-megapixel photo is plenty for a 512 px fine-tune.
MAX_PIXELS = 40_000_000
# Beyond this long/short side ratio an image is a strip, not a photo: its cover-resize into the most
# elongated bucket (5:2) would keep under a third of it, and a 40000x1 PNG would resize to megapixels.
MAX_IMAGE_ASPECT = 8.0
# EXIF orientations that turn the stored image by 90°: the displayed width is the stored height.
_TRANSPOSED_ORIENTATIONS = {5, 6, 7, 8}
DATASET_INFO = "dataset_info.json"
CAPTION_SUFFIXES = {".txt"}
# What an archive library raises for a damaged or unsupported archive: an encrypted member
# (RuntimeError), a method Python lacks such as Deflate64 (NotImplementedError), a CRC mismatch or a
# bad header (BadZipFile, TarError), a truncated stream (EOFError, zlib.error, gzip.BadGzipFile).
ARCHIVE_ERRORS = (RuntimeError, NotImplementedError, zipfile.BadZipFile, tarfile.TarError, EOFError, zlib.error,
                  gzip.BadGzipFile, lzma.LZMAError, ValueError)
ARCHIVE_FIX = ("re-create the archive as a plain zip (Deflate, no password) or .tar.gz, check that it opens, "
               "and upload it again, or upload the images themselves")


@dataclass(frozen=True)
class Example:
    path: str  # local path of the decoded-ok image file
    source: str  # where it came from, relative to the input URI (as recorded in the manifest)
    sha256: str
    caption: str
    caption_file: str | None = None  # the caption's file, relative like `source`; None: the instance prompt


@dataclass
class Dataset:
    examples: list[Example]
    skipped: list[dict] = field(default_factory=list)
    instance_prompt: str | None = None
    class_prompt: str | None = None

    def save(self, path: Path) -> None:
        path.write_text(json.dumps(asdict(self), indent=2))

    @classmethod
    def load(cls, path: Path) -> "Dataset":
        data = json.loads(path.read_text())
        return cls(**{**data, "examples": [Example(**e) for e in data["examples"]]})


def fetch_inputs(uri: str, dest: Path) -> Path:
    """Downloads the images under `uri` (a prefix, a folder, one file, or an archive) into `dest`."""
    shutil.rmtree(dest, ignore_errors=True)
    dest.mkdir(parents=True)
    store = open_store(uri)
    objects = store.list()
    if not objects:
        raise InputError(f"no files at SDFT_INSTANCE_URI {uri}: upload the instance images there first")
    store.download_all(dest / "raw", [o.key for o in objects])
    archives = [o.key for o in objects if o.key.lower().endswith(ARCHIVE_SUFFIXES)]
    images = [o.key for o in objects if PurePosixPath(o.key).suffix.lower() in IMAGE_SUFFIXES]
    if len(archives) == 1 and not images:
        # One archive, perhaps beside captions, a dataset_info.json or a README / .DS_Store: the images
        # are in the archive. Side files it does not itself hold come along (an archive's own win).
        unpacked = dest / "unpacked"
        unpack_archive(dest / "raw" / archives[0], unpacked)
        for key in (o.key for o in objects if o.key != archives[0] and _is_side_file(o.key)):
            if not (unpacked / key).exists():
                (unpacked / key).parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(dest / "raw" / key, unpacked / key)
        return unpacked
    return dest / "raw"


def _is_side_file(key: str) -> bool:
    name = PurePosixPath(key).name
    return name == DATASET_INFO or PurePosixPath(name).suffix.lower() in CAPTION_SUFFIXES


def unpack_archive(archive: Path, dest: Path) -> None:
    """Unpacks a zip or tar, refusing any member that would land outside `dest` (and links).

    Raises `InputError` for an unsafe member, and for anything the archive libraries raise (an
    encrypted member, an unsupported method such as Deflate64, a CRC error, a truncated archive),
    naming the archive, the member and the fix.
    """
    dest.mkdir(parents=True, exist_ok=True)
    root = dest.resolve()
    if zipfile.is_zipfile(archive):
        with _reading(archive, None):
            bundle = zipfile.ZipFile(archive)
        with bundle:
            members = [(m.filename, m) for m in bundle.infolist() if not m.is_dir()]
            for name, _ in members:
                _safe_member_path(root, name, archive)
            for name, member in members:
                if _is_junk(name):
                    continue
                target = root / name
                target.parent.mkdir(parents=True, exist_ok=True)
                with _reading(archive, name), bundle.open(member) as source, target.open("wb") as sink:
                    shutil.copyfileobj(source, sink)
        return
    with _reading(archive, None):
        bundle = tarfile.open(archive)
    with bundle:
        with _reading(archive, None):
            members = bundle.getmembers()
        for member in members:
            _safe_member_path(root, member.name, archive)
            if member.issym() or member.islnk() or member.isdev():
                raise InputError(f"archive {archive.name} holds a link or device ({member.name}); refused")
        for member in members:
            if member.isfile() and not _is_junk(member.name):
                # The "data" filter re-checks every member (paths, links, modes) inside the standard library.
                with _reading(archive, member.name):
                    bundle.extract(member, root, filter="data")


@contextmanager
def _reading(archive: Path, member: str | None):
    """Turns whatever the archive library raises while reading into an `InputError` naming archive and member."""
    try:
        yield
    except ARCHIVE_ERRORS as error:
        what = (f"cannot unpack member {member!r} of archive {archive.name}" if member
                else f"{archive.name} is not a readable zip or tar archive (or is damaged)")
        raise InputError(f"{what}: {type(error).__name__}: {error}; {ARCHIVE_FIX}") from error


def _safe_member_path(root: Path, name: str, archive: Path) -> Path:
    target = (root / name).resolve()
    if PurePosixPath(name).is_absolute() or name.startswith("\\") or not target.is_relative_to(root):
        raise InputError(f"archive {archive.name} has a member that escapes the destination ({name}); refused")
    return target


def _is_junk(name: str) -> bool:
    parts = PurePosixPath(name).parts
    return "__MACOSX" in parts or any(p.startswith("._") or p == ".DS_Store" for p in parts)


def prepare_dataset(folder: Path, instance_prompt: str | None, class_prompt: str | None = None) -> Dataset:
    """Decodes every image under `folder`, pairs it with its caption, and lists what was skipped.

    Captions follow `job.captions` (same stem in any case, `.txt` or `.caption`, UTF-8 or UTF-16
    with a BOM). Raises `InputError` when no image is usable, when an image has no caption and no
    instance prompt applies, or when a caption or `dataset_info.json` is not UTF-8/UTF-16 text.
    """
    info = _read_dataset_info(folder)
    instance_prompt = instance_prompt or info.get("instance_prompt")
    class_prompt = class_prompt or info.get("class_prompt")
    files = sorted(p for p in folder.rglob("*") if p.is_file() and not _is_junk(p.relative_to(folder).as_posix()))
    captions = caption_files(files)
    warn_orphans(files, folder)
    examples, skipped = [], []
    for path in files:
        source = path.relative_to(folder).as_posix()
        if is_caption_file(path) or path.name == DATASET_INFO:
            continue
        if path.suffix.lower() not in IMAGE_SUFFIXES:
            problem = f"not an image ({path.suffix or 'no extension'}; images are {', '.join(sorted(IMAGE_SUFFIXES))})"
        else:
            problem = image_problem(path)
        if problem:
            log.warning("input.skipped", path=source, reason=problem)
            skipped.append({"path": source, "reason": problem})
            continue
        caption_path = caption_for(path, captions)
        caption_file = caption_path.relative_to(folder).as_posix() if caption_path else None
        caption = read_caption(caption_path, caption_file) if caption_path else instance_prompt
        if not caption:
            raise InputError(
                f"{source} has no caption: set SDFT_INSTANCE_PROMPT, add {path.stem}.txt, "
                f"or give instance_prompt in {DATASET_INFO}"
            )
        examples.append(Example(str(path), source, sha256_file(path), caption, caption_file))
    if not examples:
        raise InputError(f"no usable instance images ({_describe_rejected(skipped)}); "
                         f"upload {', '.join(sorted(IMAGE_SUFFIXES))} files that open in an image viewer")
    return Dataset(examples, skipped, instance_prompt, class_prompt)


def _describe_rejected(skipped: list[dict], shown: int = 10) -> str:
    # One line, however many files: the first few by name, then a count.
    if not skipped:
        return "the folder is empty"
    listed = "; ".join(f"{s['path']}: {s['reason']}" for s in skipped[:shown])
    return listed + (f"; and {len(skipped) - shown} more" if len(skipped) > shown else "")


def _read_dataset_info(folder: Path) -> dict:
    found = sorted(folder.rglob(DATASET_INFO))
    if not found:
        return {}
    try:
        info = json.loads(decode_text(found[0].read_bytes(), DATASET_INFO))
    except json.JSONDecodeError as error:
        raise InputError(f"{DATASET_INFO} is not valid JSON: {error}") from error
    return info if isinstance(info, dict) else {}


def image_problem(path: Path) -> str | None:
    """Why `path` cannot be used as a training image, or None when it decodes fine.

    The pixel count and shape are read from the header before anything is decoded, so a small file
    that claims a huge image (a decompression bomb) or a 40000x1 strip costs nothing. A file that
    passes is then decoded in full (JPEGs at 1/8 scale, which still reads every byte of the scan),
    so "decodes" here means "trains".
    """
    if path.stat().st_size == 0:
        return "empty file"
    limit = f"the limit is {MAX_PIXELS // 1_000_000} megapixels"
    try:
        width, height = display_size(path)
        if width * height > MAX_PIXELS:
            return f"too large ({width}x{height} pixels; {limit})"
        if max(width, height) / min(width, height) > MAX_IMAGE_ASPECT:
            return (f"degenerate shape ({width}x{height} pixels: aspect ratio beyond {MAX_IMAGE_ASPECT:g}:1, "
                    "a strip rather than a photo)")
        load_rgb(path, at_least=(1, 1))
    except Image.DecompressionBombError:  # so large that Pillow refuses even to open it
        return f"too large (a decompression bomb; {limit})"
    except UnidentifiedImageError:
        return "not a decodable image (unknown format or not an image)"
    except (OSError, SyntaxError, ValueError, EOFError, RuntimeError) as error:  # pillow-heif raises RuntimeError
        return f"corrupt image ({error})"
    return None


def _open(path: str | Path) -> Image.Image:
    with warnings.catch_warnings():
        # Pillow warns from 89 megapixels; our own, lower limit is checked by `image_problem`.
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        return Image.open(path)


def display_size(path: str | Path) -> tuple[int, int]:
    """(width, height) of the image as a viewer shows it (EXIF rotation applied), from the header only."""
    with _open(path) as image:
        width, height = image.size
        if image.getexif().get(ExifTags.Base.Orientation) in _TRANSPOSED_ORIENTATIONS:
            return height, width
        return width, height


def load_rgb(path: str | Path, at_least: tuple[int, int] | None = None) -> Image.Image:
    """Decodes an image as 8-bit RGB: EXIF orientation applied, transparency over white, 16-bit scaled.

    With `at_least` (width, height as displayed), the image may come back smaller than stored, but
    never smaller than that in either side: JPEGs decode straight at 1/2, 1/4 or 1/8 scale (libjpeg's
    DCT scaling, Pillow's draft mode) and other formats are box-reduced by a whole factor right after
    decoding, so a 48-megapixel photo never exists at full size in more than one transient copy.
    """
    with _open(path) as image:
        transposed = image.getexif().get(ExifTags.Base.Orientation) in _TRANSPOSED_ORIENTATIONS
        if at_least is not None:
            stored_min = at_least[::-1] if transposed else at_least
            if image.format == "JPEG":
                image.draft("RGB", stored_min)
            image.load()
            factor = min(image.width // stored_min[0], image.height // stored_min[1])
            if factor >= 2 and image.mode in ("RGB", "L"):
                image = image.reduce(factor)
        image = ImageOps.exif_transpose(image)
        if image.mode in ("I;16", "I;16B", "I;16L", "I"):
            # Pillow's convert clips 16-bit values at 255; scale them instead.
            values = np.asarray(image, dtype=np.float64)
            image = Image.fromarray(np.clip(values / 257.0, 0, 255).astype(np.uint8), mode="L")
        if image.mode == "P" and "transparency" in image.info or image.mode in ("LA", "PA"):
            image = image.convert("RGBA")
        if image.mode == "RGBA":
            background = Image.new("RGBA", image.size, (255, 255, 255, 255))
            image = Image.alpha_composite(background, image)
        return image.convert("RGB")
