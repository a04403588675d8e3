"""Score a checkpoint end to end on a labelled split: pixel accuracy, mIoU, per-class IoU, confusion."""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

from fusion_seg.data.datasets import build_dataset
from fusion_seg.errors import UserError
from fusion_seg.evaluation.metrics import SegEvaluator
from fusion_seg.files import write_json_atomic
from fusion_seg.plots import plot_if_available
from fusion_seg.inference.predict import check_out_folder
from fusion_seg.checks import scales_problem
from fusion_seg.inference.segmenter import load_model
from fusion_seg.progress import Progress


def evaluate(checkpoint: str | Path, *, dataset: str, split: str, root: str | None = None,
             out: str | Path | None = None, sliding_window: bool = False, flip: bool = False,
             scales: tuple[float, ...] = (1.0,), weights: str | None = None, device: str = "auto",
             dataset_options: dict | None = None, progress: bool = True) -> dict:
    """Pixel accuracy, mIoU, per-class IoU and the confusion matrix, end to end on images.

    Predictions are scored at the original label resolution; ignore pixels are excluded. ``flip``
    and ``scales`` are test-time augmentation (see :func:`~fusion_seg.inference.segmenter.predict_logits`).
    Results go to ``out`` (default: ``<checkpoint dir>/eval-<dataset>-<split>/``) as
    ``metrics.json`` and ``confusion.json``; an ``out`` they cannot go to is refused before any work.
    """
    problem = scales_problem(scales)
    if problem:
        raise UserError(f"--scales {scales!r}: {problem}.")
    scales = tuple(float(s) for s in scales)
    out = Path(out) if out else Path(checkpoint).parent / f"eval-{dataset}-{split}"
    check_out_folder(out, {out / "metrics.json": "the metrics", out / "confusion.json": "the confusion matrix",
                           out / "confusion.png": "the confusion plot"})
    model = load_model(checkpoint, weights=weights, device=device)
    ckpt = model.checkpoint
    ds = build_dataset(dataset, root=root, split=split, **(dataset_options or {}))
    if list(ds.classes) != list(ckpt["classes"]):
        raise UserError(
            f"the checkpoint was trained on classes {list(ckpt['classes'])}, but {dataset}/{split} has "
            f"{list(ds.classes)}; evaluate on a dataset with the same class set."
        )
    instance_aware = hasattr(ds, "instance_ids")  # Cityscapes: iIoU when *_instanceIds.png are present
    if instance_aware:
        from fusion_seg.evaluation.cityscapes import CityscapesEvaluator

        evaluator = CityscapesEvaluator(ds.ignore_index)
    else:
        evaluator = SegEvaluator(len(ds.classes), ds.ignore_index, list(ds.classes))
    t0 = time.perf_counter()
    bar = Progress(len(ds), f"evaluate {dataset}/{split}", "image", enabled=progress)
    for i in range(len(ds)):
        sample = ds[i]
        if sample.mask is None:
            raise UserError(f"{dataset}/{split} has no labels for {sample.id}; evaluate needs a labelled split.")
        logits = model.logits(sample.image, sliding_window=sliding_window, flip=flip, scales=scales,
                              out_size=sample.mask.shape)
        pred, gt = logits.argmax(1)[0].cpu(), torch.from_numpy(sample.mask.astype(np.int64))
        if instance_aware:
            evaluator.process(pred, gt, ds.instance_ids(i))
        else:
            evaluator.process(pred, gt)
        bar.update(1)
    bar.close()
    result = evaluator.evaluate()
    result.update({"checkpoint": str(checkpoint), "dataset": dataset, "split": split, "images": len(ds),
                   "sliding_window": sliding_window, "flip": flip, "scales": list(scales),
                   "seconds": time.perf_counter() - t0})
    out.mkdir(parents=True, exist_ok=True)
    confusion = result["confusion"]
    write_json_atomic(out / "metrics.json", {k: v for k, v in result.items() if k != "confusion"})
    write_json_atomic(out / "confusion.json", {"classes": list(ds.classes), "rows": "ground truth",
                                               "cols": "prediction", "matrix": confusion}, indent=None)
    plot_if_available("plot_confusion", confusion, list(ds.classes), out / "confusion.png")
    result["out"] = str(out)
    return result
