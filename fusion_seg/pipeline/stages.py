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

import inspect
from dataclasses import MISSING, fields

from fusion_seg.errors import UserError
from fusion_seg.options import EMPTY, Option, check_keys, parameters, show_value, size_hint, type_hints
from fusion_seg.pipeline import requests

KINDS = ("extract", "train", "evaluate", "predict")
DECODER_KEYS = ("streams", "preset", "widths", "modules", "blocks")  # reverse-hrnet's; others via decoder_options
# A train stage's keys besides TrainConfig's that the runner passes itself (the rest of the training
# function's keyword arguments are the stage's, or built from them: see trainer_keys).
_RUNNER_ARGS = ("cache", "out", "cfg", "val_cache", "resume", "progress")
# Keys whose values are files or folders; a relative one is resolved against the recipe's folder (recipes.py).
PATH_KEYS = ("root", "out", "weights", "cache", "val_cache", "init", "checkpoint", "input")
DATASET_PATH_OPTIONS = ("sbd",)  # dataset options that are paths (voc's SBD folder)


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
        return {"store": r.store, "views": r.views_total, "written": r.views_written, "skipped": r.views_skipped,
                "views_per_second": round(r.views_per_second, 3)}
    if kind == "train":
        from fusion_seg.training.train import train_decoder, train_online

        out, val_cache = stage.pop("out"), stage.pop("val_cache", None)
        resume = "auto"  # continue the run in out only if it has these settings and this data (run_dir.py)
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
        return {"run_dir": r.run_dir, "steps": r.steps, "steps_this_run": len(r.losses), "best_miou": r.best_miou,
                "final_loss": r.losses[-1] if r.losses else None, "seconds": round(r.seconds, 1),
                **({"previous_run_kept_as": r.previous_run} if r.previous_run else {})}
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
def _train_config_options(exclude=()) -> dict[str, Option]:
    from fusion_seg.training.config import TrainConfig

    hints = type_hints(TrainConfig)
    out = {}
    for f in fields(TrainConfig):
        if f.name in exclude:
            continue
        required = f.default is MISSING and f.default_factory is MISSING
        default = EMPTY if required else None if f.default is MISSING else f.default
        out[f.name] = Option(f.name, size_hint(f.name, hints.get(f.name)), default)
    return out


def _request_options(builders, skip=()) -> dict[str, Option]:
    """The options of the requests' ``builders`` (requests.py): each builder's keyword parameters."""
    out: dict[str, Option] = {}
    for builder in builders:
        out.update({k: o for k, o in parameters(builder).items() if k not in skip and k not in out})
    return out


def stage_schema(kind: str, *, online: bool = False) -> dict[str, Option]:
    """Every key a stage of ``kind`` accepts (besides ``kind``), read from the functions it calls."""
    if kind == "extract":
        from fusion_seg.extract.local import extract

        dataset, *others = requests.EXTRACT_REQUESTS.values()
        return {**_request_options([dataset]), **parameters(extract, only=requests.EXTRACT_PLAIN),
                **_request_options(others)}
    if kind == "evaluate":
        from fusion_seg.evaluation.evaluate import evaluate

        return parameters(evaluate, skip=("progress",))
    if kind == "predict":
        from fusion_seg.inference.predict import predict

        return parameters(predict, skip=("progress",), rename={"inputs": "input"})
    if kind == "train":
        from fusion_seg.decoders import DECODERS
        from fusion_seg.training.train import train_decoder, train_online

        decoder_params = inspect.signature(DECODERS["reverse-hrnet"]).parameters
        hints = type_hints(DECODERS["reverse-hrnet"].__init__)
        own = {"out": Option("out", str, EMPTY), "online": Option("online", bool, False),
               "val_cache": Option("val_cache", str, None),
               "decoder_options": Option("decoder_options", dict, None)}
        own.update({k: Option(k, hints.get(k), None) for k in DECODER_KEYS if k in decoder_params})
        fn = train_online if online else train_decoder
        # The training function's own keyword arguments, less those the recipe runner fills in.
        passed = {k: v for k, v in parameters(fn).items() if k in trainer_keys(online=online)}
        if online:
            # Online training's requests' options: `crop` is the augmentation crop (not TrainConfig's), `seed`
            # TrainConfig's, which seeds the requests too; cached views (`views`) do not exist online.
            built = _request_options(requests.ONLINE_REQUESTS.values(), skip=requests.SHARED_WITH_TRAINING)
            return {**_train_config_options(exclude=("crop", "views")), **built, **passed, **own}
        own["cache"] = Option("cache", str, EMPTY)
        return {**_train_config_options(), **passed, **own}
    raise UserError(f"unknown stage kind {kind!r}; expected one of {', '.join(KINDS)}")


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
    schema = {k: v for k, v in parameters(DATASETS[name]).items() if k not in ("root", "split")}
    schema["limit"] = Option("limit", int, None)
    return [f"dataset_options: {e}" for e in check_keys(options, schema, "option", f"dataset {name!r}")]


def decoder_option_errors(name, config: dict) -> list[str]:
    """Whether ``name`` is a registered decoder and ``config`` its options (names and types)."""
    from fusion_seg.decoders import option_problems

    return option_problems(name, config) if isinstance(name, str) else []


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
    from fusion_seg.training.train import check_trainable_size

    try:
        with torch.device("meta"):
            check_trainable_size(build_decoder(decoder, input_shapes, num_classes, **config), decoder, config)
    except UserError as exc:
        return str(exc)
    except Exception as exc:  # a value of the right type the decoder still cannot use
        return f"decoder {decoder!r} cannot be built with {show_value(config)}: {type(exc).__name__}: {exc}"
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
            if option_errors:  # reported above; TrainConfig would report them again
                leave |= {*DECODER_KEYS, "decoder", "decoder_options", "decoder_config"}
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
