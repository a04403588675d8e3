"""What a pipeline stage accepts, read from the library functions it calls, and the TrainConfig a train
stage's (or the command line's) flat options make.

A stage's keys are the keyword arguments of the library function it calls, or of the builders of the typed
requests that function takes (requests.py), so what a stage accepts is read from those functions
(:func:`stage_schema`): the signatures of ``evaluate``, ``predict``, ``extract``'s plain arguments and its
requests' builders, ``train_online``'s requests' builders, and the fields of ``TrainConfig``.
"""
from __future__ import annotations

import inspect
from dataclasses import MISSING, fields

from fusion_seg.errors import UserError
from fusion_seg.options import EMPTY, Option, parameters, size_hint, type_hints
from fusion_seg import requests
from fusion_seg.training.config import DECODER_KEYS

KINDS = ("extract", "train", "evaluate", "predict")
# A train stage's keys besides TrainConfig's that the runner passes itself (the rest of the training
# function's keyword arguments are the stage's, or built from them: see trainer_keys).
_RUNNER_ARGS = ("cache", "out", "cfg", "val_cache", "resume", "progress")
# Keys whose values are files or folders; a relative one is resolved against the recipe's folder (recipes.py).
PATH_KEYS = ("root", "out", "weights", "cache", "val_cache", "init", "checkpoint", "input")
DATASET_PATH_OPTIONS = ("sbd", "ids_file")  # dataset options that are paths (voc's SBD folder, a list of ids)




def trainer_keys(*, online: bool) -> tuple[str, ...]:
    """The plain keyword arguments of ``train_online`` or ``train_decoder`` that a train stage sets itself,
    besides TrainConfig's fields and online training's requests (requests.py): read from their signatures."""
    from fusion_seg.training.train import train_decoder, train_online

    fn = train_online if online else train_decoder
    built = requests.ONLINE_REQUESTS if online else {}
    return tuple(name for name, p in inspect.signature(fn).parameters.items()
                 if p.kind is p.KEYWORD_ONLY and name not in _RUNNER_ARGS and name not in built)


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

        # A recipe names its dataset one key at a time (TOML holds no DatasetRef): name and split are required.
        return {**parameters(evaluate, skip=("progress",)), "dataset": Option("dataset", str, EMPTY),
                "split": Option("split", str, EMPTY)}
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
