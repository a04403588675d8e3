"""Writers of tiny fake datasets in the official download layouts (Cityscapes, Mapillary Vistas,
PASCAL VOC 2012 + SBD, COCO 2017), for loader and recipe tests.

Every writer takes the folder to write into, a ``splits`` mapping (split name ->
number of images, or for VOC/SBD also a list of ids) and ``size`` ``(H, W)``, writes
only what the official download has (no conversion step), and returns the path to
pass as ``--root`` (for SBD: the ``sbd=`` path). Pixels are seeded noise, labels
deterministic patterns that use many classes; nothing is random between runs.
"""
from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from PIL import Image

# ----- shared -----------------------------------------------------------------------------------


def write_image(path, size=(64, 128), seed=0) -> Path:
    """An ``(H, W)`` RGB noise image; the format follows the suffix (.jpg or .png)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    h, w = size
    pixels = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path, quality=90) if path.suffix == ".jpg" else Image.fromarray(pixels).save(path)
    return path


def write_index_png(path, mask: np.ndarray, palette: np.ndarray | None = None) -> Path:
    """A single-channel uint8 PNG; with ``palette`` a palette ('P') PNG, as VOC and Mapillary ship."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    img = Image.fromarray(np.asarray(mask, dtype=np.uint8))  # mode "L"
    if palette is not None:
        full = np.zeros((256, 3), dtype=np.uint8)
        full[: len(palette)] = np.asarray(palette, dtype=np.uint8)[:256]
        img.putpalette(full.tobytes())  # turns the 'L' image into 'P'
    img.save(path)
    return path


def _stripes(size, k: int, modulo: int) -> np.ndarray:
    """Blocks of 2 columns x 4 rows whose values cycle through ``0..modulo-1``, shifted by ``k``."""
    h, w = size
    return ((np.arange(w)[None, :] // 2 + np.arange(h)[:, None] // 4 + k) % modulo).astype(np.uint8)


# ----- Cityscapes -------------------------------------------------------------------------------

CITYSCAPES_TRAIN_IDS = {7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9, 23: 10, 24: 11,
                        25: 12, 26: 13, 27: 14, 28: 15, 31: 16, 32: 17, 33: 18}


def cityscapes_files(root, split: str, city: str, base: str) -> dict[str, Path]:
    """The paths of one Cityscapes frame: ``image``, ``label_ids``, ``train_ids``, ``instance_ids``."""
    root = Path(root)
    gt = root / "gtFine" / split / city / base
    return {
        "image": root / "leftImg8bit" / split / city / f"{base}_leftImg8bit.png",
        "label_ids": gt.with_name(f"{base}_gtFine_labelIds.png"),
        "train_ids": gt.with_name(f"{base}_gtFine_labelTrainIds.png"),
        "instance_ids": gt.with_name(f"{base}_gtFine_instanceIds.png"),
    }


def write_cityscapes(root, splits: Mapping[str, int] = {"train": 2, "val": 1}, size=(64, 128), *,
                     cities: Sequence[str] = ("aachen", "bremen"), train_ids: bool = False,
                     instance_ids: bool = True, labels: bool = True) -> Path:
    """``leftImg8bit/<split>/<city>/<city>_000000_0000NN_leftImg8bit.png`` plus gtFine labels.

    Frame ``n`` of a split goes to city ``cities[n % len(cities)]``. labelIds cycle through
    0..33; ``train_ids`` also writes ``*_labelTrainIds.png`` (the official mapping),
    ``instance_ids`` writes 16-bit ``*_instanceIds.png`` (cars as ``26000 + k``).
    ``labels=False`` writes images only.
    """
    root = Path(root)
    for split, count in splits.items():
        for n in range(count):
            city = cities[n % len(cities)]
            files = cityscapes_files(root, split, city, f"{city}_000000_{n:06d}")
            write_image(files["image"], size, seed=n)
            if not labels:
                continue
            label_ids = _stripes(size, n, 34)
            write_index_png(files["label_ids"], label_ids)
            if train_ids:
                table = np.full(256, 255, dtype=np.uint8)
                for label_id, train_id in CITYSCAPES_TRAIN_IDS.items():
                    table[label_id] = train_id
                write_index_png(files["train_ids"], table[label_ids])
            if instance_ids:
                inst = label_ids.astype(np.uint16)
                cars = label_ids == 26
                inst[cars] = 26000 + (np.nonzero(cars)[1] // 4 % 3)
                Image.fromarray(inst).save(files["instance_ids"])
    return root


# ----- Mapillary Vistas -------------------------------------------------------------------------

MAPILLARY_NAMES = ("Bird", "Ground Animal", "Curb", "Fence", "Guard Rail", "Barrier", "Wall", "Bike Lane")
MAPILLARY_NUM_LABELS = 66  # 65 classes + the final 'Unlabeled'


def mapillary_config(num_labels: int = MAPILLARY_NUM_LABELS) -> dict:
    """A Vistas-style config: ``labels[i]`` with ``name``, ``readable``, ``color``; the last is 'Unlabeled'."""
    labels = []
    for i in range(num_labels - 1):
        readable = MAPILLARY_NAMES[i] if i < len(MAPILLARY_NAMES) else f"Class {i}"
        labels.append({"name": f"fake--{readable.lower().replace(' ', '-')}", "readable": readable,
                       "color": [(37 * i) % 256, (91 * i) % 256, (53 * i + 20) % 256],
                       "instances": False, "evaluate": True})
    labels.append({"name": "void--unlabeled", "readable": "Unlabeled", "color": [0, 0, 0],
                   "instances": False, "evaluate": False})
    return {"labels": labels, "version": "fake"}


def write_mapillary(root, splits: Mapping[str, int] = {"training": 2, "validation": 1}, size=(64, 128), *,
                    version: str = "v1.2") -> Path:
    """``<split>/images/*.jpg`` with palette-PNG labels in ``<split>/v1.2/labels`` (v1.2) or
    ``<split>/labels`` (v1.1), and ``config_v1.2.json`` or ``config.json`` at the root.

    Labels cycle through all 66 label ids (65 = Unlabeled); v1.1 labels are shifted by 7
    against v1.2 so tests can tell which were read. ``testing`` gets images only.
    Call it twice with both versions for a root that has both.
    """
    root = Path(root)
    config = mapillary_config()
    config_name, labels_rel, shift = {"v1.2": ("config_v1.2.json", "v1.2/labels", 0),
                                      "v1.1": ("config.json", "labels", 7)}[version]
    root.mkdir(parents=True, exist_ok=True)
    (root / config_name).write_text(json.dumps(config), encoding="utf-8")
    palette = np.array([label["color"] for label in config["labels"]], dtype=np.uint8)
    for split, count in splits.items():
        for n in range(count):
            key = f"{split[:2]}{n:020d}"
            write_image(root / split / "images" / f"{key}.jpg", size, seed=n)
            if split != "testing":
                write_index_png(root / split / labels_rel / f"{key}.png",
                                _stripes(size, n + shift, MAPILLARY_NUM_LABELS), palette)
    return root


# ----- PASCAL VOC 2012 and SBD ------------------------------------------------------------------

def _ids(splits: Mapping, start: int = 1) -> dict[str, list[str]]:
    """Split -> ids; counts become consecutive ``2007_NNNNNN`` ids, disjoint across splits."""
    out, next_id = {}, start
    for split, value in splits.items():
        if isinstance(value, int):
            out[split] = [f"2007_{next_id + k:06d}" for k in range(value)]
            next_id += value
        else:
            out[split] = [str(v) for v in value]
    return out


def voc_mask(sid: str, size=(64, 128)) -> np.ndarray:
    """VOC-style mask of ``sid``: background, one object box of class ``1 + n % 20`` and a 255 border ring."""
    h, w = size
    n = int(sid.split("_")[-1])
    mask = np.zeros((h, w), dtype=np.uint8)
    mask[h // 4 - 2: 3 * h // 4 + 2, w // 4 - 2: 3 * w // 4 + 2] = 255
    mask[h // 4: 3 * h // 4, w // 4: 3 * w // 4] = 1 + n % 20
    return mask


def sbd_mask(sid: str, size=(64, 128)) -> np.ndarray:
    """SBD-style mask of ``sid`` (no border): left half class ``1 + (n + 5) % 20``, right half background."""
    h, w = size
    n = int(sid.split("_")[-1])
    mask = np.zeros((h, w), dtype=np.uint8)
    mask[:, : w // 2] = 1 + (n + 5) % 20
    return mask


def write_voc(root, splits: Mapping[str, int | Sequence[str]] = {"train": 2, "val": 1}, size=(64, 128), *,
              nested: bool = True, masks: bool = True) -> Path:
    """``VOCdevkit/VOC2012/{JPEGImages,SegmentationClass,ImageSets/Segmentation}`` under ``root``.

    ``splits`` values are counts or id lists; ``trainval.txt`` is written as train + val
    when both exist. Masks (:func:`voc_mask`) are palette PNGs with VOC's colour map.
    ``nested=False`` writes the VOC2012 contents directly into ``root``.
    """
    from fusion_seg.data.io import default_palette

    root = Path(root)
    voc = root / "VOCdevkit" / "VOC2012" if nested else root
    lists = _ids(splits)
    if "train" in lists and "val" in lists and "trainval" not in lists:
        lists["trainval"] = lists["train"] + lists["val"]
    (voc / "ImageSets" / "Segmentation").mkdir(parents=True, exist_ok=True)
    for split, ids in lists.items():
        (voc / "ImageSets" / "Segmentation" / f"{split}.txt").write_text("".join(f"{i}\n" for i in ids))
        for sid in ids:
            write_image(voc / "JPEGImages" / f"{sid}.jpg", size, seed=int(sid.split("_")[-1]))
            if masks:
                write_index_png(voc / "SegmentationClass" / f"{sid}.png", voc_mask(sid, size), default_palette(256))
    return root


def write_sbd(root, splits: Mapping[str, int | Sequence[str]] = {"train": 2, "val": 1}, size=(64, 128)) -> Path:
    """``benchmark_RELEASE/dataset/{cls/<id>.mat, img/<id>.jpg, train.txt, val.txt}``; returns benchmark_RELEASE.

    Each ``.mat`` holds struct ``GTcls`` with ``Segmentation`` (uint8 :func:`sbd_mask`),
    ``Boundaries`` and ``CategoriesPresent``, like the real files. Count-given ids
    start at ``2008_000001`` so they differ from :func:`write_voc`'s.
    """
    import scipy.io

    release = Path(root) / "benchmark_RELEASE"
    dataset = release / "dataset"
    (dataset / "cls").mkdir(parents=True, exist_ok=True)
    lists = {split: [i.replace("2007_", "2008_") for i in ids] if isinstance(splits[split], int) else ids
             for split, ids in _ids(splits).items()}
    for split, ids in lists.items():
        (dataset / f"{split}.txt").write_text("".join(f"{i}\n" for i in ids))
        for sid in ids:
            write_image(dataset / "img" / f"{sid}.jpg", size, seed=1000 + int(sid.split("_")[-1]))
            mask = sbd_mask(sid, size)
            present = np.unique(mask[mask > 0]).astype(np.uint8)
            boundaries = np.empty((20, 1), dtype=object)
            boundaries[:] = [[np.zeros((1, 1))] for _ in range(20)]
            scipy.io.savemat(dataset / "cls" / f"{sid}.mat", {"GTcls": {
                "Segmentation": mask, "Boundaries": boundaries, "CategoriesPresent": present}})
    return release


# ----- COCO 2017 --------------------------------------------------------------------------------

COCO_CATEGORIES = {
    1: "person", 2: "bicycle", 3: "car", 4: "motorcycle", 5: "airplane", 6: "bus", 7: "train", 8: "truck",
    9: "boat", 10: "traffic light", 11: "fire hydrant", 13: "stop sign", 14: "parking meter", 15: "bench",
    16: "bird", 17: "cat", 18: "dog", 19: "horse", 20: "sheep", 21: "cow", 22: "elephant", 23: "bear",
    24: "zebra", 25: "giraffe", 27: "backpack", 28: "umbrella", 31: "handbag", 32: "tie", 33: "suitcase",
    34: "frisbee", 35: "skis", 36: "snowboard", 37: "sports ball", 38: "kite", 39: "baseball bat",
    40: "baseball glove", 41: "skateboard", 42: "surfboard", 43: "tennis racket", 44: "bottle",
    46: "wine glass", 47: "cup", 48: "fork", 49: "knife", 50: "spoon", 51: "bowl", 52: "banana", 53: "apple",
    54: "sandwich", 55: "orange", 56: "broccoli", 57: "carrot", 58: "hot dog", 59: "pizza", 60: "donut",
    61: "cake", 62: "chair", 63: "couch", 64: "potted plant", 65: "bed", 67: "dining table", 70: "toilet",
    72: "tv", 73: "laptop", 74: "mouse", 75: "remote", 76: "keyboard", 77: "cell phone", 78: "microwave",
    79: "oven", 80: "toaster", 81: "sink", 82: "refrigerator", 84: "book", 85: "clock", 86: "vase",
    87: "scissors", 88: "teddy bear", 89: "hair drier", 90: "toothbrush",
}

# The objects of every fake COCO image: (name, category id, kind, iscrowd, (y0, y1, x0, x1)).
# Boxes are half-open pixel ranges; polygons rasterise to exactly these boxes.
COCO_OBJECTS = (
    ("person_a", 1, "polygon", 0, (8, 40, 8, 40)),
    ("person_b", 1, "polygon", 0, (30, 50, 0, 16)),      # overlaps person_a: same class, stays person
    ("car", 3, "rle", 0, (16, 48, 32, 72)),               # overlaps person_a: two classes -> 255
    ("crowd", 1, "uncompressed_rle", 1, (48, 60, 80, 120)),  # crowd -> 255
    ("stop_sign", 13, "polygon", 0, (4, 20, 90, 120)),    # not a VOC class: background in classes=voc
)


def coco_annotation(ann_id: int, image_id: int, obj, size=(64, 128)) -> dict:
    """One COCO annotation for an entry of :data:`COCO_OBJECTS` (area and bbox filled in)."""
    from pycocotools import mask as mask_utils

    _, category, kind, iscrowd, (y0, y1, x0, x1) = obj
    h, w = size
    box = np.zeros((h, w), dtype=np.uint8)
    box[y0:y1, x0:x1] = 1
    if kind == "polygon":
        segmentation = [[float(v) for v in (x0, y0, x1, y0, x1, y1, x0, y1)]]
    elif kind == "rle":
        rle = mask_utils.encode(np.asfortranarray(box))
        segmentation = {"size": [h, w], "counts": rle["counts"].decode("ascii")}
    else:  # uncompressed RLE: column-major run lengths, the first run counting zeros
        flat = box.flatten(order="F")
        edges = np.concatenate([[0], np.flatnonzero(np.diff(flat)) + 1, [flat.size]])
        runs = np.diff(edges).tolist()
        segmentation = {"size": [h, w], "counts": ([0] + runs) if flat[0] else runs}
    return {"id": ann_id, "image_id": image_id, "category_id": category, "iscrowd": iscrowd,
            "segmentation": segmentation, "area": float(box.sum()),
            "bbox": [float(x0), float(y0), float(x1 - x0), float(y1 - y0)]}


def write_coco(root, splits: Mapping[str, int] = {"train": 2, "val": 1}, size=(64, 128)) -> Path:
    """``annotations/instances_<split>2017.json`` and ``<split>2017/<12-digit id>.jpg``.

    Every image carries the objects of :data:`COCO_OBJECTS`; all 80 real categories are
    listed. Split names are ``train``/``val`` (written as ``train2017``/``val2017``).
    ``size`` must be at least 64x128.
    """
    h, w = size
    if h < 64 or w < 128:
        raise ValueError(f"write_coco needs a size of at least (64, 128), got {size}")
    root = Path(root)
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    image_id, ann_id = 0, 0
    categories = [{"id": cid, "name": name, "supercategory": "fake"} for cid, name in COCO_CATEGORIES.items()]
    for split, count in splits.items():
        folder = split if split[-4:].isdigit() else f"{split}2017"
        images, annotations = [], []
        for _ in range(count):
            image_id += 1
            file_name = f"{image_id:012d}.jpg"
            write_image(root / folder / file_name, size, seed=image_id)
            images.append({"id": image_id, "file_name": file_name, "height": h, "width": w})
            for obj in COCO_OBJECTS:
                ann_id += 1
                annotations.append(coco_annotation(ann_id, image_id, obj, size))
        (root / "annotations" / f"instances_{folder}.json").write_text(json.dumps(
            {"info": {"description": "fake"}, "images": images, "annotations": annotations,
             "categories": categories}))
    return root


def write_camvid(root, splits: Mapping[str, int] = {"train": 2, "val": 1}, size=(64, 128)) -> Path:
    """SegNet-layout CamVid: ``<split>/``, ``<split>annot/`` and ``<split>.txt`` with the ``/SegNet/CamVid/`` prefix.

    Labels use classes 0..10 and 11 (void).
    """
    root = Path(root)
    rng = np.random.default_rng(0)
    for split, count in splits.items():
        lines = []
        for i in range(count):
            name = f"{split}_{i:03d}.png"
            write_image(root / split / name, size, seed=i)
            write_index_png(root / f"{split}annot" / name, rng.integers(0, 12, size, dtype=np.uint8))
            lines.append(f"/SegNet/CamVid/{split}/{name} /SegNet/CamVid/{split}annot/{name}")
        (root / f"{split}.txt").write_text("\n".join(lines) + "\n")
    return root
