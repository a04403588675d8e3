"""Class weights for the loss (``--class-weights``), from the training store's labels.

Street scenes are dominated by road, sky and building; poles, signs and pedestrians cover
a few percent of the pixels, and an unweighted loss can ignore them. The CamVid literature
reweights the loss per class:

- ``median-freq``: SegNet's median frequency balancing (Badrinarayanan et al. 2017, after
  Eigen & Fergus 2015): ``freq(c)`` is the number of pixels of class ``c`` divided by the
  number of pixels of the training samples in which ``c`` appears, and
  ``weight(c) = median(freq) / freq(c)``.
- ``inverse-log``: ENet's weighting (Paszke et al. 2016): ``weight(c) = 1 / ln(1.02 + p(c))``,
  where ``p(c)`` is the share of class ``c`` among all labelled pixels; weights lie in
  ``(1, 50.5]``.
- ``FILE``: one weight per class from a JSON file, either a list in class order or an object
  ``{"class name": weight}`` naming every class.

Frequencies are counted over the stored training views the run uses (``--views``), labelled
pixels only (the ignore index is not a class). A class absent from those views gets weight 0
under ``median-freq`` (it has no pixels to weight) and is left out of the median. The counts
and the resolved weights are stored in the run's ``config.json``.

With OHEM the weights scale each pixel's loss and the mean divides by the number of kept
pixels, as in HRNet's ``OhemCrossEntropy``; with ``ce`` the mean divides by the summed
weights, as ``F.cross_entropy`` does (see ``losses.py``).
"""
from __future__ import annotations

import json
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fusion_seg.errors import UserError

CLASS_WEIGHTS = ("none", "median-freq", "inverse-log")  # or a FILE
ENET_C = 1.02  # ENet's constant: bounds the weights to (1, 1/ln(1.02)] = (1, 50.5]


@dataclass(frozen=True)
class ClassFrequencies:
    """Labelled-pixel counts of each class in a set of training samples."""

    pixels: tuple[int, ...]          # pixels of class c
    sample_pixels: tuple[int, ...]   # labelled pixels of the samples in which class c appears

    @classmethod
    def count(cls, label_maps, num_classes: int, ignore_index: int) -> "ClassFrequencies":
        pixels = np.zeros(num_classes, dtype=np.int64)
        sample_pixels = np.zeros(num_classes, dtype=np.int64)
        for labels in label_maps:
            flat = np.asarray(labels).reshape(-1)
            flat = flat[(flat != ignore_index) & (flat < num_classes)]
            counts = np.bincount(flat, minlength=num_classes)[:num_classes]
            pixels += counts
            sample_pixels[counts > 0] += flat.size
        return cls(tuple(int(p) for p in pixels), tuple(int(p) for p in sample_pixels))

    def median_frequency(self) -> list[float]:
        """SegNet: ``median(freq) / freq(c)``, ``freq(c) = pixels(c) / sample_pixels(c)``; 0 for absent classes."""
        freq = [p / s if s else 0.0 for p, s in zip(self.pixels, self.sample_pixels)]
        present = [f for f in freq if f > 0]
        median = float(np.median(present))
        return [median / f if f > 0 else 0.0 for f in freq]

    def inverse_log(self, c: float = ENET_C) -> list[float]:
        """ENet: ``1 / ln(c + p(c))`` with ``p(c)`` the class's share of all labelled pixels."""
        total = sum(self.pixels)
        return [1.0 / math.log(c + p / total) for p in self.pixels]

    def to_json(self) -> dict:
        return {"pixels": list(self.pixels), "sample_pixels": list(self.sample_pixels)}


def check_class_weights_option(value: str | None, option: str = "--class-weights") -> None:
    """Refuse a value that is neither a method nor an existing file, before any work."""
    if value is None or value in CLASS_WEIGHTS:
        return
    if not Path(value).is_file():
        raise UserError(f"{option} {value!r} is neither one of {', '.join(CLASS_WEIGHTS)} nor an existing file; "
                        "pass a method, or a JSON file with one weight per class.")


def read_weights_file(path: str | Path, classes: list[str]) -> list[float]:
    """Weights from a JSON list (class order) or object (``{"class": weight}`` for every class)."""
    path = Path(path)
    fix = (f"write a JSON list of {len(classes)} non-negative numbers in class order, or an object naming "
           f"every class ({', '.join(classes)})")
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UserError(f"--class-weights {path}: cannot read it as JSON ({exc}); {fix}.") from None
    if isinstance(data, dict):
        missing = [c for c in classes if c not in data]
        unknown = sorted(set(data) - set(classes))
        if missing or unknown:
            raise UserError(f"--class-weights {path}: " + "; ".join(
                part for part in (f"missing {', '.join(missing)}" if missing else "",
                                  f"unknown {', '.join(unknown)}" if unknown else "") if part) + f"; {fix}.")
        data = [data[c] for c in classes]
    if not isinstance(data, list) or len(data) != len(classes):
        raise UserError(f"--class-weights {path}: expected {len(classes)} weights, found "
                        f"{len(data) if isinstance(data, list) else type(data).__name__}; {fix}.")
    if not all(isinstance(w, (int, float)) and not isinstance(w, bool) and math.isfinite(w) and w >= 0
               for w in data):
        raise UserError(f"--class-weights {path}: every weight must be a finite number >= 0; {fix}.")
    if not any(w > 0 for w in data):
        raise UserError(f"--class-weights {path}: all weights are 0, which leaves no loss; {fix}.")
    return [float(w) for w in data]


def resolve_class_weights(option: str | None, label_maps, classes: list[str], ignore_index: int,
                          where: str = "the training data") -> tuple[list[float] | None, dict]:
    """``(weights or None, record for config.json)`` for ``--class-weights option``.

    ``label_maps`` is an iterable of the training samples' label arrays; it is only read for
    ``median-freq`` and ``inverse-log``, which refuse labels without a single labelled pixel
    (``where`` names them in the message).
    """
    if option is None or option == "none":
        return None, {"method": "none"}
    if option not in CLASS_WEIGHTS:
        weights = read_weights_file(option, classes)
        return weights, {"method": "file", "file": str(option), "weights": weights}
    freqs = ClassFrequencies.count(label_maps, len(classes), ignore_index)
    if sum(freqs.pixels) == 0:
        raise UserError(f"{where} holds no labelled pixel: every label is the ignore index {ignore_index}, so "
                        f"there is nothing to learn (and no {option} class weights). Check the dataset's masks: "
                        f"each pixel's value is its class id, {ignore_index} marks pixels to ignore.")
    weights = freqs.median_frequency() if option == "median-freq" else freqs.inverse_log()
    return weights, {"method": option, "weights": weights, "frequencies": freqs.to_json()}


def store_label_maps(store, views) -> Iterator[np.ndarray]:
    """The valid region of each view's labels in ``store`` (no features are read)."""
    from fusion_seg.cache.store import VIEW_FIELDS  # numpy-only callers (TrainConfig's checks) need no zarr

    rows = store.rows()
    h, w = VIEW_FIELDS.index("valid_h"), VIEW_FIELDS.index("valid_w")
    for v in views:
        _, _, labels = store.read_stored_view(int(v), [])
        yield labels[: int(rows[v, h]), : int(rows[v, w])]


def require_labelled_pixels(store, views, what: str) -> None:
    """Refuse a store (``what`` names it: "--val-cache X", "the training store X") whose ``views`` hold no
    labelled pixel: training on it learns nothing, and its mIoU is undefined. Reads views until the
    first labelled pixel: one label chunk for any usable store."""
    ignore = store.spec.ignore_index
    if len(views) == 0:
        skipped = len(store.skipped_views())
        why = f"all {skipped} were skipped as bad input" if skipped else "it has none"
        raise UserError(f"{what} holds no usable view ({why}: `fusion-seg info {store.path}` lists them); fix the "
                        "inputs and re-run its extract command with --repair.")
    if not any(bool((labels != ignore).any()) for labels in store_label_maps(store, views)):
        raise UserError(f"{what} holds no labelled pixel in its {len(views)} views: every label is the ignore "
                        f"index {ignore}. Check the dataset's masks (each pixel's value is its class id; {ignore} "
                        "marks pixels to ignore) and extract the store again.")
