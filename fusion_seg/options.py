"""Keyword options checked against the function that takes them: names, required ones, value types.

A recipe stage's keys, a dataset's ``--dataset-opt`` options and a decoder's ``--decoder-opt`` options
are keyword arguments of a library function or class. What each accepts is read from its signature
(:func:`parameters`: names, defaults, type hints, or the default's type where there is no hint), and
:func:`check_keys` lists what is wrong with a set of values, one message per problem, before the
function is called: an unknown name (with the closest known one), a missing required one, a value of
the wrong type (``num_images = "abc"``, ``streams = 4.5``). :func:`check_fields` does the same for the
fields of a request or config dataclass a Python caller builds (``Augment(crop="64x64")``), and holds
numpy numbers as Python's. Plain data, no torch: the command line checks its options with it at parse time.
"""
from __future__ import annotations

import dataclasses
import difflib
import inspect
import json
import numbers
import os
import types
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Any

EMPTY = inspect.Parameter.empty  # the default of a required option
SIZE_KEYS = ("crop", "size")  # sizes are (H, W): exactly two integers, wherever a signature says only "a list"


@dataclasses.dataclass(frozen=True)
class Option:
    """One key a function accepts: its type (a typing hint, or None: anything) and default (``EMPTY``: required)."""

    name: str
    hint: Any = None
    default: Any = None

    @property
    def required(self) -> bool:
        return self.default is EMPTY


def type_hints(obj) -> dict:
    """The evaluated type hints of a function, a dataclass's fields, or another class's ``__init__`` (not its
    class attributes, which are not its options)."""
    target = obj.__init__ if isinstance(obj, type) and not dataclasses.is_dataclass(obj) else obj
    try:
        return typing.get_type_hints(target)
    except Exception:  # an annotation that does not evaluate here: no type check for that object
        return {}


def parameters(fn, skip=(), rename=None, only=None, keyword_only: bool = False) -> dict[str, Option]:
    """The keyword parameters of ``fn`` (a function or a class; ``only``: those of them; ``keyword_only``:
    only those after ``*``) as options, typed by their annotations, else by their defaults."""
    hints = type_hints(fn)
    out = {}
    for name, p in inspect.signature(fn).parameters.items():
        if name in skip or p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) or (only is not None and name not in only):
            continue
        if keyword_only and p.kind is not p.KEYWORD_ONLY:
            continue
        hint = hints.get(name)
        if hint is None and p.default is not EMPTY and p.default is not None:
            hint = _hint_of(p.default)
        key = (rename or {}).get(name, name)
        out[key] = Option(key, size_hint(key, hint), p.default)
    return out


def _hint_of(value):
    """A type hint for an unannotated parameter, from its default value."""
    if isinstance(value, tuple) and value:
        kinds = {float if isinstance(v, float) else type(v) for v in value}
        if len(kinds) == 1:
            (kind,) = kinds
            return tuple[(kind,) * len(value)] if len(value) == 2 else tuple[kind, ...]
        return tuple
    return type(value)


def size_hint(key: str, hint):
    """``crop`` and ``size`` are (H, W) pairs whatever their annotation says."""
    if key in SIZE_KEYS and hint is not None:
        return tuple[int, int] | None
    return hint
def _union_args(hint):
    origin = typing.get_origin(hint)
    if origin is typing.Union or origin is types.UnionType:
        return [a for a in typing.get_args(hint) if a is not type(None)]
    return None


def accepts(value, hint) -> bool:
    """Whether a TOML value fits a type hint (None or an unknown hint: anything)."""
    if hint is None or hint is Any:
        return True
    union = _union_args(hint)
    if union is not None:
        if value is None:  # a Python caller's None for an optional value (TOML has no null)
            return type(None) in typing.get_args(hint)
        return any(accepts(value, a) for a in union)
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is bool:
        return isinstance(value, (bool, np_bool()))
    if hint is int:  # numbers.Integral: numpy's integers too (a size taken from an array's shape)
        return isinstance(value, numbers.Integral) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, numbers.Real) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    if hint is Path or (isinstance(hint, type) and issubclass(hint, Path)):
        return isinstance(value, (str, os.PathLike))
    if hint is dict or origin is dict:
        return isinstance(value, dict)
    if hint in (list, tuple) or origin in (list, tuple, Sequence) or hint is Sequence:
        if not isinstance(value, (list, tuple)):  # a TOML array, or a tuple from Python
            return False
        if origin is tuple and args and args[-1] is not Ellipsis:
            return len(value) == len(args) and all(accepts(v, a) for v, a in zip(value, args))
        return all(accepts(v, args[0]) for v in value) if args else True
    if hint is type(None):
        return False
    return True  # a type this checker does not know: leave it to the function


def describe(hint) -> str:
    """``tuple[int, int]`` -> "a list of 2 integers", for messages."""
    names = {bool: "true or false", int: "an integer", float: "a number", str: "a string", Path: "a path",
             dict: "a table"}
    plural = {bool: "booleans", int: "integers", float: "numbers", str: "strings", Path: "paths", dict: "tables"}
    union = _union_args(hint)
    if union is not None:
        if Path in union and str in union:
            union = [a for a in union if a is not str]
        return " or ".join(dict.fromkeys(describe(a) for a in union))
    if hint in names:
        return names[hint]
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint in (list, tuple) or origin in (list, tuple, Sequence) or hint is Sequence:
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(set(args)) == 1:
                return f"a list of {len(args)} {plural.get(args[0], 'values')}"
            return f"a list [{', '.join(describe(a) for a in args)}]"
        return f"a list of {plural.get(args[0], 'values')}" if args else "a list"
    return getattr(hint, "__name__", str(hint))


def unknown_key(key: str, allowed, what: str, owner: str | None = None) -> str:
    """``unknown key 'epoch' (did you mean 'epochs'?); allowed keys: ...``, or with ``owner``:
    ``decoder 'linear' has no option 'streams'; its options: ...``."""
    close = difflib.get_close_matches(key, list(allowed), n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    names = ", ".join(sorted(allowed)) or "none"
    if owner:
        return f"{owner} has no {what} {key!r}{hint}; its {what}s: {names}."
    return f"unknown {what} {key!r}{hint}; allowed {what}s: {names}."


def check_keys(options: dict, schema: dict[str, Option], what: str = "key", owner: str | None = None) -> list[str]:
    """Unknown keys, missing required keys and wrong value types of ``options`` against ``schema``."""
    errors = [unknown_key(k, schema, what, owner) for k in options if k not in schema]
    errors += [f"missing required {what} {name!r}{f' of {owner}' if owner else ''}." for name, opt in schema.items()
               if opt.required and name not in options]
    for key, value in options.items():
        opt = schema.get(key)
        if opt is not None and not accepts(value, opt.hint):
            errors.append(f"{key} = {show_value(value)} should be {describe(opt.hint)}.")
    return errors


def show_value(value) -> str:
    """A value as JSON, cut at 60 characters, for messages."""
    try:
        text = json.dumps(value)
    except (TypeError, ValueError):
        text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def keyword_errors(fn, options: dict, owner: str, *, skip=(), keyword_only: bool = False) -> list[str]:
    """What is wrong with ``options`` as keyword arguments of ``fn`` (a class or function; ``owner`` names it
    in the messages, e.g. "decoder 'fpn'"): unknown names and values of the wrong type. A function that
    takes ``**kwargs`` accepts any name, so only the types of the named ones are checked."""
    schema = parameters(fn, skip=skip, keyword_only=keyword_only)
    if any(p.kind is p.VAR_KEYWORD for p in inspect.signature(fn).parameters.values()):
        options = {k: v for k, v in options.items() if k in schema}
    return check_keys(options, schema, "option", owner)


def np_bool() -> type:
    """numpy's bool type when numpy is there (always, with fusion-seg), else bool."""
    try:
        import numpy
    except ImportError:
        return bool
    return numpy.bool_


def check_fields(obj, owner: str) -> None:
    """Refuse a request or config dataclass ``obj`` whose fields are not of their annotated types (a ``str`` where
    a size goes, a number where a name goes), one UserError listing each, with what to pass: what a caller of
    the Python API gets instead of an error deep inside (the command line's types are right by construction)."""
    from fusion_seg.errors import UserError

    hints = {name: _any_length(hint) for name, hint in type_hints(type(obj)).items()}
    problems = [f"{f.name}={show_value(getattr(obj, f.name))} should be {describe(hints[f.name])}"
                for f in dataclasses.fields(obj) if f.name in hints and not accepts(getattr(obj, f.name), hints[f.name])]
    if problems:
        raise UserError(f"{owner}: {'; '.join(problems)}.")
    for f in dataclasses.fields(obj):  # numpy's numbers as Python's: they go into JSON (specs, config.json)
        object.__setattr__(obj, f.name, plain(getattr(obj, f.name)))


def _any_length(hint):
    """``hint`` with its fixed-length tuples (``tuple[int, int]``) of any length: a size's length is a range check,
    made with the option's own message (``--crop 64: must be a size HxW ...``) where the request is used."""
    union = _union_args(hint)
    if union is not None:
        args = tuple(_any_length(a) for a in typing.get_args(hint))
        return typing.Union[args]
    args = typing.get_args(hint)
    if typing.get_origin(hint) is tuple and args and args[-1] is not Ellipsis and len(set(args)) == 1:
        return tuple[args[0], ...]
    return hint


def plain(value):
    """``value`` with numpy scalars (in lists, tuples and dicts too) as the Python numbers they are."""
    if isinstance(value, (list, tuple)):
        return type(value)(plain(v) for v in value)
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    if not isinstance(value, (bool, int, float, str)) and hasattr(value, "item") and hasattr(value, "dtype"):
        return value.item()
    return value
