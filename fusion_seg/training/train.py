"""Stage two: train a decoder, from a feature store or (``--online``) from images.

Both paths share one loop; they differ only in where a batch's features come
from: read from the cache, or computed by the frozen encoder each step. With the
same seed and no random crop the two give the same losses up to fp16 rounding of
the cached features (tested).

The recipe is HRNet's: SGD (momentum 0.9, weight decay 5e-4), lr 0.01 with poly
decay (power 0.9) per iteration, OHEM cross-entropy, ignore index from the data.

A run directory holds ``last.pt`` (every epoch, atomic), ``best.pt`` (best val
mIoU), ``metrics.jsonl`` and ``config.json``. ``resume=True`` continues from
``last.pt``; since every random draw is seeded by (seed, epoch, index), the
losses after a resume equal those of an uninterrupted run.

Launched by ``torchrun``, ``train_decoder`` trains with DistributedDataParallel:
``batch_size`` stays the global batch, each process takes its share of every
global batch, and rank 0 alone validates and writes the run directory, whose
checkpoints are those of a single process (a resume may change the process count).
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import resource
import sys
import textwrap
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from torch import nn

from fusion_seg.training import ddp
from fusion_seg.cache.store import FeatureStore
from fusion_seg.cache.reader import CachedViews, collate_views
from fusion_seg.checkpoint import load_checkpoint, save_checkpoint
from fusion_seg.data.datasets import build_dataset
from fusion_seg.training.ddp import DistEnv
from fusion_seg.device import autocast, memory_format, resolve_device, to_device
from fusion_seg.encoder.build import build_encoder, build_image_encoder
from fusion_seg.encoder.identity import DEFAULT_ENCODER, DEFAULT_STRIDES, EncoderIdentity
from fusion_seg.errors import CheckpointError, Failed, UserError
from fusion_seg.training.losses import build_loss, decoder_loss
from fusion_seg.evaluation.metrics import SegEvaluator
from fusion_seg.decoders import decoder_from_record, decoder_record
from fusion_seg.decoders.base import upsample_logits
from fusion_seg.plots import plot_if_available
from fusion_seg.progress import Progress, TensorBoardLog, format_duration, require_tensorboard
from fusion_seg.cache.resident import ResidentViews, TierChoice, choose_tier, resident_bytes
from fusion_seg.decoders import DECODERS, build_decoder
from fusion_seg.shapes import ShapeSpec
from fusion_seg.data.views import Augment, Resize, ViewSource


@dataclass
class TrainConfig:
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
    seed: int = 0
    init: str | None = None  # a checkpoint to start from (two-stage schedules)
    workers: int = 2
    val_every: int = 1
    log_every: int = 10
    device: str = "auto"
    # Where cached views are read from (resident.py): auto, device, ram or stream. Operational: every
    # tier gives the same batches in a single process, so a resume may change it.
    cache_mode: str = "auto"
    # SyncBatchNorm across torchrun processes. Operational, like the number of processes (which a
    # resume may change): both only decide over how many samples BatchNorm takes its statistics.
    sync_bn: bool = False
    # Also write the scalars to RUN_DIR/tensorboard (needs the tensorboard extra). Operational: logging only.
    tensorboard: bool = False

    def schedule(self) -> dict:
        """The settings a run must keep to be resumed (not the operational ones: workers, device, logging,
        and how the work is spread over processes)."""
        operational = {"workers", "device", "log_every", "val_every", "sync_bn", "cache_mode", "tensorboard"}
        return {k: v for k, v in asdict(self).items() if k not in operational}

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        """Refuse out-of-range settings (a UserError naming the option) before any work is done."""
        from fusion_seg.checks import (CACHE_MODES, FEATURE_CROP_ALIGN, fraction_problem, int_problem, non_negative_problem,
                             require, size_problem)

        for name, minimum in (("epochs", 1), ("batch_size", 1), ("ohem_min_kept", 1), ("seed", 0), ("workers", 0),
                              ("val_every", 1), ("log_every", 1)):
            require("--" + name.replace("_", "-"), getattr(self, name), int_problem(getattr(self, name), minimum))
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
        if self.crop is not None:  # from a cache: a feature-space crop
            require("--crop", self.crop, size_problem(self.crop, FEATURE_CROP_ALIGN), sep="x")
        if self.loss not in ("ohem", "ce"):
            require("--loss", self.loss, "choose ohem or ce")
        if self.cache_mode not in CACHE_MODES:
            require("--cache-mode", self.cache_mode, f"choose one of {', '.join(CACHE_MODES)}")


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


# --------------------------------------------------------------------------- batch sources
class CacheSource:
    """Batches of cached features."""

    online = False

    def __init__(self, path: str, names: list[str], cfg: TrainConfig, device: torch.device,
                 dist: DistEnv | None = None):
        self.views = CachedViews(path, names, crop=cfg.crop, seed=cfg.seed, max_views_per_image=cfg.views)
        self.spec = self.views.spec
        self.device = device
        self.cfg = cfg
        self.dist = dist or DistEnv(device=device)

    def __len__(self) -> int:
        return len(self.views)

    def batches(self, epoch: int) -> Iterator[tuple[dict, torch.Tensor]]:
        self.views.set_epoch(epoch)
        for batch in _loader(self.views, self.cfg, epoch, collate_views, self.device, self.dist):
            features, labels = Failed.check(batch)
            yield ({k: to_device(v, self.device).float() for k, v in features.items()},
                   to_device(labels, self.device))


class ResidentSource:
    """Batches cut from views held in memory (``--cache-mode device`` or ``ram``, see resident.py).

    The same seeded sampler and batch rule as :func:`_loader`, so a single process draws exactly
    the stream tier's batches; under torchrun each process samples its own shard of the views.
    """

    online = False

    def __init__(self, views: ResidentViews, cfg: TrainConfig, dist: DistEnv):
        self.views, self.cfg, self.dist = views, cfg, dist
        self.spec = views.spec

    def __len__(self) -> int:
        return len(self.views.all_views)  # all processes' views, as CacheSource counts them

    def batches(self, epoch: int) -> Iterator[tuple[dict, torch.Tensor]]:
        sampler = _sampler(range(len(self.views)), self.cfg, epoch, DistEnv(device=self.dist.device))  # its shard
        batches = torch.utils.data.BatchSampler(sampler, self.dist.local_batch(self.cfg.batch_size),
                                                drop_last=len(self) >= self.cfg.batch_size)
        for positions in batches:
            yield self.views.batch(positions, epoch)


class OnlineSource:
    """Batches made from images each step: augmentation, then the frozen encoder."""

    online = True

    def __init__(self, views: ViewSource, encoder, cfg: TrainConfig, device: torch.device):
        self.views = views
        self.encoder = encoder.to(device, memory_format=memory_format(device))
        self.device = device
        self.cfg = cfg

    def __len__(self) -> int:
        return len(self.views)

    def batches(self, epoch: int) -> Iterator[tuple[dict, torch.Tensor]]:
        self.views.view_offset = epoch  # a fresh augmentation every epoch
        for batch in _loader(self.views, self.cfg, epoch, _collate_images, self.device):
            images, labels = Failed.check(batch)
            with autocast(self.device):
                features = self.encoder(to_device(images, self.device))
            # Inference tensors cannot be saved for backward: clone them into normal tensors.
            yield ({k: v.float().clone() for k, v in features.items()}, to_device(labels, self.device))


def _collate_images(items):
    bad = Failed.first(items)
    if bad is not None:
        return bad  # raised by the consumer, in the main process (collate runs in the worker)
    shapes = {tuple(it["image"].shape) for it in items}
    if len(shapes) > 1:
        raise UserError(f"images have different sizes {sorted(shapes)}; pass --crop or --size, or --batch-size 1.")
    return torch.stack([it["image"] for it in items]), torch.stack([it["labels"].long() for it in items])


def _loader(dataset, cfg: TrainConfig, epoch: int, collate, device, dist: DistEnv | None = None):
    """This process's batches of epoch ``epoch``: its ``batch_size / world`` share of each global batch.

    Every process shuffles all items with the same seeded permutation and takes every
    ``world``-th item of it, so the k-th batches of all processes together are items
    ``[k*B, (k+1)*B)`` of the permutation, the k-th batch of one process at the global batch
    ``B``. Steps per epoch are ``floor(floor(n/world)/b) == floor(n/B)`` for any ``world``.
    A dataset smaller than ``B`` gives one smaller batch per epoch (of ``floor(n/world)`` items).
    """
    dist = dist or DistEnv(device=device)
    if len(dataset) < dist.world:
        raise UserError(f"{len(dataset)} training views cannot be shared among {dist.world} processes; "
                        "start fewer processes or use a larger training set.")
    sampler = _sampler(dataset, cfg, epoch, dist)
    return torch.utils.data.DataLoader(
        dataset, batch_size=dist.local_batch(cfg.batch_size), sampler=sampler, num_workers=cfg.workers,
        collate_fn=collate, drop_last=len(dataset) >= cfg.batch_size, pin_memory=device.type == "cuda",
    )


def _sampler(dataset, cfg: TrainConfig, epoch: int, dist: DistEnv) -> torch.utils.data.DistributedSampler:
    """The order of epoch ``epoch``'s items for this process, the one rule of every cache tier.

    DistributedSampler shuffles with randperm seeded by seed + epoch: seed * 100003 keeps seeds 0 and 1
    from sharing permutations one epoch apart, and keeps one process's order what it was before DDP.
    """
    sampler = torch.utils.data.DistributedSampler(dataset, num_replicas=dist.world, rank=dist.rank, shuffle=True,
                                                  seed=cfg.seed * 100003, drop_last=True)
    sampler.set_epoch(epoch)
    return sampler


# --------------------------------------------------------------------------- validation
class ValidationViews:
    """The views of a (whole-image) validation store, one at a time: held in memory when the cache
    tier allows it (loaded once, here), else read by a DataLoader every validation."""

    def __init__(self, path: str, names: list[str], device: torch.device, mode: str = "stream", workers: int = 0,
                 progress: bool = True):
        self.path, self.names, self.device, self.mode = path, names, device, mode
        self.workers, self.progress = workers, progress
        self.spec = FeatureStore.open(path).spec
        self._views = (ResidentViews(path, names, device, mode, progress=progress, echo=_echo if progress else None)
                       if mode in ("device", "ram") else None)

    def __iter__(self) -> Iterator[tuple[dict, torch.Tensor]]:
        if self._views is not None:
            for j in range(len(self._views)):
                yield self._views.batch([j])
            return
        loader = torch.utils.data.DataLoader(CachedViews(self.path, self.names), batch_size=1,
                                             num_workers=self.workers, collate_fn=collate_views)
        for batch in loader:
            features, labels = Failed.check(batch)
            yield {k: to_device(v, self.device).float() for k, v in features.items()}, labels


def validate(decoder: nn.Module, views: ValidationViews, num_classes: int, classes, device) -> dict:
    """mIoU of ``decoder`` on every view of a (whole-image) feature store."""
    evaluator = SegEvaluator(num_classes, views.spec.ignore_index, list(classes))
    was_training = decoder.training
    decoder.eval()
    with torch.inference_mode():
        for features, labels in views:
            with autocast(device):
                logits = decoder(features)
            pred = upsample_logits(logits.float(), labels.shape[-2:]).argmax(1)
            evaluator.process(pred.cpu(), labels.cpu())
    decoder.train(was_training)
    return evaluator.evaluate()


# --------------------------------------------------------------------------- the loop
def _make_decoder(cfg: TrainConfig, input_shapes: dict[str, ShapeSpec], num_classes: int):
    """The seeded decoder, and the names of the feature maps it reads."""
    torch.manual_seed(cfg.seed)
    decoder = build_decoder(cfg.decoder, input_shapes, num_classes, **cfg.decoder_config)
    return decoder, [n for n, s in input_shapes.items() if s.stride in decoder.required_strides]


def _fit(source, decoder: nn.Module, names: list[str], run_dir: Path, cfg: TrainConfig, *,
         input_shapes: dict[str, ShapeSpec], classes: list[str], ignore_index: int, encoder: dict, data: dict,
         val_views: ValidationViews | None, resume: bool, progress: bool, dist: DistEnv | None = None,
         cache_info: dict | None = None) -> TrainResult:
    """The training loop; under torchrun, one of ``dist.world`` processes (rank 0 writes every output)."""
    dist = dist or DistEnv(device=resolve_device(cfg.device))
    device = dist.device
    if resume and not (run_dir / "last.pt").exists():
        raise CheckpointError(f"--resume: {run_dir} holds no last.pt to continue from (no epoch of a run there has "
                              "finished). Drop --resume to start the run from scratch, or pass the --out of the "
                              "run to continue.")
    if cfg.tensorboard:
        require_tensorboard()
    ddp.check_sync_bn(cfg.sync_bn, dist)
    decoder = decoder.to(device)
    if device.type == "cuda":
        decoder = decoder.to(memory_format=torch.channels_last)
    if cfg.sync_bn and dist.distributed:
        decoder = nn.SyncBatchNorm.convert_sync_batchnorm(decoder)  # same state-dict keys as BatchNorm
    # OHEM keeps at least min_kept pixels of the (global) batch: each process keeps its share of them.
    criterion = build_loss(cfg.loss, ignore_index, thresh=cfg.ohem_thresh,
                           min_kept=-(-cfg.ohem_min_kept // dist.world))
    optimizer = torch.optim.SGD(decoder.parameters(), lr=cfg.lr, momentum=cfg.momentum,
                                weight_decay=cfg.weight_decay)
    steps_per_epoch = len(source) // cfg.batch_size if len(source) >= cfg.batch_size else 1
    total_steps = max(1, steps_per_epoch * cfg.epochs)
    scheduler = torch.optim.lr_scheduler.PolynomialLR(optimizer, total_iters=total_steps, power=cfg.poly_power)
    record = decoder_record(cfg.decoder, decoder, input_shapes, len(classes))

    run_dir.mkdir(parents=True, exist_ok=True)
    last, best_path, log_path = run_dir / "last.pt", run_dir / "best.pt", run_dir / "metrics.jsonl"
    start_epoch, step, best = 0, 0, None
    init_info = None
    lr_changes: list[dict] = []  # explicit --lr changes on resume: {"epoch", "step", "from", "to"}
    lr_change = None
    if cfg.init and not resume:
        init_info = init_from_checkpoint(decoder, cfg.init, record, classes, encoder)
    if resume:
        ckpt = load_checkpoint(last)
        old_lr = _check_resumable(ckpt, record, cfg, classes, encoder, last)
        decoder.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        start_epoch, step, best = ckpt["epoch"], ckpt["step"], ckpt.get("best_miou")
        init_info = ckpt.get("init")
        lr_changes = list(ckpt.get("lr_changes") or [])
        if old_lr is not None:  # the poly decay continues from the new base lr
            _set_base_lr(optimizer, scheduler, cfg.lr, step, total_steps, cfg.poly_power)
            lr_change = {"epoch": start_epoch + 1, "step": step, "from": old_lr, "to": cfg.lr}
            lr_changes.append(lr_change)
        if dist.is_main:
            _truncate_log(log_path, start_epoch, step)
    elif last.exists():
        raise UserError(f"{run_dir} already holds a run (last.pt). Pass --resume to continue it, or choose a new --out.")
    elif log_path.exists() and dist.is_main:
        log_path.unlink()
    if dist.is_main:
        (run_dir / "config.json").write_text(json.dumps(
            {"train": asdict(cfg), "decoder": record, "classes": classes, "encoder": encoder, "data": data,
             "world_size": dist.world}, indent=2))

    def payload(epoch: int) -> dict:
        return {"decoder": record, "classes": classes, "ignore_index": ignore_index, "encoder": encoder,
                "data": data, "train": asdict(cfg), "init": init_info, "epoch": epoch, "step": step, "best_miou": best,
                "world_size": dist.world, "lr_changes": lr_changes,
                # the unwrapped decoder's keys: no DDP "module." prefix
                "model": decoder.state_dict(), "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict()}

    losses: list[float] = []
    val = None
    t0 = time.perf_counter()
    model = _distributed(decoder, dist)
    model.train()
    # Only rank 0 writes the log (and TensorBoard) and shows progress; the others log into /dev/null.
    # Epochs are numbered 1..E in every record: "epoch" is the epoch being (or just) trained.
    with open(log_path if dist.is_main else os.devnull, "a") as log, \
            Progress(total_steps, f"train {run_dir.name}", "step", initial=step,
                     enabled=progress and dist.is_main) as bar, \
            TensorBoardLog(run_dir / "tensorboard", enabled=cfg.tensorboard and dist.is_main,
                           purge_step=step + 1 if step else None) as board:
        bar.write(_describe_run(run_dir, cfg, data, device, dist, len(source), steps_per_epoch, total_steps,
                                start_epoch, step))
        if lr_change is not None:
            _log(log, {"type": "lr_change", **lr_change})
            bar.write(f"learning rate changed on resume: {lr_change['from']:g} -> {lr_change['to']:g} from epoch "
                      f"{lr_change['epoch']} (step {step + 1}); recorded in {log_path.name} and the checkpoints")
        for epoch in range(start_epoch, cfg.epochs):
            epoch_losses = []
            epoch_t0 = time.perf_counter()
            for features, labels in source.batches(epoch):
                loss = decoder_loss(model, decoder, features, labels, criterion, device)
                value = dist.mean(loss)  # over all processes: the loss of the global batch, on every rank
                if not math.isfinite(value):
                    raise UserError(_diverged_message(value, step, epoch, cfg, run_dir, last))
                optimizer.zero_grad(set_to_none=True)
                loss.backward()  # under DDP this averages the gradients over the processes
                optimizer.step()
                scheduler.step()
                step += 1
                losses.append(value)
                epoch_losses.append(value)
                lr = optimizer.param_groups[0]["lr"]
                bar.update(1, epoch=f"{epoch + 1}/{cfg.epochs}", loss=f"{value:.4f}", lr=f"{lr:.3g}")
                if step % cfg.log_every == 0:
                    _log(log, {"type": "step", "epoch": epoch + 1, "step": step, "loss": value, "lr": lr})
                    board.add({"train/loss": value, "train/lr": lr}, step)
            record_epoch = {"type": "epoch", "epoch": epoch + 1, "step": step,
                            "loss": float(np.mean(epoch_losses)) if epoch_losses else None,
                            "seconds": time.perf_counter() - t0}
            # Rank 0 alone validates (on the unwrapped decoder: no collectives) and writes; the others wait.
            if dist.is_main:
                if val_views and ((epoch + 1) % cfg.val_every == 0 or epoch + 1 == cfg.epochs):
                    val = validate(decoder, val_views, len(classes), classes, device)
                    record_epoch["val"] = {k: val[k] for k in ("miou", "pixel_acc", "mean_acc", "per_class_iou")}
                    if best is None or val["miou"] > best:
                        best = val["miou"]
                        save_checkpoint(best_path, payload(epoch + 1) | {"val": record_epoch["val"]})
                _log(log, record_epoch)
                board.add({"epoch/loss": record_epoch["loss"],
                           **({"val/miou": record_epoch["val"]["miou"], "val/pixel_acc": record_epoch["val"]["pixel_acc"]}
                              if "val" in record_epoch else {})}, step)
                bar.write(_epoch_line(record_epoch, cfg.epochs, time.perf_counter() - epoch_t0))
                save_checkpoint(last, payload(epoch + 1))
            dist.barrier()
        peak = peak_memory_mib(device)
        if dist.is_main:
            if not val_views:  # without validation, the final model is the best one we know
                save_checkpoint(best_path, payload(cfg.epochs))
            _log(log, {"type": "summary", "epoch": cfg.epochs, "step": step, "seconds": time.perf_counter() - t0,
                       "steps_this_run": len(losses), "world_size": dist.world, "peak_memory_MiB": peak,
                       "peak_memory_kind": "cuda_max_allocated" if device.type == "cuda" else "process_max_rss",
                       "peak_memory_scope": "rank 0, per process" if dist.distributed else "the process",
                       **({"cache": cache_info} if cache_info else {})})
    if dist.is_main:
        plot_if_available("plot_training_curves", log_path, run_dir / "curves.png")
    dist.barrier()  # every process returns once the run directory is complete
    return TrainResult(str(run_dir), cfg.epochs, step, losses, best, val, time.perf_counter() - t0, peak, cache_info)




def _distributed(decoder: nn.Module, dist: DistEnv) -> nn.Module:
    """``decoder`` wrapped in DistributedDataParallel when several processes train it; else itself.

    The wrapper is used for the training forward only: validation and checkpoints use ``decoder``.
    """
    if not dist.distributed:
        return decoder
    device_ids = [dist.device.index] if dist.device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(decoder, device_ids=device_ids)


def peak_memory_mib(device: torch.device) -> float:
    """Peak memory of this process so far: CUDA's max allocated, or the process's max RSS on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def class_dependent_keys(record: dict) -> set[str]:
    """State-dict keys whose shape depends on the number of classes (classifiers, auxiliary heads)."""
    n = int(record["num_classes"])
    a = decoder_from_record(record).state_dict()
    b = decoder_from_record({**record, "num_classes": n + 1}).state_dict()
    return {k for k in a if a[k].shape != b[k].shape}


def init_from_checkpoint(decoder: nn.Module, path: str, record: dict, classes: list[str], encoder: dict) -> dict:
    """Start ``decoder`` from a decoder trained on another dataset (the paper's two-stage schedules).

    Everything carries over when the class lists are equal; otherwise the class-dependent
    layers (the classifier) keep their fresh initialisation. The encoder must be the same,
    and so must the architecture.
    """
    ckpt = load_checkpoint(path)
    enc_diffs = EncoderIdentity.from_dict(ckpt["encoder"]).differences(EncoderIdentity.from_dict(encoder))
    if enc_diffs:
        raise CheckpointError(f"--init {path} was trained on features of another encoder: " + "; ".join(enc_diffs)
                              + ". Extract both datasets with the same encoder and weights.")
    theirs = ckpt["decoder"]
    if (theirs["name"], theirs["config"], theirs["input_shapes"]) != (record["name"], record["config"],
                                                                      record["input_shapes"]):
        raise CheckpointError(f"--init {path} holds decoder {theirs['name']} {theirs['config']}, not "
                              f"{record['name']} {record['config']}; train with the same --decoder settings.")
    same_classes = list(ckpt["classes"]) == list(classes)
    skip = set() if same_classes else class_dependent_keys(record)
    state = {k: v for k, v in ckpt["model"].items() if k not in skip}
    decoder.load_state_dict(state, strict=same_classes)
    return {"checkpoint": str(path), "sha256": hashlib.sha256(Path(path).read_bytes()).hexdigest(),
            "classes": list(ckpt["classes"]), "dataset": ckpt["data"].get("dataset", {}).get("name"),
            "reinitialised": sorted(skip)}


def _log(f, record: dict) -> None:
    f.write(json.dumps(record) + "\n")
    f.flush()


def _truncate_log(path: Path, epoch: int, step: int) -> None:
    """Drop log records written after the checkpoint being resumed (a partial epoch), which ended ``epoch``
    at ``step``. Steps are numbered alike in logs of every version, so step records are kept by step."""
    if not path.exists():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut by the interruption
        kind = rec.get("type")
        if kind == "summary":
            continue  # rewritten at the end of the resumed run
        if kind == "epoch":
            done = rec["epoch"] <= epoch
        elif kind == "lr_change":
            done = rec.get("step", 0) < step  # a change made on resuming this checkpoint is made again
        else:
            done = rec.get("step", 0) <= step
        if done:
            keep.append(line)
    path.write_text("".join(k + "\n" for k in keep))


def _differences(ours, theirs, name: str) -> list[str]:
    """``name.key A vs B`` for each key whose value differs (one level into dicts), or ``name A vs B``."""
    if isinstance(ours, dict) and isinstance(theirs, dict):
        def shown(d, k):
            return repr(d[k]) if k in d else "(unset)"
        return [f"{name}.{k} {shown(ours, k)} vs {shown(theirs, k)}"
                for k in sorted(set(ours) | set(theirs), key=str) if ours.get(k, ...) != theirs.get(k, ...)]
    return [f"{name} {ours!r} vs {theirs!r}"] if ours != theirs else []


def _check_resumable(ckpt: dict, record: dict, cfg: TrainConfig, classes, encoder: dict, path: Path) -> float | None:
    """Refuse to resume ``ckpt`` with other settings, listing each that differs with both values.

    The learning rate alone may change (after a divergence, say): then this returns the checkpoint's
    lr, for the caller to apply and record; else None.
    """
    diffs = []
    theirs = ckpt["decoder"]
    for key in ("name", "num_classes", "config", "input_shapes"):
        diffs += _differences(theirs.get(key), record.get(key), "decoder" if key == "name" else f"decoder {key}")
    stored, now = TrainConfig(**ckpt["train"]).schedule(), cfg.schedule()
    changed = [k for k in now if stored.get(k) != now[k]]
    decoder_differs = (theirs.get("name"), theirs.get("config")) != (record.get("name"), record.get("config"))
    for k in changed:
        if k in ("decoder", "decoder_config") and decoder_differs:
            continue  # listed above, as the decoder's resolved settings
        diffs += _differences(stored.get(k), now[k], k)
    if list(ckpt["classes"]) != list(classes):
        diffs.append(f"classes {list(ckpt['classes'])} vs {list(classes)}")
    enc_diffs = EncoderIdentity.from_dict(ckpt["encoder"]).differences(EncoderIdentity.from_dict(encoder))
    diffs += [f"encoder {d}" for d in enc_diffs]
    if changed == ["lr"] and len(diffs) == 1:
        return stored["lr"]
    if diffs:
        note = " (--lr alone may change on --resume)" if "lr" in changed else ""
        raise CheckpointError(f"cannot resume from {path}: these settings differ (checkpoint vs now): "
                              + "; ".join(diffs) + f". Pass the checkpoint's settings to continue it{note}, "
                              "or use a new --out.")
    return None


def resumed_lr(run_dir: str | Path, default: float) -> float:
    """The learning rate of the run in ``run_dir`` (its last.pt), else ``default``: the CLI's ``--resume``
    without ``--lr`` keeps it, so only an explicit ``--lr`` changes it."""
    last = Path(run_dir) / "last.pt"
    if not last.is_file():
        return default
    try:
        return float(load_checkpoint(last)["train"]["lr"])
    except (UserError, KeyError, TypeError, ValueError):
        return default  # the resume itself reports what is wrong with the checkpoint


def _set_base_lr(optimizer, scheduler, lr: float, step: int, total_steps: int, power: float) -> None:
    """Make ``lr`` the base of the poly decay from ``step`` on, as if the run had started with it."""
    for group in optimizer.param_groups:
        group["initial_lr"] = lr
        group["lr"] = lr * (1.0 - min(step, total_steps) / total_steps) ** power
    scheduler.base_lrs = [lr] * len(optimizer.param_groups)


def _diverged_message(value: float, step: int, epoch: int, cfg: TrainConfig, run_dir: Path, last: Path) -> str:
    lower = f"{cfg.lr / 10:g}"
    what = f"the loss became {value} at step {step + 1} (epoch {epoch + 1}/{cfg.epochs}): training diverged."
    if last.exists():
        return (f"{what} {last} holds the last good state (end of epoch {epoch}). Continue from it with a lower "
                f"--lr: run the same command with --resume --lr {lower}, i.e. `fusion-seg train-decoder <the same "
                f"options> --out {run_dir} --resume --lr {lower}` (--lr is the one setting --resume lets you "
                "change; the change is recorded in metrics.jsonl and the checkpoint).")
    return (f"{what} No checkpoint was written yet, so start again with a lower --lr: run the same command "
            f"without --resume and with --lr {lower}, i.e. `fusion-seg train-decoder <the same options> --out "
            f"{run_dir} --lr {lower}`.")


def _describe_run(run_dir: Path, cfg: TrainConfig, data: dict, device: torch.device, dist: DistEnv, views: int,
                  steps_per_epoch: int, total_steps: int, start_epoch: int, step: int) -> str:
    """The run's resolved settings, one compact block (printed at its start)."""
    source = data.get("source", {})
    where = "online (encoder every step)" if source.get("online") else f"cache {source.get('cache')}"
    head = (f"train {run_dir}: {where}, val cache {source.get('val_cache') or 'none'}, device {device}"
            f"{f' x {dist.world} processes' if dist.distributed else ''}, {views} views, {steps_per_epoch} "
            f"steps/epoch x {cfg.epochs} epochs = {total_steps} steps")
    if start_epoch:
        head += f"; resuming after epoch {start_epoch} (step {step})"
    settings = " ".join(f"{k}={json.dumps(v, separators=(',', ':')) if isinstance(v, (dict, list)) else v}"
                        for k, v in asdict(cfg).items())
    return head + "\n" + textwrap.fill(settings, width=110, initial_indent="  ", subsequent_indent="  ",
                                       break_on_hyphens=False)


def _epoch_line(record: dict, epochs: int, seconds: float) -> str:
    loss = f"{record['loss']:.4f}" if record.get("loss") is not None else "n/a"
    line = f"epoch {record['epoch']}/{epochs}: mean loss {loss}"
    if "val" in record:
        line += f", val mIoU {record['val']['miou']:.4f}, pixel acc {record['val']['pixel_acc']:.4f}"
    return line + f" ({format_duration(seconds)})"


# --------------------------------------------------------------------------- entry points
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
    if val_cache:
        val_store = FeatureStore.open(val_cache)
        val_store.check_complete()
        _check_val_store(spec, val_store, val_cache, train_path=cache, allow_val_on_train=allow_val_on_train)
    shapes = spec.input_shapes()
    decoder, names = _make_decoder(cfg, shapes, len(spec.classes))
    data = {"dataset": spec.dataset, "resize": spec.resize, "augment": spec.augment, "crop": cfg.crop,
            "source": {"cache": str(cache), "val_cache": str(val_cache) if val_cache else None}}
    with ddp.session(resolve_device(cfg.device)) as dist:
        tier = _choose_tier(cfg, store, names, val_store if val_cache else None, dist)
        if progress and dist.is_main:
            _echo(tier.describe())
        cache_info = {"mode": tier.mode, "requested": tier.requested, "resident_bytes": 0,
                      "val_resident": tier.val_resident, "load_seconds": 0.0, "reason": tier.reason}
        if tier.mode == "stream":
            source = CacheSource(cache, names, cfg, dist.device, dist)
        else:
            views = ResidentViews(cache, names, dist.device, tier.mode, crop=cfg.crop, seed=cfg.seed,
                                  max_views_per_image=cfg.views, rank=dist.rank, world=dist.world,
                                  progress=progress and dist.is_main, echo=_echo if progress and dist.is_main else None)
            source = ResidentSource(views, cfg, dist)
            cache_info.update(resident_bytes=views.nbytes, load_seconds=views.load_seconds)
        val_views = (ValidationViews(val_cache, names, dist.device, tier.mode if tier.val_resident else "stream",
                                     workers=min(cfg.workers, 1), progress=progress)
                     if val_cache and dist.is_main else None)
        return _fit(source, decoder, names, Path(out), cfg, input_shapes=shapes, classes=list(spec.classes),
                    ignore_index=spec.ignore_index, encoder=spec.encoder, data=data, val_views=val_views,
                    resume=resume, progress=progress, dist=dist, cache_info=cache_info)


def _choose_tier(cfg: TrainConfig, store: FeatureStore, names: list[str], val_store: FeatureStore | None,
                 dist: DistEnv) -> TierChoice:
    """The cache tier for this process: its shard of the training views, plus the validation views on rank 0."""
    usable = len(store.usable_views(cfg.views))
    per_process = usable // dist.world if dist.distributed else usable
    train_bytes = resident_bytes(store.spec, names, per_process)
    val_bytes = resident_bytes(val_store.spec, names, len(val_store.usable_views())) if val_store and dist.is_main else 0
    local = int(os.environ.get("LOCAL_WORLD_SIZE", "1")) if dist.distributed else 1
    return choose_tier(cfg.cache_mode, train_bytes, val_bytes, dist.device, local_processes=local)


def _echo(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _check_val_store(train_spec, val_store: FeatureStore, path: str, *, train_path: str | None = None,
                     allow_val_on_train: bool = False) -> None:
    """Refuse a validation store that does not match the training cache, or that holds the training data."""
    diffs = []
    if list(val_store.spec.classes) != list(train_spec.classes):
        diffs.append(f"classes {list(val_store.spec.classes)} != {list(train_spec.classes)}")
    if val_store.spec.ignore_index != train_spec.ignore_index:
        diffs.append(f"ignore index {val_store.spec.ignore_index} != {train_spec.ignore_index}")
    enc = EncoderIdentity.from_dict(val_store.spec.encoder).differences(EncoderIdentity.from_dict(train_spec.encoder))
    diffs += [f"encoder {d}" for d in enc]
    if diffs:
        raise UserError(f"--val-cache {path} does not match the training cache: " + "; ".join(diffs)
                        + ". Extract the val split with the same dataset and encoder.")
    _check_not_training_data(val_store, path, train_spec.dataset, train_spec.augment, train_spec.image_ids,
                             train_path=train_path, allow=allow_val_on_train)


def _check_not_training_data(val_store: FeatureStore, path: str, dataset: dict, augment: dict, image_ids, *,
                             train_path: str | None, allow: bool) -> None:
    """Refuse (or with ``allow``, warn about) a validation store that holds the training data: the training
    store itself, or a store of the same dataset split with the same augmentation (its seed aside: other
    random crops of the same images) that shares images with it."""
    from fusion_seg.cache import locations as store_url

    def where(p) -> str:
        return os.path.realpath(store_url.local_path(p)) if store_url.is_local(p) else str(p).rstrip("/")

    val = val_store.spec
    strip = lambda a: {k: v for k, v in (a or {}).items() if k != "seed"}  # noqa: E731
    if train_path is not None and where(train_path) == where(path):
        why = "it is the training store"
    elif (val.dataset.get("name") == dataset.get("name") and val.dataset.get("split") == dataset.get("split")
          and strip(val.augment) == strip(augment) and not set(val.image_ids).isdisjoint(image_ids)):
        crops = "augmented crops" if (augment or {}).get("enabled") else "images"
        why = (f"it holds {crops} of the training split ({dataset.get('name')}/{dataset.get('split')}, "
               "same augmentation)")
    else:
        return
    if not allow:
        raise UserError(f"--val-cache {path} holds the training data: {why}, so validation would score the model on "
                        "what it trains on. Pass a store of the validation split (`fusion-seg extract --split val "
                        "--no-augment`), or --allow-val-on-train to validate on training data anyway.")
    if ddp.is_main_process():
        print(f"warning: --val-cache {path} holds the training data ({why}); validating on it anyway "
              "(--allow-val-on-train): its scores are not validation scores.", file=sys.stderr, flush=True)


def train_online(out: str | Path, cfg: TrainConfig, *, dataset: str, split: str, root: str | None = None,
                 augment: bool = True, crop: tuple[int, int] = (512, 512), scale_range=(0.5, 2.0),
                 flip: bool = True, short_side: int | None = None, size: tuple[int, int] | None = None,
                 encoder: str = DEFAULT_ENCODER, weights: str | None = None, random_init: bool = False,
                 seed: int = 0, strides=DEFAULT_STRIDES, val_cache: str | None = None, resume: bool = False,
                 dataset_options: dict | None = None, progress: bool = True,
                 allow_val_on_train: bool = False) -> TrainResult:
    """Train the same decoder with the frozen encoder run every step (no cache): the baseline.

    A ``val_cache`` of the training split with the same augmentation is refused unless
    ``allow_val_on_train``, which warns instead.

    One process only: under torchrun with several processes this is refused.
    """
    if ddp.torchrun_world() > 1:
        raise UserError("--online trains in a single process; run it without torchrun, or extract a cache "
                        "(`fusion-seg extract`) and run `train-decoder --cache` under torchrun.")
    if cfg.views is not None:
        raise UserError("--views selects cached views; --online draws a fresh view every epoch and takes no --views.")
    ds = build_dataset(dataset, root=root, split=split, **(dataset_options or {}))
    if getattr(DECODERS.get(cfg.decoder), "end_to_end", False):
        enc = build_image_encoder()  # e.g. the HRNet baseline: trains from images with its own stem
    else:
        enc = build_encoder(encoder, weights_file=weights, random_init=random_init, seed=seed, strides=strides)
    aug = Augment(enabled=augment, crop=tuple(crop) if augment else None, scale_range=tuple(scale_range),
                  flip=flip if augment else False, seed=seed)
    rsz = Resize(short_side=short_side, size=tuple(size) if size else None)
    views = ViewSource(ds, 1, aug, rsz, enc.identity.mean, enc.identity.std)
    if val_cache:
        val_store = FeatureStore.open(val_cache)
        if list(val_store.spec.classes) != list(ds.classes):
            raise UserError(f"--val-cache {val_cache} has classes {list(val_store.spec.classes)}, "
                            f"the dataset has {list(ds.classes)}.")
        diffs = EncoderIdentity.from_dict(val_store.spec.encoder).differences(enc.identity)
        if diffs:
            raise UserError(f"--val-cache {val_cache} was extracted with another encoder: " + "; ".join(diffs))
        _check_not_training_data(val_store, val_cache, ds.describe(), aug.to_json(), ds.ids, train_path=None,
                                 allow=allow_val_on_train)
    device = resolve_device(cfg.device)
    source = OnlineSource(views, enc, cfg, device)
    decoder, names = _make_decoder(cfg, enc.output_shape(), len(ds.classes))
    val_views = None
    if val_cache:
        tier = choose_tier(cfg.cache_mode, 0, resident_bytes(val_store.spec, names, len(val_store.usable_views())),
                           device)
        val_views = ValidationViews(val_cache, names, device, tier.mode if tier.val_resident else "stream",
                                    workers=min(cfg.workers, 1), progress=progress)
    data = {"dataset": ds.describe(), "resize": rsz.to_json(), "augment": aug.to_json(), "crop": cfg.crop,
            "source": {"online": True, "val_cache": str(val_cache) if val_cache else None}}
    return _fit(source, decoder, names, Path(out), cfg, input_shapes=enc.output_shape(), classes=list(ds.classes),
                ignore_index=ds.ignore_index, encoder=enc.identity.to_dict(), data=data, val_views=val_views,
                resume=resume, progress=progress)
