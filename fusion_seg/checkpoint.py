"""Decoder checkpoints: written atomically, read safely.

A checkpoint is a plain dict of tensors and JSON-like values, saved with
``torch.save`` through :func:`fusion_seg.files.atomic_write` (a temporary file in the
same directory, fsync'ed, then renamed over the target), so a crash leaves either the
old or the new file, never half of one. It is read with ``torch.load(weights_only=True)``:
no code in a checkpoint runs.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import torch

from fusion_seg.errors import CheckpointError
from fusion_seg.files import atomic_write

FORMAT = "fusion-seg/decoder-checkpoint"
VERSION = 1


def _open_temp(tmp: Path):
    """The file a checkpoint's bytes go to before the rename; tests replace it to inject a full disk."""
    return open(tmp, "wb")


def save_checkpoint(path: str | Path, payload: dict) -> None:
    """Write ``payload`` to ``path`` atomically. A failed write (a full disk) leaves the previous file
    as it was, removes the temporary one, and raises a :class:`CheckpointError` that says why."""
    path = Path(path)
    record = {"format": FORMAT, "version": VERSION, **payload}
    try:
        atomic_write(path, lambda f: torch.save(record, f), opener=_open_temp)
    # torch.save reports a failed write (ENOSPC, EIO) as a RuntimeError ("unexpected pos ..."), or as
    # the OSError itself; mkdir/close/fsync/replace raise OSError.
    except (OSError, RuntimeError) as exc:
        raise CheckpointError(_write_failed(path, exc)) from exc


def _write_failed(path: Path, exc: BaseException) -> str:
    try:
        free = f"{shutil.disk_usage(path.parent).free / 2**20:,.0f} MiB free there"
    except OSError:
        free = "free space unknown"
    kept = (f"the previous {path.name} is unchanged" if path.exists()
            else f"no earlier {path.name} was there")
    if isinstance(exc, OSError):
        reason = exc.strerror or str(exc) or type(exc).__name__
    elif "unexpected pos" in str(exc):  # torch's writer lost bytes the file refused
        reason = "the write stopped part-way, as when the disk is full"
    else:
        reason = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"
    return (f"cannot write checkpoint {path} ({reason}; {free}); {kept}. Free space on that "
            "disk (or write to another one), then run the same command again (train-decoder: with --resume, "
            "to continue from last.pt).")


def load_checkpoint(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}. Pass a file written by `fusion-seg train-decoder`.")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CheckpointError(
            f"cannot read checkpoint {path}: it is corrupt or truncated ({type(exc).__name__}: "
            f"{str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ''}). "
            "Use the previous checkpoint (best.pt / last.pt) or retrain."
        ) from exc
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a fusion-seg decoder checkpoint.")
    if ckpt.get("version", 0) > VERSION:
        raise CheckpointError(
            f"{path} has checkpoint version {ckpt['version']}, newer than this fusion-seg reads ({VERSION}); upgrade fusion-seg."
        )
    return ckpt
