"""Cityscapes' official pixel-level scores: class/category IoU and instance-level IoU (iIoU).

A port, to train ids and vectorised with ``bincount``, of cityscapesscripts
``evaluation/evalPixelLevelSemanticLabeling.py`` (repo ``mcordts/cityscapesScripts``):
``evaluatePair``, ``getIouScoreForLabel``, ``getInstanceIouScoreForLabel``,
``getIouScoreForCategory``, ``getInstanceIouScoreForCategory`` and ``getScoreAverage``.

How the reference scores an instance class ``c`` (iIoU, "nIoU" in its printout):

* Every ground-truth *instance* (instance id ``labelId * 1000 + k``) of an evaluated class
  adds its pixels predicted as ``c`` to TP and the rest of its pixels to FN, both weighted by
  ``avgClassSize[c] / instance_size``. Which pixels belong to the instance comes from the
  instance map alone.
* FP is unweighted: pixels predicted as ``c`` whose ground truth is another *evaluated* class
  (a column of the confusion matrix without the diagonal and without ignored rows).
* Pixels of ``c`` outside any instance (crowd/group regions, stored in the instance map as the
  plain labelId ``< 1000``) are in neither weighted sum; predicting ``c`` there is no FP
  either (their ground truth *is* ``c``), while predicting another class there is an FP of
  that class, as for plain IoU. Ignored ground truth (train id 255) counts nowhere, and
  instances of ignored classes (caravan, trailer) are skipped.
* ``iIoU = wTP / (wTP + FP + wFN)``, undefined (None here, NaN there) when the denominator is
  0; a class with FP but no instance scores 0 and counts in the mean.
* Category level (human, vehicle): the same with "predicted as any class of the category" as
  a hit, the instance's *class* weight, and FP over ground truth of evaluated classes of other
  categories.
* Averages (``iou_class``, ``iiou_class``, ``iou_category``, ``iiou_category``) are means over
  the defined (non-None) scores, as ``getScoreAverage`` skips NaN.

Deviations from the reference (none changes a score on Cityscapes data):

* Inputs are train ids (0..18, 255 = ignore) rather than labelIds. The reference's vehicle
  category also counts predictions of the ignored labelIds caravan/trailer as hits / FP; a
  train-id prediction cannot name them, so that case does not arise.
* The reference selects instances with ``instanceIds > 1000``; here ``>= 1000``. The only id
  that differs, 1000, is labelId 1 (ego vehicle, ignored), so nothing changes.
* The reference requires an instance map for every image. Here ``instance_ids`` may be None:
  such an image counts towards the (category) IoU but not towards any iIoU, whose FP are taken
  from a second confusion matrix over the images *with* instance maps only. With instance maps
  for all images, both matrices are equal and the scores are the reference's.
* An instance of an evaluated class without instances (e.g. id 7000, "road"), or of an unknown
  labelId, makes the reference fail with a ``KeyError``; here it raises ``ValueError``.
* Weighted sums are accumulated in float64 in a different order (differences ~1e-15).
"""
from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch

from fusion_seg.data.datasets.cityscapes import CLASSES, LABEL_TO_TRAIN
from fusion_seg.evaluation.metrics import SegEvaluator

# Average instance size in pixels per class, verbatim from
# ``args.avgClassSize`` in cityscapesscripts/evaluation/evalPixelLevelSemanticLabeling.py
# (GitHub repo mcordts/cityscapesScripts). caravan and trailer are ignored in evaluation
# and kept only to mirror the reference table.
AVG_CLASS_SIZE = {
    "bicycle": 4672.3249222261,
    "caravan": 36771.8241758242,
    "motorcycle": 6298.7200839748,
    "rider": 3930.4788056518,
    "bus": 35732.1511111111,
    "train": 67583.7075812274,
    "car": 12794.0202738185,
    "person": 3462.4756337644,
    "truck": 27855.1264367816,
    "trailer": 16926.9763313609,
}
# The evaluated classes with ``hasInstances`` in cityscapesscripts helpers/labels.py.
INSTANCE_CLASSES = ("person", "rider", "car", "truck", "bus", "train", "motorcycle", "bicycle")
# Categories of helpers/labels.py that hold an evaluated class ("void" holds none).
CATEGORIES = ("flat", "construction", "object", "nature", "sky", "human", "vehicle")
# Categories whose labels all have instances (generateInstanceStats): the iIoU categories.
INSTANCE_CATEGORIES = ("human", "vehicle")
# Category of each train id (labels.py): road, sidewalk | building, wall, fence |
# pole, traffic light, traffic sign | vegetation, terrain | sky | person, rider |
# car, truck, bus, train, motorcycle, bicycle.
TRAIN_ID_CATEGORY = ("flat", "flat", "construction", "construction", "construction", "object",
                     "object", "object", "nature", "nature", "sky", "human", "human", "vehicle",
                     "vehicle", "vehicle", "vehicle", "vehicle", "vehicle")
# Largest labelId in labels.py (bicycle); instance ids encode labelId * 1000 + k.
MAX_LABEL_ID = 33

NUM_CLASSES = len(CLASSES)
_STAT_FIELDS = ("tp", "fn", "tp_weighted", "fn_weighted")
_SKIP, _INVALID = -1, -2


def _instance_label_table() -> np.ndarray:
    """labelId -> train id of an instance class; -1 for ignored labels (skipped), -2 for the
    evaluated classes without instances (an instance of those is an error)."""
    table = np.full(MAX_LABEL_ID + 1, _SKIP, dtype=np.int64)
    for label_id, train_id in LABEL_TO_TRAIN.items():
        table[label_id] = train_id if CLASSES[train_id] in INSTANCE_CLASSES else _INVALID
    return table


def _as_long(x) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        if x.is_floating_point():
            raise ValueError("label and instance maps must be integer arrays")
        return x.long()
    x = np.asarray(x)
    if not np.issubdtype(x.dtype, np.integer):
        raise ValueError(f"label and instance maps must be integer arrays, got {x.dtype}")
    return torch.from_numpy(x.astype(np.int64))


def _score(tp, fp, fn) -> float | None:
    denom = tp + fp + fn
    return float(tp / denom) if denom > 0 else None


def _mean(scores: Mapping[str, float | None]) -> float | None:
    valid = [s for s in scores.values() if s is not None]
    return float(np.mean(valid)) if valid else None


class CityscapesEvaluator(SegEvaluator):
    """Cityscapes class/category IoU and iIoU over the 19 train ids (255 = ignore).

    ``process(pred, gt, instance_ids)`` takes ``(H, W)`` or ``(N, H, W)`` integer maps:
    predicted train ids, ground-truth train ids and the ``*_gtFine_instanceIds.png`` map
    (or None, see the module docstring). :meth:`evaluate` returns everything
    :class:`SegEvaluator` does plus:

    * ``iou_class`` (= ``miou``), ``iiou_class``, ``iou_category``, ``iiou_category``;
    * ``per_class_iiou`` (the 8 instance classes), ``per_category_iou`` (7 categories),
      ``per_category_iiou`` (human, vehicle); undefined scores are None;
    * ``instance_stats``: ``{"classes"|"categories": {name: {tp, fn, tp_weighted,
      fn_weighted, fp}}}`` (tp/fn unweighted instance pixel counts, as the reference keeps);
    * ``num_images`` and ``num_images_with_instances``.

    ``avg_class_size`` overrides the reference's per-class average instance sizes (a mapping
    from class name to pixels; it must cover the 8 instance classes); leave it None to get the
    official scores.
    """

    def __init__(self, ignore_index: int = 255, avg_class_size: Mapping[str, float] | None = None):
        sizes = dict(AVG_CLASS_SIZE if avg_class_size is None else avg_class_size)
        missing = [c for c in INSTANCE_CLASSES if c not in sizes]
        if missing:
            raise ValueError(f"avg_class_size lacks the instance classes {missing}")
        self.avg_class_size = sizes
        # Per train id; 0 for classes without instances (never used).
        self._avg_size = np.array([float(sizes[c]) if c in INSTANCE_CLASSES else 0.0 for c in CLASSES])
        self._label_table = _instance_label_table()
        self._category_of = np.array([CATEGORIES.index(c) for c in TRAIN_ID_CATEGORY], dtype=np.int64)
        super().__init__(NUM_CLASSES, ignore_index, CLASSES)

    def reset(self) -> None:
        super().reset()
        c, k = NUM_CLASSES, len(CATEGORIES)
        # Confusion matrix over the images that came with an instance map (iIoU's FP).
        self._inst_confusion = torch.zeros(c, c, dtype=torch.int64)
        # Rows: tp, fn, tp_weighted, fn_weighted (instance pixels only).
        self._class_stats = torch.zeros(len(_STAT_FIELDS), c, dtype=torch.float64)
        self._category_stats = torch.zeros(len(_STAT_FIELDS), k, dtype=torch.float64)
        self._image_counts = torch.zeros(2, dtype=torch.int64)  # images, images with instances

    def state_tensors(self) -> list[torch.Tensor]:
        """All accumulated state, for distributed evaluation: fetch the list right before
        all-reducing (sum) each tensor in place (``process`` replaces the confusion tensors)."""
        return [self._confusion, self._inst_confusion, self._class_stats, self._category_stats,
                self._image_counts]

    def merge(self, other: CityscapesEvaluator) -> None:  # type: ignore[override]
        """Add another :class:`CityscapesEvaluator`'s state to this one."""
        if not isinstance(other, CityscapesEvaluator):
            raise TypeError("CityscapesEvaluator can only merge another CityscapesEvaluator")
        if other.avg_class_size != self.avg_class_size:
            raise ValueError("cannot merge evaluators with different avg_class_size")
        super().merge(other)
        self._inst_confusion = self._inst_confusion + other._inst_confusion.to(self._inst_confusion)
        self._class_stats += other._class_stats.cpu()
        self._category_stats += other._category_stats.cpu()
        self._image_counts += other._image_counts.cpu()

    def process(self, pred, target, instance_ids=None) -> None:  # type: ignore[override]
        """Add a frame ``(H, W)`` or a batch ``(N, H, W)``: train-id prediction, train-id ground
        truth and the Cityscapes instance-id map (or None: the frame then counts for IoU only)."""
        pred, target = _as_long(pred), _as_long(target)
        if instance_ids is not None:
            instance_ids = _as_long(instance_ids)
            if instance_ids.shape != target.shape:
                raise ValueError(f"instance map shape {tuple(instance_ids.shape)} != target shape "
                                 f"{tuple(target.shape)}")
        if pred.dim() not in (2, 3):
            raise ValueError(f"expected (H, W) or (N, H, W) maps, got shape {tuple(pred.shape)}")
        before = self._confusion.clone()
        super().process(pred, target)  # validates shapes and value ranges
        num = 1 if pred.dim() == 2 else pred.shape[0]
        if instance_ids is not None:
            try:  # all frames first, so that a bad instance map leaves the evaluator unchanged
                class_stats = np.zeros(tuple(self._class_stats.shape))
                category_stats = np.zeros(tuple(self._category_stats.shape))
                for p, inst in zip(pred.cpu().numpy().reshape(num, -1),
                                   instance_ids.cpu().numpy().reshape(num, -1)):
                    self._add_instances(p, inst, class_stats, category_stats)
            except Exception:
                self._confusion = before
                raise
            self._class_stats += torch.from_numpy(class_stats)
            self._category_stats += torch.from_numpy(category_stats)
            self._inst_confusion = self._inst_confusion.to(before.device) + (self._confusion - before)
            self._image_counts[1] += num
        self._image_counts[0] += num

    def _add_instances(self, pred: np.ndarray, inst: np.ndarray, class_stats: np.ndarray,
                       category_stats: np.ndarray) -> None:
        """The per-instance part of ``evaluatePair`` for one image (flat int64 maps), added to
        ``class_stats`` (4 x 19) and ``category_stats`` (4 x 7).

        Counts per instance with ``bincount`` over the instance ids themselves (valid ids are
        < 34000, labelId <= 33), without boolean masking: every pixel that is not an instance,
        or not a hit, goes to bin 0, which is never an instance. Done in numpy, whose gathers
        and bincounts are several times faster than torch's on CPU.
        """
        key = np.where(inst >= 1000, inst, 0)   # stuff, crowd, ignore (ids < 1000) -> bin 0
        top = int(key.max()) if key.size else 0
        if top < 1000:
            return
        if top >= (MAX_LABEL_ID + 1) * 1000:
            raise ValueError(f"instance id {top} encodes labelId {top // 1000}, which Cityscapes does not have")
        nbins = top + 1                          # bin i counts the pixels of instance id i
        size = np.bincount(key, minlength=nbins)
        bins = np.flatnonzero(size[1000:]) + 1000   # the instance ids present
        train = self._label_table[bins // 1000]
        if (train == _INVALID).any():
            bad = int(bins[train == _INVALID][0])
            raise ValueError(f"instance id {bad}: labelId {bad // 1000} ({CLASSES[LABEL_TO_TRAIN[bad // 1000]]}) "
                             "is not an instance class")
        keep = train >= 0  # instances of ignored classes (caravan, trailer, ...) are skipped
        bins, train = bins[keep], train[keep]
        if bins.size == 0:
            return
        category_of = self._category_of
        train_of_bin = np.full(nbins, -1, dtype=np.int64)
        train_of_bin[bins] = train
        cat_of_bin = np.full(nbins, -1, dtype=np.int64)
        cat_of_bin[bins] = category_of[train]
        tp = np.bincount(np.where(pred == train_of_bin[key], key, 0), minlength=nbins)
        cat_tp = np.bincount(np.where(category_of[pred] == cat_of_bin[key], key, 0), minlength=nbins)
        size, tp, cat_tp = (x[bins].astype(np.float64) for x in (size, tp, cat_tp))
        weight = self._avg_size[train] / size
        for stats, index, hits in ((class_stats, train, tp), (category_stats, category_of[train], cat_tp)):
            misses = size - hits
            for row, values in enumerate((hits, misses, hits * weight, misses * weight)):
                stats[row] += np.bincount(index, weights=values, minlength=stats.shape[1])

    def evaluate(self) -> dict:
        result = super().evaluate()
        conf = self._confusion.cpu().numpy().astype(np.float64)
        inst_conf = self._inst_confusion.cpu().numpy().astype(np.float64)
        onehot = np.zeros((NUM_CLASSES, len(CATEGORIES)))
        onehot[np.arange(NUM_CLASSES), self._category_of] = 1.0
        # FP: column sum minus diagonal; ignored ground truth is not in the matrix at all.
        class_fp = inst_conf.sum(axis=0) - np.diag(inst_conf)
        cat_conf = onehot.T @ conf @ onehot
        cat_tp, cat_gt, cat_pred = np.diag(cat_conf), cat_conf.sum(axis=1), cat_conf.sum(axis=0)
        inst_cat_conf = onehot.T @ inst_conf @ onehot
        cat_fp_inst = inst_cat_conf.sum(axis=0) - np.diag(inst_cat_conf)

        cs, ks = self._class_stats.numpy(), self._category_stats.numpy()
        per_class_iiou, class_stats = {}, {}
        for name in INSTANCE_CLASSES:
            c = CLASSES.index(name)
            tpw, fnw = cs[2, c], cs[3, c]
            per_class_iiou[name] = _score(tpw, class_fp[c], fnw)
            class_stats[name] = {**{f: float(cs[r, c]) for r, f in enumerate(_STAT_FIELDS)},
                                 "fp": float(class_fp[c])}
        per_category_iou = {name: _score(cat_tp[k], cat_pred[k] - cat_tp[k], cat_gt[k] - cat_tp[k])
                            for k, name in enumerate(CATEGORIES)}
        per_category_iiou, category_stats = {}, {}
        for name in INSTANCE_CATEGORIES:
            k = CATEGORIES.index(name)
            per_category_iiou[name] = _score(ks[2, k], cat_fp_inst[k], ks[3, k])
            category_stats[name] = {**{f: float(ks[r, k]) for r, f in enumerate(_STAT_FIELDS)},
                                    "fp": float(cat_fp_inst[k])}
        result.update({
            "iou_class": result["miou"],
            "iiou_class": _mean(per_class_iiou),
            "iou_category": _mean(per_category_iou),
            "iiou_category": _mean(per_category_iiou),
            "per_class_iiou": per_class_iiou,
            "per_category_iou": per_category_iou,
            "per_category_iiou": per_category_iiou,
            "instance_stats": {"classes": class_stats, "categories": category_stats},
            "num_images": int(self._image_counts[0]),
            "num_images_with_instances": int(self._image_counts[1]),
        })
        return result
