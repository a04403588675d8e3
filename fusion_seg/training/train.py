"""Stage two: train a decoder, from a feature store or (``--online``) from images.

The one entry, :func:`train`, takes what a run trains on as typed data: :class:`CachedData` (a feature
store) or :class:`OnlineData` (a dataset, the frozen encoder, the augmentation and the resize);
``train_decoder`` and ``train_online`` are it with one or the other. It gathers the pieces: what the run
trains on (:class:`TrainingData`), its batch source (sources.py), the cache tier of its training and
validation views (chosen once), its validation store (validation.py) and its run directory (run_dir.py),
and hands them to the one loop (:class:`~fusion_seg.training.trainer.Trainer`). Cached and online runs
differ only in where a batch's features come from: read from the cache, or computed by the frozen encoder
each step.

A run directory holds ``last.pt`` (every epoch, atomic), ``best.pt`` (best val mIoU), ``metrics.jsonl``
and ``config.json``; ``resume=True`` continues from ``last.pt``. Launched by ``torchrun``,
``train_decoder`` trains with DistributedDataParallel: ``batch_size`` stays the global batch, each
process takes its share of every global batch, and rank 0 alone validates and writes the run directory.
"""
from __future__ import annotations

import contextlib
import sys
import typing
from dataclasses import dataclass, fields
from pathlib import Path

import torch
from torch import nn

from fusion_seg.cache.store import FeatureStore
from fusion_seg.checks import memory_problem
from fusion_seg.requests import Augment, DatasetRef, EncoderSpec, Resize
from fusion_seg.data.views import ViewSource
from fusion_seg.decoders import DECODERS, build_decoder
from fusion_seg.device import resolve_device, resolve_precision
from fusion_seg.encoder.build import build_image_encoder
from fusion_seg.extract.local import check_view_requests
from fusion_seg.errors import UserError, require_path, require_type
from fusion_seg.files import listing_digest
from fusion_seg.shapes import ShapeSpec
from fusion_seg.training import ddp
from fusion_seg.training.class_weights import require_labelled_pixels, resolve_class_weights, store_label_maps
from fusion_seg.training.config import TrainConfig, TrainingData, TrainResult
from fusion_seg.training.ddp import DistEnv
from fusion_seg.training.run_dir import RunDirectory
from fusion_seg.training.sources import OnlineSource, cached_source, choose_cache_tier
from fusion_seg.training.trainer import Trainer
from fusion_seg.training.validation import open_val_store, validation_views


@dataclass(frozen=True)
class CachedData:
    """Train from a feature store: ``cache`` (a folder made by ``fusion-seg extract``, or a URL). The encoder
    is never loaded."""

    cache: str | Path


@dataclass(frozen=True)
class OnlineData:
    """Train on views computed every step: the frozen ``encoder`` run on ``augment``-ed, ``resize``-d views of
    ``dataset`` (no cache), the baseline; an end-to-end decoder (hrnet) takes the images themselves."""

    dataset: DatasetRef
    encoder: EncoderSpec = EncoderSpec()
    augment: Augment = Augment()
    resize: Resize = Resize()


def train(out: str | Path, cfg: TrainConfig, data: CachedData | OnlineData, *, val_cache: str | None = None,
          resume: bool | str = False, progress: bool = True, allow_val_on_train: bool = False) -> TrainResult:
    """Train ``cfg.decoder`` into the run folder ``out`` on ``data``: the one entry to training.

    ``resume``: False starts a run in ``out`` (refused if one is there), True continues it (refused with other
    settings or data), ``"auto"`` continues it when it has these settings and this data and otherwise keeps
    it as ``OUT.previous-N`` and starts afresh (see run_dir.py). A ``val_cache`` that holds the training
    data (the same store, or one of the same dataset split and augmentation) is refused unless
    ``allow_val_on_train``, which warns instead. Where the training and validation views are held (the
    cache tier) is chosen in one place, :func:`~fusion_seg.training.sources.choose_cache_tier`.

    From a cache, launched by torchrun, each process trains its share of every global batch
    (``cfg.batch_size`` / processes) with DistributedDataParallel (see :mod:`fusion_seg.training.ddp`);
    online training is one process.
    """
    cfg, resume = _checked(cfg, resume)
    if not isinstance(data, (CachedData, OnlineData)):
        raise UserError(f"data={data!r:.60}: pass what the run trains on as fusion_seg.CachedData(cache) (a feature "
                        "store) or fusion_seg.OnlineData(dataset=DatasetRef(...), encoder=..., augment=..., "
                        "resize=...) (images, the encoder run every step).")
    if cfg.patience is not None and not val_cache:
        raise UserError(f"--patience {cfg.patience} stops the run by its val mIoU, and no --val-cache was given: "
                        "pass --val-cache STORE (a store made by `fusion-seg extract` of the val split), or drop "
                        "--patience.")
    cached = isinstance(data, CachedData)
    if cached:
        require_path("cache", data.cache, "the training store (a folder made by `fusion-seg extract`, or a URL)")
    require_path("out", out, "the run folder")
    if not cached:
        kinds = typing.get_type_hints(OnlineData)  # each field's request type
        for f in fields(OnlineData):
            require_type(f"train_online's {f.name}", getattr(data, f.name), kinds[f.name])
    prepared = _from_cache(out, data, cfg, val_cache) if cached else _online(out, data, cfg, val_cache)
    run, training_data, store = prepared.run, prepared.data, prepared.store
    val_store = open_val_store(val_cache, training_data, allow_val_on_train=allow_val_on_train) if val_cache else None
    decoder, names = _make_decoder(cfg, training_data.input_shapes, len(training_data.classes))
    device = resolve_device(cfg.device)
    session = ddp.session(device) if cached else contextlib.nullcontext(DistEnv(device=device))
    with run.claimed(), session as dist:
        echo = _echo if progress and dist.is_main else None
        tier = choose_cache_tier(cfg, store, names, val_store, dist)
        if cached:
            if echo:
                echo(tier.describe())
            source, cache_info = cached_source(str(data.cache), names, cfg, tier, dist, progress=progress, echo=echo)
        else:
            source, cache_info = OnlineSource(prepared.views, prepared.encoder, cfg, dist.device), None
        val_views = (validation_views(val_cache, names, tier, dist.device, cfg, progress=progress, echo=echo)
                     if val_store is not None and dist.is_main else None)
        trainer = Trainer(source, decoder, run, cfg, training_data, dist=dist, val_views=val_views,
                          cache_info=cache_info)
        return trainer.fit(resume=resume, progress=progress)


def train_decoder(cache: str, out: str | Path, cfg: TrainConfig, *, val_cache: str | None = None,
                  resume: bool | str = False, progress: bool = True, allow_val_on_train: bool = False) -> TrainResult:
    """:func:`train` from the feature store ``cache`` (``CachedData(cache)``); the encoder is never loaded."""
    return train(out, cfg, CachedData(cache), val_cache=val_cache, resume=resume, progress=progress,
                 allow_val_on_train=allow_val_on_train)


def train_online(out: str | Path, cfg: TrainConfig, *, dataset: DatasetRef, encoder: EncoderSpec = EncoderSpec(),
                 augment: Augment = Augment(), resize: Resize = Resize(), val_cache: str | None = None,
                 resume: bool | str = False, progress: bool = True, allow_val_on_train: bool = False) -> TrainResult:
    """:func:`train` with the frozen ``encoder`` run every step on ``augment``-ed views of ``dataset``
    (``OnlineData``): the baseline. One process only: under torchrun with several processes this is refused."""
    return train(out, cfg, OnlineData(dataset, encoder, augment, resize), val_cache=val_cache, resume=resume,
                 progress=progress, allow_val_on_train=allow_val_on_train)


@dataclass(frozen=True)
class _Prepared:
    """What a run is assembled from, read before anything is loaded: its folder and training data, and the
    store (from a cache) or the view source and encoder (online)."""

    run: RunDirectory
    data: TrainingData
    store: FeatureStore | None = None
    views: ViewSource | None = None
    encoder: nn.Module | None = None


def _from_cache(out, data: CachedData, cfg: TrainConfig, val_cache: str | None) -> _Prepared:
    """The run folder, the store and what the run trains on (TrainingData), from a cache: the run folder's
    place, the store complete, the crop within its views and a labelled pixel among the usable views checked
    before anything is loaded."""
    cache = data.cache
    run = RunDirectory(out, writes=ddp.is_main_process())
    run.check_location()  # before reading anything: a file, or a folder that is not a run
    store = FeatureStore.open(cache)
    store.check_complete()
    spec = store.spec
    _check_crop(cfg.crop, spec)
    usable = store.usable_views(cfg.views)
    require_labelled_pixels(store, usable, f"the training store {cache}")
    training = TrainingData(
        input_shapes=spec.input_shapes(), classes=list(spec.classes), ignore_index=spec.ignore_index,
        encoder=spec.encoder_identity, dataset=spec.dataset, resize=spec.resize, augment=spec.augment,
        crop=cfg.crop, image_ids=spec.image_ids,
        source={"cache": str(cache), "cache_id": store.content_id(), **_val_source(val_cache)},
        class_weights=_class_weights(cfg, store_label_maps(store, usable), list(spec.classes), spec.ignore_index,
                                     f"the training store {cache}"))
    return _Prepared(run, training, store=store)


def _online(out, data: OnlineData, cfg: TrainConfig, val_cache: str | None) -> _Prepared:
    """The run folder, the view source, the encoder and what the run trains on (TrainingData), online: the
    requests checked as extract checks them, and the settings only a cache has refused."""
    check_view_requests(data.augment, data.resize, data.encoder)  # as extract's: the views are the same
    if ddp.torchrun_world() > 1:
        raise UserError("--online trains in a single process; run it without torchrun, or extract a cache "
                        "(`fusion-seg extract`) and run `train-decoder --cache` under torchrun.")
    if cfg.views is not None:
        raise UserError("--views selects cached views; --online draws a fresh view every epoch and takes no --views.")
    if cfg.resident_dtype != "auto":
        raise UserError(f"--resident-dtype {cfg.resident_dtype} sets how cached training views are held; --online "
                        "computes them every step. Drop it, or train from a cache.")
    run = RunDirectory(out)
    run.check_location()  # before reading anything: a file, or a folder that is not a run
    ds = data.dataset.build()
    if getattr(DECODERS.get(cfg.decoder), "end_to_end", False):
        enc = build_image_encoder()  # e.g. the HRNet baseline: trains from images with its own stem
    else:
        enc = data.encoder.build()
    enc.with_precision(resolve_precision(resolve_device(cfg.device), cfg.precision))  # the identity records it
    views = ViewSource(ds, 1, data.augment, data.resize, enc.identity.mean, enc.identity.std)
    training = TrainingData(
        input_shapes=enc.output_shape(), classes=list(ds.classes), ignore_index=ds.ignore_index,
        encoder=enc.identity, dataset=ds.describe(), resize=data.resize.to_json(), augment=data.augment.to_json(),
        crop=cfg.crop, image_ids=ds.ids,
        source={"online": True, "inputs_id": listing_digest(ds.input_files()), **_val_source(val_cache)},
        class_weights=_class_weights(cfg, (ds[i].mask for i in range(len(ds))), list(ds.classes), ds.ignore_index,
                                     f"{data.dataset.name}/{data.dataset.split}"))
    return _Prepared(run, training, views=views, encoder=enc)


RESUME_CHOICES = (False, True, "auto")


def _checked(cfg: TrainConfig, resume) -> tuple[TrainConfig, bool | str]:
    """The arguments every training entry point checks first: a TrainConfig (a dict is refused with the fix)
    and one of the three ``resume`` choices."""
    require_type("the training config (cfg)", cfg, TrainConfig)
    if resume not in RESUME_CHOICES or not isinstance(resume, (bool, str)):
        raise UserError(f"resume={resume!r}: pass False (start a run), True (continue the run in out) or "
                        "'auto' (continue it when its settings and data are these, else start afresh).")
    return cfg, resume


def _val_source(val_cache: str | None) -> dict:
    """The validation store's path and content identity, as a run's ``data.source`` records them."""
    if not val_cache:
        return {"val_cache": None}
    return {"val_cache": str(val_cache), "val_cache_id": FeatureStore.open(val_cache).content_id()}


def _class_weights(cfg: TrainConfig, label_maps, classes: list[str], ignore_index: int, where: str) -> dict:
    """The loss's class weights (their record: method, weights, counts). The labels are counted only when
    the method needs them (median-freq, inverse-log), and a training set without a single labelled pixel
    is refused then (the trainer refuses it in any case, after its first epoch)."""
    return resolve_class_weights(cfg.class_weights, label_maps, classes, ignore_index, where=where)[1]


TRAINING_COPIES = 4  # a parameter's bytes in training: the weight, its gradient, SGD's momentum, and a spare


def _make_decoder(cfg: TrainConfig, input_shapes: dict[str, ShapeSpec], num_classes: int
                  ) -> tuple[nn.Module, list[str]]:
    """The seeded decoder (recomputing its activations with ``cfg.checkpoint_activations``), and the names of
    the feature maps it reads (all a source needs to load).

    Built first on the ``meta`` device (no memory): a decoder whose parameters cannot fit in memory for
    training (``--decoder-opt widths=[100000,...]``) is refused, naming its size, before any is allocated.
    """
    with torch.device("meta"):
        check_trainable_size(build_decoder(cfg.decoder, input_shapes, num_classes, **cfg.decoder_config),
                             cfg.decoder, cfg.decoder_config)
    torch.manual_seed(cfg.seed)
    decoder = build_decoder(cfg.decoder, input_shapes, num_classes, **cfg.decoder_config)
    if cfg.checkpoint_activations:  # refused here, before any view is loaded, for a decoder without stages
        decoder.set_activation_checkpointing(True)
    return decoder, list(decoder.in_features)


def check_trainable_size(decoder: nn.Module, name: str, config: dict) -> None:
    """Refuse a decoder (built on the ``meta`` device: no memory) whose parameters cannot be trained in this
    machine's memory, naming its size; the recipe check (pipeline/stage_checks.build_check) refuses it the same way."""
    params = sum(p.numel() for p in decoder.parameters())
    problem = memory_problem(params * 4 * TRAINING_COPIES)
    if problem:
        shown = " ".join(f"{k}={v}" for k, v in config.items()) or "its defaults"
        raise UserError(f"decoder {name} ({shown}) has {params / 1e9:,.1f} G parameters: training it needs "
                        f"{problem}. Choose smaller widths or a smaller preset.")


def _check_crop(crop, spec) -> None:
    """A feature-space crop larger than the store's views would only pad them with nothing (and ask for memory in
    proportion): refused, naming the views' size."""
    if crop and (crop[0] > spec.label_shape[0] or crop[1] > spec.label_shape[1]):
        h, w = spec.label_shape
        raise UserError(f"--crop {crop[0]}x{crop[1]} is larger than the store's views ({h}x{w}); pass a crop of at "
                        f"most {h - h % 32}x{w - w % 32} (a multiple of 32), or leave --crop out for whole views.")


def _echo(message: str) -> None:
    """A line for the user (the cache tier, load times), on stderr beside the progress bar."""
    print(message, file=sys.stderr, flush=True)
