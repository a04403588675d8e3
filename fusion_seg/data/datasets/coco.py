"""COCO 2017 as semantic segmentation, from the official instance annotations.

Layout under ``root`` (``train2017.zip``, ``val2017.zip`` and
``annotations_trainval2017.zip`` unpacked side by side)::

    root/annotations/instances_{train,val}2017.json
    root/{train,val}2017/<12-digit id>.jpg

Splits ``train`` and ``val`` mean ``train2017`` and ``val2017``; any
``annotations/instances_<split>.json`` with its ``<split>/`` folder works
(e.g. ``train2014``). Semantic masks are made from the instance annotations
(polygons, RLE and uncompressed RLE, decoded with pycocotools:
``pip install 'fusion-seg[coco]'``) in one of two class sets, option ``classes``:

* ``voc`` (default): background + the 20 PASCAL VOC classes, through
  torchvision's ``CAT_LIST`` (index = VOC class id, value = COCO category id).
  Objects of the other 60 categories are background, as in torchvision.
* ``things``: background 0 + the 80 thing categories, ids 1..80 in the order of
  their sorted COCO category ids.

Conventions (where they differ from torchvision's ``references/segmentation``,
that is said):

* A pixel claimed by objects of two *different* classes is 255 (ignore);
  overlapping objects of the same class keep the class. (torchvision ignores
  any overlap of two instances, even of one class.)
* Crowd annotations (``iscrowd=1``) of the kept categories are 255 (ignore):
  they cover a class without outlining its objects. (torchvision drops crowd
  annotations, so their pixels count as background.)
* ``min_pixels`` drops images with fewer annotated pixels; it defaults to 1000
  for a train split (torchvision's value, which keeps images with more than
  1000) and 0 (keep every image) otherwise. The count is *approximated*
  without decoding any mask, from the annotations' ``area`` field: the sum of
  the areas of the non-crowd annotations of the kept categories (overlaps
  count twice). torchvision also sums ``area``, including crowd annotations.

Images are in the order of their COCO image ids; sample ids are the file stems.
The annotation JSON is parsed once at construction (train2017: about 450 MB,
tens of seconds and a few GB of memory).
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from fusion_seg.errors import DataError
from fusion_seg.data.io import default_palette, file_problem, image_size, read_image
from fusion_seg.data.datasets.base import RootLayout, SegDataset, SegSample, import_optional, register_dataset
from fusion_seg.data.datasets.voc import CLASSES as VOC_CLASSES
from fusion_seg.data.datasets.voc import PALETTE as VOC_PALETTE

# torchvision references/segmentation/coco_utils.py: index = VOC class id, value = COCO category id.
CAT_LIST = (0, 5, 2, 16, 9, 44, 6, 3, 17, 62, 21, 67, 18, 19, 4, 1, 64, 20, 63, 7, 72)
CLASS_SETS = ("voc", "things")
ALIASES = {"train": "train2017", "val": "val2017"}
TRAIN_MIN_PIXELS = 1000
LAYOUT = "<root>/annotations/instances_<split>2017.json with the images in <root>/<split>2017/"
PURPOSE = "the coco dataset (decoding COCO polygons and RLE)"


@register_dataset("coco")
class COCODataset(SegDataset):
    """COCO instances turned into semantic masks; ``classes`` is ``"voc"`` or ``"things"``.

    With ``require_masks=False`` no masks are made (every mask is None).
    """

    def __init__(self, root=None, split: str = "train", *, classes: str = "voc", min_pixels: int | None = None,
                 require_masks: bool = True):
        root = ROOT.check(root)
        if classes not in CLASS_SETS:
            raise DataError(f"coco classes {classes!r} is not a class set; pass --dataset-opt classes=voc "
                            "(background + 20 VOC classes) or classes=things (background + 80 categories).")
        if require_masks:  # fail now, not in a DataLoader worker
            import_optional("pycocotools.mask", "coco", PURPOSE)
        split = ALIASES.get(split, split)
        ann_file, self._image_dir = root / "annotations" / f"instances_{split}.json", root / split
        if not ann_file.is_file():
            existing = sorted(p.name[len("instances_"):-len(".json")]
                              for p in (root / "annotations").glob("instances_*.json"))
            raise DataError(
                f"COCO root {root} has no split {split!r}: {ann_file} does not exist. The splits there are: "
                f"{', '.join(existing) or 'none'} (train and val are aliases of train2017 and val2017). "
                f"Choose one of them (expected layout: {LAYOUT})."
            )
        if not self._image_dir.is_dir():
            raise DataError(f"COCO image folder {self._image_dir} does not exist, but {ann_file} does. Unpack "
                            f"{split}.zip into {root}, or pass another --root.")
        if min_pixels is None:
            min_pixels = TRAIN_MIN_PIXELS if split.startswith("train") else 0
        if isinstance(min_pixels, bool) or not isinstance(min_pixels, int) or min_pixels < 0:
            raise DataError(f"coco min_pixels must be a whole number >= 0, got {min_pixels!r}; pass e.g. "
                            "--dataset-opt min_pixels=1000.")
        self._ann_file = ann_file
        data = _load_json(ann_file)
        try:
            names, palette, cat_to_class = _class_set(classes, data["categories"], ann_file)
            self._images, self.dropped = self._index(data, cat_to_class, min_pixels)
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise DataError(f"COCO annotations {ann_file} are malformed ({type(exc).__name__}: {exc}): expected "
                            "the official instances JSON. Restore it from annotations_trainval2017.zip.") from exc
        self._ids = [Path(file_name).stem for file_name, _, _, _ in self._images]
        super().__init__(split=split, classes=names, root=root, palette=palette,
                         options={"classes": classes, "min_pixels": min_pixels, "require_masks": require_masks})
        self._require_masks = require_masks

    def _index(self, data: dict, cat_to_class: dict[int, int], min_pixels: int):
        """``[(file_name, h, w, [(class, iscrowd, segmentation, ann_id), ...]), ...]`` and the dropped count."""
        ann_file = self._ann_file
        per_image: dict[int, list] = {}
        for ann in data["annotations"]:
            cls = cat_to_class.get(ann.get("category_id"))
            if cls is not None:
                per_image.setdefault(ann.get("image_id"), []).append(ann)
        present = {entry.name: entry for entry in os.scandir(self._image_dir)}  # no stat per plain file
        images, dropped = [], 0
        for info in sorted(data["images"], key=lambda im: im["id"]):
            file_name = str(info.get("file_name", ""))
            if not file_name or Path(file_name).name != file_name or file_name in (".", ".."):
                raise DataError(f"{ann_file}: image id {info.get('id')} has file_name {file_name!r}, but a plain "
                                "file name inside the split folder is expected. Restore the annotation file.")
            anns = per_image.get(info["id"], [])
            if min_pixels > 0:
                area = sum(float(a.get("area", 0)) for a in anns if not a.get("iscrowd"))
                if area < min_pixels:
                    dropped += 1
                    continue
            if file_name not in present:
                raise DataError(f"COCO image {self._image_dir / file_name} (listed in {ann_file}) does not exist. "
                                f"Unpack {self._image_dir.name}.zip completely, or pass another --root.")
            if not present[file_name].is_file():
                path = self._image_dir / file_name
                raise DataError(f"cannot read COCO image {path} (listed in {ann_file}): {file_problem(path)}.")
            kept = [(cat_to_class[a["category_id"]], bool(a.get("iscrowd")), a.get("segmentation"), a.get("id"))
                    for a in anns]
            images.append((file_name, int(info["height"]), int(info["width"]), kept))
        return images, dropped

    def __len__(self) -> int:
        return len(self._images)

    @property
    def ids(self) -> list[str]:
        return list(self._ids)

    def image_size(self, i: int) -> tuple[int, int]:
        return image_size(self._image_dir / self._images[i][0])

    def input_files(self) -> list[Path]:
        return [self._ann_file, *super().input_files()]

    def sample_files(self, i: int) -> list[Path]:
        return [self._image_dir / self._images[i][0]]  # its mask is made from the annotation file

    def _sources(self, i: int) -> tuple[str, str]:
        file_name = self._images[i][0]
        return str(self._image_dir / file_name), f"annotations of {file_name} in {self._ann_file}"

    def _load(self, i: int) -> SegSample:
        file_name, _, _, _ = self._images[i]
        image = read_image(self._image_dir / file_name)
        mask = self.semantic_mask(i) if self._require_masks else None
        return SegSample(image=image, mask=mask, id=self._ids[i])

    def semantic_mask(self, i: int) -> np.ndarray:
        """Sample ``i``'s ``(H, W)`` uint8 mask (H, W from the JSON), built from its annotations."""
        file_name, h, w, anns = self._images[i]
        label = np.zeros((h, w), dtype=np.uint8)
        conflict = np.zeros((h, w), dtype=bool)
        crowd = np.zeros((h, w), dtype=bool)
        for cls, iscrowd, segmentation, ann_id in anns:
            covered = self._decode(segmentation, h, w, ann_id, file_name)
            if covered is None:
                continue
            if iscrowd:
                crowd |= covered
                continue
            conflict |= covered & (label != 0) & (label != cls)
            label[covered & (label == 0)] = cls
        label[conflict | crowd] = 255
        return label

    def _decode(self, segmentation, h: int, w: int, ann_id, file_name: str) -> np.ndarray | None:
        """One annotation (polygons, RLE or uncompressed RLE) as an ``(h, w)`` bool array; None if empty."""
        if not segmentation:
            return None
        mu = import_optional("pycocotools.mask", "coco", PURPOSE)  # not kept: the dataset must stay picklable
        try:
            if isinstance(segmentation, list):  # polygons
                rle = mu.merge(mu.frPyObjects(segmentation, h, w))
            elif isinstance(segmentation.get("counts"), list):  # uncompressed RLE (crowds)
                rle = mu.frPyObjects(segmentation, h, w)
            else:  # compressed RLE
                counts = segmentation["counts"]
                rle = {"size": segmentation["size"],
                       "counts": counts.encode("ascii") if isinstance(counts, str) else counts}
            covered = mu.decode(rle)
        except Exception as exc:  # pycocotools raises TypeError, ValueError, ...
            raise DataError(f"cannot decode annotation {ann_id} of {file_name} in {self._ann_file} "
                            f"({type(exc).__name__}: {exc}). Fix or remove the annotation.") from exc
        if covered.ndim == 3:
            covered = covered.any(axis=2)
        if covered.shape != (h, w):
            raise DataError(f"annotation {ann_id} of {file_name} in {self._ann_file} is {covered.shape[1]}x"
                            f"{covered.shape[0]} (WxH) but its image is {w}x{h} in the JSON. Fix the annotation.")
        return covered.astype(bool)

    def describe(self) -> dict:
        info = super().describe()
        info["annotation_file"] = str(self._ann_file)
        info["dropped_by_min_pixels"] = self.dropped
        return info


ROOT = RootLayout(
    "COCO", "the coco dataset needs its folder: pass --root /path/to/coco, the folder that contains annotations/ and "
    f"train2017/, val2017/ (layout: {LAYOUT}).", LAYOUT,
    "Unpack annotations_trainval2017.zip and the image zips into one folder and pass it with --root.",
    find=lambda root: root if (root / "annotations").is_dir() else None,
    kind="COCO root (it has no annotations/ folder)",
    inside=lambda root: (root.parent / "annotations").is_dir())


def _load_json(path: Path) -> dict:
    try:
        with open(path, encoding="utf-8") as fh:
            data = json.load(fh)
        if not all(isinstance(data.get(k), list) for k in ("images", "annotations", "categories")):
            raise ValueError("missing images, annotations or categories")
    except (OSError, ValueError, AttributeError) as exc:
        raise DataError(f"cannot read COCO annotations {path} ({type(exc).__name__}: {exc}): expected the "
                        "instances JSON with images, annotations and categories. Restore it from "
                        "annotations_trainval2017.zip.") from exc
    return data


def _class_set(classes: str, categories: list, ann_file: Path):
    """``(names, palette, {COCO category id: class id})`` of a class set."""
    by_id = {int(c["id"]): str(c.get("name", c["id"])) for c in categories}
    if classes == "voc":
        missing = [c for c in CAT_LIST[1:] if c not in by_id]
        if missing:
            raise DataError(f"{ann_file} lacks COCO categories {', '.join(map(str, missing))}, which classes=voc "
                            "maps to VOC classes. Use the official instances JSON, or classes=things.")
        return VOC_CLASSES, VOC_PALETTE, {cat: cls for cls, cat in enumerate(CAT_LIST) if cls > 0}
    ordered = sorted(by_id)
    if not ordered or len(ordered) > 254:
        raise DataError(f"{ann_file} lists {len(ordered)} categories; classes=things needs 1..254 "
                        "(background and ignore take two of a uint8 mask's values).")
    names = ("background",) + tuple(by_id[c] for c in ordered)
    return names, default_palette(len(names)), {cat: k for k, cat in enumerate(ordered, start=1)}
