"""``predict``: images in, masks and overlays out, never over an input, another result or a file of the user's.

Its output folder is checked before any work (:func:`fusion_seg.files.check_out_folder`), and a write that
fails all the same (a full disk) is one line naming the file (:func:`fusion_seg.files.reporting_write_errors`).
Every file it writes carries the PNG text ``Software: fusion-seg predict`` (:data:`WRITTEN_BY`): a rerun
replaces its own results, and a file of the same name that it did not write is refused, not overwritten.
"""
from __future__ import annotations

import importlib.util
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from fusion_seg.data.io import (IMAGE_EXTENSIONS, file_problem, list_images as list_image_files, overlay, png_text,
                                read_image, write_mask_png, write_rgb_png)
from fusion_seg.errors import UserError
from fusion_seg.files import check_out_folder, reporting_write_errors
from fusion_seg.inference import arguments
from fusion_seg.inference.segmenter import load_model
from fusion_seg.plots import plot_if_available
from fusion_seg.progress import Progress
from fusion_seg.results import ResultMapping


def list_images(path: str | Path) -> list[Path]:
    """``--input``'s images: the file itself, or the images of the folder (:func:`fusion_seg.data.io.list_images`)."""
    path = Path(path)
    if path.is_file():
        return [path]
    if path.is_symlink() and not path.exists():
        raise UserError(f"cannot read --input {path}: {file_problem(path)}.")
    if not path.is_dir():
        raise UserError(f"--input {path} does not exist; pass an image file or a folder of images.")
    files = list_image_files(path)
    if not files:
        raise UserError(f"no images ({', '.join(sorted(IMAGE_EXTENSIONS))}) in {path}.")
    return files


def not_images(folder: Path, images: list[Path]) -> list[Path]:
    """The files of ``folder`` other than its ``images`` (:func:`list_images`'s), hidden files aside."""
    listed = set(images)
    return sorted((p for p in folder.iterdir() if not p.name.startswith(".") and not p.is_dir() and p not in listed),
                  key=lambda p: p.name)


def skipped_line(folder: Path, skipped: list[Path]) -> str:
    """What predict says of the files of ``--input`` it does not read."""
    names = ", ".join(p.name for p in skipped[:3]) + (f" and {len(skipped) - 3} more" if len(skipped) > 3 else "")
    return (f"predict: skipping {len(skipped)} file{'s' if len(skipped) != 1 else ''} of {folder} that "
            f"{'is' if len(skipped) == 1 else 'are'} not an image type it reads ({names}); it reads "
            f"{', '.join(sorted(IMAGE_EXTENSIONS))}.")


LEGEND = "legend.png"  # predict's colour legend (class names), beside the overlays
WRITTEN_BY = {"Software": "fusion-seg predict"}  # the PNG text of every file predict writes


def refuse_foreign_files(paths: dict[Path, str], out: Path) -> None:
    """Refuse, before any work, to overwrite a file at one of ``paths`` (path -> what predict would write
    there) that predict did not write: a user's own file of the same name is not a result to replace."""
    for path, what in paths.items():
        if path.is_file() and png_text(path, "Software") != WRITTEN_BY["Software"]:
            raise UserError(f"--out {out}: {path.name} is there and was not written by fusion-seg predict; "
                            f"{what} would overwrite it. Move it, or pass another --out folder.")


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


def prediction_targets(inputs: str | Path, out: Path) -> dict[Path, tuple[Path, str]]:
    """:func:`prediction_paths` of ``inputs``'s images, after refusing an ``out`` that is the input folder itself:
    the masks and overlays would lie among the images, and a re-run would take them for inputs."""
    inputs, out = Path(inputs), Path(out)
    targets = prediction_paths(list_images(inputs), out)  # first: it names the input a result would overwrite
    if inputs.is_dir() and out.resolve() == inputs.resolve():
        raise UserError(f"--out {out} is the --input folder: the masks and overlays would be written among the "
                        "images (and read as inputs by the next run). Pass another --out folder.")
    return targets


def _file_id(path: Path) -> tuple[int, int]:
    """(device, inode): the same file under any name (symlinks, hard links, case-insensitive file systems)."""
    st = os.stat(path)
    return st.st_dev, st.st_ino


@dataclass(frozen=True, eq=False)
class PredictionResult(ResultMapping):
    """What ``predict`` wrote (also readable as a mapping: ``r["images"]``; see results.py)."""

    images: int
    out: str
    seconds: float
    images_per_second: float | None


def predict(checkpoint: str | Path, inputs: str | Path, out: str | Path, *, sliding_window: bool = False,
            flip: bool = False, scales=(1.0,), weights: str | None = None, device: str = "auto",
            precision: str = "auto", backend: str = "torch", progress: bool = True) -> PredictionResult:
    """Write ``<stem>.png`` (palette label mask) and ``<stem>_overlay.png`` for each input image, and
    ``legend.png`` (the palette's colours with the class names; needs matplotlib, the ``plots`` extra).

    ``inputs`` is one image file or a folder of images. Never overwrites an input image and never
    writes two results to one path: such a request is refused before the model is loaded, as is an
    ``out`` that is (or lies under) a file or cannot be written, and an argument the command line
    would refuse. A write that fails all the same (a full disk) is a one-line :class:`UserError`.
    With ``progress``, a progress line per image (and over the windows of a long sliding window).
    ``flip`` and ``scales`` are test-time augmentation, as ``evaluate``'s (the logits of the mirrored and
    rescaled images averaged). ``precision`` and ``backend`` are :func:`~fusion_seg.inference.segmenter.load_model`'s
    (``backend="onnxruntime"`` runs the model ``fusion-seg export`` wrote, ``checkpoint`` its .onnx file).
    """
    checkpoint = arguments.path("checkpoint", checkpoint, "the checkpoint's path")
    inputs = arguments.path("inputs", inputs, "an image file or a folder of images (to predict several files, "
                                              "put them in one folder)")
    out = arguments.path("out", out, "the output folder")
    weights = arguments.path("weights", weights, "the encoder's weights file", optional=True)
    arguments.backend(backend, checkpoint, precision=precision, weights=weights)
    sliding_window = arguments.flag("sliding_window", sliding_window)
    flip, scales = arguments.flag("flip", flip), arguments.scales(scales)
    progress = arguments.flag("progress", progress)
    device = arguments.text("device", device, "cpu")
    targets = prediction_targets(inputs, out)
    writes = {path: f"the {what} of {src}" for path, (src, what) in targets.items()}
    check_out_folder(out, writes)
    if importlib.util.find_spec("matplotlib") is not None:  # the legend is written only with matplotlib
        writes[out / LEGEND] = "the class legend"
    refuse_foreign_files(writes, out)
    files = list(dict.fromkeys(src for src, _ in targets.values()))
    skipped = not_images(inputs, files) if inputs.is_dir() else []
    if skipped:
        print(skipped_line(inputs, skipped), file=sys.stderr, flush=True)
    model = load_model(checkpoint, weights=weights, device=device, precision=precision, backend=backend)
    palette = model.palette
    with reporting_write_errors(out, "the output folder"):
        out.mkdir(parents=True, exist_ok=True)
    with reporting_write_errors(out / LEGEND, "the class legend"):
        plot_if_available("plot_legend", model.classes, palette, out / LEGEND, metadata=WRITTEN_BY)  # colour -> name
    t0 = time.perf_counter()
    with Progress(len(files), "predict", "image", enabled=progress) as bar:
        for path in files:
            image = read_image(path)
            mask = model.predict(image, sliding_window=sliding_window, flip=flip, scales=scales, progress=progress)
            label_map, overlaid = out / f"{path.stem}.png", out / f"{path.stem}_overlay.png"
            with reporting_write_errors(label_map, f"the label map of {path.name}"):
                write_mask_png(label_map, mask, palette, text=WRITTEN_BY)
            with reporting_write_errors(overlaid, f"the overlay of {path.name}"):
                write_rgb_png(overlaid, overlay(image, mask, palette), text=WRITTEN_BY)
            bar.update(1)
    seconds = time.perf_counter() - t0
    return PredictionResult(len(files), str(out), seconds, len(files) / seconds if seconds else None)
