"""Decoder checkpoints: written atomically, read safely.

A checkpoint is a plain dict of tensors and JSON-like values, saved with
``torch.save`` to a temporary file in the same directory, fsync'ed, then renamed
over the target, so a crash leaves either the old or the new file, never half of
one. It is read with ``torch.load(weights_only=True)``: no code in a checkpoint runs.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch

from .errors import CheckpointError

FORMAT = "fusion-seg/decoder-checkpoint"
VERSION = 1


def save_checkpoint(path: str | Path, payload: dict) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save({"format": FORMAT, "version": VERSION, **payload}, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # make the rename itself durable
    finally:
        os.close(dir_fd)


def load_checkpoint(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}. Pass a file written by `fusion-seg train-decoder`.")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CheckpointError(
            f"cannot read checkpoint {path}: it is corrupt or truncated ({type(exc).__name__}: {exc}). "
            "Use the previous checkpoint (best.pt / last.pt) or retrain."
        ) from exc
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a fusion-seg decoder checkpoint.")
    if ckpt.get("version", 0) > VERSION:
        raise CheckpointError(
            f"{path} has checkpoint version {ckpt['version']}, newer than this fusion-seg reads ({VERSION}); upgrade fusion-seg."
        )
    return ckpt
