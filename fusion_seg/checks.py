"""Range checks of numeric settings, shared by the command line and the library entry points.

The CLI checks its options at parse time (the option types of cli/params.py), and ``extract()`` and
``TrainConfig`` check the same values for callers that do not go through it (recipes,
scripts), so a bad value is refused before a store or run directory is made.

Each ``*_problem`` function returns what is wrong with a value and how to fix it (``None``
when it is fine); :func:`require` raises that as a :class:`UserError` naming the option.
Torch-free: ``fusion-seg --help`` imports it.
"""
from __future__ import annotations

import math

import numbers

from fusion_seg.errors import UserError

FEATURE_CROP_ALIGN = 32  # a feature-space crop is cut at the coarsest stride (cache.reader.ALIGN)
STRIDES = (2, 4, 8, 16, 32)  # the strides a feature map may have
CACHE_MODES = ("auto", "device", "ram", "stream")  # train-decoder --cache-mode (resident.py)
RESIDENT_DTYPES = ("auto", "float16", "uint8", "float8", "int4")  # train-decoder --resident-dtype (formats.py)
# --precision of extract, train-decoder, evaluate and predict (device.py): auto is bf16 autocast on CUDA, fp32
# elsewhere.
PRECISIONS = ("auto", "fp32", "bf16")
# --backend of predict and evaluate: a checkpoint in torch, or a model `fusion-seg export` wrote in ONNX Runtime.
BACKENDS = ("torch", "onnxruntime")


def _is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


MAX_SEED = 2**32 - 1  # seeds go to numpy's and torch's generators (torch's overflows past 2**63 - 1)


def int_problem(value, minimum: int, maximum: int | None = None) -> str | None:
    if not _is_int(value) or value < minimum or (maximum is not None and value > maximum):
        return f"must be an integer >= {minimum}" + (f" and <= {maximum}" if maximum is not None else "")
    return None


def seed_problem(value) -> str | None:
    """A seed: an integer in 0..:data:`MAX_SEED`."""
    return int_problem(value, 0, MAX_SEED)


def non_negative_problem(value) -> str | None:
    if not _is_number(value) or not value >= 0:
        return "must be a number >= 0"
    return None


def fraction_problem(value) -> str | None:
    """A fraction in (0, 1]."""
    if not _is_number(value) or not 0 < value <= 1:
        return "must be a number in (0, 1]"
    return None


def size_problem(hw, multiple: int = 1) -> str | None:
    """(H, W): two positive integers, each a multiple of ``multiple``."""
    try:
        parts = tuple(hw)
    except TypeError:
        parts = ()
    if len(parts) != 2 or not all(_is_int(p) and p > 0 for p in parts):
        return "must be a size HxW of two positive integers, e.g. 512x1024 (height x width)"
    if multiple > 1 and any(p % multiple for p in parts):
        up = "x".join(str(-(-p // multiple) * multiple) for p in parts)
        return (f"a feature-space crop must be a multiple of {multiple} (the coarsest feature stride) in both "
                f"dimensions, e.g. {up}")
    return None


def scale_range_problem(scale_range) -> str | None:
    """(low, high) with 0 < low <= high."""
    try:
        parts = tuple(scale_range)
    except TypeError:
        parts = ()
    if len(parts) != 2 or not all(_is_number(p) for p in parts):
        return "must be two numbers LOW HIGH, e.g. 0.5 2.0"
    low, high = parts
    if not 0 < low <= high:
        fix = f"{high} {low}" if 0 < high < low else "0.5 2.0"
        return f"must be LOW HIGH with 0 < LOW <= HIGH, e.g. {fix}"
    return None


def bounded_problem(value, low: float, high: float) -> str | None:
    """A number in [low, high] (a photometric amount: --brightness, --hue, --blur)."""
    if not _is_number(value) or not low <= value <= high:
        return f"must be a number from {low:g} to {high:g}"
    return None


def strides_problem(strides) -> str | None:
    """Feature strides: one or more of 2, 4, 8, 16, 32, ascending, each once."""
    allowed = ",".join(map(str, STRIDES))
    try:
        parts = tuple(strides) if not isinstance(strides, str) else None
    except TypeError:
        parts = None
    if parts is None:
        return f"must be a list of integers, e.g. {allowed}"
    if not parts:
        return f"must name at least one stride, e.g. {allowed}"
    bad = [p for p in parts if not _is_int(p) or p not in STRIDES]
    if bad:
        return f"{', '.join(map(str, bad))}: each stride must be a power of 2 from 2 to 32 ({allowed})"
    if list(parts) != sorted(set(parts)):
        return f"strides must be ascending and unique, e.g. {','.join(map(str, sorted(set(parts))))}"
    return None


def show(value, sep: str = ",") -> str:
    """A value as it is typed on the command line: 4,8,16 (``sep=","``), 48x64 (``"x"``), 0.5 2.0 (``" "``)."""
    if isinstance(value, (tuple, list)):
        return sep.join(map(str, value))
    return repr(value) if isinstance(value, str) else str(value)


def require_feature_crop(crop) -> None:
    """The one check of a feature-space crop (``--crop`` from a cache): None, or HxW with each side a multiple of
    :data:`FEATURE_CROP_ALIGN`. TrainConfig, the stream reader and the resident views all call it."""
    if crop is not None:
        require("--crop", crop, size_problem(crop, FEATURE_CROP_ALIGN), sep="x")


def require(option: str, value, problem: str | None, sep: str = ",") -> None:
    """Raise ``problem`` (from a ``*_problem`` function) as a UserError naming ``option``."""
    if problem:
        raise UserError(f"{option} {show(value, sep)}: {problem}.")


MAX_SCALE = 4.0  # a test-time scale beyond this is a typo (40 for 0.4), not an evaluation setting


def scales_problem(scales) -> str | None:
    """Why ``scales`` is not a usable list of test-time scale factors (None when it is)."""
    if not scales:
        return "give one or more scale factors, e.g. 0.75,1.0,1.25"
    for s in scales:
        if isinstance(s, bool) or not isinstance(s, (int, float)) or not math.isfinite(s) or not 0 < s <= MAX_SCALE:
            return f"each scale must be a number in (0, {MAX_SCALE:g}], got {s!r}"
    return None


def memory_problem(nbytes: int) -> str | None:
    """Why ``nbytes`` cannot be held in this machine's memory (``"447.0 GiB of memory, more than the 23.4 GiB
    this machine has"``, to follow "needs"), or None when they can.

    Compared with the physical memory (``os.sysconf``), not with what is free now: what is refused here
    cannot fit whatever else runs, so a caller that passes a lower bound of what it would allocate never
    refuses a setting that could work, and refuses a typo (``--crop 100000x100000``) before allocating.
    """
    import os

    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):  # not known on this platform: nothing to compare with
        return None
    if nbytes <= total:
        return None
    return f"{nbytes / 2**30:.1f} GiB of memory, more than the {total / 2**30:.1f} GiB this machine has"
