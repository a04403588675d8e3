"""Cityscapes in the official download layout (19 train classes, everything else -> ignore).

Layout under ``root`` (``leftImg8bit_trainvaltest.zip`` and ``gtFine_trainvaltest.zip``
unpacked side by side)::

    root/leftImg8bit/{train,val,test}/<city>/<city>_<seq>_<frame>_leftImg8bit.png
    root/gtFine/{train,val,test}/<city>/<city>_<seq>_<frame>_gtFine_labelIds.png
                                          ..._gtFine_labelTrainIds.png   (optional)
                                          ..._gtFine_instanceIds.png     (optional)

Labels: a ``*_gtFine_labelTrainIds.png`` (made by cityscapesscripts'
``createTrainIdLabelImgs``) is used as is when present; otherwise
``*_gtFine_labelIds.png`` is mapped to the 19 train ids with the table of
cityscapesscripts ``helpers/labels.py`` (every other label id -> 255). Sample ids
are the file stems without ``_leftImg8bit`` (``aachen_000000_000019``); images are
sorted by city, then name. The official test labels are all "ignore", so the
``test`` split reads no masks unless ``require_masks=True`` is passed.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from fusion_seg.errors import DataError
from fusion_seg.data.io import _open_decoded, file_problem, list_images, read_mask
from fusion_seg.data.datasets.base import FileSegDataset, RootLayout, register_dataset

CLASSES = ("road", "sidewalk", "building", "wall", "fence", "pole", "traffic light", "traffic sign",
           "vegetation", "terrain", "sky", "person", "rider", "car", "truck", "bus", "train", "motorcycle",
           "bicycle")
# The train classes' colours from cityscapesscripts helpers/labels.py.
PALETTE = np.array([
    [128, 64, 128], [244, 35, 232], [70, 70, 70], [102, 102, 156], [190, 153, 153], [153, 153, 153],
    [250, 170, 30], [220, 220, 0], [107, 142, 35], [152, 251, 152], [70, 130, 180], [220, 20, 60],
    [255, 0, 0], [0, 0, 142], [0, 0, 70], [0, 60, 100], [0, 80, 100], [0, 0, 230], [119, 11, 32],
], dtype=np.uint8)
# labelId -> trainId for the 19 evaluated classes (cityscapesscripts helpers/labels.py).
LABEL_TO_TRAIN = {7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9, 23: 10, 24: 11,
                  25: 12, 26: 13, 27: 14, 28: 15, 31: 16, 32: 17, 33: 18}
SPLITS = ("train", "val", "test")
IMAGE_SUFFIX = "_leftImg8bit.png"
LABEL_IDS, TRAIN_IDS, INSTANCE_IDS = "_gtFine_labelIds.png", "_gtFine_labelTrainIds.png", "_gtFine_instanceIds.png"
LAYOUT = ("<root>/leftImg8bit/<split>/<city>/*_leftImg8bit.png with "
          "<root>/gtFine/<split>/<city>/*_gtFine_labelIds.png")


def label_id_table() -> np.ndarray:
    """256-entry uint8 lookup table labelId -> trainId (255 = ignore, also for -1 stored as 255)."""
    table = np.full(256, 255, dtype=np.uint8)
    for label_id, train_id in LABEL_TO_TRAIN.items():
        table[label_id] = train_id
    return table


@register_dataset("cityscapes")
class CityscapesDataset(FileSegDataset):
    """Cityscapes fine annotations from the official ``root`` (the folder holding ``leftImg8bit/`` and ``gtFine/``).

    ``require_masks`` defaults to True for train/val and False for test; with
    False no label files are read and masks are None.
    """

    label_map = label_id_table()

    def __init__(self, root=None, split: str = "train", *, require_masks: bool | None = None):
        root = ROOT.check(root)
        if require_masks is None:
            require_masks = split != "test"
        existing = sorted(p.name for p in (root / "leftImg8bit").iterdir()
                          if p.is_dir() and not p.name.startswith("."))
        image_dir = root / "leftImg8bit" / split
        if split not in existing:
            raise DataError(
                f"Cityscapes root {root} has no split {split!r}: {image_dir} does not exist. The splits "
                f"there are: {', '.join(existing) or 'none'}. Choose one of them (expected layout: {LAYOUT})."
            )
        images = _list_frames(image_dir)
        if not images:
            raise DataError(
                f"Cityscapes image folder {image_dir} holds no <city>/*{IMAGE_SUFFIX} files. Unpack "
                "leftImg8bit_trainvaltest.zip into the root, or pass another --root."
            )
        entries, self._label_prefix = [], []
        for image_path in images:
            base = image_path.name[: -len(IMAGE_SUFFIX)]
            prefix = root / "gtFine" / split / image_path.parent.name / base
            self._label_prefix.append(prefix)
            mask_path = None
            if require_masks:
                mask_path = _label_file(prefix)
                if mask_path is None:
                    raise DataError(
                        f"Cityscapes image {image_path} has no label: expected {prefix}{LABEL_IDS} (or "
                        f"{prefix.name}{TRAIN_IDS}). Unpack gtFine_trainvaltest.zip into {root}, or (for "
                        "prediction only) pass --dataset-opt require_masks=false."
                    )
            entries.append((base, image_path, mask_path))
        super().__init__(entries, split=split, classes=CLASSES, root=root, palette=PALETTE,
                         options={"require_masks": require_masks})

    def _read_mask(self, path: Path) -> np.ndarray:
        # labelTrainIds are already train ids; labelIds go through the table.
        return super()._read_mask(path) if path.name.endswith(LABEL_IDS) else read_mask(path)

    def instance_ids(self, i: int) -> np.ndarray | None:
        """Sample ``i``'s ``*_gtFine_instanceIds.png`` as ``(H, W)`` int32, or None when there is none.

        Values are labelIds for stuff and ``labelId * 1000 + k`` for the k-th instance of a thing
        class (the encoding cityscapesscripts' iIoU evaluation reads).
        """
        path = self._label_prefix[i].with_name(self._label_prefix[i].name + INSTANCE_IDS)
        if not path.is_file():
            return None
        img = _open_decoded(path, "Instance mask")
        if len(img.getbands()) != 1:
            raise DataError(f"instance mask {path} has mode {img.mode!r}, but a single-channel 16-bit PNG is "
                            "expected (cityscapesscripts' json2instanceImg). Re-create it from the polygons.")
        return np.asarray(img).astype(np.int32)


def _list_frames(image_dir: Path) -> list[Path]:
    """The ``<city>/*_leftImg8bit.png`` images of a split folder, sorted by city, then name. A city entry or an
    image that cannot be read (a dangling symbolic link) is a DataError naming it, not a city or frame less."""
    images = []
    for city in sorted(image_dir.iterdir(), key=lambda p: p.name):
        if city.name.startswith("."):
            continue
        if city.is_dir():
            images += list_images(city, (IMAGE_SUFFIX.lower(),))
        elif city.is_symlink():
            raise DataError(f"cannot read the Cityscapes city folder {city}: {file_problem(city)}.")
    return images


def _label_file(prefix: Path) -> Path | None:
    """The sample's label file: labelTrainIds if present, else labelIds, else None."""
    for suffix in (TRAIN_IDS, LABEL_IDS):
        path = prefix.with_name(prefix.name + suffix)
        if path.is_file():
            return path
    return None


ROOT = RootLayout(
    "Cityscapes", "the cityscapes dataset needs its folder: pass --root /path/to/cityscapes, the folder that "
    f"contains leftImg8bit/ and gtFine/ (layout: {LAYOUT}).", LAYOUT,
    "Pass the folder that contains leftImg8bit/ and gtFine/ with --root.",
    find=lambda root: root if (root / "leftImg8bit").is_dir() else None,
    kind="Cityscapes root (it has no leftImg8bit/ folder)",
    inside=lambda root: root.name in ("leftImg8bit", "gtFine") or (root.parent / "leftImg8bit").is_dir())
