"""What a run shows and records as it trains, besides its checkpoints: the records of metrics.jsonl,
the progress bar and TensorBoard (:class:`RunLog`), and the lines printed at its start, after each
epoch and when it diverges.

Epochs are numbered 1..E in every record: ``"epoch"`` is the epoch being (or just) trained. Under
torchrun only rank 0 writes the log and TensorBoard and shows progress.
"""
from __future__ import annotations

import contextlib
import json
import resource
import textwrap
import time
from dataclasses import asdict
from typing import Callable, Iterator

import torch

from fusion_seg.progress import Progress, TensorBoardLog, format_duration
from fusion_seg.training.config import TrainConfig
from fusion_seg.training.ddp import DistEnv
from fusion_seg.training.run_dir import RunDirectory


class RunLog:
    """metrics.jsonl, the progress bar and TensorBoard of one run, called at its start, after each step
    and after each epoch. Made by :meth:`open`, which closes all three when the run ends or fails."""

    def __init__(self, append: Callable[[dict], None], bar: Progress, board: TensorBoardLog, run: RunDirectory,
                 cfg: TrainConfig):
        self.append, self.bar, self.board, self.run, self.cfg = append, bar, board, run, cfg

    @classmethod
    @contextlib.contextmanager
    def open(cls, run: RunDirectory, cfg: TrainConfig, *, total_steps: int, step: int, progress: bool
             ) -> Iterator["RunLog"]:
        """The run's outputs from step ``step`` on (TensorBoard drops the events a resumed run will redo)."""
        show = progress and run.writes
        with run.open_log() as append, \
                Progress(total_steps, f"train {run.name}", "step", initial=step, enabled=show) as bar, \
                TensorBoardLog(run.tensorboard, enabled=cfg.tensorboard and run.writes,
                               purge_step=step + 1 if step else None) as board:
            yield cls(append, bar, board, run, cfg)

    def start(self, description: str, lr_change: dict | None, notices=()) -> None:
        """The run's settings, after ``notices`` (an earlier run kept under a new name); a learning rate
        changed on resume is also recorded."""
        for notice in notices:
            self.bar.write(notice)
        self.bar.write(description)
        if lr_change is not None:
            self.append({"type": "lr_change", **lr_change})
            self.bar.write(f"learning rate changed on resume: {lr_change['from']:g} -> {lr_change['to']:g} from "
                           f"epoch {lr_change['epoch']} (step {lr_change['step'] + 1}); recorded in "
                           f"{self.run.metrics.name} and the checkpoints")

    def after_step(self, epoch: int, step: int, loss: float, lr: float) -> None:
        self.bar.update(1, epoch=f"{epoch + 1}/{self.cfg.epochs}", loss=f"{loss:.4f}", lr=f"{lr:.3g}")
        if step % self.cfg.log_every == 0:
            self.append({"type": "step", "epoch": epoch + 1, "step": step, "loss": loss, "lr": lr})
            self.board.add({"train/loss": loss, "train/lr": lr}, step)

    def after_epoch(self, record: dict, started: float) -> None:
        """The epoch's record (rank 0, after validation), and its line: loss, val mIoU, time since ``started``."""
        self.append(record)
        self.board.add({"epoch/loss": record["loss"],
                        **({"val/miou": record["val"]["miou"], "val/pixel_acc": record["val"]["pixel_acc"]}
                           if "val" in record else {})}, record["step"])
        self.bar.write(epoch_line(record, self.cfg.epochs, time.perf_counter() - started))

    def stopped_early(self, record: dict, best: float, epochs: int, step: int) -> None:
        """The run ends before epoch ``epochs`` (``--patience``): its record, and the line that says why."""
        self.append({"type": "early_stop", "step": step, **record})
        self.bar.write(f"stopping early after epoch {record['epoch']}/{epochs}: the val mIoU has not improved on "
                       f"epoch {record['best_epoch']}'s {best:.4f} for {record['epoch'] - record['best_epoch']} "
                       f"epochs (--patience {record['patience']}); best.pt holds that epoch")


def describe_run(run: RunDirectory, cfg: TrainConfig, source: dict, dist: DistEnv, views: int, steps_per_epoch: int,
                 total_steps: int, start_epoch: int, step: int) -> str:
    """The run's resolved settings, one compact block (printed at its start)."""
    where = "online (encoder every step)" if source.get("online") else f"cache {source.get('cache')}"
    head = (f"train {run}: {where}, val cache {source.get('val_cache') or 'none'}, device {dist.device}"
            f"{f' x {dist.world} processes' if dist.distributed else ''}, {views} views, {steps_per_epoch} "
            f"steps/epoch x {cfg.epochs} epochs = {total_steps} steps")
    if start_epoch:
        head += f"; resuming after epoch {start_epoch} (step {step})"
    settings = " ".join(f"{k}={json.dumps(v, separators=(',', ':')) if isinstance(v, (dict, list)) else v}"
                        for k, v in asdict(cfg).items())
    return head + "\n" + textwrap.fill(settings, width=110, initial_indent="  ", subsequent_indent="  ",
                                       break_on_hyphens=False)


def epoch_line(record: dict, epochs: int, seconds: float) -> str:
    loss = f"{record['loss']:.4f}" if record.get("loss") is not None else "n/a"
    line = f"epoch {record['epoch']}/{epochs}: mean loss {loss}"
    if "val" in record:
        line += f", val mIoU {record['val']['miou']:.4f}, pixel acc {record['val']['pixel_acc']:.4f}"
    return line + f" ({format_duration(seconds)})"


def diverged_message(value: float, step: int, epoch: int, cfg: TrainConfig, run: RunDirectory) -> str:
    """Why the run stopped at a loss of NaN or infinity, and the command that continues it with a lower lr
    (or starts it again, before its first checkpoint)."""
    lower = f"{cfg.lr / 10:g}"
    what = f"the loss became {value} at step {step + 1} (epoch {epoch + 1}/{cfg.epochs}): training diverged."
    if run.last.exists():
        return (f"{what} {run.last} holds the last good state (end of epoch {epoch}). Continue from it with a lower "
                f"--lr: run the same command with --resume --lr {lower}, i.e. `fusion-seg train-decoder <the same "
                f"options> --out {run} --resume --lr {lower}` (--lr is the one setting --resume lets you "
                "change; the change is recorded in metrics.jsonl and the checkpoint).")
    return (f"{what} No checkpoint was written yet, so start again with a lower --lr: run the same command "
            f"without --resume and with --lr {lower}, i.e. `fusion-seg train-decoder <the same options> --out "
            f"{run} --lr {lower}`.")


def no_labels_message(data, epoch: int, views: int) -> str:
    """Why a run stops when a whole epoch had no labelled pixel (every label the ignore index)."""
    where = f"the training store {data.store}" if data.store else f"{data.dataset.get('name')}/{data.dataset.get('split')}"
    return (f"epoch {epoch + 1} saw no labelled pixel in the {views} training views of {where}: every label is the "
            f"ignore index {data.ignore_index}, so the loss is 0 and the decoder learns nothing. Check the dataset's "
            f"masks (each pixel's value is its class id; {data.ignore_index} marks pixels to ignore) and extract "
            "the store again.")


def peak_memory_mib(device: torch.device) -> float:
    """Peak memory of this process so far: CUDA's max allocated, or the process's max RSS on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
