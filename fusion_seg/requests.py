"""The requests: what each stage is asked to do, as small frozen dataclasses, and the one place option
values (the command line's, a recipe stage's) become them. Torch-free, and below every sub-package that
uses them (``data/`` and ``encoder/`` are imported only inside ``build()``): the command line builds and
checks its requests here before it imports any library code.

The request types: :class:`DatasetRef` (a dataset split by name), :class:`EncoderSpec` (a timm tag, one
weights source and the strides), :class:`Augment` (HRNet's training views), :class:`Resize` (before
anything else), and extraction's own :class:`StoreFormat` and :class:`ExtractRun`. ``build()`` makes what
a request asks for (a dataset, an encoder). The training configuration is
:class:`~fusion_seg.training.config.TrainConfig`, made from the same option values by
:func:`~fusion_seg.training.config.train_config`.

The command line's options and a recipe stage's keys are the same names (``dataset``, ``root``, ``crop``,
``seed``, ...), and mean the same: both hand their values to the builders below. Each builder's keyword
parameters are its options: their names, types and defaults are what a recipe stage accepts
(``pipeline/schema.stage_schema``).
"""
from __future__ import annotations

import inspect
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

from fusion_seg.cache.codecs import DEFAULT_CODEC, DEFAULT_DTYPE
from fusion_seg.encoder.identity import DEFAULT_ENCODER, DEFAULT_STRIDES
from fusion_seg.errors import UserError
from fusion_seg.options import check_fields


# --------------------------------------------------------------------------- the request types
@dataclass(frozen=True)
class DatasetRef:
    """A dataset split by name: what extraction, online training and evaluation are asked to read.

    ``options`` are the dataset's own keyword arguments (see :func:`fusion_seg.data.datasets.build_dataset`).
    """

    name: str
    split: str = "train"
    root: str | Path | None = None
    options: dict = field(default_factory=dict)

    def __post_init__(self):
        check_fields(self, "DatasetRef")

    def build(self):
        """The :class:`~fusion_seg.data.datasets.base.SegDataset` this names."""
        from fusion_seg.data.datasets import build_dataset

        return build_dataset(self.name, root=self.root, split=self.split, **self.options)


@dataclass(frozen=True)
class EncoderSpec:
    """Which encoder to build: a timm tag and exactly one weights source, and the strides to return.

    The request that extraction, online training and the CLI pass around; ``build()`` makes the
    :class:`~fusion_seg.encoder.build.FrozenEncoder`, whose :class:`~fusion_seg.encoder.identity.EncoderIdentity` then records
    what was actually loaded.
    """

    tag: str = DEFAULT_ENCODER
    weights_file: str | Path | None = None
    random_init: bool = False
    seed: int = 0
    strides: tuple[int, ...] = DEFAULT_STRIDES

    def __post_init__(self):
        check_fields(self, "EncoderSpec")
        if isinstance(self.strides, list):  # as a recipe (TOML) gives them; the order is checked, not changed
            object.__setattr__(self, "strides", tuple(self.strides))

    def build(self):
        """The :class:`~fusion_seg.encoder.build.FrozenEncoder` this asks for."""
        from fusion_seg.encoder.build import build_encoder

        return build_encoder(self.tag, weights_file=self.weights_file, random_init=self.random_init,
                             seed=self.seed, strides=self.strides)


@dataclass(frozen=True)
class Photometric:
    """Photometric augmentation, mmsegmentation's ``PhotoMetricDistortion`` (its defaults), and an optional blur.

    Each step with probability 1/2: ``brightness`` (a delta up to that many pixel values), ``contrast`` and
    ``saturation`` (factors in those ranges), ``hue`` (a rotation up to that many degrees: mmseg's 18 on
    OpenCV's 0-180 scale); then with probability ``blur`` a Gaussian blur (sigma in [0.1, 2.0]). See
    :func:`fusion_seg.data.transforms.photometric_distortion`.
    """

    brightness: float = 32.0
    contrast: tuple[float, float] = (0.5, 1.5)
    saturation: tuple[float, float] = (0.5, 1.5)
    hue: float = 36.0
    blur: float = 0.0

    def __post_init__(self):
        check_fields(self, "Photometric")
        _tuples(self, "contrast", "saturation")

    def to_json(self) -> dict:
        return {**asdict(self), "contrast": list(self.contrast), "saturation": list(self.saturation)}


@dataclass(frozen=True)
class Augment:
    """HRNet's training augmentation; ``enabled=False`` keeps the whole (resized) image. ``photometric``
    (None: off) adds a photometric draw to every view (:class:`Photometric`)."""

    enabled: bool = True
    crop: tuple[int, int] | None = (512, 512)
    scale_range: tuple[float, float] = (0.5, 2.0)
    flip: bool = True
    seed: int = 0
    photometric: Photometric | None = None

    def __post_init__(self):
        check_fields(self, "Augment")  # a caller's crop="64x64" is refused here, not deep in a worker
        # One form per augmentation, whoever builds it: a store records to_json(), and equal requests must
        # record equal specs. Without augmentation there is no crop and no flip.
        if not self.enabled and self.photometric is not None:
            raise UserError("Augment(enabled=False, photometric=...): a view without augmentation is the plain "
                            "image; enable the augmentation or drop photometric (--photometric with --no-augment).")
        if not self.enabled:
            object.__setattr__(self, "crop", None)
            object.__setattr__(self, "flip", False)
        _tuples(self, "crop", "scale_range")

    def to_json(self) -> dict:
        d = asdict(self)
        d["crop"] = list(self.crop) if self.crop else None
        d["scale_range"] = list(self.scale_range)
        if self.photometric is None:
            del d["photometric"]  # as every store's record before the option: the same spec and hash
        else:
            d["photometric"] = self.photometric.to_json()
        return d


@dataclass(frozen=True)
class Resize:
    """Resizing applied before anything else (``short_side`` or an exact ``size`` (H, W))."""

    short_side: int | None = None
    size: tuple[int, int] | None = None

    def __post_init__(self):
        check_fields(self, "Resize")
        _tuples(self, "size")

    def to_json(self) -> dict:
        return {"short_side": self.short_side, "size": list(self.size) if self.size else None}


def _tuples(request, *names: str) -> None:
    """Sizes and ranges given as lists (a recipe's TOML arrays) held as tuples, as the library gives them."""
    for name in names:
        value = getattr(request, name)
        if isinstance(value, list):
            object.__setattr__(request, name, tuple(value))


@dataclass(frozen=True)
class StoreFormat:
    """How a store encodes its features: the storage ``dtype`` and the chunk ``codec`` (see cache/codecs.py).

    Part of the store's spec: re-running with another format is refused, never mixed into the store.
    """

    dtype: str = DEFAULT_DTYPE
    codec: str | dict = DEFAULT_CODEC

    def __post_init__(self):
        check_fields(self, "StoreFormat")


@dataclass(frozen=True)
class ExtractRun:
    """Where and how the extraction work runs.

    In this process, on ``device``: ``loader_workers`` DataLoader processes decode views, the encoder
    runs ``batch_size`` views per forward, and ``writers`` threads write them. Instead, ``scheduler``
    (``tcp://HOST:PORT``) runs it on an existing dask.distributed cluster, and ``dask_workers`` on a new
    local one of that many worker processes (see dask_cluster.py).
    """

    device: str = "auto"
    batch_size: int = 4
    loader_workers: int = 2
    writers: int = 2
    scheduler: str | None = None
    dask_workers: int | None = None
    # The encoder's forward (--precision): auto (bf16 autocast on CUDA, fp32 elsewhere), fp32 or bf16. The store's
    # encoder identity records the one used, so that bf16 and fp32 features are never mixed.
    precision: str = "auto"

    def __post_init__(self):
        check_fields(self, "ExtractRun")

    def forward_precision(self) -> str:
        """``fp32`` or ``bf16``: ``precision`` on ``device``. On a cluster the workers' devices are not known
        here: ``auto`` is bf16 only when ``device`` names CUDA, and every worker runs the store's precision."""
        if self.precision != "auto":
            return self.precision
        if self.on_cluster:
            return "bf16" if self.device.startswith("cuda") else "fp32"
        from fusion_seg.device import resolve_device, resolve_precision

        return resolve_precision(resolve_device(self.device))

    @property
    def on_cluster(self) -> bool:
        return self.scheduler is not None or self.dask_workers is not None


# --------------------------------------------------------------------------- built from option values
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
            scale_range: tuple[float, float] = (0.5, 2.0), flip: bool = True, seed: int = 0,
            photometric: bool = False, brightness: float | None = None, contrast: tuple[float, float] | None = None,
            saturation: tuple[float, float] | None = None, hue: float | None = None,
            blur: float | None = None) -> Augment:
    """How each view is cut from an image: ``augment`` (``--no-augment``: the whole image), the ``crop``
    (None: the default, 512x512), ``scale_range``, ``flip`` (``--no-flip``), drawn from ``seed``; and with
    ``photometric`` (``--photometric``) a photometric draw of ``brightness``, ``contrast``, ``saturation``,
    ``hue`` and ``blur`` (None: :class:`Photometric`'s defaults, mmseg's).

    A ``crop`` with ``augment=False`` is refused: the view is the whole image, and the crop would be ignored.
    So are photometric ranges without ``photometric`` (and :class:`Augment` refuses ``photometric`` without
    ``augment``).
    """
    if not augment and crop is not None:
        raise UserError(f"--crop {'x'.join(map(str, crop)) if isinstance(crop, (list, tuple)) else crop} has no "
                        "effect with --no-augment (augment = false): the view is the whole, resized image. Drop "
                        "--crop, or use --size/--short-side to set the size of the view.")
    ranges = {k: v for k, v in (("brightness", brightness), ("contrast", contrast), ("saturation", saturation),
                                ("hue", hue), ("blur", blur)) if v is not None}
    if ranges and not photometric:
        flags = ", ".join("--" + k for k in ranges)
        one = len(ranges) == 1
        raise UserError(f"{flags} set{'s' if one else ''} the photometric augmentation, which is off: add "
                        f"--photometric (photometric = true), or drop {'it' if one else 'them'}.")
    return Augment(enabled=augment, crop=DEFAULT_CROP if crop is None else crop, scale_range=scale_range,
                   flip=flip, seed=seed, photometric=Photometric(**ranges) if photometric else None)


def resize(*, short_side: int | None = None, size: tuple[int, int] | None = None) -> Resize:
    """``--short-side N`` or ``--size HxW``: the resize before anything else."""
    return Resize(short_side=short_side, size=size)


def store_format(*, dtype: str = DEFAULT_DTYPE, codec: str | dict = DEFAULT_CODEC) -> StoreFormat:
    """extract's ``--dtype`` and ``--codec``."""
    return StoreFormat(dtype=dtype, codec=codec)


def extract_run(*, batch_size: int = 4, loader_workers: int = 2, writers: int = 2, scheduler: str | None = None,
                workers: int | None = None, device: str = "auto", precision: str = "auto") -> ExtractRun:
    """extract's ``--batch-size``, ``--loader-workers``, ``--scheduler``, ``--device``, ``--precision`` and
    (``workers``) ``--dask-workers``; ``writers`` has no command-line option."""
    return ExtractRun(device=device, batch_size=batch_size, loader_workers=loader_workers, writers=writers,
                      scheduler=scheduler, dask_workers=workers, precision=precision)


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
