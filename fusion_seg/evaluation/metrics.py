"""Semantic-segmentation evaluation: a confusion matrix and the metrics from it.

Gupta et al. report pixel accuracy and mean IoU. The evaluator follows
detectron2's ``SemSegEvaluator`` pattern (``reset`` / ``process`` /
``evaluate``) and accumulates one ``num_classes x num_classes`` confusion
matrix over the whole dataset, so every metric is dataset-level (areas
summed over images, not averaged per image).
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch


class SegEvaluator:
    """Accumulates a confusion matrix and reports pixel accuracy and IoU.

    ``confusion[g, p]`` counts pixels with ground truth ``g`` predicted as
    ``p``; pixels whose ground truth is ``ignore_index`` are not counted.

    Metrics returned by :meth:`evaluate`, with ``tp = diag``, ``gt`` = row
    sums, ``pred`` = column sums and ``union = gt + pred - tp`` per class:

    * ``pixel_acc`` = ``sum(tp) / sum(gt)`` (all non-ignored pixels).
    * ``per_class_iou[c]`` = ``tp / union``, or ``None`` when the class's
      union is empty (absent from both ground truth and prediction).
    * ``miou`` = mean of the per-class IoUs that are not ``None``: mmseg's
      nanmean convention. A class only ever *predicted* has IoU 0 and
      counts; a class never seen nor predicted is left out. HRNet's own
      evaluation instead divides by ``max(1, union)`` and so counts such a
      class as 0, which gives a lower mIoU whenever a class is absent
      (common on small validation sets).
    * ``mean_acc`` = mean per-class recall ``tp / gt`` over the classes with
      ground-truth pixels.
    * ``confusion`` (list of lists of ints) and ``num_pixels`` (= ``sum(gt)``).

    Metrics are ``None`` where nothing defines them (no pixel processed).
    For distributed evaluation, all-reduce :attr:`confusion` (in place) or
    :meth:`merge` the evaluators before calling :meth:`evaluate`.
    """

    def __init__(self, num_classes: int, ignore_index: int = 255,
                 class_names: Sequence[str] | None = None):
        if class_names is not None and len(class_names) != num_classes:
            raise ValueError(f"{len(class_names)} class names for {num_classes} classes")
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.class_names = list(class_names) if class_names is not None \
            else [str(c) for c in range(num_classes)]
        self.reset()

    def reset(self) -> None:
        self._confusion = torch.zeros(self.num_classes, self.num_classes, dtype=torch.int64)

    @property
    def confusion(self) -> torch.Tensor:
        """The accumulated matrix (rows: ground truth, columns: prediction); all-reduce it in place."""
        return self._confusion

    def merge(self, other: SegEvaluator | torch.Tensor) -> None:
        """Add another evaluator's (or a raw) confusion matrix to this one."""
        counts = other.confusion if isinstance(other, SegEvaluator) else torch.as_tensor(other)
        if counts.shape != self._confusion.shape:
            raise ValueError(f"confusion shape {tuple(counts.shape)} != "
                             f"{tuple(self._confusion.shape)}")
        self._confusion = self._confusion + counts.to(self._confusion)

    def process(self, pred, target) -> None:
        """Add a batch: integer class maps, ``(N, H, W)`` or ``(H, W)``, tensors or arrays."""
        pred, target = torch.as_tensor(pred), torch.as_tensor(target)
        if pred.shape != target.shape:
            raise ValueError(f"prediction shape {tuple(pred.shape)} != target shape "
                             f"{tuple(target.shape)}")
        if pred.is_floating_point() or target.is_floating_point():
            raise ValueError("pred and target must be integer class maps (take argmax first)")
        pred, target = pred.reshape(-1).long(), target.reshape(-1).long().to(pred.device)
        c = self.num_classes
        if pred.numel() and (pred.min() < 0 or pred.max() >= c):
            raise ValueError(f"predictions must lie in [0, {c}), got values in "
                             f"[{pred.min().item()}, {pred.max().item()}]")
        valid = target != self.ignore_index
        pred, target = pred[valid], target[valid]
        if target.numel() and (target.min() < 0 or target.max() >= c):
            raise ValueError(f"ground-truth labels must lie in [0, {c}) or equal "
                             f"ignore_index={self.ignore_index}, got values in "
                             f"[{target.min().item()}, {target.max().item()}]")
        counts = torch.bincount(target * c + pred, minlength=c * c).reshape(c, c)
        self._confusion = self._confusion.to(counts.device) + counts

    def evaluate(self) -> dict:
        """The metrics described in the class docstring, as plain Python values."""
        conf = self._confusion.cpu().numpy().astype(np.float64)
        tp, gt, pred = np.diag(conf), conf.sum(axis=1), conf.sum(axis=0)
        union = gt + pred - tp
        iou = [float(t / u) if u > 0 else None for t, u in zip(tp, union)]
        present = [i for i in iou if i is not None]
        recall = [t / g for t, g in zip(tp, gt) if g > 0]
        total = gt.sum()
        return {
            "pixel_acc": float(tp.sum() / total) if total > 0 else None,
            "miou": float(np.mean(present)) if present else None,
            "mean_acc": float(np.mean(recall)) if recall else None,
            "per_class_iou": dict(zip(self.class_names, iou)),
            "confusion": self._confusion.cpu().tolist(),
            "num_pixels": int(total),
        }
