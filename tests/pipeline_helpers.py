"""Shared settings for tests that run the pipeline: a small, fast, random-init encoder.

resnet18 has the same five-stride feature contract as ResNet-50 with other widths
(64/64/128/256/512), which also exercises "decoders are built from feature_info".
"""
from __future__ import annotations

from pathlib import Path

from fusion_seg.extract.local import extract

ENCODER = "resnet18"
SYNTH = {"num_images": 6, "size": (64, 96)}


def extract_synthetic(out: Path, *, split="train", views=2, augment=True, crop=(64, 64), seed=0,
                      strides=(4, 8, 16, 32), num_images=6, **kw):
    return extract(dataset="synthetic", split=split, out=out, views=views, augment=augment, crop=crop,
                   encoder=ENCODER, random_init=True, seed=seed, strides=strides, loader_workers=0, progress=False,
                   dataset_options={"num_images": num_images, "size": SYNTH["size"]}, **kw)


def tiny_config(**kw):
    from fusion_seg.training.train import TrainConfig

    base = dict(decoder_config={"streams": 4, "preset": "small"}, epochs=2, batch_size=2, workers=0,
                log_every=1, loss="ce", device="cpu")
    base.update(kw)
    return TrainConfig(**base)


def raise_after_checkpoint(monkeypatch, epoch: int, exc: type[Exception]) -> None:
    """Make training raise ``exc`` right after it has written ``last.pt`` for ``epoch`` (an interruption)."""
    import fusion_seg.training.train

    real_save = fusion_seg.training.train.save_checkpoint

    def save_then_raise(path, payload):
        real_save(path, payload)
        if path.name == "last.pt" and payload["epoch"] == epoch:
            raise exc

    monkeypatch.setattr(fusion_seg.training.train, "save_checkpoint", save_then_raise)
