"""Mapillary Vistas (v1.2 or v1.1) in the official download layout (65 classes, 'Unlabeled' -> ignore).

Layout under ``root`` (the unpacked download)::

    root/config_v1.2.json                    v1.2: labels[i].readable / .color
    root/{training,validation,testing}/images/<key>.jpg
    root/{training,validation}/v1.2/labels/<key>.png
    root/config.json                         v1.1 (older download)
    root/{training,validation}/labels/<key>.png

Labels are 8-bit palette PNGs read as indices: label ``i`` is ``labels[i]`` of
the config. The last label, 'Unlabeled', becomes 255 (ignore), which leaves 65
classes. ``version="auto"`` takes v1.2 when its config (and, for a labelled
split, its labels folder) exists, else v1.1. Splits ``train``/``val``/``test``
are aliases of ``training``/``validation``/``testing``; ``testing`` has no
labels, so it reads no masks unless ``require_masks=True``.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from fusion_seg.errors import DataError
from fusion_seg.data.datasets.base import FileSegDataset, RootLayout, register_dataset
from fusion_seg.data.io import list_images

SPLITS = ("training", "validation", "testing")
ALIASES = {"train": "training", "val": "validation", "test": "testing"}
# version -> (config file under root, labels folder under root/<split>)
VERSIONS = {"v1.2": ("config_v1.2.json", "v1.2/labels"), "v1.1": ("config.json", "labels")}
UNLABELED = "Unlabeled"
LAYOUT = ("<root>/{training,validation}/images/*.jpg with <root>/{training,validation}/v1.2/labels/*.png "
          "and <root>/config_v1.2.json (v1.2), or <root>/{training,validation}/labels/*.png and "
          "<root>/config.json (v1.1)")


@register_dataset("mapillary")
class MapillaryDataset(FileSegDataset):
    """Mapillary Vistas from the official ``root``; ``version`` is ``"auto"``, ``"v1.2"`` or ``"v1.1"``."""

    def __init__(self, root=None, split: str = "training", *, version: str = "auto",
                 require_masks: bool | None = None):
        root = ROOT.check(root)
        split = ALIASES.get(split, split)
        existing = [s for s in SPLITS if (root / s / "images").is_dir()]
        if split not in existing:
            raise DataError(
                f"Mapillary root {root} has no split {split!r}: {root / split / 'images'} does not exist. The "
                f"splits there are: {', '.join(existing) or 'none'} (train, val and test are aliases of "
                f"training, validation and testing). Choose one of them (expected layout: {LAYOUT})."
            )
        if require_masks is None:
            require_masks = split != "testing"
        version = _resolve_version(root, split, version, require_masks)
        config_name, labels_rel = VERSIONS[version]
        classes, palette, self.label_map = _read_config(root / config_name)
        images_dir, labels_dir = root / split / "images", root / split / labels_rel
        images = list_images(images_dir, (".jpg", ".jpeg"))
        if not images:
            raise DataError(f"Mapillary image folder {images_dir} holds no .jpg files. Unpack the images there, "
                            "or pass another --root.")
        if require_masks and not labels_dir.is_dir():
            raise DataError(
                f"Mapillary {version} labels folder {labels_dir} does not exist. Unpack the {version} labels "
                f"there, choose another version with --dataset-opt version=..., or (for prediction only) "
                "pass --dataset-opt require_masks=false."
            )
        entries = []
        for image_path in images:
            mask_path = labels_dir / f"{image_path.stem}.png"
            if require_masks and not mask_path.is_file():
                raise DataError(
                    f"Mapillary image {image_path} has no label: expected {mask_path}. Add the label, remove "
                    "the image, or (for prediction only) pass --dataset-opt require_masks=false."
                )
            entries.append((image_path.stem, image_path, mask_path if require_masks else None))
        super().__init__(entries, split=split, classes=classes, root=root, palette=palette,
                         options={"version": version, "require_masks": require_masks})


ROOT = RootLayout(
    "Mapillary", "the mapillary dataset needs its folder: pass --root /path/to/mapillary-vistas, the folder that "
    f"contains training/ and validation/ (layout: {LAYOUT}).", LAYOUT,
    "Pass the folder that contains training/ and validation/ with --root.",
    find=lambda root: root if root.is_dir() and any((root / s / "images").is_dir() for s in SPLITS) else None,
    kind="Mapillary Vistas root",
    inside=lambda root: root.name in SPLITS or (root.parent / "training" / "images").is_dir())


def _resolve_version(root: Path, split: str, version: str, require_masks: bool) -> str:
    """The annotation version to read: the requested one, or for ``auto`` the first of v1.2, v1.1 present."""
    if version != "auto" and version not in VERSIONS:
        raise DataError(f"Mapillary version {version!r} is not supported; pass --dataset-opt version= one of: "
                        f"auto, {', '.join(VERSIONS)}.")
    candidates = list(VERSIONS) if version == "auto" else [version]
    for name in candidates:
        config_name, labels_rel = VERSIONS[name]
        if (root / config_name).is_file() and (not require_masks or (root / split / labels_rel).is_dir()):
            return name
    if version != "auto":
        config_name, labels_rel = VERSIONS[version]
        missing = root / config_name if not (root / config_name).is_file() else root / split / labels_rel
        raise DataError(f"Mapillary {version} needs {missing}, which does not exist. Unpack the {version} "
                        "annotations into the root, or pass --dataset-opt version=auto.")
    raise DataError(
        f"Mapillary root {root} has no annotations for split {split!r}: expected {root / 'config_v1.2.json'} "
        f"with {root / split / 'v1.2' / 'labels'}/ (v1.2), or {root / 'config.json'} with "
        f"{root / split / 'labels'}/ (v1.1). Unpack the annotations, or (for prediction only) pass "
        "--dataset-opt require_masks=false."
    )


def _read_config(path: Path) -> tuple[tuple[str, ...], np.ndarray, np.ndarray]:
    """``(classes, palette, label_map)`` from a Vistas config; the final 'Unlabeled' label maps to 255."""
    try:
        labels = json.loads(path.read_text(encoding="utf-8"))["labels"]
        names = [str(label["readable"]) for label in labels]
        colours = np.array([label["color"] for label in labels], dtype=np.int64).reshape(len(labels), 3)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise DataError(f"cannot read the Mapillary config {path} ({type(exc).__name__}: {exc}): expected JSON "
                        "with labels[i].readable and labels[i].color. Restore the file from the download.") from exc
    if colours.size and (colours.min() < 0 or colours.max() > 255):
        raise DataError(f"Mapillary config {path} has label colours outside 0..255. Restore the file from the "
                        "download.")
    label_map = np.arange(256, dtype=np.uint8)
    if names and names[-1] == UNLABELED:
        names, colours = names[:-1], colours[:-1]
        label_map[len(names)] = 255
    if not 0 < len(names) <= 255:
        raise DataError(f"Mapillary config {path} lists {len(names)} classes besides 'Unlabeled', but 1..255 "
                        "are needed (255 is the ignore value of a uint8 mask). Restore the file from the download.")
    return tuple(names), colours.astype(np.uint8), label_map
