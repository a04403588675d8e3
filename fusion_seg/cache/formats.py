"""Resident formats: how a resident cache tier (resident.py) holds each view's feature maps in memory.

Chosen when the store is loaded (``train-decoder --resident-dtype``), whatever the store's own dtype, so
a lossless float16 store can be held in a quarter of its size without extracting it again:

========  =====  ==========================================================================================
format    bits   a map of C channels
========  =====  ==========================================================================================
float16   16     the stored 16-bit values (a bfloat16 store stays bfloat16): lossless
uint8     8      ``round((x - lo) / s)``, ``s = (hi - lo) / 255``, ``lo`` and ``hi`` the channel's minimum and
                 maximum over the view's valid cells (per view and channel); a uint8 store is held as stored
                 (its own codes and scales, no second rounding)
float8    8      e4m3 (``torch.float8_e4m3fn``) of ``x / s``, ``s = max|x| / 448`` (e4m3's largest value) over
                 the view's valid cells (per view and channel)
int4      4      ``floor((x - lo) / s + u)``, ``s = (hi - lo) / 15``, ``lo`` and ``hi`` the channel's minimum and
                 maximum over the valid cells of *every* view held (per channel, computed from the store by
                 a scan before packing: :func:`channel_ranges`), ``u`` uniform in [0, 1): stochastic rounding,
                 so that the mean of a value over draws is the value itself (round-to-nearest would be
                 biased wherever values crowd one side of a step, as post-ReLU maps do near 0); two channels
                 a byte (channel 2i in the low nibble, 2i+1 in the high one)
========  =====  ==========================================================================================

Scales and offsets are float32: uint8 and float8 keep theirs with each view (4 or 8 bytes a channel and
view: 8.01-8.15 bits a value for ResNet-50 maps), int4 keeps one scale and offset a channel for the whole
store, so that a view costs 4 bits a value and nothing more (per-view ranges would add 0.01-0.15 bits: the
issue's goal is at most 4); its steps are then those of the store's range, coarser for a view whose own
range is narrower. Zeros stay zeros where ``lo`` is 0, as it is for most channels of post-ReLU maps. The
draws of ``u`` come from a generator seeded by ``(seed, view, map)``, so a view is quantised the same in
every tier, process and run of the same seed.

Decoding happens per batch, on the device, on the cells a batch's crop cut: :func:`decode` turns a
batch of codes (and its views' scales and offsets) into float32 maps. Nothing decodes the whole store.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from fusion_seg.errors import UserError

# The formats, most precise first: the order in which --resident-dtype auto tries them.
FORMATS = ("float16", "uint8", "float8", "int4")
BITS = {"float16": 16, "uint8": 8, "float8": 8, "int4": 4}
FLOAT8 = torch.float8_e4m3fn
FLOAT8_MAX = float(torch.finfo(FLOAT8).max)  # 448
_FLOAT8_VALUES = torch.arange(256, dtype=torch.uint8).view(FLOAT8).float()  # each e4m3 code's float32 value


def formats_for(stored: str) -> tuple[str, ...]:
    """The formats a store of dtype ``stored`` can be held in, most precise first: float16 only for 16-bit
    stores (a uint8 store holds no more than 8 bits a value)."""
    return FORMATS if stored in ("float16", "bfloat16") else FORMATS[1:]


def check_format(fmt: str, stored: str, store: str = "the store") -> None:
    """Refuse a format the store cannot be held in (float16 from a uint8 store), naming the ones it can."""
    if fmt not in formats_for(stored):
        raise UserError(f"--resident-dtype {fmt}: {store} is stored as {stored}, which holds no more than 8 bits a "
                        f"value; choose one of {', '.join(formats_for(stored))}, or auto.")


def held_as_stored(fmt: str, stored: str) -> bool:
    """Whether views are held as the store holds them (its codes and scales): no requantisation at load."""
    return (fmt == "float16" and stored in ("float16", "bfloat16")) or (fmt == "uint8" and stored == "uint8")


def data_dtype(fmt: str, stored: str) -> torch.dtype:
    if fmt == "float16":
        return torch.bfloat16 if stored == "bfloat16" else torch.float16
    return {"uint8": torch.uint8, "float8": FLOAT8, "int4": torch.uint8}[fmt]


def data_channels(fmt: str, channels: int) -> int:
    """Channels of the held array: int4 packs two channels a byte."""
    return -(-channels // 2) if fmt == "int4" else channels


def has_offset(fmt: str, stored: str) -> bool:
    return fmt == "int4" or (fmt == "uint8" and stored != "uint8")


def has_scale(fmt: str, stored: str) -> bool:
    return fmt in ("uint8", "float8", "int4")


def ranges_per_store(fmt: str) -> bool:
    """Whether a format's scales and offsets are one a channel for the whole store (int4), not one a view."""
    return fmt == "int4"


def side_bytes(fmt: str, stored: str, channels: int) -> int:
    """Bytes of the float32 scales and offsets of one map of ``channels`` channels (one view's, or the store's)."""
    return 4 * channels * (int(has_scale(fmt, stored)) + int(has_offset(fmt, stored)))


def view_bytes(fmt: str, stored: str, shapes) -> int:
    """Bytes one view's maps of ``shapes`` (``[(C, h, w), ...]``) take in format ``fmt``: the codes, and the
    view's own scales and offsets (none for int4: see :func:`store_bytes`). Labels are not counted here
    (resident.resident_bytes adds them)."""
    total = 0
    for c, h, w in shapes:
        total += math.ceil(c * h * w * BITS[fmt] / 8)
        total += 0 if ranges_per_store(fmt) else side_bytes(fmt, stored, c)
    return total


def store_bytes(fmt: str, stored: str, shapes) -> int:
    """Bytes held once for all views in format ``fmt``: int4's scales and offsets, a channel each."""
    return sum(side_bytes(fmt, stored, c) for c, _h, _w in shapes) if ranges_per_store(fmt) else 0


def channel_ranges(array: np.ndarray, stored: str, scale: np.ndarray | None,
                   cells: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """One stored map's per-channel minimum and maximum (float32 ``(C,)`` each) over its valid ``cells``:
    what int4's ranges are taken over, view by view (the store's range is their envelope)."""
    valid = _valid(torch.from_numpy(_decoded(array, stored, scale)), cells)
    return valid.amin(dim=1), valid.amax(dim=1)


def scale_and_offset(fmt: str, lo: torch.Tensor, hi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8's or int4's per-channel step and offset for values in ``[lo, hi]``: ``(hi - lo) / levels`` (1 where
    a channel is constant, so that its codes decode to ``lo``) and ``lo``."""
    s = (hi - lo) / (255 if fmt == "uint8" else 15)
    return torch.where(s > 0, s, torch.ones_like(s)), lo


def _valid(x: torch.Tensor, cells: tuple[int, int]) -> torch.Tensor:
    """A map's valid cells, ``(C, h*w)``."""
    return x[:, :max(1, cells[0]), :max(1, cells[1])].reshape(x.shape[0], -1)


def encode(fmt: str, stored: str, array: np.ndarray, scale: np.ndarray | None, cells: tuple[int, int],
           seed: tuple[int, ...], ranges: tuple[torch.Tensor, torch.Tensor] | None = None,
           ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """One stored map ``array`` (``(C, h, w)`` in the store's dtype; ``scale``: a uint8 store's) as
    ``(codes, scale, offset)`` of ``fmt``: codes ``(C', h, w)``, scale and offset ``(C,)`` float32 or None.

    ``cells`` is the (h, w) of its valid cells (a view's statistics are taken there); ``seed`` seeds int4's
    draws; ``ranges`` is int4's ``(lo, hi)`` per channel over the whole store (required for int4).
    """
    if held_as_stored(fmt, stored):
        codes = _stored_tensor(array, stored)
        return codes, (torch.from_numpy(np.asarray(scale, dtype=np.float32)) if scale is not None else None), None
    x = torch.from_numpy(_decoded(array, stored, scale))  # float32 (C, h, w)
    if fmt == "float8":
        s = _valid(x, cells).abs().amax(dim=1) / FLOAT8_MAX
        s = torch.where(s > 0, s, torch.ones_like(s))
        codes = (x / s[:, None, None]).clamp(-FLOAT8_MAX, FLOAT8_MAX).to(FLOAT8)
        return codes, s, None
    if fmt == "int4":
        if ranges is None:
            raise ValueError("int4 is quantised over the store's per-channel ranges: pass ranges=channel_ranges(...)")
        lo, hi = ranges
    else:
        valid = _valid(x, cells)
        lo, hi = valid.amin(dim=1), valid.amax(dim=1)
    s, lo = scale_and_offset(fmt, lo, hi)
    q = (x - lo[:, None, None]) / s[:, None, None]
    if fmt == "uint8":
        return q.round().clamp(0, 255).to(torch.uint8), s, lo
    g = torch.Generator().manual_seed(int(np.random.SeedSequence(list(seed)).generate_state(1)[0]))
    q = torch.floor(q + torch.rand(q.shape, generator=g)).clamp(0, 15).to(torch.uint8)
    if q.shape[0] % 2:  # an odd channel count: a zero channel makes the pairs
        q = torch.cat([q, torch.zeros_like(q[:1])])
    return q[0::2] | (q[1::2] << 4), s, lo


def decode(fmt: str, codes: torch.Tensor, scale: torch.Tensor | None, offset: torch.Tensor | None,
           channels: int) -> torch.Tensor:
    """A batch of codes ``(B, C', h, w)`` with its views' ``scale`` and ``offset`` (``(B, C)``) as float32
    maps ``(B, C, h, w)``, on the codes' device."""
    if fmt == "int4":
        pairs = torch.stack([codes & 0x0F, codes >> 4], dim=2)  # (B, C', 2, h, w): channels 2i, 2i+1
        codes = pairs.reshape(codes.shape[0], -1, *codes.shape[2:])[:, :channels]
    x = codes.float()
    if scale is not None:
        x = x * scale[:, :, None, None]
    if offset is not None:
        x = x + offset[:, :, None, None]
    return x


def decode_into(fmt: str, out: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor | None,
                offset: torch.Tensor | None) -> None:
    """One view's codes ``(C', h, w)`` decoded into the float32 ``out`` ``(C, h, w)`` in place: the operations
    of :func:`decode` (convert, times the scale, plus the offset), so the same values, without temporaries
    of the batch's size (resident.ResidentViews cuts a CPU's batches this way)."""
    c = out.shape[0]
    if fmt == "int4":  # channel 2i in the low nibble of byte i, 2i+1 in the high one
        out[0::2].copy_(codes[:-(-c // 2)] & 0x0F)
        out[1::2].copy_(codes[:c // 2] >> 4)
    elif codes.dtype == FLOAT8 and codes.device.type == "cpu":  # a table lookup: CPUs convert e4m3 in software
        out.copy_(_FLOAT8_VALUES.index_select(0, codes.view(torch.uint8).reshape(-1).int()).view(codes.shape))
    else:
        out.copy_(codes)
    if scale is not None:
        out.mul_(scale[:, None, None])
    if offset is not None:
        out.add_(offset[:, None, None])


def _stored_tensor(array: np.ndarray, stored: str) -> torch.Tensor:
    """A stored map as a tensor of its own dtype (bfloat16 is kept as its bit pattern)."""
    if stored == "bfloat16":
        return torch.from_numpy(np.ascontiguousarray(array).view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(np.ascontiguousarray(array))


def _decoded(array: np.ndarray, stored: str, scale: np.ndarray | None) -> np.ndarray:
    """A stored map as float32, as the stream tier reads it (cache/codecs.py)."""
    from fusion_seg.cache import codecs

    return np.ascontiguousarray(codecs.decode(array, stored, scale), dtype=np.float32)
