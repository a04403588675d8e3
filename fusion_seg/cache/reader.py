"""Training samples read from a feature store, with random crops taken in feature space.

A crop is a box in pixel coordinates whose offset and size are multiples of the
largest stride (32), so that the same box cuts whole cells out of every stride's
map and out of the labels: the stride-s map is cut at ``[y0/s, (y0+h)/s)``.
Input sizes need not be multiples of 32 (at 360x480 the stride-16 map is 23x30);
a box never starts past the last full alignment step, and a view smaller than the
crop is padded (zeros in the features, the ignore index in the labels).
"""
from __future__ import annotations

import os

import numpy as np
import torch

from fusion_seg.cache.store import FeatureStore
from fusion_seg.checks import FEATURE_CROP_ALIGN as ALIGN, require_feature_crop
from fusion_seg.errors import Failed, UserError


def aligned_crop_box(valid_hw: tuple[int, int], crop_hw: tuple[int, int], rng: np.random.Generator,
                     align: int = ALIGN) -> tuple[int, int]:
    """Top-left corner (y0, x0), multiples of ``align``, of a ``crop_hw`` box inside ``valid_hw``."""
    (h, w), (ch, cw) = valid_hw, crop_hw
    ny = max(0, h - ch) // align + 1
    nx = max(0, w - cw) // align + 1
    return int(rng.integers(ny)) * align, int(rng.integers(nx)) * align


def crop_view(features: dict[str, np.ndarray], labels: np.ndarray, strides: dict[str, int],
              box: tuple[int, int], crop_hw: tuple[int, int], ignore_index: int):
    """Cut the same pixel box out of every map and the labels, padding where the view is smaller."""
    y0, x0 = box
    ch, cw = crop_hw
    out_labels = np.full((ch, cw), ignore_index, dtype=labels.dtype)
    part = labels[y0:y0 + ch, x0:x0 + cw]
    out_labels[: part.shape[0], : part.shape[1]] = part
    out = {}
    for name, fmap in features.items():
        s = strides[name]
        fh, fw = ch // s, cw // s
        piece = fmap[:, y0 // s: y0 // s + fh, x0 // s: x0 // s + fw]
        if piece.shape[1:] != (fh, fw):
            padded = np.zeros((fmap.shape[0], fh, fw), dtype=fmap.dtype)
            padded[:, : piece.shape[1], : piece.shape[2]] = piece
            piece = padded
        out[name] = piece
    return out, out_labels


class CachedViews(torch.utils.data.Dataset):
    """Item ``v``: ``(features {name: fp16 tensor}, labels int64 tensor)`` of stored view ``v``.

    The store is opened lazily in each process (DataLoader workers must not share
    the parent's zarr event loop). That holds for remote stores too: zarr and fsspec
    start new event loops in a forked worker and fsspec's filesystem cache is per
    process, so each worker makes its own S3 client (tested with workers=2).
    Crops are drawn from ``rng([seed, epoch, v])``, so they do not depend on worker
    count or order; call ``set_epoch`` before each epoch.
    """

    def __init__(self, path: str, names: list[str], crop: tuple[int, int] | None = None, seed: int = 0,
                 max_views_per_image: int | None = None):
        """Item ``j`` is the ``j``-th *usable* view (views skipped as bad input at extraction are left out).

        ``max_views_per_image=K`` uses only each image's first K views: view ``k`` is drawn from
        ``view_rng(seed, i, k)``, so these are exactly the views a ``--views K`` extraction stores.
        """
        self.path = path
        self.names = list(names)
        self.crop = tuple(crop) if crop else None
        self.seed = seed
        self.epoch = 0
        store = FeatureStore.open(path)
        self.spec = store.spec
        self.views = store.usable_views(max_views_per_image)
        self.strides = {n: s.stride for n, s in store.spec.input_shapes().items()}
        require_feature_crop(self.crop)
        self._store, self._pid = None, None

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.views)

    def _open(self) -> FeatureStore:
        if self._store is None or self._pid != os.getpid():
            self._store, self._pid = FeatureStore.open(self.path), os.getpid()
        return self._store

    def __getitem__(self, j: int):
        v = int(self.views[j])
        try:
            features, labels, _ = self._open().read_view(v, self.names)
        except UserError as exc:  # a corrupt chunk: raised in the main process by the collate function
            return Failed(v, exc)
        if self.crop:
            rng = np.random.default_rng([self.seed, self.epoch, v])
            box = aligned_crop_box(labels.shape, self.crop, rng)
            features, labels = crop_view(features, labels, self.strides, box, self.crop, self.spec.ignore_index)
        return ({k: torch.from_numpy(np.ascontiguousarray(a)) for k, a in features.items()},
                torch.from_numpy(labels.astype(np.int64)))


def collate_views(items):
    """Stack features and labels; views of different sizes need a crop or batch size 1.

    A failed item is returned as the batch (see :class:`Failed`), for the main process to raise.
    """
    bad = Failed.first(items)
    if bad is not None:
        return bad
    shapes = {tuple(lbl.shape) for _, lbl in items}
    if len(shapes) > 1:
        raise UserError(
            f"cached views have different sizes {sorted(shapes)} and cannot be batched; "
            "pass --crop HxW (a multiple of 32) or --batch-size 1."
        )
    features = {k: torch.stack([f[k] for f, _ in items]) for k in items[0][0]}
    return features, torch.stack([lbl for _, lbl in items])
