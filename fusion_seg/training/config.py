"""What a training run is asked to do (:class:`TrainConfig`), what it trains on (:class:`TrainingData`)
and what it returns (:class:`TrainResult`).

The recipe is HRNet's: SGD (momentum 0.9, weight decay 5e-4), lr 0.01 with poly decay (power 0.9)
per iteration, OHEM cross-entropy, ignore index from the data. Out-of-range settings are refused
when a config is made, before any work, with a UserError naming the command-line option.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, fields

from fusion_seg.encoder.identity import EncoderIdentity
from fusion_seg.errors import UserError
from fusion_seg.options import check_fields
from fusion_seg.shapes import ShapeSpec

@dataclass(frozen=True)
class Schedule:
    """What a run learns: the decoder, the optimisation, the loss, the data it is shown, the seed.

    A resume must keep every one of these (``--lr`` alone may change, see run_dir.py), and a checkpoint's
    ``train`` record holds them with the :class:`RunSettings` beside them, as one flat dict.
    """

    decoder: str = "reverse-hrnet"
    decoder_config: dict = field(default_factory=dict)  # the decoder's own options; {} = its defaults
    epochs: int = 10
    batch_size: int = 8
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 5e-4
    poly_power: float = 0.9
    crop: list[int] | None = None
    views: int | None = None  # use only each image's first K cached views (None: all of them)
    loss: str = "ohem"
    ohem_thresh: float = 0.9
    ohem_min_kept: int = 131072
    # Per-class loss weights (class_weights.py): none, median-freq (SegNet), inverse-log (ENet) or a JSON
    # file; the methods count the training store's labels, and the resolved weights go into config.json.
    class_weights: str = "none"
    seed: int = 0
    init: str | None = None  # a checkpoint to start from (two-stage schedules)
    # The decoder step's forward (device.py): auto (bf16 autocast on CUDA, fp32 elsewhere), fp32 or bf16. Online,
    # also the encoder's, which the run's encoder identity then records (a validation store must match it).
    precision: str = "auto"
    # How the device and ram tiers hold the training views (formats.py): auto (the most precise that fits),
    # float16, uint8, float8 or int4. Part of the schedule: a lossy format changes the features the decoder sees.
    resident_dtype: str = "auto"

    def __post_init__(self):
        check_fields(self, "Schedule")
        self.check_schedule()

    def check_schedule(self) -> None:
        """Refuse settings out of range (a UserError naming the option) before any work."""
        from fusion_seg.checks import (PRECISIONS, RESIDENT_DTYPES, fraction_problem, int_problem, non_negative_problem,
                                       require, require_feature_crop, seed_problem)
        from fusion_seg.training.class_weights import check_class_weights_option

        for name, minimum in (("epochs", 1), ("batch_size", 1), ("ohem_min_kept", 1)):
            require("--" + name.replace("_", "-"), getattr(self, name), int_problem(getattr(self, name), minimum))
        require("--seed", self.seed, seed_problem(self.seed))
        if self.views is not None:
            require("--views", self.views, int_problem(self.views, 1))
        # The command line also refuses --lr 0; a script may train with lr 0 (weights carried over unchanged).
        require("--lr", self.lr, non_negative_problem(self.lr))
        require("--ohem-thresh", self.ohem_thresh, fraction_problem(self.ohem_thresh))
        for name in ("momentum", "weight_decay", "poly_power"):  # no command-line option: a recipe's or a script's
            value = getattr(self, name)
            problem = non_negative_problem(value)
            if name == "momentum" and not problem and not value < 1:
                problem = "must be a number in [0, 1)"
            require(f"TrainConfig {name}", value, problem)
        require_feature_crop(self.crop)  # from a cache: a feature-space crop
        if self.loss not in ("ohem", "ce"):
            require("--loss", self.loss, "choose ohem or ce")
        check_class_weights_option(self.class_weights)
        if self.precision not in PRECISIONS:
            require("--precision", self.precision, f"choose one of {', '.join(PRECISIONS)}")
        if self.resident_dtype not in RESIDENT_DTYPES:
            require("--resident-dtype", self.resident_dtype, f"choose one of {', '.join(RESIDENT_DTYPES)}")
        self._check_decoder()

    def _check_decoder(self) -> None:
        """The decoder's name and its options' names and value types (``--decoder-opt width=abc``), checked
        against its constructor before anything is built. This one check imports the decoders (torch): a
        decoder's options are its constructor's keyword arguments, and a torch-free copy of them would be a
        second list to keep in step with the code."""
        from fusion_seg.decoders import DECODERS, check_options

        if self.decoder not in DECODERS:
            raise UserError(f"--decoder {self.decoder!r} is not a decoder; choose one of {', '.join(DECODERS)}.")
        if not isinstance(self.decoder_config, dict):
            raise UserError(f"TrainConfig decoder_config must be a dict of the decoder's options, not "
                            f"{type(self.decoder_config).__name__}.")
        check_options(self.decoder, self.decoder_config)


@dataclass(frozen=True)
class RunSettings:
    """How a run does its work, not what it learns: a resume may change any of these."""

    workers: int = 2
    val_every: int = 1
    # Early stopping: end the run once the val mIoU has not improved for this many epochs (None: train every
    # epoch). best.pt keeps the best epoch; the poly decay stays that of ``epochs``. A resume may change it.
    patience: int | None = None
    log_every: int = 10
    device: str = "auto"
    # Where cached views are read from (resident.py): auto, device, ram or stream. Every tier gives the
    # same batches in a single process.
    cache_mode: str = "auto"
    # Recompute each HRNet module's activations in the backward pass instead of keeping them
    # (torch.utils.checkpoint): less memory, more time, the same gradients.
    checkpoint_activations: bool = False
    # SyncBatchNorm across torchrun processes, like the number of processes (which a resume may change):
    # both only decide over how many samples BatchNorm takes its statistics.
    sync_bn: bool = False
    # Also write the scalars to RUN_DIR/tensorboard (needs the tensorboard extra): logging only.
    tensorboard: bool = False

    def __post_init__(self):
        check_fields(self, "RunSettings")
        self.check_run_settings()

    def check_run_settings(self) -> None:
        from fusion_seg.checks import CACHE_MODES, int_problem, require

        for name, minimum in (("workers", 0), ("val_every", 1), ("log_every", 1)):
            require("--" + name.replace("_", "-"), getattr(self, name), int_problem(getattr(self, name), minimum))
        if self.patience is not None:
            require("--patience", self.patience, int_problem(self.patience, 1))
        if self.cache_mode not in CACHE_MODES:
            require("--cache-mode", self.cache_mode, f"choose one of {', '.join(CACHE_MODES)}")

    def out_of_patience(self, best_epoch: int | None, last_val_epoch: int) -> bool:
        """Whether ``patience`` epochs have passed, at the latest validation (``last_val_epoch``), since the
        best one (``best_epoch``; None: none yet): the run is over (:class:`~fusion_seg.training.trainer.Trainer`)."""
        return self.patience is not None and best_epoch is not None and last_val_epoch - best_epoch >= self.patience


@dataclass(frozen=True)
class TrainConfig(RunSettings, Schedule):
    """A run's :class:`Schedule` and its :class:`RunSettings`, as one flat set of fields (``cfg.epochs``,
    ``cfg.workers``): what ``train`` takes, and what a checkpoint records under ``train``."""

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        """Refuse settings of the wrong type or out of range (a UserError naming the option) before any work."""
        check_fields(self, "TrainConfig")
        self.check_run_settings()
        self.check_schedule()

    @classmethod
    def of(cls, schedule: Schedule, settings: RunSettings | None = None) -> "TrainConfig":
        """The config of a schedule run with these settings (None: the defaults)."""
        return cls(**_values(schedule, Schedule), **_values(settings or RunSettings(), RunSettings))

    def schedule(self) -> Schedule:
        """What this run learns: the settings a resume must keep."""
        return Schedule(**_values(self, Schedule))

    def run_settings(self) -> RunSettings:
        """How this run works: the settings a resume may change."""
        return RunSettings(**_values(self, RunSettings))


def _values(obj, part: type) -> dict:
    return {f.name: getattr(obj, f.name) for f in fields(part)}


@dataclass(frozen=True)
class TrainingData:
    """What a run trains on: from its cache's spec, or (online) from its dataset, augmentation and encoder.

    One description for the two places that need it: the run records it (config.json and every
    checkpoint, see :meth:`record`), and a validation store must match it and must not hold it
    (:func:`fusion_seg.training.validation.open_val_store`).
    """

    input_shapes: dict[str, ShapeSpec]  # every map the encoder gives (the decoder reads some of them)
    classes: list[str]
    ignore_index: int
    encoder: EncoderIdentity  # what the features were made with (stored as its dict)
    dataset: dict  # the dataset split's description
    resize: dict
    augment: dict
    crop: list[int] | None  # TrainConfig.crop: the feature-space crop (None online, or whole views)
    image_ids: Sequence[str]
    source: dict  # where batches come from: {"cache", "val_cache"}, or {"online": True, "val_cache"}
    class_weights: dict | None = None  # the loss's class weights: {"method", "weights", ...} (class_weights.py)

    @property
    def online(self) -> bool:
        return bool(self.source.get("online"))

    @property
    def store(self) -> str | None:
        """The training store (None online): a validation store must not be it."""
        return self.source.get("cache")

    def record(self) -> dict:
        """The ``data`` entry of config.json and of every checkpoint."""
        record = {"dataset": self.dataset, "resize": self.resize, "augment": self.augment, "crop": self.crop,
                  "source": self.source}
        if self.class_weights and self.class_weights["method"] != "none":
            record["class_weights"] = self.class_weights
        return record

    @property
    def loss_weights(self) -> list[float] | None:
        return self.class_weights.get("weights") if self.class_weights else None


@dataclass
class TrainResult:
    run_dir: str
    epochs: int
    steps: int
    losses: list[float]
    best_miou: float | None
    val: dict | None
    seconds: float
    peak_memory_mib: float | None = None
    cache: dict | None = None  # the cache tier used, its resident bytes and load time (cache path only)
    previous_run: str | None = None  # where an earlier run of other settings in the same out was kept ("auto")
    # Set when --patience ended the run before cfg.epochs: {"epoch", "best_epoch", "patience"}.
    stopped_early: dict | None = None


DECODER_KEYS = ("streams", "preset", "widths", "modules", "blocks")  # reverse-hrnet's; others via decoder_options


def train_config(options: dict):
    """A TrainConfig from flat options; decoder architecture keys go into ``decoder_config``."""
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
