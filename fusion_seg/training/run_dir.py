"""A run directory: everything one training run writes, and the checks before a run continues in it.

It holds ``last.pt`` (every epoch), ``best.pt`` (best val mIoU), ``metrics.jsonl``, ``config.json``,
``curves.png`` and, on request, ``tensorboard/``. Checkpoints are written atomically
(:func:`fusion_seg.checkpoint.save_checkpoint`), so an interrupted run leaves the last complete epoch
in ``last.pt``; a resume continues from it, after :meth:`RunDirectory.check_resumable` has made sure
the run is continued with its own settings, and drops the log records written after it.

Under torchrun every process has a RunDirectory, but only rank 0's ``writes``: the others log into
/dev/null and leave the files alone.
"""
from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Callable, Iterator

from fusion_seg.checkpoint import load_checkpoint, save_checkpoint
from fusion_seg.encoder.identity import EncoderIdentity
from fusion_seg.errors import CheckpointError, UserError
from fusion_seg.files import write_json_atomic, write_text_atomic
from fusion_seg.plots import plot_if_available
from fusion_seg.training.config import TrainConfig


class RunDirectory:
    """The files of one run in ``path``; ``writes`` is False in every torchrun process but rank 0."""

    def __init__(self, path: str | Path, *, writes: bool = True):
        self.path = Path(path)
        self.writes = writes
        self.last = self.path / "last.pt"
        self.best = self.path / "best.pt"
        self.metrics = self.path / "metrics.jsonl"
        self.config = self.path / "config.json"
        self.curves = self.path / "curves.png"
        self.tensorboard = self.path / "tensorboard"

    @property
    def name(self) -> str:
        return self.path.name

    def __str__(self) -> str:
        return str(self.path)

    # ----------------------------------------------------------------------- starting or continuing a run
    def require_last(self) -> None:
        """Refuse ``--resume`` of a directory without ``last.pt``, before anything is written there."""
        if not self.last.exists():
            raise CheckpointError(f"--resume: {self.path} holds no last.pt to continue from (no epoch of a run "
                                  "there has finished). Drop --resume to start the run from scratch, or pass the "
                                  "--out of the run to continue.")

    def create(self) -> None:
        self.path.mkdir(parents=True, exist_ok=True)

    def start_fresh(self) -> None:
        """Refuse to start a run over another one; drop a log that no checkpoint goes with (a run stopped
        in its first epoch)."""
        if self.last.exists():
            raise UserError(f"{self.path} already holds a run (last.pt). Pass --resume to continue it, "
                            "or choose a new --out.")
        if self.metrics.exists() and self.writes:
            self.metrics.unlink()

    def load_last(self) -> dict:
        return load_checkpoint(self.last)

    def check_resumable(self, ckpt: dict, record: dict, cfg: TrainConfig, classes, encoder: EncoderIdentity) -> float | None:
        """Refuse to resume ``ckpt`` (this directory's last.pt) with other settings; see :func:`_check_resumable`."""
        return _check_resumable(ckpt, record, cfg, classes, encoder, self.last)

    def truncate_log(self, epoch: int, step: int) -> None:
        """Drop log records written after the checkpoint being resumed (a partial epoch), which ended ``epoch``
        at ``step``. Steps are numbered alike in logs of every version, so step records are kept by step."""
        if not self.writes or not self.metrics.exists():
            return
        keep = []
        for line in self.metrics.read_text().splitlines():
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
        write_text_atomic(self.metrics, "".join(k + "\n" for k in keep))

    def write_config(self, config: dict) -> None:
        if self.writes:
            write_json_atomic(self.config, config)

    # ----------------------------------------------------------------------- while it runs
    @contextlib.contextmanager
    def open_log(self) -> Iterator[Callable[[dict], None]]:
        """A function that appends a record to metrics.jsonl (flushed: a crash loses no finished line)."""
        with open(self.metrics if self.writes else os.devnull, "a") as f:
            def append(record: dict) -> None:
                f.write(json.dumps(record) + "\n")
                f.flush()

            yield append

    def save_last(self, payload: dict) -> None:
        save_checkpoint(self.last, payload)

    def save_best(self, payload: dict) -> None:
        save_checkpoint(self.best, payload)

    def plot_curves(self) -> None:
        """curves.png from metrics.jsonl, when matplotlib is installed."""
        plot_if_available("plot_training_curves", self.metrics, self.curves)


def resumed_lr(run_dir: str | Path, default: float) -> float:
    """The learning rate of the run in ``run_dir`` (its last.pt), else ``default``: the CLI's ``--resume``
    without ``--lr`` keeps it, so only an explicit ``--lr`` changes it."""
    last = RunDirectory(run_dir).last
    if not last.is_file():
        return default
    try:
        return float(load_checkpoint(last)["train"]["lr"])
    except (UserError, KeyError, TypeError, ValueError):
        return default  # the resume itself reports what is wrong with the checkpoint


def _differences(ours, theirs, name: str) -> list[str]:
    """``name.key A vs B`` for each key whose value differs (one level into dicts), or ``name A vs B``."""
    if isinstance(ours, dict) and isinstance(theirs, dict):
        def shown(d, k):
            return repr(d[k]) if k in d else "(unset)"
        return [f"{name}.{k} {shown(ours, k)} vs {shown(theirs, k)}"
                for k in sorted(set(ours) | set(theirs), key=str) if ours.get(k, ...) != theirs.get(k, ...)]
    return [f"{name} {ours!r} vs {theirs!r}"] if ours != theirs else []


def _check_resumable(ckpt: dict, record: dict, cfg: TrainConfig, classes, encoder: EncoderIdentity, path: Path) -> float | None:
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
    enc_diffs = EncoderIdentity.from_checkpoint(ckpt).differences(encoder)
    diffs += [f"encoder {d}" for d in enc_diffs]
    if changed == ["lr"] and len(diffs) == 1:
        return stored["lr"]
    if diffs:
        note = " (--lr alone may change on --resume)" if "lr" in changed else ""
        raise CheckpointError(f"cannot resume from {path}: these settings differ (checkpoint vs now): "
                              + "; ".join(diffs) + f". Pass the checkpoint's settings to continue it{note}, "
                              "or use a new --out.")
    return None
