"""Stage two: train a decoder, from a feature store or (``--online``) from images.

The two entry points only gather the pieces: what the run trains on (:class:`TrainingData`), its
batch source (sources.py), its validation store (validation.py) and its run directory (run_dir.py),
and hand them to the one loop (:class:`~fusion_seg.training.trainer.Trainer`). They differ only in
where a batch's features come from: read from the cache, or computed by the frozen encoder each step.

A run directory holds ``last.pt`` (every epoch, atomic), ``best.pt`` (best val mIoU), ``metrics.jsonl``
and ``config.json``; ``resume=True`` continues from ``last.pt``. Launched by ``torchrun``,
``train_decoder`` trains with DistributedDataParallel: ``batch_size`` stays the global batch, each
process takes its share of every global batch, and rank 0 alone validates and writes the run directory.
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch
from torch import nn

from fusion_seg.cache.resident import choose_tier, resident_bytes
from fusion_seg.cache.store import FeatureStore
from fusion_seg.data.datasets import DatasetRef
from fusion_seg.data.views import Augment, Resize, ViewSource
from fusion_seg.decoders import DECODERS, build_decoder
from fusion_seg.device import resolve_device
from fusion_seg.encoder.build import EncoderSpec, build_image_encoder
from fusion_seg.errors import UserError
from fusion_seg.shapes import ShapeSpec
from fusion_seg.training import ddp
from fusion_seg.training.class_weights import resolve_class_weights, store_label_maps
from fusion_seg.training.config import TrainConfig, TrainingData, TrainResult
from fusion_seg.training.ddp import DistEnv
from fusion_seg.training.run_dir import RunDirectory
from fusion_seg.training.sources import OnlineSource, cached_source, choose_cache_tier
from fusion_seg.training.trainer import Trainer
from fusion_seg.training.validation import open_val_store, validation_views


def train_decoder(cache: str, out: str | Path, cfg: TrainConfig, *, val_cache: str | None = None,
                  resume: bool = False, progress: bool = True, allow_val_on_train: bool = False) -> TrainResult:
    """Train ``cfg.decoder`` from the feature store ``cache``; the encoder is never loaded.

    A ``val_cache`` that holds the training data (the same store, or one of the same dataset split
    and augmentation) is refused unless ``allow_val_on_train``, which warns instead.

    Launched by torchrun, each process trains its share of every global batch
    (``cfg.batch_size`` / processes) with DistributedDataParallel (see :mod:`fusion_seg.training.ddp`).
    """
    store = FeatureStore.open(cache)
    store.check_complete()
    spec = store.spec
    data = TrainingData(input_shapes=spec.input_shapes(), classes=list(spec.classes), ignore_index=spec.ignore_index,
                        encoder=spec.encoder_identity, dataset=spec.dataset, resize=spec.resize, augment=spec.augment,
                        crop=cfg.crop, image_ids=spec.image_ids,
                        source={"cache": str(cache), "val_cache": str(val_cache) if val_cache else None},
                        class_weights=resolve_class_weights(
                            cfg.class_weights, store_label_maps(store, store.usable_views(cfg.views)),
                            list(spec.classes), spec.ignore_index)[1])
    val_store = open_val_store(val_cache, data, allow_val_on_train=allow_val_on_train) if val_cache else None
    decoder, names = _make_decoder(cfg, data.input_shapes, len(data.classes))
    with ddp.session(resolve_device(cfg.device)) as dist:
        echo = _echo if progress and dist.is_main else None
        tier = choose_cache_tier(cfg, store, names, val_store, dist)
        if echo:
            echo(tier.describe())
        source, cache_info = cached_source(cache, names, cfg, tier, dist, progress=progress, echo=echo)
        val_views = (validation_views(val_cache, names, tier, dist.device, cfg, progress=progress, echo=echo)
                     if val_cache and dist.is_main else None)
        trainer = Trainer(source, decoder, RunDirectory(out, writes=dist.is_main), cfg, data, dist=dist,
                          val_views=val_views, cache_info=cache_info)
        return trainer.fit(resume=resume, progress=progress)


def train_online(out: str | Path, cfg: TrainConfig, *, dataset: DatasetRef, encoder: EncoderSpec = EncoderSpec(),
                 augment: Augment = Augment(), resize: Resize = Resize(), val_cache: str | None = None,
                 resume: bool = False, progress: bool = True, allow_val_on_train: bool = False) -> TrainResult:
    """Train the same decoder with the frozen ``encoder`` run every step on ``augment``-ed views of
    ``dataset`` (no cache): the baseline. An end-to-end decoder (hrnet) takes the images themselves.

    A ``val_cache`` of the training split with the same augmentation is refused unless
    ``allow_val_on_train``, which warns instead.

    One process only: under torchrun with several processes this is refused.
    """
    if ddp.torchrun_world() > 1:
        raise UserError("--online trains in a single process; run it without torchrun, or extract a cache "
                        "(`fusion-seg extract`) and run `train-decoder --cache` under torchrun.")
    if cfg.views is not None:
        raise UserError("--views selects cached views; --online draws a fresh view every epoch and takes no --views.")
    ds = dataset.build()
    if getattr(DECODERS.get(cfg.decoder), "end_to_end", False):
        enc = build_image_encoder()  # e.g. the HRNet baseline: trains from images with its own stem
    else:
        enc = encoder.build()
    views = ViewSource(ds, 1, augment, resize, enc.identity.mean, enc.identity.std)
    data = TrainingData(input_shapes=enc.output_shape(), classes=list(ds.classes), ignore_index=ds.ignore_index,
                        encoder=enc.identity, dataset=ds.describe(), resize=resize.to_json(),
                        augment=augment.to_json(), crop=cfg.crop, image_ids=ds.ids,
                        source={"online": True, "val_cache": str(val_cache) if val_cache else None},
                        class_weights=resolve_class_weights(
                            cfg.class_weights, (ds[i].mask for i in range(len(ds))), list(ds.classes),
                            ds.ignore_index)[1])
    val_store = open_val_store(val_cache, data, allow_val_on_train=allow_val_on_train) if val_cache else None
    device = resolve_device(cfg.device)
    source = OnlineSource(views, enc, cfg, device)
    decoder, names = _make_decoder(cfg, data.input_shapes, len(data.classes))
    val_views = None
    if val_store is not None:  # held in memory when it fits (no training views compete for it)
        tier = choose_tier(cfg.cache_mode, 0, resident_bytes(val_store.spec, names, len(val_store.usable_views())),
                           device)
        val_views = validation_views(val_cache, names, tier, device, cfg, progress=progress,
                                     echo=_echo if progress else None)
    trainer = Trainer(source, decoder, RunDirectory(out), cfg, data, dist=DistEnv(device=device), val_views=val_views)
    return trainer.fit(resume=resume, progress=progress)


def _make_decoder(cfg: TrainConfig, input_shapes: dict[str, ShapeSpec], num_classes: int
                  ) -> tuple[nn.Module, list[str]]:
    """The seeded decoder, and the names of the feature maps it reads (all a source needs to load)."""
    torch.manual_seed(cfg.seed)
    decoder = build_decoder(cfg.decoder, input_shapes, num_classes, **cfg.decoder_config)
    return decoder, list(decoder.in_features)


def _echo(message: str) -> None:
    """A line for the user (the cache tier, load times), on stderr beside the progress bar."""
    print(message, file=sys.stderr, flush=True)
