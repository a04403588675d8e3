"""Validation during training: the validation store's checks, its views, and the mIoU of a decoder on them.

A validation store is a feature store of whole images (``fusion-seg extract --split val --no-augment``).
Cached and online training check it alike (:func:`open_val_store`): it must be complete, match what
the run trains on (classes, ignore index, encoder), and not hold the training data, or validation
would score the model on what it trains on.
"""
from __future__ import annotations

import os
import sys
from typing import Callable, Iterator

import torch
from torch import nn

from fusion_seg.cache.reader import CachedViews, collate_views
from fusion_seg.cache.resident import ResidentViews, TierChoice
from fusion_seg.cache.store import FeatureStore
from fusion_seg.decoders.base import upsample_logits
from fusion_seg.device import autocast, to_device
from fusion_seg.errors import Failed, UserError
from fusion_seg.evaluation.metrics import SegEvaluator
from fusion_seg.training import ddp
from fusion_seg.training.class_weights import require_labelled_pixels
from fusion_seg.training.config import TrainConfig, TrainingData


class ValidationViews:
    """The views of a (whole-image) validation store, one at a time: held in memory when the cache
    tier allows it (loaded once, here), else read by a DataLoader every validation."""

    def __init__(self, path: str, names: list[str], device: torch.device, mode: str = "stream", workers: int = 0,
                 progress: bool = True, echo: Callable[[str], None] | None = None):
        self.path, self.names, self.device, self.mode = path, names, device, mode
        self.workers, self.progress = workers, progress
        self.spec = FeatureStore.open(path).spec
        self._views = (ResidentViews(path, names, device, mode, progress=progress, echo=echo)
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


def validation_views(path: str, names: list[str], tier: TierChoice, device: torch.device, cfg: TrainConfig, *,
                     progress: bool, echo: Callable[[str], None] | None) -> ValidationViews:
    """The views ``names`` of the validation store ``path``: held in memory when ``tier`` has room for
    them, else streamed by one DataLoader worker at most (validation is a small part of an epoch)."""
    return ValidationViews(path, names, device, tier.mode if tier.val_resident else "stream",
                           workers=min(cfg.workers, 1), progress=progress, echo=echo)


def validate(decoder: nn.Module, views: ValidationViews, num_classes: int, classes, device,
             precision: str = "auto") -> dict:
    """mIoU of ``decoder`` on every view of a (whole-image) feature store, its forward in ``precision``."""
    evaluator = SegEvaluator(num_classes, views.spec.ignore_index, list(classes))
    was_training = decoder.training
    decoder.eval()
    with torch.inference_mode():
        for features, labels in views:
            with autocast(device, precision):
                logits = decoder(features)
            pred = upsample_logits(logits.float(), labels.shape[-2:]).argmax(1)
            evaluator.process(pred.cpu(), labels.cpu())
    decoder.train(was_training)
    return evaluator.evaluate()


# --------------------------------------------------------------------------- the validation store's checks
def open_val_store(path: str, train: TrainingData, *, allow_val_on_train: bool = False) -> FeatureStore:
    """The validation store ``path``, once it is known to be complete, to match ``train`` and not to hold
    the training data; a UserError otherwise, except that ``allow_val_on_train`` turns the last into a warning."""
    store = FeatureStore.open(path)
    store.check_complete()
    require_labelled_pixels(store, store.usable_views(), f"--val-cache {path}")
    _check_matches(store, path, train)
    _check_not_training_data(store, path, train, allow=allow_val_on_train)
    return store


def _check_matches(val_store: FeatureStore, path: str, train: TrainingData) -> None:
    """Refuse a validation store of other classes, another ignore index or another encoder: its scores
    would not be those of the model being trained."""
    val = val_store.spec
    diffs = []
    if list(val.classes) != list(train.classes):
        diffs.append(f"classes {list(val.classes)} != {list(train.classes)}")
    if val.ignore_index != train.ignore_index:
        diffs.append(f"ignore index {val.ignore_index} != {train.ignore_index}")
    enc = val.encoder_identity.differences(train.encoder)
    diffs += [f"encoder {d}" for d in enc]
    if diffs:
        what = "the dataset and encoder of online training" if train.online else "the training cache"
        raise UserError(f"--val-cache {path} does not match {what}: " + "; ".join(diffs)
                        + ". Extract the val split with the same dataset and encoder.")


def _check_not_training_data(val_store: FeatureStore, path: str, train: TrainingData, *, allow: bool) -> None:
    """Refuse (or with ``allow``, warn about) a validation store that holds the training data: the training
    store itself, or a store of the same dataset split with the same augmentation (its seed aside: other
    random crops of the same images) that shares images with it."""
    from fusion_seg.cache import locations

    def where(p) -> str:
        return os.path.realpath(locations.local_path(p)) if locations.is_local(p) else str(p).rstrip("/")

    val, dataset = val_store.spec, train.dataset
    strip = lambda a: {k: v for k, v in (a or {}).items() if k != "seed"}  # noqa: E731
    if train.store is not None and where(train.store) == where(path):
        why = "it is the training store"
    elif (val.dataset.get("name") == dataset.get("name") and val.dataset.get("split") == dataset.get("split")
          and strip(val.augment) == strip(train.augment) and not set(val.image_ids).isdisjoint(train.image_ids)):
        crops = "augmented crops" if (train.augment or {}).get("enabled") else "images"
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
