"""One function per pipeline stage, taking plain keyword data (from a recipe or the CLI).

A stage's keys are the keyword arguments of the library function it calls, or of the builders of
the typed requests that function takes (requests.py), so what a stage accepts is read from those
functions (:func:`stage_schema`): the signatures of ``evaluate``, ``predict``, ``extract``'s plain
arguments and its requests' builders, ``train_online``'s requests' builders, and the fields of
``TrainConfig``. A recipe is checked against them, and its decoders are built (on the ``meta``
device: no memory, no weights) before any stage runs; see :func:`check_stage` and
:mod:`fusion_seg.pipeline.recipes`.
"""
from __future__ import annotations

import difflib
import inspect
import types
import typing
from collections.abc import Sequence
from dataclasses import MISSING, dataclass, fields
from pathlib import Path
from typing import Any

from fusion_seg.errors import UserError
from fusion_seg.pipeline import requests

KINDS = ("extract", "train", "evaluate", "predict")
DECODER_KEYS = ("streams", "preset", "widths", "modules", "blocks")  # reverse-hrnet's; others via decoder_options
# A train stage's keys besides TrainConfig's that the runner passes itself (the rest of the training
# function's keyword arguments are the stage's, or built from them: see trainer_keys).
_RUNNER_ARGS = ("cache", "out", "cfg", "val_cache", "resume", "progress")
# Keys whose values are files or folders; a relative one is resolved against the recipe's folder (recipes.py).
PATH_KEYS = ("root", "out", "weights", "cache", "val_cache", "init", "checkpoint", "input")
DATASET_PATH_OPTIONS = ("sbd",)  # dataset options that are paths (voc's SBD folder)
# Sizes are (H, W): exactly two integers, wherever a signature says only "a list".
_SIZE_KEYS = ("crop", "size")
_EMPTY = inspect.Parameter.empty


def train_config(options: dict):
    """A TrainConfig from flat options; decoder architecture keys go into ``decoder_config``."""
    from fusion_seg.training.config import TrainConfig

    options = dict(options)
    names = {f.name for f in fields(TrainConfig)}
    decoder_config = {k: options.pop(k) for k in DECODER_KEYS if options.get(k) is not None}
    decoder_config.update(options.pop("decoder_options", None) or {})
    unknown = {k for k, v in options.items() if v is not None} - names
    if unknown:
        raise UserError(f"unknown training option(s): {', '.join(sorted(unknown))}")
    kwargs = {k: v for k, v in options.items() if k in names and v is not None}
    if isinstance(kwargs.get("crop"), tuple):  # the command line's HxW; a recipe's and a checkpoint's: a list
        kwargs["crop"] = list(kwargs["crop"])
    kwargs["decoder_config"] = {**kwargs.get("decoder_config", {}), **decoder_config}
    return TrainConfig(**kwargs)  # which checks its ranges (UserError)


def trainer_keys(*, online: bool) -> tuple[str, ...]:
    """The plain keyword arguments of ``train_online`` or ``train_decoder`` that a train stage sets itself,
    besides TrainConfig's fields and online training's requests (requests.py): read from their signatures."""
    from fusion_seg.training.train import train_decoder, train_online

    fn = train_online if online else train_decoder
    built = requests.ONLINE_REQUESTS if online else {}
    return tuple(name for name, p in inspect.signature(fn).parameters.items()
                 if p.kind is p.KEYWORD_ONLY and name not in _RUNNER_ARGS and name not in built)


def run_stage(stage: dict, *, progress: bool = True) -> dict:
    stage = dict(stage)
    kind = stage.pop("kind")
    if kind == "extract":
        from fusion_seg.extract.local import extract

        r = extract(**requests.extract_arguments(stage), progress=progress)
        return {"store": r.store, "views": r.views_total, "written": r.views_written,
                "views_per_second": round(r.views_per_second, 3)}
    if kind == "train":
        from fusion_seg.training.train import train_decoder, train_online

        out, val_cache = stage.pop("out"), stage.pop("val_cache", None)
        resume = (Path(out) / "last.pt").exists()
        if stage.pop("online", False):
            # As on the command line: `crop` is the augmentation crop and `seed` seeds everything.
            options, images = requests.split_train_options(stage, online=True)
            extra = {k: options.pop(k) for k in trainer_keys(online=True) if k in options}
            r = train_online(out, train_config(options), **requests.online_arguments(images), val_cache=val_cache,
                             resume=resume, progress=progress, **extra)
        else:
            cache = stage.pop("cache")
            extra = {k: stage.pop(k) for k in trainer_keys(online=False) if k in stage}
            r = train_decoder(cache, out, train_config(stage), val_cache=val_cache, resume=resume, progress=progress,
                              **extra)
        return {"run_dir": r.run_dir, "steps": r.steps, "best_miou": r.best_miou,
                "final_loss": r.losses[-1] if r.losses else None, "seconds": round(r.seconds, 1)}
    if kind == "evaluate":
        from fusion_seg.evaluation.evaluate import evaluate

        r = evaluate(**stage, progress=progress)
        return {"miou": r["miou"], "pixel_acc": r["pixel_acc"], "out": r["out"]}
    if kind == "predict":
        from fusion_seg.inference.predict import predict

        stage["inputs"] = stage.pop("input")
        r = predict(**stage, progress=progress)
        return {"images": r["images"], "out": r["out"]}
    raise UserError(f"unknown stage kind {kind!r}")


# --------------------------------------------------------------------------- what a stage accepts
@dataclass(frozen=True)
class Option:
    """One key a stage accepts: its type (a typing hint, or None: anything) and default (``_EMPTY``: required)."""

    name: str
    hint: Any = None
    default: Any = None

    @property
    def required(self) -> bool:
        return self.default is _EMPTY


def _hints(obj) -> dict:
    try:
        return typing.get_type_hints(obj)
    except Exception:  # an annotation that does not evaluate here: no type check for that object
        return {}


def _parameters(fn, skip=(), rename=None, only=None) -> dict[str, Option]:
    """The keyword parameters of ``fn`` (``only``: those of them) as options (types from its annotations,
    else from its defaults)."""
    hints = _hints(fn)
    out = {}
    for name, p in inspect.signature(fn).parameters.items():
        if name in skip or p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) or (only is not None and name not in only):
            continue
        hint = hints.get(name)
        if hint is None and p.default is not _EMPTY and p.default is not None:
            hint = _hint_of(p.default)
        key = (rename or {}).get(name, name)
        out[key] = Option(key, _size_hint(key, hint), p.default)
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


def _size_hint(key: str, hint):
    if key in _SIZE_KEYS and hint is not None:
        return tuple[int, int] | None
    return hint


def _train_config_options(exclude=()) -> dict[str, Option]:
    from fusion_seg.training.config import TrainConfig

    hints = _hints(TrainConfig)
    out = {}
    for f in fields(TrainConfig):
        if f.name in exclude:
            continue
        required = f.default is MISSING and f.default_factory is MISSING
        default = _EMPTY if required else None if f.default is MISSING else f.default
        out[f.name] = Option(f.name, _size_hint(f.name, hints.get(f.name)), default)
    return out


def _request_options(builders, skip=()) -> dict[str, Option]:
    """The options of the requests' ``builders`` (requests.py): each builder's keyword parameters."""
    out: dict[str, Option] = {}
    for builder in builders:
        out.update({k: o for k, o in _parameters(builder).items() if k not in skip and k not in out})
    return out


def stage_schema(kind: str, *, online: bool = False) -> dict[str, Option]:
    """Every key a stage of ``kind`` accepts (besides ``kind``), read from the functions it calls."""
    if kind == "extract":
        from fusion_seg.extract.local import extract

        dataset, *others = requests.EXTRACT_REQUESTS.values()
        return {**_request_options([dataset]), **_parameters(extract, only=requests.EXTRACT_PLAIN),
                **_request_options(others)}
    if kind == "evaluate":
        from fusion_seg.evaluation.evaluate import evaluate

        return _parameters(evaluate, skip=("progress",))
    if kind == "predict":
        from fusion_seg.inference.predict import predict

        return _parameters(predict, skip=("progress",), rename={"inputs": "input"})
    if kind == "train":
        from fusion_seg.decoders import DECODERS
        from fusion_seg.training.train import train_decoder, train_online

        decoder_params = inspect.signature(DECODERS["reverse-hrnet"]).parameters
        hints = _hints(DECODERS["reverse-hrnet"].__init__)
        own = {"out": Option("out", str, _EMPTY), "online": Option("online", bool, False),
               "val_cache": Option("val_cache", str, None),
               "decoder_options": Option("decoder_options", dict, None)}
        own.update({k: Option(k, hints.get(k), None) for k in DECODER_KEYS if k in decoder_params})
        fn = train_online if online else train_decoder
        # The training function's own keyword arguments, less those the recipe runner fills in.
        passed = {k: v for k, v in _parameters(fn).items() if k in trainer_keys(online=online)}
        if online:
            # Online training's requests' options: `crop` is the augmentation crop (not TrainConfig's), `seed`
            # TrainConfig's, which seeds the requests too; cached views (`views`) do not exist online.
            built = _request_options(requests.ONLINE_REQUESTS.values(), skip=requests.SHARED_WITH_TRAINING)
            return {**_train_config_options(exclude=("crop", "views")), **built, **passed, **own}
        own["cache"] = Option("cache", str, _EMPTY)
        return {**_train_config_options(), **passed, **own}
    raise UserError(f"unknown stage kind {kind!r}; expected one of {', '.join(KINDS)}")


# --------------------------------------------------------------------------- value types
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
        return any(accepts(value, a) for a in union)
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint in (str, Path) or (isinstance(hint, type) and issubclass(hint, Path)):
        return isinstance(value, str)
    if hint is dict or origin is dict:
        return isinstance(value, dict)
    if hint in (list, tuple) or origin in (list, tuple, Sequence) or hint is Sequence:
        if not isinstance(value, list):
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


def _unknown(key: str, allowed, what: str, owner: str | None = None) -> str:
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
    errors = [_unknown(k, schema, what, owner) for k in options if k not in schema]
    errors += [f"missing required {what} {name!r}{f' of {owner}' if owner else ''}." for name, opt in schema.items()
               if opt.required and name not in options]
    for key, value in options.items():
        opt = schema.get(key)
        if opt is not None and not accepts(value, opt.hint):
            errors.append(f"{key} = {_show(value)} should be {describe(opt.hint)}.")
    return errors


def _show(value) -> str:
    import json

    try:
        text = json.dumps(value)
    except (TypeError, ValueError):
        text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


# --------------------------------------------------------------------------- checking one stage
def dataset_errors(name, options) -> list[str]:
    """Whether ``name`` is a registered dataset and ``options`` its options (as build_dataset checks them)."""
    from fusion_seg.data.datasets import DATASETS

    if not isinstance(name, str):
        return []  # a type error, reported with the other keys
    if name not in DATASETS:
        return [f"unknown dataset {name!r}; known datasets: {', '.join(sorted(DATASETS))}."]
    if not isinstance(options, dict):
        return []
    schema = {k: v for k, v in _parameters(DATASETS[name]).items() if k not in ("root", "split")}
    schema["limit"] = Option("limit", int, None)
    return [f"dataset_options: {e}" for e in check_keys(options, schema, "option", f"dataset {name!r}")]


def decoder_option_errors(name, config: dict) -> list[str]:
    """Whether ``name`` is a registered decoder and ``config`` its options (names and types)."""
    from fusion_seg.decoders import DECODERS

    if not isinstance(name, str):
        return []
    if name not in DECODERS:
        return [f"unknown decoder {name!r}; known decoders: {', '.join(sorted(DECODERS))}."]
    cls = DECODERS[name]
    params = inspect.signature(cls).parameters
    if any(p.kind is p.VAR_KEYWORD for p in params.values()):
        return []
    hints = _hints(cls.__init__)
    schema = {k: Option(k, hints.get(k), p.default) for k, p in params.items() if p.kind is p.KEYWORD_ONLY}
    return check_keys(config, schema, "option", f"decoder {name!r}")


def encoder_shapes(tag: str, strides) -> dict:
    """``{name: ShapeSpec}`` the encoder ``tag`` gives at ``strides``, from timm's feature info on the
    ``meta`` device (no memory, no weights). UserError for an unknown encoder or stride."""
    import timm
    import torch

    from fusion_seg.shapes import ShapeSpec, feature_name

    architecture = str(tag).split(".")[0]
    try:
        with torch.device("meta"):
            probe = timm.create_model(architecture, pretrained=False, features_only=True)
    except RuntimeError as exc:  # timm: unknown model name
        raise UserError(f"unknown timm encoder {tag!r}: {exc}") from None
    by_stride = {int(i["reduction"]): int(i["num_chs"]) for i in probe.feature_info.get_dicts()}
    unknown = [s for s in strides if s not in by_stride]
    if unknown:
        raise UserError(f"encoder {architecture} has no feature map at stride(s) {unknown}; available strides: "
                        f"{sorted(by_stride)}. Adjust strides.")
    return {feature_name(s): ShapeSpec(by_stride[s], s) for s in sorted({int(s) for s in strides})}


def build_check(decoder: str, config: dict, input_shapes: dict, num_classes: int = 2) -> str | None:
    """Build the decoder on the ``meta`` device, as training will; None when it builds, else why not."""
    import torch

    from fusion_seg.decoders import build_decoder

    if config.get("pretrained"):
        return None  # would download weights; its options were checked by name and type
    if not input_shapes:
        return None
    try:
        with torch.device("meta"):
            build_decoder(decoder, input_shapes, num_classes, **config)
    except UserError as exc:
        return str(exc)
    except Exception as exc:  # a value of the right type the decoder still cannot use
        return f"decoder {decoder!r} cannot be built with {_show(config)}: {type(exc).__name__}: {exc}"
    return None


def check_stage(stage: dict, *, shapes=None, num_classes: int = 2) -> list[str]:
    """Everything that can be checked about one stage without running it or reading its inputs.

    ``shapes``: the ``{name: ShapeSpec}`` a train stage's cache will hold (from the extract stage that
    makes it, or the store on disk), to build its decoder; None: not known, built only online.
    Returns one message per problem (without the stage's name: the caller adds it).
    """
    kind = stage.get("kind")
    body = {k: v for k, v in stage.items() if k != "kind"}
    online = kind == "train" and body.get("online") is True
    schema = stage_schema(kind, online=online)
    errors = check_keys(body, schema)
    if kind == "train" and not online and "cache" not in body and any(k in body for k in ("dataset", "root")):
        errors.append("a train stage reads a cache (cache = STORE) or, with online = true, images; "
                      "add online = true to train from dataset images.")
    typed = not errors  # range checks and builds only once the names and types are right
    if "dataset" in body:
        errors += dataset_errors(body["dataset"], body.get("dataset_options") or {})
    if kind == "extract" and typed:
        errors += _extract_range_errors(body)
        try:
            encoder_shapes(body.get("encoder", schema["encoder"].default), body.get("strides",
                                                                                    schema["strides"].default))
        except UserError as exc:
            errors.append(str(exc))
    if kind == "train":
        config = {k: body[k] for k in DECODER_KEYS if body.get(k) is not None}
        if isinstance(body.get("decoder_options"), dict):
            config.update(body["decoder_options"])
        if isinstance(body.get("decoder_config"), dict):
            config = {**body["decoder_config"], **config}
        decoder = body.get("decoder", "reverse-hrnet")
        option_errors = decoder_option_errors(decoder, config)
        errors += option_errors
        if typed:
            leave = {"out", "online", "val_cache", "cache", *trainer_keys(online=online)}
            options, _ = requests.split_train_options(body, online=online)
            try:
                train_config({k: v for k, v in options.items() if k not in leave})
            except UserError as exc:
                errors.append(str(exc))
            except (TypeError, ValueError) as exc:
                errors.append(f"invalid training settings: {exc}")
        if typed and not option_errors:
            from fusion_seg.decoders import DECODERS

            if getattr(DECODERS[decoder], "end_to_end", False):
                from fusion_seg.encoder.build import IMAGE_TAG
                from fusion_seg.shapes import ShapeSpec

                shapes = {IMAGE_TAG: ShapeSpec(3, 1)} if online else shapes
            elif online:
                try:
                    shapes = encoder_shapes(body.get("encoder", schema["encoder"].default),
                                            body.get("strides", schema["strides"].default))
                except UserError as exc:
                    errors.append(str(exc))
                    shapes = None
            if shapes:
                problem = build_check(decoder, config, shapes, num_classes)
                if problem:
                    errors.append(problem)
    return errors


def _extract_range_errors(options: dict) -> list[str]:
    """extract()'s own range checks (``check_extract_arguments``) of a stage's requests, run without
    extracting anything."""
    from fusion_seg.extract.local import check_extract_arguments

    try:
        check_extract_arguments(**requests.extract_arguments(options))
    except UserError as exc:
        return [str(exc)]
    return []
