"""Score a checkpoint end to end on a labelled split: pixel accuracy, mIoU, per-class IoU, confusion."""
from __future__ import annotations

import hashlib
import json
import re
import time
from dataclasses import dataclass, field, fields
from pathlib import Path

import numpy as np
import torch

from fusion_seg.data.datasets import build_dataset
from fusion_seg.requests import DatasetRef
from fusion_seg.errors import UserError
from fusion_seg.evaluation.metrics import SegEvaluator
from fusion_seg.files import check_out_folder, reporting_write_errors, write_json_atomic
from fusion_seg.inference import arguments
from fusion_seg.inference.segmenter import load_model
from fusion_seg.plots import plot_if_available
from fusion_seg.progress import Progress
from fusion_seg.results import ResultMapping


@dataclass(frozen=True, eq=False)
class EvaluationResult(ResultMapping):
    """What ``evaluate`` measured (also readable as a mapping: ``r["miou"]``; see results.py). ``extra`` holds
    the metrics only some datasets have (Cityscapes: ``iiou_class``, ``iou_category``, ...)."""

    pixel_acc: float | None
    miou: float | None
    mean_acc: float | None
    per_class_iou: dict
    confusion: list
    num_pixels: int
    checkpoint: str
    dataset: str
    split: str
    images: int
    sliding_window: bool
    flip: bool
    scales: list
    seconds: float
    out: str
    backend: str = "torch"  # torch, or onnxruntime (an exported model)
    precision: str = "fp32"  # the forward's, resolved: fp32 or bf16
    extra: dict = field(default_factory=dict)


def evaluate(checkpoint: str | Path, *, dataset: DatasetRef | str, split: str | None = None, root: str | None = None,
             out: str | Path | None = None, sliding_window: bool = False, flip: bool = False,
             scales: tuple[float, ...] = (1.0,), weights: str | None = None, device: str = "auto",
             dataset_options: dict | None = None, precision: str = "auto", backend: str = "torch",
             progress: bool = True) -> EvaluationResult:
    """Pixel accuracy, mIoU, per-class IoU and the confusion matrix, end to end on images.

    ``dataset`` is a :class:`~fusion_seg.requests.DatasetRef` (which holds the split, root and options), or
    a dataset's name with ``split``, ``root`` and ``dataset_options`` one by one, as the command line has them.
    Predictions are scored at the original label resolution; ignore pixels are excluded. ``flip``
    and ``scales`` are test-time augmentation (see :func:`~fusion_seg.inference.segmenter.predict_logits`);
    ``precision`` and ``backend`` are :func:`~fusion_seg.inference.segmenter.load_model`'s (``backend="onnxruntime"``
    scores the model ``fusion-seg export`` wrote, ``checkpoint`` its .onnx file).
    Results go to ``out`` (default: a folder beside the checkpoint named for this evaluation,
    :func:`default_out_folder`) as ``metrics.json``, ``confusion.json`` and ``confusion.png``. An
    argument the command line would refuse, the dataset's errors and an ``out`` the results cannot go to
    are refused before the model loads; a write that fails all the same (a full disk) is a one-line
    :class:`UserError` naming the file.
    """
    checkpoint = arguments.path("checkpoint", checkpoint, "the checkpoint's path")
    if isinstance(dataset, DatasetRef):
        given = [name for name, value in (("split", split), ("root", root), ("dataset_options", dataset_options))
                 if value is not None]
        if given:
            raise UserError(f"evaluate(dataset={dataset!r}, {', '.join(f'{n}=...' for n in given)}): the DatasetRef "
                            f"holds the split, root and options; drop {', '.join(given)}, or pass the dataset's name "
                            f"and settings one by one: dataset={dataset.name!r}, split={dataset.split!r}, "
                            f"root={dataset.root!r}, dataset_options={dataset.options!r}.")
        dataset, split, root, dataset_options = dataset.name, dataset.split, dataset.root, dict(dataset.options)
    dataset = arguments.text("dataset", dataset, "camvid")
    split = arguments.text("split", split, "val")
    root = arguments.path("root", root, "the dataset's folder", optional=True)
    weights = arguments.path("weights", weights, "the encoder's weights file", optional=True)
    arguments.backend(backend, checkpoint, precision=precision, weights=weights)
    options = arguments.options("dataset_options", dataset_options, "{'num_images': 2}")
    sliding_window, flip = arguments.flag("sliding_window", sliding_window), arguments.flag("flip", flip)
    scales = arguments.scales(scales, option="--scales")
    progress = arguments.flag("progress", progress)
    device = arguments.text("device", device, "cpu")
    if out is None:
        out = default_out_folder(checkpoint, dataset, split, root=root, dataset_options=options, flip=flip,
                                 scales=scales, sliding_window=sliding_window, weights=weights, precision=precision)
    out = arguments.path("out", out, "the output folder", optional=True)
    check_out_folder(out, {out / "metrics.json": "the metrics", out / "confusion.json": "the confusion matrix",
                           out / "confusion.png": "the confusion plot"})
    ds = build_dataset(dataset, root=root, split=split, **options)  # its errors before the model's
    model = load_model(checkpoint, weights=weights, device=device, precision=precision, backend=backend)
    ckpt = model.checkpoint
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
    with Progress(len(ds), f"evaluate {dataset}/{split}", "image", enabled=progress) as bar:
        for i in range(len(ds)):
            sample = ds[i]
            if sample.mask is None:
                raise UserError(f"{dataset}/{split} has no labels for {sample.id}; evaluate needs a labelled split.")
            logits = model.logits(sample.image, sliding_window=sliding_window, flip=flip, scales=scales,
                                  out_size=sample.mask.shape, progress=progress)
            pred, gt = logits.argmax(1)[0].cpu(), torch.from_numpy(sample.mask.astype(np.int64))
            if instance_aware:
                evaluator.process(pred, gt, ds.instance_ids(i))
            else:
                evaluator.process(pred, gt)
            bar.update(1)
    result = evaluator.evaluate()
    result.update({"checkpoint": str(checkpoint), "dataset": dataset, "split": split, "images": len(ds),
                   "sliding_window": sliding_window, "flip": flip, "scales": list(scales), "backend": backend,
                   "precision": model.segmenter.identity.precision,
                   "seconds": time.perf_counter() - t0})
    confusion = result["confusion"]
    with reporting_write_errors(out, "the output folder"):
        out.mkdir(parents=True, exist_ok=True)
    with reporting_write_errors(out / "metrics.json", "the metrics"):
        write_json_atomic(out / "metrics.json", {k: v for k, v in result.items() if k != "confusion"})
    with reporting_write_errors(out / "confusion.json", "the confusion matrix"):
        write_json_atomic(out / "confusion.json", {"classes": list(ds.classes), "rows": "ground truth",
                                                   "cols": "prediction", "matrix": confusion}, indent=None)
    with reporting_write_errors(out / "confusion.png", "the confusion plot"):
        plot_if_available("plot_confusion", confusion, list(ds.classes), out / "confusion.png")
    result["out"] = str(out)
    own = {f.name for f in fields(EvaluationResult)} - {"extra"}
    return EvaluationResult(**{k: v for k, v in result.items() if k in own},
                            extra={k: v for k, v in result.items() if k not in own})


def default_out_folder(checkpoint: str | Path, dataset: str, split: str, *, root, dataset_options: dict, flip: bool,
                       scales, sliding_window: bool, weights, precision: str = "auto") -> Path:
    """Where :func:`evaluate` writes without ``out``: a folder beside the checkpoint, one per evaluation that differs.

    The name says what is readable at a glance: ``eval-<checkpoint stem>-<dataset>-<split>``, then ``-flip``,
    ``-scales0.75_1_1.25``, ``-sliding`` and ``-bf16``/``-fp32`` (``--precision``) when used; then, when there
    is a root, a dataset option or an encoder
    weights file, the first 8 hex digits of a sha256 of them (the root resolved, so that one folder spelled two
    ways is one evaluation), since paths and options do not fit a folder name. So ``best.pt`` and ``last.pt``,
    with and without test-time augmentation, on two copies of a dataset, each get their own folder, and the same
    evaluation run again replaces its own.
    """
    checkpoint = Path(checkpoint)
    parts = [checkpoint.stem, dataset, split]
    if flip:
        parts.append("flip")
    if tuple(scales) != (1.0,):
        parts.append("scales" + "_".join(f"{s:g}" for s in scales))
    if sliding_window:
        parts.append("sliding")
    if precision != "auto":
        parts.append(precision)
    if root is not None or dataset_options or weights is not None:
        where = {"root": None if root is None else str(Path(root).expanduser().resolve()),
                 "dataset_options": dataset_options, "weights": None if weights is None else str(weights)}
        parts.append(hashlib.sha256(json.dumps(where, sort_keys=True, default=str).encode()).hexdigest()[:8])
    return checkpoint.parent / "-".join(["eval", *(re.sub(r"[^\w.,+=-]", "_", p) for p in parts)])
