"""End to end: image in, mask out. ``predict`` writes masks; ``evaluate`` scores them.

The encoder is rebuilt from the identity the checkpoint records and checked
against it, so a decoder is never run on features of another encoder.
"""
from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .checkpoint import load_checkpoint
from .datasets import build_dataset
from .device import autocast, resolve_device, to_device
from .encoder import EncoderIdentity, rebuild_encoder
from .errors import UserError
from .io import default_palette, overlay, read_image, write_mask_png, write_rgb_png
from .metrics import SegEvaluator
from .model import Segmenter, decoder_from_record
from .plots import plot_if_available
from .progress import Progress
from .transforms import resize_pair, to_tensor

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp"}


def load_segmenter(checkpoint: str | Path, *, weights: str | None = None, device: str = "auto"):
    """(Segmenter on device, checkpoint dict)."""
    ckpt = load_checkpoint(checkpoint)
    dev = resolve_device(device)
    decoder = decoder_from_record(ckpt["decoder"])
    decoder.load_state_dict(ckpt["model"])
    encoder = rebuild_encoder(EncoderIdentity.from_dict(ckpt["encoder"]), weights_file=weights)
    model = Segmenter(encoder, decoder).to(dev).eval()
    if dev.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    return model, ckpt


def sliding_window_logits(model: Segmenter, image: torch.Tensor, crop: tuple[int, int], num_classes: int,
                          stride: tuple[int, int] | None = None) -> torch.Tensor:
    """HRNet's sliding-window inference: windows of ``crop`` every 2/3 crop, logits averaged where they overlap."""
    _, _, h, w = image.shape
    ch, cw = crop
    sh, sw = stride or (max(1, ch * 2 // 3), max(1, cw * 2 // 3))
    ph, pw = max(0, ch - h), max(0, cw - w)
    padded = F.pad(image, (0, pw, 0, ph))
    H, W = padded.shape[-2:]
    logits = torch.zeros(1, num_classes, H, W, device=image.device)
    count = torch.zeros(1, 1, H, W, device=image.device)
    rows = max(1, math.ceil((H - ch) / sh) + 1)
    cols = max(1, math.ceil((W - cw) / sw) + 1)
    for r in range(rows):
        for c in range(cols):
            y0, x0 = min(r * sh, H - ch), min(c * sw, W - cw)
            logits[..., y0:y0 + ch, x0:x0 + cw] += model(padded[..., y0:y0 + ch, x0:x0 + cw]).float()
            count[..., y0:y0 + ch, x0:x0 + cw] += 1
    return (logits / count)[..., :h, :w]


@torch.inference_mode()
def predict_logits(model: Segmenter, image: np.ndarray, ckpt: dict, *, sliding_window: bool = False,
                   out_size: tuple[int, int] | None = None) -> torch.Tensor:
    """Logits (1, C, H, W) for one RGB image, resized as in training, returned at ``out_size``."""
    resize = ckpt["data"].get("resize") or {}
    size = tuple(resize["size"]) if resize.get("size") else None
    resized, _ = resize_pair(image, None, short_side=resize.get("short_side"), size=size)
    identity = model.encoder.identity
    device = next(model.decoder.parameters()).device
    x = to_device(to_tensor(resized, identity.mean, identity.std).unsqueeze(0), device)
    with autocast(device):
        crop = _train_crop(ckpt)
        if sliding_window and crop and (x.shape[-2] > crop[0] or x.shape[-1] > crop[1]):
            logits = sliding_window_logits(model, x, crop, ckpt["decoder"]["num_classes"])
        else:
            logits = model(x)
    logits = logits.float()
    target = out_size or image.shape[:2]
    if tuple(logits.shape[-2:]) != tuple(target):
        logits = F.interpolate(logits, size=target, mode="bilinear", align_corners=False)
    return logits


def _train_crop(ckpt: dict) -> tuple[int, int] | None:
    data = ckpt["data"]
    crop = data.get("crop") or (data.get("augment") or {}).get("crop")
    return tuple(crop) if crop else None


def _palette(ckpt: dict) -> np.ndarray:
    return default_palette(len(ckpt["classes"]))


def list_images(path: str | Path) -> list[Path]:
    path = Path(path)
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise UserError(f"--input {path} does not exist; pass an image file or a folder of images.")
    files = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not files:
        raise UserError(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) in {path}.")
    return files


def check_out_folder(out: Path, files: dict[Path, str], option: str = "--out") -> None:
    """Refuse, before any work, an output folder that is a file or lies under one, and an output
    path (``files``: path -> what goes there) that is a folder: each would fail only after the work."""
    if out.exists() and not out.is_dir():
        raise UserError(f"{option} {out} is a file, not a folder; pass a folder (it is created if missing).")
    for parent in out.parents:
        if parent.exists():
            if not parent.is_dir():
                raise UserError(f"{option} {out} lies under {parent}, which is a file, not a folder; "
                                "pass a folder path.")
            break
    for path, what in files.items():
        if path.is_dir():
            raise UserError(f"{path} is a folder, where {what} would be written; move it, or pass another {option}.")


LEGEND = "legend.png"  # predict's colour legend (class names), beside the overlays


def prediction_paths(files: list[Path], out: Path) -> dict[Path, tuple[Path, str]]:
    """Where ``predict`` writes each image's results: ``{output path: (input image, "label map"|"overlay")}``.

    Refused (UserError naming the paths) before any work when two results would go to one path,
    or a result would overwrite an input image (``--out`` the input folder, say).
    """
    inputs = {}
    for path in files:
        try:
            inputs[_file_id(path)] = path
        except OSError as exc:
            raise UserError(f"--input {path} cannot be read ({exc.strerror}); fix or remove it.") from None
    outputs: dict[Path, tuple[Path, str]] = {}
    for path in files:
        for target, what in ((out / f"{path.stem}.png", "label map"), (out / f"{path.stem}_overlay.png", "overlay")):
            if target in outputs:
                other, other_what = outputs[target]
                which = (f"their {what}s" if what == other_what
                         else f"the {other_what} of {other.name} and the {what} of {path.name}")
                raise UserError(
                    f"--input {other} and {path} would both write {target} ({which}); rename one of them, "
                    "or predict them into separate --out folders."
                )
            try:
                victim = inputs.get(_file_id(target))
            except OSError:
                victim = None  # nothing there yet
            if victim is not None:
                raise UserError(
                    f"--out {out}: the {what} of {path} would overwrite the input image {victim}; "
                    "pass an --out folder that holds no input images."
                )
            outputs[target] = (path, what)
    if out / LEGEND in outputs:
        src, what = outputs[out / LEGEND]
        raise UserError(f"--input {src}: its {what} would be written to {out / LEGEND}, where predict writes the "
                        "class legend; rename the image.")
    return outputs


def _file_id(path: Path) -> tuple[int, int]:
    """(device, inode): the same file under any name (symlinks, hard links, case-insensitive file systems)."""
    st = os.stat(path)
    return st.st_dev, st.st_ino


def predict(checkpoint: str | Path, inputs: str | Path, out: str | Path, *, sliding_window: bool = False,
            weights: str | None = None, device: str = "auto", progress: bool = True) -> dict:
    """Write ``<stem>.png`` (palette label mask) and ``<stem>_overlay.png`` for each input image, and
    ``legend.png`` (the palette's colours with the class names; needs matplotlib, the ``plots`` extra).

    Never overwrites an input image and never writes two results to one path: such a request is
    refused before the model is loaded, as is an ``out`` that is (or lies under) a file.
    """
    out = Path(out)
    files = list_images(inputs)
    targets = prediction_paths(files, out)
    check_out_folder(out, {path: f"the {what} of {src}" for path, (src, what) in targets.items()})
    model, ckpt = load_segmenter(checkpoint, weights=weights, device=device)
    palette = _palette(ckpt)
    out.mkdir(parents=True, exist_ok=True)
    plot_if_available("plot_legend", list(ckpt["classes"]), palette, out / LEGEND)  # colour -> class name
    t0 = time.perf_counter()
    bar = Progress(len(files), "predict", "image", enabled=progress)
    for path in files:
        image = read_image(path)
        pred = predict_logits(model, image, ckpt, sliding_window=sliding_window).argmax(1)[0]
        mask = pred.cpu().numpy().astype(np.uint8)
        write_mask_png(out / f"{path.stem}.png", mask, palette)
        write_rgb_png(out / f"{path.stem}_overlay.png", overlay(image, mask, palette))
        bar.update(1)
    bar.close()
    seconds = time.perf_counter() - t0
    return {"images": len(files), "out": str(out), "seconds": seconds,
            "images_per_second": len(files) / seconds if seconds else None}


def evaluate(checkpoint: str | Path, *, dataset: str, split: str, root: str | None = None,
             out: str | Path | None = None, sliding_window: bool = False, weights: str | None = None,
             device: str = "auto", dataset_options: dict | None = None, progress: bool = True) -> dict:
    """Pixel accuracy, mIoU, per-class IoU and the confusion matrix, end to end on images.

    Predictions are scored at the original label resolution; ignore pixels are excluded.
    Results go to ``out`` (default: ``<checkpoint dir>/eval-<dataset>-<split>/``) as
    ``metrics.json`` and ``confusion.json``; an ``out`` they cannot go to is refused before any work.
    """
    out = Path(out) if out else Path(checkpoint).parent / f"eval-{dataset}-{split}"
    check_out_folder(out, {out / "metrics.json": "the metrics", out / "confusion.json": "the confusion matrix",
                           out / "confusion.png": "the confusion plot"})
    model, ckpt = load_segmenter(checkpoint, weights=weights, device=device)
    ds = build_dataset(dataset, root=root, split=split, **(dataset_options or {}))
    if list(ds.classes) != list(ckpt["classes"]):
        raise UserError(
            f"the checkpoint was trained on classes {list(ckpt['classes'])}, but {dataset}/{split} has "
            f"{list(ds.classes)}; evaluate on a dataset with the same class set."
        )
    instance_aware = hasattr(ds, "instance_ids")  # Cityscapes: iIoU when *_instanceIds.png are present
    if instance_aware:
        from .cityscapes_metrics import CityscapesEvaluator

        evaluator = CityscapesEvaluator(ds.ignore_index)
    else:
        evaluator = SegEvaluator(len(ds.classes), ds.ignore_index, list(ds.classes))
    t0 = time.perf_counter()
    bar = Progress(len(ds), f"evaluate {dataset}/{split}", "image", enabled=progress)
    for i in range(len(ds)):
        sample = ds[i]
        if sample.mask is None:
            raise UserError(f"{dataset}/{split} has no labels for {sample.id}; evaluate needs a labelled split.")
        logits = predict_logits(model, sample.image, ckpt, sliding_window=sliding_window,
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
                   "sliding_window": sliding_window, "seconds": time.perf_counter() - t0})
    out.mkdir(parents=True, exist_ok=True)
    confusion = result["confusion"]
    (out / "metrics.json").write_text(json.dumps({k: v for k, v in result.items() if k != "confusion"}, indent=2))
    (out / "confusion.json").write_text(json.dumps({"classes": list(ds.classes), "rows": "ground truth",
                                                    "cols": "prediction", "matrix": confusion}))
    plot_if_available("plot_confusion", confusion, list(ds.classes), out / "confusion.png")
    result["out"] = str(out)
    return result
