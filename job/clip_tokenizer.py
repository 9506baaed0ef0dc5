"""CLIP's BPE tokenizer, built offline: what a single-file checkpoint lacks.

A single `.safetensors` checkpoint holds the text encoders' weights but no tokenizer. SD 1.x, SD 2.x
and SDXL all tokenize with CLIP's byte-level BPE (49,408 tokens). Its merges ship in open_clip's
package data (`open_clip/bpe_simple_vocab_16e6.txt.gz`, from openai/CLIP); the vocabulary is built
from them exactly as CLIP's `SimpleTokenizer` does: the 256 byte symbols, the same with `</w>`, one
token per merge (the first 48,894), then `<|startoftext|>` and `<|endoftext|>`. open_clip is used as
data only: it is never imported (its import pulls in torchvision and timm).
"""

import gzip
from functools import lru_cache
from importlib.util import find_spec
from pathlib import Path

VOCAB_SIZE = 49408
MAX_LENGTH = 77
START, END = "<|startoftext|>", "<|endoftext|>"


def byte_symbols() -> list[str]:
    """Byte-level BPE's printable stand-ins for the 256 bytes, in CLIP's vocabulary order.

    CLIP's `bytes_to_unicode`: the printable Latin-1 bytes stand for themselves and come first (ids
    0…187, `!` is 0); the other bytes, in byte order, take the characters from U+0100 on.
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    return [chr(b) for b in printable] + [chr(256 + n) for n in range(len(others))]


def merges_file() -> Path:
    """open_clip's gzipped BPE merges file (raises ModuleNotFoundError if open-clip-torch is absent)."""
    spec = find_spec("open_clip")  # finds the package without running its __init__
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError("open-clip-torch is not installed: it ships CLIP's BPE merges")
    return Path(next(iter(spec.submodule_search_locations))) / "bpe_simple_vocab_16e6.txt.gz"


@lru_cache(maxsize=1)
def clip_vocab() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """(token → id, merges as pairs in rank order) of CLIP's tokenizer; len(vocab) == 49,408."""
    lines = gzip.decompress(merges_file().read_bytes()).decode("utf-8").split("\n")
    # Line 0 is a version header; CLIP keeps the first 49152 - 256 - 2 merges.
    merges = [tuple(line.split()) for line in lines[1 : VOCAB_SIZE - 256 * 2 - 2 + 1]]
    symbols = byte_symbols()
    tokens = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges] + [START, END]
    vocab = {token: index for index, token in enumerate(tokens)}
    assert len(vocab) == VOCAB_SIZE, len(vocab)
    return vocab, merges


def clip_tokenizer(pad_token: str = END):
    """A transformers `CLIPTokenizer` equal to openai/clip-vit-large-patch14's.

    `pad_token` is `<|endoftext|>` for SD 1.x's tokenizer and `!` (id 0) for the OpenCLIP encoders
    of SD 2.x and SDXL's second tokenizer, as in those models' tokenizer configs.
    """
    from transformers import CLIPTokenizer

    vocab, merges = clip_vocab()
    return CLIPTokenizer(vocab=dict(vocab), merges=list(merges), pad_token=pad_token, model_max_length=MAX_LENGTH)
