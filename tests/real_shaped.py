"""Real-shaped single-file checkpoints for the tests: SD 1.x, SD 2.x and SDXL architectures, random
weights, CLIP's real vocabulary size (49,408), written in the original single-file layout in fp16.

Nothing smaller is a faithful single file (diffusers maps keys by the real architectures), so the
files are large (SD 1.x ~2.1 GB, SD 2.x ~2.6 GB, SDXL ~6.9 GB): they are built once and kept under
a cache folder keyed by `VERSION` (`SDFT_TEST_CACHE`, default `<tmp>/sdft-test-cache`), reused by
later runs. Each part is built in fp16 and written out before the next is built, so building one
holds at most one part in memory (SDXL's UNet, ~5 GB).
"""

from __future__ import annotations

import json
import os
import struct
import tempfile
from pathlib import Path

import torch

from ldm_layout import clip_to_ldm, open_clip_to_ldm, unet_to_ldm, vae_to_ldm

VERSION = "v1"
CONFIGS = Path(__file__).resolve().parents[1] / "job" / "model_configs"
SAFETENSORS_DTYPE = {torch.float16: "F16", torch.float32: "F32"}


def cache_dir() -> Path:
    root = Path(os.environ.get("SDFT_TEST_CACHE", Path(tempfile.gettempdir()) / "sdft-test-cache"))
    folder = root / f"real-shaped-{VERSION}"
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def _config(family: str, part: str) -> dict:
    return {k: v for k, v in json.loads((CONFIGS / family / part / "config.json").read_text()).items() if not k.startswith("_")}


def _parts(family: str):
    """Yields, one at a time, each part's tensors in the original layout (built in fp16, seeded)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    def build(seed, make):
        torch.manual_seed(seed)
        previous = torch.get_default_dtype()
        torch.set_default_dtype(torch.float16)
        try:
            return make()
        finally:
            torch.set_default_dtype(previous)

    def text_config(part):
        config = _config(family, part)
        config.pop("architectures", None)
        return CLIPTextConfig(**config)

    unet_config = _config(family, "unet")
    unet = build(1, lambda: UNet2DConditionModel(**unet_config))
    yield unet_to_ldm(unet.state_dict(), unet_config)
    del unet
    vae = build(2, lambda: AutoencoderKL(**_config(family, "vae")))
    yield vae_to_ldm(vae.state_dict())
    del vae
    if family == "sd1":
        encoder = build(3, lambda: CLIPTextModel(text_config("text_encoder")))
        yield clip_to_ldm(encoder.state_dict(), "cond_stage_model.transformer.")
    elif family == "sd2":
        encoder = build(3, lambda: CLIPTextModel(text_config("text_encoder")))
        yield open_clip_to_ldm(encoder.state_dict(), "cond_stage_model.model.", 1024, extra_layer=True)
    else:
        encoder = build(3, lambda: CLIPTextModel(text_config("text_encoder")))
        yield clip_to_ldm(encoder.state_dict(), "conditioner.embedders.0.transformer.")
        del encoder
        encoder = build(4, lambda: CLIPTextModelWithProjection(text_config("text_encoder_2")))
        yield open_clip_to_ldm(encoder.state_dict(), "conditioner.embedders.1.model.", 1280)
    del encoder


def write_streamed(parts, path: Path, metadata: dict[str, str]) -> None:
    """Writes a safetensors file part by part (the format: u64 header size, JSON header, raw data)."""
    header, offset = {}, 0
    data_path = path.with_name(path.name + ".data")
    with data_path.open("wb") as data:
        for tensors in parts:
            for name, tensor in tensors.items():
                raw = tensor.detach().to(torch.float16).contiguous().numpy().tobytes()
                header[name] = {"dtype": "F16", "shape": list(tensor.shape), "data_offsets": [offset, offset + len(raw)]}
                data.write(raw)
                offset += len(raw)
            tensors.clear()
    header["__metadata__"] = metadata
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)
    partial = path.with_name(path.name + ".partial")
    with partial.open("wb") as out, data_path.open("rb") as data:
        out.write(struct.pack("<Q", len(encoded)))
        out.write(encoded)
        while chunk := data.read(64 << 20):
            out.write(chunk)
    data_path.unlink()
    os.replace(partial, path)


def real_shaped_file(family: str, name: str | None = None, metadata: dict[str, str] | None = None) -> Path:
    """The cached single file of `family` (`sd1`, `sd2`, `sdxl`), built on first use.

    `name` and `metadata` give files of the same weights with different headers (SD 2 base / 768-v).
    """
    path = cache_dir() / f"{name or family}.safetensors"
    if not path.exists():
        write_streamed(_parts(family), path, metadata or {})
    return path


def with_metadata(source: Path, name: str, metadata: dict[str, str]) -> Path:
    """A copy of `source` under `name` whose header metadata is `metadata` (same tensors, no rebuild)."""
    path = cache_dir() / f"{name}.safetensors"
    if path.exists():
        return path
    with source.open("rb") as handle:
        size = struct.unpack("<Q", handle.read(8))[0]
        header = json.loads(handle.read(size))
        header["__metadata__"] = metadata
        encoded = json.dumps(header, separators=(",", ":")).encode()
        encoded += b" " * (-len(encoded) % 8)
        partial = path.with_name(path.name + ".partial")
        with partial.open("wb") as out:
            out.write(struct.pack("<Q", len(encoded)))
            out.write(encoded)
            while chunk := handle.read(64 << 20):
                out.write(chunk)
    os.replace(partial, path)
    return path
