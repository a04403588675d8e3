"""The training loop, shared by cached and online training: they differ only in the batch source.

A :class:`Trainer` (detectron2's TrainerBase, kept simple) has a few steps: :meth:`~Trainer.restore`
(resume from ``last.pt``, or start, from ``--init``'s decoder when given), :meth:`~Trainer.train_epoch`
and :meth:`~Trainer.end_epoch` (validate, log, checkpoint); :meth:`~Trainer.fit` runs them, and ends the
run early once the val mIoU has not improved for ``--patience`` epochs. What the
run shows and logs on the way is :class:`~fusion_seg.training.hooks.RunLog`'s; its files are the
:class:`~fusion_seg.training.run_dir.RunDirectory`'s. Since every random draw is seeded by (seed,
epoch, index), the losses after a resume equal those of an uninterrupted run.

Launched by ``torchrun``, each process trains its share of every global batch with
DistributedDataParallel; rank 0 alone validates and writes the run directory, whose checkpoints
are those of a single process (a resume may change the process count).
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict

import numpy as np
import torch
from torch import nn

from fusion_seg import faults
from fusion_seg.decoders import decoder_record
from fusion_seg.errors import UserError
from fusion_seg.progress import require_tensorboard
from fusion_seg.training import ddp
from fusion_seg.training.config import TrainConfig, TrainingData, TrainResult
from fusion_seg.training.ddp import DistEnv
from fusion_seg.training.hooks import RunLog, describe_run, diverged_message, no_labels_message, peak_memory_mib
from fusion_seg.training.run_dir import RunDirectory, run_differences
from fusion_seg.training.step import TrainingStep
from fusion_seg.training.validation import ValidationViews, validate
from fusion_seg.training.warm_start import init_from_checkpoint


class Trainer:
    """Trains ``decoder`` on the batches of ``source`` (sources.py) into ``run``, validating on
    ``val_views`` (rank 0 only; None: no validation, and the final model is also best.pt)."""

    def __init__(self, source, decoder: nn.Module, run: RunDirectory, cfg: TrainConfig, data: TrainingData, *,
                 dist: DistEnv, val_views: ValidationViews | None = None, cache_info: dict | None = None):
        if cfg.tensorboard:
            require_tensorboard()
        ddp.check_sync_bn(cfg.sync_bn, dist)
        self.source, self.run, self.cfg, self.data, self.dist = source, run, cfg, data, dist
        self.val_views, self.cache_info = val_views, cache_info
        self.device = dist.device
        self.decoder = _placed(decoder, cfg, dist)  # checkpoints and validation use it, never the DDP wrapper
        self.steps_per_epoch = len(source) // cfg.batch_size if len(source) >= cfg.batch_size else 1
        self.total_steps = max(1, self.steps_per_epoch * cfg.epochs)
        # OHEM keeps at least min_kept pixels of the (global) batch: each process keeps its share of them.
        self.training_step = TrainingStep(self.decoder, cfg, self.device, ignore_index=data.ignore_index,
                                          loss_weights=data.loss_weights, world=dist.world,
                                          total_steps=self.total_steps)
        self.optimizer, self.scheduler = self.training_step.optimizer, self.training_step.scheduler
        self.record = decoder_record(cfg.decoder, self.decoder, data.input_shapes, len(data.classes))
        # Where the run stands: set by restore, advanced by every step and validation.
        self.start_epoch, self.step, self.best = 0, 0, None
        self.epoch = 0  # epochs done
        self.best_epoch: int | None = None  # the epoch of the best val mIoU
        self.last_val_epoch = 0  # the epoch of the latest validation
        self.stopped_early: dict | None = None  # set when --patience ended the run
        self.init_info: dict | None = None  # what --init started from (kept across resumes)
        self.lr_changes: list[dict] = []  # explicit --lr changes on resume: {"epoch", "step", "from", "to"}
        self.lr_change: dict | None = None  # the one made by this resume
        self.notices: list[str] = []  # what the start of the run must tell (an earlier run set aside)
        self.previous_run = None  # where restore kept an earlier run of other settings ("auto")
        self.losses: list[float] = []  # the loss of every step this fit trains (from the start or the resume)
        self.val: dict | None = None  # the latest validation

    def fit(self, *, resume: bool | str, progress: bool) -> TrainResult:
        """Train epochs ``start_epoch + 1 .. cfg.epochs``; every process returns once the run directory is complete."""
        self.restore(resume)
        t0 = time.perf_counter()
        model = self.training_step.model = _distributed(self.decoder, self.dist)
        model.train()
        with RunLog.open(self.run, self.cfg, total_steps=self.total_steps, step=self.step, progress=progress) as log:
            log.start(describe_run(self.run, self.cfg, self.data.source, self.dist, len(self.source),
                                   self.steps_per_epoch, self.total_steps, self.start_epoch, self.step),
                      self.lr_change, self.notices)
            for epoch in range(self.start_epoch, self.cfg.epochs):
                # rank 0 alone validates: its decision
                if self.dist.from_main(self.cfg.out_of_patience(self.best_epoch, self.last_val_epoch)):
                    self.stop_early(log)
                    break
                started = time.perf_counter()
                losses = self.train_epoch(epoch, log)
                if self.dist.is_main:  # rank 0 alone validates (no collectives there) and writes; the others wait
                    self.end_epoch(epoch, losses, time.perf_counter() - t0, started, log)
                self.epoch = epoch + 1
                self.dist.barrier()
            peak = peak_memory_mib(self.device)
            if self.dist.is_main:
                self.finish(log, t0, peak)
        if self.dist.is_main:
            self.run.plot_curves()
        self.dist.barrier()
        return TrainResult(str(self.run), self.epoch, self.step, self.losses, self.best, self.val,
                           time.perf_counter() - t0, peak, self.cache_info,
                           str(self.previous_run) if self.previous_run else None, self.stopped_early)

    def restore(self, resume: bool | str) -> None:
        """Continue the run in the run directory from its last.pt, or start one there (from ``--init``'s
        decoder when given); then record the run's settings in config.json. ``resume="auto"``: continue
        the run there only when it has these settings and this data (see :meth:`_continue_or_set_aside`)."""
        if resume == "auto":
            resume = self._continue_or_set_aside()
        if resume:
            self.run.require_last()
            self.run.create()
            self._resume()
        else:
            self.run.create()
            if self.cfg.init:
                self.init_info = init_from_checkpoint(self.decoder, self.cfg.init, self.record, self.data.classes,
                                                      self.data.encoder)
            self.run.start_fresh()
        self.run.write_config({"train": asdict(self.cfg), "decoder": self.record, "classes": self.data.classes,
                               "encoder": self.data.encoder.to_dict(), "data": self.data.record(),
                               "world_size": self.dist.world})

    def _continue_or_set_aside(self) -> bool:
        """Whether to continue the run in the run directory: yes when its last.pt was made with exactly these
        settings and this data (a run stopped part-way; a finished one then trains no step). A run made
        otherwise (any setting, the lr included, or its data changed), or whose last.pt cannot be read, is
        kept under a new name and a fresh run starts, which the run's first lines say."""
        if not self.run.last.exists():
            return False
        try:
            ckpt = self.run.load_last()
            diffs, _ = run_differences(ckpt, self.record, self.cfg, self.data.classes, self.data.encoder,
                                       self.data.record())
        except (UserError, KeyError, TypeError) as exc:
            diffs = [f"its last.pt cannot be continued ({exc})"]
        if not diffs:
            return True
        if not self.run.writes:  # under torchrun rank 0 alone renames; every rank starts afresh alike
            return False
        kept = self.previous_run = self.run.set_aside()
        self.notices.append(f"{self.run} held a run with other settings or data ({'; '.join(diffs)}); kept it as "
                            f"{kept} and training a new run in {self.run}.")
        return False

    def _resume(self) -> None:
        ckpt = self.run.load_last()
        old_lr = self.run.check_resumable(ckpt, self.record, self.cfg, self.data.classes, self.data.encoder,
                                          self.data.record())
        self.decoder.load_state_dict(ckpt["model"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.scheduler.load_state_dict(ckpt["scheduler"])
        self.start_epoch, self.step, self.best = ckpt["epoch"], ckpt["step"], ckpt.get("best_miou")
        self.epoch = self.start_epoch
        # A checkpoint from before early stopping has no best_epoch: patience then counts from the resume.
        self.best_epoch = ckpt.get("best_epoch", self.start_epoch if self.best is not None else None)
        self.last_val_epoch = ckpt.get("last_val_epoch", self.start_epoch)
        self.init_info = ckpt.get("init")
        self.lr_changes = list(ckpt.get("lr_changes") or [])
        if old_lr is not None:  # the poly decay continues from the new base lr
            _set_base_lr(self.optimizer, self.scheduler, self.cfg.lr, self.step, self.total_steps, self.cfg.poly_power)
            self.lr_change = {"epoch": self.start_epoch + 1, "step": self.step, "from": old_lr, "to": self.cfg.lr}
            self.lr_changes.append(self.lr_change)
        self.run.truncate_log(self.start_epoch, self.step)

    def train_epoch(self, epoch: int, log: RunLog) -> list[float]:
        """One pass over the source with the training step (its forward: the decoder, or its DDP wrapper); its
        losses, each the mean over all processes (the loss of the global batch). A loss of NaN or infinity
        stops the run."""
        losses, labelled = [], 0
        for features, labels in self.source.batches(epoch):
            labelled += int((labels != self.data.ignore_index).sum())
            loss = self.training_step.loss(features, labels)
            value = self.dist.mean(loss)
            if not math.isfinite(value):
                raise UserError(diverged_message(value, self.step, epoch, self.cfg, self.run))
            self.training_step.update(loss)
            self.step += 1
            losses.append(value)
            self.losses.append(value)
            log.after_step(epoch, self.step, value, self.optimizer.param_groups[0]["lr"])
            faults.checkpoint_reached("step")  # a test's pause point (faults.py); nothing when no test set one
        if losses and self.dist.mean(torch.tensor(float(labelled))) == 0:
            raise UserError(no_labels_message(self.data, epoch, len(self.source)))
        return losses

    def end_epoch(self, epoch: int, losses: list[float], seconds: float, started: float, log: RunLog) -> None:
        """Rank 0, after epoch ``epoch`` (``seconds`` into the run): validate when due (best.pt on a new
        best mIoU), log the epoch, and write last.pt."""
        record = {"type": "epoch", "epoch": epoch + 1, "step": self.step,
                  "loss": float(np.mean(losses)) if losses else None, "seconds": seconds}
        if self.val_views and ((epoch + 1) % self.cfg.val_every == 0 or epoch + 1 == self.cfg.epochs):
            self.val = validate(self.decoder, self.val_views, len(self.data.classes), self.data.classes, self.device,
                                self.cfg.precision)
            record["val"] = {k: self.val[k] for k in ("miou", "pixel_acc", "mean_acc", "per_class_iou")}
            self.last_val_epoch = epoch + 1
            if self.best is None or self.val["miou"] > self.best:
                self.best, self.best_epoch = self.val["miou"], epoch + 1
                self.run.save_best(self.checkpoint(epoch + 1) | {"val": record["val"]})
        log.after_epoch(record, started)
        self.run.save_last(self.checkpoint(epoch + 1))

    def stop_early(self, log: RunLog) -> None:
        """End the run after epoch ``self.epoch``: its record, and the line that says why."""
        self.stopped_early = {"epoch": self.epoch, "best_epoch": self.best_epoch, "patience": self.cfg.patience}
        if self.dist.is_main:
            log.stopped_early(self.stopped_early, self.best, self.cfg.epochs, self.step)

    def finish(self, log: RunLog, t0: float, peak: float) -> None:
        """Rank 0, after the last epoch: best.pt when nothing validated, and the run's summary record."""
        if not self.val_views:  # without validation, the final model is the best one we know
            self.run.save_best(self.checkpoint(self.epoch))
        log.append({"type": "summary", "epoch": self.epoch, "step": self.step, "seconds": time.perf_counter() - t0,
                    "steps_this_run": len(self.losses), "world_size": self.dist.world, "peak_memory_MiB": peak,
                    "peak_memory_kind": "cuda_max_allocated" if self.device.type == "cuda" else "process_max_rss",
                    "peak_memory_scope": "rank 0, per process" if self.dist.distributed else "the process",
                    **({"stopped_early": self.stopped_early} if self.stopped_early else {}),
                    **({"cache": self.cache_info} if self.cache_info else {})})

    def checkpoint(self, epoch: int) -> dict:
        """What last.pt and best.pt hold after ``epoch`` epochs: the run's settings and state."""
        data = self.data
        return {"decoder": self.record, "classes": data.classes, "ignore_index": data.ignore_index,
                "encoder": data.encoder.to_dict(), "data": data.record(), "train": asdict(self.cfg), "init": self.init_info,
                "epoch": epoch, "step": self.step, "best_miou": self.best, "best_epoch": self.best_epoch,
                "last_val_epoch": self.last_val_epoch, "world_size": self.dist.world,
                "lr_changes": self.lr_changes,
                # the unwrapped decoder's keys: no DDP "module." prefix
                "model": self.decoder.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict()}


def _placed(decoder: nn.Module, cfg: TrainConfig, dist: DistEnv) -> nn.Module:
    """``decoder`` on the training device (channels_last on CUDA), with SyncBatchNorm when asked for under
    torchrun (same state-dict keys as BatchNorm)."""
    decoder = decoder.to(dist.device)
    if dist.device.type == "cuda":
        decoder = decoder.to(memory_format=torch.channels_last)
    if cfg.sync_bn and dist.distributed:
        decoder = nn.SyncBatchNorm.convert_sync_batchnorm(decoder)
    return decoder


def _distributed(decoder: nn.Module, dist: DistEnv) -> nn.Module:
    """``decoder`` wrapped in DistributedDataParallel when several processes train it; else itself.

    Made after :meth:`Trainer.restore`, since DDP broadcasts rank 0's weights when it wraps them. The
    wrapper is used for the training forward only: validation and checkpoints use ``decoder``.
    """
    if not dist.distributed:
        return decoder
    device_ids = [dist.device.index] if dist.device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(decoder, device_ids=device_ids)


def _set_base_lr(optimizer, scheduler, lr: float, step: int, total_steps: int, power: float) -> None:
    """Make ``lr`` the base of the poly decay from ``step`` on, as if the run had started with it."""
    for group in optimizer.param_groups:
        group["initial_lr"] = lr
        group["lr"] = lr * (1.0 - min(step, total_steps) / total_steps) ** power
    scheduler.base_lrs = [lr] * len(optimizer.param_groups)
