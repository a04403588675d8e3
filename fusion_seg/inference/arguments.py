"""Checks of the Python API's arguments: what the command line's option types guarantee for ``predict``,
``evaluate`` and ``visualize`` (and what ``SegmentationModel`` needs), checked for a caller that passes them
directly, so that the library refuses what the CLI refuses instead of computing something wrong (``scales=(0,)``
gave an all-background mask).

Each function raises a one-line :class:`~fusion_seg.errors.UserError` that names the argument and says what to
pass, and returns the value in the form the code uses. The ranges are fusion_seg/checks.py's, as the CLI's are.
"""
from __future__ import annotations

import numbers
from pathlib import Path

import numpy as np

from fusion_seg.checks import BACKENDS, PRECISIONS, scales_problem, size_problem
from fusion_seg.errors import UserError, require_path


def flag(name: str, value) -> bool:
    """``value`` of the on/off argument ``name`` (``flip``, ``sliding_window``, ``progress``): a bool."""
    if not isinstance(value, (bool, np.bool_)):
        raise UserError(f"{name}={value!r}: pass True or False.")
    return bool(value)


def scales(value, option: str = "scales") -> tuple[float, ...]:
    """Test-time scale factors: a tuple (or list) of numbers in (0, 4] (:func:`fusion_seg.checks.scales_problem`).
    ``option`` names them in the range's message (``--scales`` where the command line has them too)."""
    if not isinstance(value, (tuple, list)):
        raise UserError(f"scales={value!r}: pass a tuple of scale factors, e.g. scales=(1.0,) for one plain pass "
                        "or scales=(0.75, 1.0, 1.25).")
    problem = scales_problem(value)
    if problem:
        raise UserError(f"{option} {tuple(value)!r}: {problem}.")
    return tuple(float(s) for s in value)


def out_size(value) -> tuple[int, int] | None:
    """The logits' size: None (the image's) or ``(height, width)``, two positive integers."""
    if value is None:
        return None
    if isinstance(value, str) or size_problem(value):
        raise UserError(f"out_size={value!r}: pass (height, width), two positive integers, e.g. out_size=(512, 1024), "
                        "or None for the image's own size.")
    return int(value[0]), int(value[1])


def path(name: str, value, what: str, *, optional: bool = False) -> Path | None:
    """A file or folder argument (``checkpoint``, ``inputs``, ``out``, ...): a str or Path (or None if ``optional``)."""
    if value is None and optional:
        return None
    require_path(name, value, what)
    return Path(value)


def text(name: str, value, example: str) -> str:
    """A name argument (``dataset``, ``split``, ``device``): a str, e.g. ``example``."""
    if not isinstance(value, str):
        raise UserError(f"{name}={value!r}: pass a name, e.g. {name}={example!r}.")
    return value


def options(name: str, value, example: str) -> dict:
    """A dict of keyword options (``dataset_options``), or None for none."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise UserError(f"{name}={value!r}: pass a dict of options, e.g. {name}={example}, or None.")
    return dict(value)


def positive(name: str, value) -> float:
    """A size or resolution (``panel_width``, ``dpi``): a finite number > 0."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0 < value < float("inf"):
        raise UserError(f"{name}={value!r}: pass a number > 0.")
    return float(value)


def choice(name: str, value, choices: tuple[str, ...]) -> str:
    """One of ``choices`` (``precision``, ``backend``)."""
    if value not in choices:
        raise UserError(f"{name}={value!r}: choose one of {', '.join(map(repr, choices))} (--{name}).")
    return value


def backend(value, checkpoint: Path, *, precision: str, weights) -> str:
    """``backend`` for ``checkpoint``: torch runs a checkpoint (.pt), onnxruntime a model ``fusion-seg export``
    wrote (.onnx), which holds its encoder's weights and runs in fp32; refused otherwise, naming the fix."""
    value, precision = choice("backend", value, BACKENDS), choice("precision", precision, PRECISIONS)
    exported = Path(checkpoint).suffix.lower() == ".onnx"
    if value == "torch" and exported:
        raise UserError(f"--checkpoint {checkpoint} is an exported ONNX model: pass --backend onnxruntime to run it, "
                        "or the .pt checkpoint it was exported from.")
    if value == "onnxruntime":
        if not exported:
            raise UserError(f"--backend onnxruntime runs an exported model, and --checkpoint {checkpoint} is not a "
                            f".onnx file: export it first (fusion-seg export --checkpoint {checkpoint} --out "
                            "model.onnx) and pass --checkpoint model.onnx.")
        if precision == "bf16":
            raise UserError("--precision bf16 runs with --backend torch only: an exported model runs in fp32 "
                            "(drop --precision, or use --backend torch with the .pt checkpoint).")
        if weights is not None:
            raise UserError(f"--weights {weights}: an exported model holds its encoder's weights; drop --weights.")
    return value
