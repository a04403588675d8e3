"""Shared settings for tests that run the pipeline: a small, fast, random-init encoder.

resnet18 has the same five-stride feature contract as ResNet-50 with other widths
(64/64/128/256/512), which also exercises "decoders are built from feature_info".
"""
from __future__ import annotations

import errno
import io
from pathlib import Path

from fusion_seg.extract.local import extract
from fusion_seg.requests import extract_arguments

ENCODER = "resnet18"
SYNTH = {"num_images": 6, "size": (64, 96)}


def extract_synthetic(out: Path, *, split="train", views=2, augment=True, crop=(64, 64), seed=0,
                      strides=(4, 8, 16, 32), num_images=6, **kw):
    """``num_images`` synthetic images extracted into ``out``; ``kw``: any other extract option, by its
    recipe name (``batch_size``, ``dtype``, ``scheduler``, ...), built into extract()'s requests as a recipe's are."""
    options = dict(dataset="synthetic", split=split, out=out, views=views, augment=augment,
                   crop=crop if augment else None,  # a crop without augmentation is refused
                   encoder=ENCODER, random_init=True, seed=seed, strides=strides, loader_workers=0,
                   dataset_options={"num_images": num_images, "size": SYNTH["size"]}, **kw)
    return extract(**extract_arguments(options), progress=False)


def tiny_config(**kw):
    from fusion_seg.training.config import TrainConfig

    base = dict(decoder_config={"streams": 4, "preset": "small"}, epochs=2, batch_size=2, workers=0,
                log_every=1, loss="ce", device="cpu")
    base.update(kw)
    return TrainConfig(**base)


def raise_after_checkpoint(monkeypatch, epoch: int, exc: type[Exception]) -> None:
    """Make training raise ``exc`` right after it has written ``last.pt`` for ``epoch`` (an interruption)."""
    import fusion_seg.training.run_dir

    real_save = fusion_seg.training.run_dir.save_checkpoint

    def save_then_raise(path, payload):
        real_save(path, payload)
        if path.name == "last.pt" and payload["epoch"] == epoch:
            raise exc

    monkeypatch.setattr(fusion_seg.training.run_dir, "save_checkpoint", save_then_raise)


class FullDisk(io.FileIO):
    """A file on a disk with ``room`` bytes left: writes past it fail with ENOSPC."""

    def __init__(self, path, room):
        super().__init__(path, "wb")
        self.room = room

    def write(self, data):
        size = memoryview(data).nbytes
        if size > self.room:
            raise OSError(errno.ENOSPC, "No space left on device")
        self.room -= size
        return super().write(data)


def tiny_checkpoint(folder: Path) -> Path:
    """best.pt of a one-epoch tiny decoder on a 2-image synthetic store made in ``folder``."""
    from fusion_seg.training.train import train_decoder

    extract_synthetic(folder / "s.zarr", views=1, num_images=2)
    train_decoder(str(folder / "s.zarr"), folder / "run", tiny_config(epochs=1), progress=False)
    return folder / "run" / "best.pt"


def direct_batch_equal_to_staged(res, positions, epoch: int):
    """A resident store's batch cut on the CPU's direct path, after checking that the staged path (the ram tier
    on CUDA: cut in host RAM, decoded on the device; forced here) gives it bit for bit."""
    import torch

    direct = res.batch(positions, epoch=epoch)
    res.staged = True
    try:
        staged = res.batch(positions, epoch=epoch)
    finally:
        res.staged = False
    assert torch.equal(staged[1], direct[1])
    for k in direct[0]:
        assert torch.equal(staged[0][k], direct[0][k]), k
    return direct
