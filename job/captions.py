"""Captions as people write them: which file captions which image, how its bytes become text, and
what the text encoder will not see.

- Pairing: an image's caption is the file with the same stem, in the same folder, ending in `.txt`
  or `.caption` (kohya's convention), compared case-insensitively: `IMG_0001.JPG` is captioned by
  `IMG_0001.TXT`. When both exist, `.txt` wins. A caption file that pairs with no file at all is
  warned about (`input.caption_orphaned`): it is usually a renamed or missing image.
- Text: UTF-8 with or without a byte-order mark, or UTF-16 with a BOM (Notepad's "Unicode"); any
  line endings. Anything else (cp1252 from an old editor, say) is refused with the file and the
  first offending byte, because guessing an encoding trains on mojibake without a word. Runs of
  whitespace (line breaks included) become one space.
- Length: CLIP-style text encoders see `model_max_length` tokens (77, start and end tokens
  included); `find_truncated` says which texts lose tokens, how many and which words.
"""

import codecs
from pathlib import Path

import structlog

from job.errors import InputError

log = structlog.get_logger()

CAPTION_SUFFIXES = (".txt", ".caption")  # in order of preference when both exist


def decode_text(data: bytes, name: str) -> str:
    """`data` as text: UTF-8 (an optional BOM dropped) or UTF-16 with a BOM.

    Raises `InputError` naming `name`, the offending byte and its offset when it is neither.
    """
    if data.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        try:
            return data.decode("utf-16")  # the BOM says which byte order, and is dropped
        except UnicodeDecodeError as error:
            raise InputError(f"{name} starts with a UTF-16 byte-order mark but is not UTF-16 text "
                             f"({error.reason} at byte {error.start}); save it as UTF-8") from error
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        byte = data[error.start]
        raise InputError(
            f"{name} is not UTF-8 text: byte 0x{byte:02X} at offset {error.start} "
            f"(…{data[max(0, error.start - 12):error.start + 4]!r}…) is not valid UTF-8, probably an "
            "older encoding such as Windows-1252; save the file as UTF-8 (or UTF-16 with a BOM)"
        ) from error


def read_caption(path: Path, source: str) -> str:
    """The caption in `path` (named `source` in errors), whitespace collapsed to single spaces."""
    return " ".join(decode_text(path.read_bytes(), f"caption {source}").split())


def is_caption_file(path: Path) -> bool:
    return path.suffix.lower() in CAPTION_SUFFIXES


def caption_files(files: list[Path]) -> dict[tuple[Path, str], Path]:
    """Caption files by (folder, lower-case stem); `.txt` is preferred over `.caption` for one stem."""
    found: dict[tuple[Path, str], Path] = {}
    rank = {suffix: i for i, suffix in enumerate(CAPTION_SUFFIXES)}
    for path in sorted(files):
        if not is_caption_file(path):
            continue
        key = (path.parent, path.stem.lower())
        if key not in found or rank[path.suffix.lower()] < rank[found[key].suffix.lower()]:
            found[key] = path
    return found


def caption_for(image: Path, captions: dict[tuple[Path, str], Path]) -> Path | None:
    """The caption file of `image` (same folder, same stem in any case), or None."""
    return captions.get((image.parent, image.stem.lower()))


def warn_orphans(files: list[Path], folder: Path) -> list[str]:
    """Warns about every caption file whose stem no other file has; returns their relative paths."""
    stems = {(p.parent, p.stem.lower()) for p in files if not is_caption_file(p)}
    paired = caption_files(files)
    orphans = []
    for path in sorted(files):
        if not is_caption_file(path):
            continue
        source = path.relative_to(folder).as_posix()
        key = (path.parent, path.stem.lower())
        if key not in stems:
            log.warning("input.caption_orphaned", path=source,
                        reason=f"no image named {path.stem}.* beside it; the caption is not used")
            orphans.append(source)
        elif paired[key] != path:
            log.warning("input.caption_orphaned", path=source,
                        reason=f"{paired[key].name} captions the same image and is used instead")
            orphans.append(source)
    return orphans


def overflow(tokenizer, text: str) -> tuple[int, str] | None:
    """(token count, the words cut off) when `text` is longer than `tokenizer.model_max_length`, else None.

    Counts include the start and end tokens, as the encoder sees them; the cut-off words are the
    decoded tokens past the limit (the last kept position holds the end token).
    """
    limit = tokenizer.model_max_length
    ids = tokenizer(text, truncation=False, verbose=False).input_ids
    if len(ids) <= limit:
        return None
    dropped = tokenizer.decode(ids[limit - 1 : -1], skip_special_tokens=True).strip()
    return len(ids), dropped


def find_truncated(tokenizer, texts: dict[str, str]) -> set[str]:
    """Warns (`caption.truncated`) for each text the encoder will see cut; returns those texts.

    `texts` maps each text to the name it is reported under (a caption file, a setting).
    """
    truncated = set()
    for text, name in texts.items():
        cut = overflow(tokenizer, text)
        if cut is None:
            continue
        tokens, dropped = cut
        log.warning("caption.truncated", path=name, tokens=tokens, limit=tokenizer.model_max_length, dropped=dropped,
                    reason=f"{name}: {tokens} tokens but the text encoder reads {tokenizer.model_max_length}; "
                           f"it trains without {dropped!r}")
        truncated.add(text)
    return truncated
