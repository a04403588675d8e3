"""``predict``: images in, masks and overlays out, never over an input or another result."""
from __future__ import annotations

import os
import time
from pathlib import Path


from fusion_seg.data.io import IMAGE_EXTENSIONS, list_images as list_image_files, overlay, read_image, write_mask_png, write_rgb_png
from fusion_seg.errors import UserError
from fusion_seg.inference.segmenter import load_model
from fusion_seg.plots import plot_if_available
from fusion_seg.progress import Progress


def list_images(path: str | Path) -> list[Path]:
    path = Path(path)
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise UserError(f"--input {path} does not exist; pass an image file or a folder of images.")
    files = list_image_files(path)
    if not files:
        raise UserError(f"no images ({', '.join(sorted(IMAGE_EXTENSIONS))}) in {path}.")
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
    model = load_model(checkpoint, weights=weights, device=device)
    palette = model.palette
    out.mkdir(parents=True, exist_ok=True)
    plot_if_available("plot_legend", model.classes, palette, out / LEGEND)  # colour -> class name
    t0 = time.perf_counter()
    bar = Progress(len(files), "predict", "image", enabled=progress)
    for path in files:
        image = read_image(path)
        mask = model.predict(image, sliding_window=sliding_window)
        write_mask_png(out / f"{path.stem}.png", mask, palette)
        write_rgb_png(out / f"{path.stem}_overlay.png", overlay(image, mask, palette))
        bar.update(1)
    bar.close()
    seconds = time.perf_counter() - t0
    return {"images": len(files), "out": str(out), "seconds": seconds,
            "images_per_second": len(files) / seconds if seconds else None}


