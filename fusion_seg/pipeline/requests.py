"""The typed requests that extraction and online training take, built from plain option values.

The command line's options and a recipe stage's keys are the same names (``dataset``, ``root``,
``crop``, ``seed``, ...), and mean the same: both hand their values to the builders below, which
make the frozen requests the library takes (:class:`~fusion_seg.data.datasets.DatasetRef`,
:class:`~fusion_seg.encoder.build.EncoderSpec`, :class:`~fusion_seg.data.views.Augment`,
:class:`~fusion_seg.data.views.Resize`, :class:`~fusion_seg.extract.request.StoreFormat`,
:class:`~fusion_seg.extract.request.ExtractRun`). Each builder's keyword parameters are its options:
their names, types and defaults are what a recipe stage accepts (``schema.stage_schema``).
"""
from __future__ import annotations

import inspect
from pathlib import Path
from typing import Callable

from fusion_seg.cache.codecs import DEFAULT_CODEC, DEFAULT_DTYPE
from fusion_seg.data.datasets import DatasetRef
from fusion_seg.data.views import Augment, Resize
from fusion_seg.encoder.build import EncoderSpec
from fusion_seg.encoder.identity import DEFAULT_ENCODER, DEFAULT_STRIDES
from fusion_seg.errors import UserError
from fusion_seg.extract.request import ExtractRun, StoreFormat

DEFAULT_CROP = (512, 512)  # the augmentation crop (HRNet's), for extract and train-decoder --online


# --------------------------------------------------------------------------- one builder per request
def dataset_ref(*, dataset: str, split: str, root: str | Path | None = None,
                dataset_options: dict | None = None) -> DatasetRef:
    """``--dataset``, ``--split``, ``--root`` and the ``--dataset-opt`` options (``dataset_options``)."""
    return DatasetRef(dataset, split=split, root=root, options=dict(dataset_options or {}))


def encoder_spec(*, encoder: str = DEFAULT_ENCODER, weights: str | Path | None = None, random_init: bool = False,
                 seed: int = 0, strides: tuple[int, ...] = DEFAULT_STRIDES) -> EncoderSpec:
    """``--encoder`` (a timm tag), one weights source (``--weights FILE``, ``--random-init`` seeded by
    ``--seed``, else the tag's pretrained weights) and ``--strides``."""
    return EncoderSpec(encoder, weights_file=weights, random_init=random_init, seed=seed, strides=strides)


def augment(*, augment: bool = True, crop: tuple[int, int] | None = None,
            scale_range: tuple[float, float] = (0.5, 2.0), flip: bool = True, seed: int = 0) -> Augment:
    """How each view is cut from an image: ``augment`` (``--no-augment``: the whole image), the ``crop``
    (None: the default, 512x512), ``scale_range``, ``flip`` (``--no-flip``), drawn from ``seed``.

    A ``crop`` with ``augment=False`` is refused: the view is the whole image, and the crop would be ignored.
    """
    if not augment and crop is not None:
        raise UserError(f"--crop {'x'.join(map(str, crop)) if isinstance(crop, (list, tuple)) else crop} has no "
                        "effect with --no-augment (augment = false): the view is the whole, resized image. Drop "
                        "--crop, or use --size/--short-side to set the size of the view.")
    return Augment(enabled=augment, crop=DEFAULT_CROP if crop is None else crop, scale_range=scale_range,
                   flip=flip, seed=seed)


def resize(*, short_side: int | None = None, size: tuple[int, int] | None = None) -> Resize:
    """``--short-side N`` or ``--size HxW``: the resize before anything else."""
    return Resize(short_side=short_side, size=size)


def store_format(*, dtype: str = DEFAULT_DTYPE, codec: str | dict = DEFAULT_CODEC) -> StoreFormat:
    """extract's ``--dtype`` and ``--codec``."""
    return StoreFormat(dtype=dtype, codec=codec)


def extract_run(*, batch_size: int = 4, loader_workers: int = 2, writers: int = 2, scheduler: str | None = None,
                workers: int | None = None, device: str = "auto") -> ExtractRun:
    """extract's ``--batch-size``, ``--loader-workers``, ``--scheduler``, ``--device`` and (``workers``)
    ``--dask-workers``; ``writers`` has no command-line option."""
    return ExtractRun(device=device, batch_size=batch_size, loader_workers=loader_workers, writers=writers,
                      scheduler=scheduler, dask_workers=workers)


# --------------------------------------------------------------------------- what each entry point takes
# The requests of each entry point, by the name of its argument, and each request's builder.
EXTRACT_REQUESTS: dict[str, Callable] = {"dataset": dataset_ref, "encoder": encoder_spec, "augment": augment,
                                         "resize": resize, "storage": store_format, "run": extract_run}
ONLINE_REQUESTS: dict[str, Callable] = {"dataset": dataset_ref, "encoder": encoder_spec, "augment": augment,
                                        "resize": resize}
# extract()'s arguments that are plain values, passed as they are.
EXTRACT_PLAIN = ("out", "views", "repair", "skip_bad")
# Online, ``seed`` is TrainConfig's and also the requests' (the encoder's random init, the views).
SHARED_WITH_TRAINING = ("seed",)


def option_names(builders) -> tuple[str, ...]:
    """Every option the ``builders`` take (each once, in order)."""
    names: dict[str, None] = {}
    for builder in builders:
        names.update(dict.fromkeys(inspect.signature(builder).parameters))
    return tuple(names)


def build(builder: Callable, options: dict):
    """``builder``'s request from the options it takes, out of ``options`` (the others are left alone)."""
    names = inspect.signature(builder).parameters
    return builder(**{k: v for k, v in options.items() if k in names})


def extract_arguments(options: dict) -> dict:
    """:func:`fusion_seg.extract.local.extract`'s arguments from an extract command's or stage's plain options:
    ``out``, ``views``, ``repair`` and ``skip_bad`` as they are, the others built into its requests."""
    known = set(EXTRACT_PLAIN) | set(option_names(EXTRACT_REQUESTS.values()))
    unknown = sorted(set(options) - known)
    if unknown:
        raise TypeError(f"extract takes no option {', '.join(unknown)}")
    return {**{k: options[k] for k in EXTRACT_PLAIN if k in options},
            **{name: build(builder, options) for name, builder in EXTRACT_REQUESTS.items()}}


def online_request_keys() -> tuple[str, ...]:
    """The options of a train command or stage that are online training's requests, not TrainConfig's."""
    return tuple(k for k in option_names(ONLINE_REQUESTS.values()) if k not in SHARED_WITH_TRAINING)


def split_train_options(options: dict, *, online: bool) -> tuple[dict, dict]:
    """A train command's or stage's plain options, as (TrainConfig's and the trainer's, the online requests').

    ``crop`` says what the decoder trains on. Online it is the augmentation crop of every view, as extract's
    (default 512x512); from a cache, a random crop in feature space, TrainConfig's (default: none, whole
    stored views). ``seed`` stays TrainConfig's, and online also seeds the encoder's random init and the
    views. From a cache the request options are not used (the cache holds the views).
    """
    keys = set(online_request_keys())
    if not online:
        keys.discard("crop")
    rest = {k: v for k, v in options.items() if k not in keys}
    requests = {k: v for k, v in options.items() if k in keys or k in SHARED_WITH_TRAINING}
    return rest, requests


def online_arguments(options: dict) -> dict:
    """``train_online``'s requests (``dataset``, ``encoder``, ``augment``, ``resize``) from the request options
    of :func:`split_train_options`."""
    return {name: build(builder, options) for name, builder in ONLINE_REQUESTS.items()}
