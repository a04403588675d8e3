"""Parameter types and parsing of the command line: sizes, lists, scales, KEY=VALUE pairs, and a command's
options under the names a recipe stage gives them (:func:`option_values`)."""
from __future__ import annotations

import json
from pathlib import Path

import click

from fusion_seg.checks import scale_range_problem, size_problem, strides_problem
from fusion_seg.errors import UserError


class HxW(click.ParamType):
    """``512x1024`` -> (512, 1024); a single number means a square. ``multiple``: each side a multiple of it."""

    name = "HxW"

    def __init__(self, multiple: int = 1):
        self.multiple = multiple

    def convert(self, value, param, ctx):
        if isinstance(value, tuple):
            parts = value
        else:
            try:
                parts = tuple(int(p) for p in str(value).lower().split("x"))
            except ValueError:
                self.fail(f"{value!r} is not a size like 512x1024 (height x width)", param, ctx)
            if len(parts) == 1:
                parts *= 2
        problem = size_problem(parts, self.multiple)
        if problem:
            self.fail(f"{value if isinstance(value, str) else 'x'.join(map(str, value))}: {problem}", param, ctx)
        return tuple(parts)


class HxWList(click.ParamType):
    """``360x480,720x960`` -> ((360, 480), (720, 960))."""

    name = "HxW,HxW,..."

    def convert(self, value, param, ctx):
        if isinstance(value, tuple):
            return value
        sizes = tuple(HxW().convert(s.strip(), param, ctx) for s in str(value).split(",") if s.strip())
        if not sizes:
            self.fail(f"{value!r}: give at least one size, e.g. 360x480,720x960", param, ctx)
        return sizes


class IntList(click.ParamType):
    """``3,4,1`` -> (3, 4, 1); ``minimum``: the least each entry may be."""

    name = "N,N,..."

    def __init__(self, minimum: int | None = None):
        self.minimum = minimum

    def convert(self, value, param, ctx):
        if isinstance(value, (list, tuple)):
            out = tuple(int(v) for v in value)
        else:
            try:
                out = tuple(int(v) for v in str(value).split(",") if v.strip())
            except ValueError:
                self.fail(f"{value!r} is not a comma-separated list of integers", param, ctx)
        if self.minimum is not None and (not out or min(out) < self.minimum):
            self.fail(f"{value!r}: give one or more integers, each >= {self.minimum}", param, ctx)
        return out


class Scales(click.ParamType):
    """``0.75,1.0,1.25`` -> (0.75, 1.0, 1.25): test-time scale factors, each > 0 and at most 4."""

    name = "S,S,..."

    def convert(self, value, param, ctx):
        from fusion_seg.checks import scales_problem

        if isinstance(value, (list, tuple)):
            out = tuple(value)
        else:
            try:
                out = tuple(float(v) for v in str(value).split(",") if v.strip())
            except ValueError:
                self.fail(f"{value!r} is not a comma-separated list of numbers, e.g. 0.75,1.0,1.25", param, ctx)
        problem = scales_problem(out)
        if problem:
            self.fail(f"{value!r}: {problem}", param, ctx)
        return out


class Strides(IntList):
    """Feature strides, ``4,8,16,32``: powers of 2 from 2 to 32, ascending, each once."""

    name = "S,S,..."

    def convert(self, value, param, ctx):
        strides = super().convert(value, param, ctx)
        problem = strides_problem(strides)
        if problem:
            self.fail(f"{value if isinstance(value, str) else ','.join(map(str, value))}: {problem}", param, ctx)
        return strides


class NameList(click.ParamType):
    """``linear,fpn`` -> ("linear", "fpn"), each one of ``choices``."""

    name = "NAME,NAME,..."

    def __init__(self, choices):
        self.choices = tuple(choices)

    def convert(self, value, param, ctx):
        if isinstance(value, tuple):
            return value
        names = tuple(v.strip() for v in str(value).split(",") if v.strip())
        unknown = [n for n in names if n not in self.choices]
        if unknown:
            self.fail(f"{', '.join(map(repr, unknown))} is not one of {', '.join(self.choices)}", param, ctx)
        if not names:
            self.fail(f"{value!r}: give one or more of {', '.join(self.choices)}, comma-separated", param, ctx)
        return names


def check_scale_range(ctx, param, value):
    """``--scale-range LOW HIGH``: 0 < LOW <= HIGH (a click callback, so the error names the option)."""
    problem = value is not None and scale_range_problem(value)
    if problem:
        raise click.BadParameter(f"{' '.join(map(str, value))}: {problem}", ctx=ctx, param=param)
    return value


def written_as(kind: str, *suffixes: str):
    """A click callback for an option that names a file written as ``kind`` (JSON, Markdown): a name whose
    suffix says another format (``plan.csv`` for JSON) is refused while the command line is read, before any
    work; ``suffixes`` are the suffixes of ``kind`` (the first is suggested). A name without a suffix is taken."""
    def check(ctx, param, value):
        suffix = Path(value).suffix.lower() if value else ""
        if suffix and suffix not in suffixes:
            raise click.BadParameter(f"{value}: the file is written as {kind}, but its suffix {suffix} says another "
                                     f"format; name it {Path(value).with_suffix(suffixes[0])}", ctx=ctx, param=param)
        return value
    return check


POSITIVE = click.FloatRange(min=0, min_open=True)


def parse_key_values(pairs) -> dict:
    """``("num_images=4", "size=[64,96]")`` -> ``{"num_images": 4, "size": [64, 96]}`` (values as JSON, else text)."""
    out = {}
    for item in pairs:
        if "=" not in item:
            raise UserError(f"{item!r}: expected KEY=VALUE")
        key, value = item.split("=", 1)
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def option_values(params: dict) -> dict:
    """A command's parsed options under the names a recipe stage gives them, from which the library's
    requests are built (fusion_seg/requests.py): ``--no-augment``/``--no-flip`` as ``augment``/``flip``,
    the ``--dataset-opt``/``--decoder-opt`` pairs as ``dataset_options``/``decoder_options``, and extract's
    ``--dask-workers`` as ``workers``."""
    values = dict(params)
    for flag in ("augment", "flip"):
        if f"no_{flag}" in values:
            values[flag] = not values.pop(f"no_{flag}")
    for kind in ("dataset", "decoder"):
        if f"{kind}_opt" in values:
            values[f"{kind}_options"] = parse_key_values(values.pop(f"{kind}_opt"))
    if "dask_workers" in values:
        values["workers"] = values.pop("dask_workers")
    return values
