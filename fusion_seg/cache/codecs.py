"""How a feature map is stored: its dtype and its compression codec.

Storage dtypes (``--dtype``):

- ``float16``: lossless for what the training step sees (features are cast to fp16 anyway).
- ``bfloat16``: fp32's range, 8 mantissa bits; Zarr has no bf16 type, so its bit pattern is
  stored as ``uint16`` and decoded on read.
- ``uint8``: lossy, a quarter of fp32. Each view's channel ``c`` is stored as
  ``round(x / scale_c)`` with ``scale_c = max(x_c) / 255``, and the scales go in a side array.
  Exact for zeros, which are half or more of post-ReLU features; a map with negative values
  is refused (it is not a post-ReLU feature), since it would not survive the round trip.

Codecs (``--codec``) are Zarr's own v3 codecs (``zstd``, ``blosc-*``) or numcodecs' ``lz4``;
each is followed by a crc32c checksum, so a flipped bit is an error, never a wrong feature.
"""
from __future__ import annotations

import numpy as np

from fusion_seg.errors import CacheError, UserError

DTYPES = ("float16", "bfloat16", "uint8")
DEFAULT_DTYPE = "float16"

# Named presets for --codec; a store records the resolved dict.
CODECS = {
    "none": {"name": "none"},
    "zstd": {"name": "zstd", "level": 1},
    "blosc-zstd": {"name": "blosc", "cname": "zstd", "clevel": 3, "shuffle": "shuffle"},
    "blosc-lz4": {"name": "blosc", "cname": "lz4", "clevel": 5, "shuffle": "shuffle"},
    "lz4": {"name": "lz4", "acceleration": 1},
}
# From `fusion-seg bench` (BENCHMARKS.md): zstd-1 writes 2.1x faster than Blosc-zstd-3 (179 vs 84 MB/s
# of raw fp16 per thread), for a store 14% larger; compression competes with the encoder for the
# CPU during extraction, and a GPU outruns a Blosc-zstd-3 writer pool.
DEFAULT_CODEC = "zstd"


def check_dtype(dtype: str) -> str:
    if dtype not in DTYPES:
        raise UserError(f"unknown storage dtype {dtype!r}; choose one of {', '.join(DTYPES)}.")
    return dtype


def codec_spec(codec: str | dict) -> dict:
    """A preset name (``zstd``, ``blosc-zstd``, ...) or a stored codec dict -> the codec dict."""
    if isinstance(codec, dict):
        compressors(codec)  # validates
        return dict(codec)
    if codec not in CODECS:
        raise UserError(f"unknown codec {codec!r}; choose one of {', '.join(CODECS)}.")
    return dict(CODECS[codec])


def codec_label(codec: dict) -> str:
    """A short name for tables and `fusion-seg info`."""
    if codec["name"] == "blosc":
        return f"blosc-{codec['cname']}-{codec['clevel']}" + ("" if codec.get("shuffle") == "shuffle" else "-noshuffle")
    if codec["name"] == "zstd":
        return f"zstd-{codec['level']}"
    return codec["name"]


def compressors(codec: dict) -> list:
    """Zarr compressors for a codec dict, followed by the crc32c checksum."""
    from zarr.codecs import BloscCodec, Crc32cCodec, ZstdCodec  # here: `fusion-seg --help` lists the codecs only

    name = codec.get("name")
    if name == "none":
        return [Crc32cCodec()]
    if name == "zstd":
        return [ZstdCodec(level=int(codec["level"])), Crc32cCodec()]
    if name == "blosc":
        return [BloscCodec(cname=codec["cname"], clevel=int(codec["clevel"]), shuffle=codec["shuffle"]), Crc32cCodec()]
    if name == "lz4":
        import warnings

        try:
            from zarr.codecs.numcodecs import LZ4  # zarr >= 3.1.3
        except ImportError:
            from numcodecs.zarr3 import LZ4

        with warnings.catch_warnings():  # "numcodecs codecs are not in the Zarr v3 spec": known, and read back by zarr
            warnings.simplefilter("ignore")
            return [LZ4(acceleration=int(codec.get("acceleration", 1))), Crc32cCodec()]
    raise CacheError(f"unknown codec {codec!r} in store settings")


def array_dtype(dtype: str) -> str:
    """The Zarr array dtype that holds a storage dtype."""
    return {"float16": "float16", "bfloat16": "uint16", "uint8": "uint8"}[dtype]


def has_scales(dtype: str) -> bool:
    return dtype == "uint8"


def encode(x: np.ndarray, dtype: str) -> tuple[np.ndarray, np.ndarray | None]:
    """A (C, h, w) float map -> (stored array, per-channel scales or None)."""
    if dtype == "float16":
        return x.astype(np.float16, copy=False), None
    x32 = x.astype(np.float32, copy=False)
    if dtype == "bfloat16":
        bits = np.ascontiguousarray(x32).view(np.uint32)
        # round to nearest even, as torch does when casting fp32 to bf16
        rounded = bits + np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1))
        return (rounded >> np.uint32(16)).astype(np.uint16), None
    low = float(x32.min()) if x32.size else 0.0
    if low < 0:
        raise CacheError(f"--dtype uint8 stores post-ReLU features (>= 0), but a map has values down to {low:.4g}. "
                         "Use --dtype float16 or bfloat16 for this encoder.")
    scale = x32.reshape(x32.shape[0], -1).max(axis=1) / 255.0 if x32.size else np.zeros(x32.shape[0], np.float32)
    safe = np.where(scale > 0, scale, 1.0).astype(np.float32)
    q = np.rint(x32 / safe[:, None, None])
    return np.clip(q, 0, 255).astype(np.uint8), scale.astype(np.float32)


def decode(stored: np.ndarray, dtype: str, scale: np.ndarray | None = None) -> np.ndarray:
    """The stored array -> float16 (``float16`` stores) or float32 (the others)."""
    if dtype == "float16":
        return stored
    if dtype == "bfloat16":
        return (stored.astype(np.uint32) << np.uint32(16)).view(np.float32)
    return stored.astype(np.float32) * scale.astype(np.float32)[:, None, None]
