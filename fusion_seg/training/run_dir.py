"""A run directory: everything one training run writes, and the checks before a run starts or continues in it.

It holds ``last.pt`` (every epoch), ``best.pt`` (best val mIoU), ``metrics.jsonl``, ``config.json``,
``curves.png`` and, on request, ``tensorboard/``. Checkpoints are written atomically
(:func:`fusion_seg.checkpoint.save_checkpoint`), so an interrupted run leaves the last complete epoch
in ``last.pt``; a resume continues from it, after :meth:`RunDirectory.check_resumable` has made sure
the run is continued with its own settings and its own data (the training and validation stores'
content, or online the dataset's files), and drops the log records written after it.

A run holds its directory while it trains (:meth:`RunDirectory.claimed`): a lock beside it
(``OUT.lock``, :mod:`fusion_seg.locks`) refuses a second run into the same ``--out``, and a path that
cannot be a run directory (a file, a path under a file, a folder holding something that is not a
fusion-seg run) is refused before any work.

Three ways to start (``resume``): ``False`` starts a run and refuses a directory that holds one;
``True`` continues the run there and refuses other settings or data (``--lr`` alone may change while
steps remain); ``"auto"`` (recipes) continues the run there when it was made with these settings and
this data, and otherwise keeps it under a new name (``OUT.previous-N``) and starts afresh, saying so.

Under torchrun every process has a RunDirectory, but only rank 0's ``writes`` (and locks): the others
log into /dev/null and leave the files alone.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
from dataclasses import asdict
from pathlib import Path
from typing import Callable, Iterator

from fusion_seg.checkpoint import load_checkpoint, save_checkpoint
from fusion_seg.encoder.identity import EncoderIdentity
from fusion_seg.errors import CheckpointError, UserError, write_error
from fusion_seg.files import folder_problem, write_json_atomic, write_text_atomic
from fusion_seg.locks import exclusive_lock
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

    # ----------------------------------------------------------------------- holding the directory
    @contextlib.contextmanager
    def claimed(self) -> Iterator[None]:
        """Hold this directory for a run (the ``with`` block), after checking it can be one (:meth:`check_location`).

        The process that writes takes ``OUT.lock`` (:func:`fusion_seg.locks.exclusive_lock`): a second run
        into the same directory is refused, naming the process that holds it, until this one ends.
        """
        self.check_location()
        if not self.writes:
            yield
            return

        def busy(owner: str) -> UserError:
            return UserError(f"{self.path} is being trained into by another fusion-seg process (pid {owner}); "
                             "wait for it to finish or stop it, or pass another --out.")

        with exclusive_lock(self.path, busy):
            yield

    def check_location(self) -> None:
        """Refuse, before any work, a ``--out`` that cannot be this run's directory: a file, a path under a
        file, a folder that holds something other than a fusion-seg run (which the run would write into), a
        name that says it is a file (``model.pt``), or a folder inside a Zarr store."""
        if self.path.exists() and not self.path.is_dir():
            raise UserError(f"--out {self.path} is a file, not a folder; pass a run folder (it is created if missing).")
        for parent in self.path.parents:
            if parent.exists():
                if not parent.is_dir():
                    raise UserError(f"--out {self.path} lies under {parent}, which is a file, not a folder; "
                                    "pass another --out.")
                break
        problem = None if self.holds_run() else folder_problem(self.path, "the run folder (its checkpoints go in it)")
        if problem:
            raise UserError(f"--out {self.path}: {problem}.")
        if self.path.is_dir() and not self.holds_run():
            entries = sorted(p.name for p in self.path.iterdir())
            if entries:
                shown = ", ".join(entries[:5]) + (f" and {len(entries) - 5} more" if len(entries) > 5 else "")
                raise UserError(f"--out {self.path} is a folder that holds {shown}, not a fusion-seg run; a run would "
                                "write into it. Pass a new or empty folder, or the folder of an earlier run.")

    def holds_run(self) -> bool:
        """Whether a fusion-seg run was started here: its ``config.json`` (written before the first step)."""
        try:
            config = json.loads(self.config.read_text())
        except (OSError, ValueError):
            return False
        return isinstance(config, dict) and {"train", "decoder", "classes"} <= set(config)

    def set_aside(self) -> Path:
        """Rename this directory to the first free ``NAME.previous-N`` beside it, keeping the run it holds;
        returns the new path."""
        k = 1
        while (target := self.path.with_name(f"{self.path.name}.previous-{k}")).exists():
            k += 1
        try:
            os.rename(self.path, target)
        except OSError as exc:
            raise write_error(target, exc, what="the earlier run's new name", then=f"{self.path} is unchanged.") from None
        return target

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

    def check_resumable(self, ckpt: dict, record: dict, cfg: TrainConfig, classes, encoder: EncoderIdentity,
                        data: dict) -> float | None:
        """Refuse to resume ``ckpt`` (this directory's last.pt) with other settings or data.

        The learning rate alone may change while steps remain (after a divergence, say): then this
        returns the checkpoint's lr, for the caller to apply and record; else None.
        """
        diffs, changed = run_differences(ckpt, record, cfg, classes, encoder, data)
        if changed == ["lr"] and len(diffs) == 1:
            stopped = cfg.out_of_patience(ckpt.get("best_epoch"), ckpt.get("last_val_epoch", 0))
            if ckpt.get("epoch", 0) >= cfg.epochs or stopped:
                how = (f"stopped early after epoch {ckpt['epoch']} by --patience {cfg.patience}" if stopped
                       else f"{ckpt['epoch']} of {cfg.epochs} epochs")
                raise CheckpointError(
                    f"cannot resume {self.last} with --lr {cfg.lr:g}: that run is finished ({how}), so a new --lr "
                    "would change no step. Drop --lr to keep it as it is (or give more --patience), or pass a new "
                    "--out to train a new run with this --lr.")
            return TrainConfig(**ckpt["train"]).lr
        if diffs:
            note = " (--lr alone may change on --resume)" if "lr" in changed else ""
            raise CheckpointError(f"cannot resume from {self.last}: these settings differ (checkpoint vs now): "
                                  + "; ".join(diffs) + f". Pass the checkpoint's settings to continue it{note}, "
                                  "or use a new --out.")
        return None

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
            if kind in ("summary", "early_stop"):
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


def run_differences(ckpt: dict, record: dict, cfg: TrainConfig, classes, encoder: EncoderIdentity,
                    data: dict) -> tuple[list[str], list[str]]:
    """``(differences, changed schedule keys)`` between the run a checkpoint holds and the one asked for now
    (``record``: its decoder record; ``data``: :meth:`TrainingData.record`), each difference with both values.

    Everything that decides what the run learns is compared: the decoder, the schedule (not the operational
    settings), the classes, the encoder, and the data: the dataset, views and augmentation, and the identity
    of what the batches are read from (the stores' content, or online the dataset's files). Checkpoints of
    earlier versions, which recorded no identity, are compared on the rest.
    """
    diffs = []
    theirs = ckpt["decoder"]
    for key in ("name", "num_classes", "config", "input_shapes"):
        diffs += _differences(theirs.get(key), record.get(key), "decoder" if key == "name" else f"decoder {key}")
    stored, now = asdict(TrainConfig(**ckpt["train"]).schedule()), asdict(cfg.schedule())
    changed = [k for k in now if stored.get(k) != now[k]]
    decoder_differs = (theirs.get("name"), theirs.get("config")) != (record.get("name"), record.get("config"))
    for k in changed:
        if k in ("decoder", "decoder_config") and decoder_differs:
            continue  # listed above, as the decoder's resolved settings
        diffs += _differences(stored.get(k), now[k], k)
    if list(ckpt["classes"]) != list(classes):
        diffs.append(f"classes {list(ckpt['classes'])} vs {list(classes)}")
    diffs += [f"encoder {d}" for d in EncoderIdentity.from_checkpoint(ckpt).differences(encoder)]
    diffs += _data_differences(ckpt.get("data") or {}, data)
    started = (ckpt.get("init") or {}).get("sha256")
    if cfg.init and started and started != _sha256(cfg.init):
        diffs.append(f"init {cfg.init} (the checkpoint the run started from changed since: retrained)")
    return diffs, changed


def _sha256(path) -> str | None:
    try:
        return hashlib.sha256(Path(path).read_bytes()).hexdigest()
    except OSError:
        return None  # gone: the run's own record is all there is


def _data_differences(theirs: dict, ours: dict) -> list[str]:
    """What differs in the data of two runs: dataset, resize and augmentation, and (when both recorded
    them) the identity of the training data and of the validation store."""
    diffs = []
    for key in ("dataset", "resize", "augment"):
        if key in theirs:
            diffs += _differences(theirs[key], ours.get(key), f"data {key}")
    weights = [(d.get("class_weights") or {}).get("weights") for d in (theirs, ours)]
    if "class_weights" in theirs and weights[0] != weights[1]:  # e.g. a --class-weights FILE edited since
        diffs.append(f"class weights {weights[0]} vs {weights[1]}")
    a, b = theirs.get("source") or {}, ours.get("source") or {}
    if "cache_id" not in a and "inputs_id" not in a:
        return diffs  # a checkpoint of an earlier version: no identity recorded
    for path_key, id_key, what in (("cache", "cache_id", "training store"), ("online", "inputs_id", "dataset files"),
                                   ("val_cache", "val_cache_id", "validation store")):
        if (a.get(path_key) is None, a.get(id_key)) == (b.get(path_key) is None, b.get(id_key)):
            continue
        if a.get(path_key) is None or b.get(path_key) is None:
            diffs.append(f"{what} {a.get(path_key) or 'none'} vs {b.get(path_key) or 'none'}")
        elif a.get(path_key) == b.get(path_key) and path_key != "online":
            diffs.append(f"{what} {b[path_key]} (its content changed since the checkpoint: re-extracted)")
        elif path_key == "online":
            diffs.append("dataset files (images or masks added, removed or changed since the checkpoint)")
        else:
            diffs.append(f"{what} {a[path_key]} vs {b[path_key]}")
    return diffs
