"""PASCAL VOC 2012 segmentation in the official layout, optionally with SBD (``train_aug``).

Layout (``VOCtrainval_11-May-2012.tar`` unpacked)::

    root/VOCdevkit/VOC2012/JPEGImages/<id>.jpg
    root/VOCdevkit/VOC2012/SegmentationClass/<id>.png      palette PNG, index = class, 255 = border
    root/VOCdevkit/VOC2012/ImageSets/Segmentation/{train,val,trainval}.txt

``root`` may also be the ``VOC2012`` folder itself (or the ``VOCdevkit`` folder).
21 classes (background + 20); the 255 border is ignored. Masks are read as
palette indices, never as colours.

``sbd=/path/to/benchmark_RELEASE`` (the Semantic Boundaries Dataset,
``benchmark.tgz``) adds split ``train_aug``: VOC train, SBD train and SBD val
(``dataset/train.txt``, ``dataset/val.txt``) together, minus every VOC val id
(10,582 images with the real data), sorted by id. An id with a VOC
``SegmentationClass`` PNG uses it (and its VOC image); the others read SBD's
``dataset/cls/<id>.mat`` (field ``GTcls.Segmentation``) with
``dataset/img/<id>.jpg``. Reading ``.mat`` files needs scipy
(``pip install 'fusion-seg[voc]'``).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from fusion_seg.errors import DataError
from fusion_seg.data.io import default_palette
from fusion_seg.data.datasets.base import (FileSegDataset, RootLayout, import_optional, register_dataset,
                                           safe_relative)

CLASSES = ("background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
           "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train",
           "tvmonitor")
PALETTE = default_palette(len(CLASSES))  # VOC's own colour map (bit-interleaved class ids)
TRAIN_AUG = "train_aug"
LAYOUT = ("<root>/VOCdevkit/VOC2012/{JPEGImages,SegmentationClass,ImageSets/Segmentation/<split>.txt} "
          "(root = the folder that contains VOCdevkit), or JPEGImages/, SegmentationClass/ and ImageSets/ "
          "directly under <root> (root = VOC2012)")
SBD_HINT = "--dataset-opt sbd=/path/to/benchmark_RELEASE"


@register_dataset("voc")
class VOCDataset(FileSegDataset):
    """VOC 2012 from ``root``; split ``train``, ``val``, ``trainval`` (any ``ImageSets/Segmentation/*.txt``)
    or, with ``sbd``, ``train_aug``.

    ``require_masks`` defaults to True except for split ``test`` (no public labels).
    The palette is VOC's own colour map.
    """

    def __init__(self, root=None, split: str = "train", *, sbd=None, require_masks: bool | None = None):
        voc = ROOT.check(root)
        if require_masks is None:
            require_masks = split != "test"
        lists = voc / "ImageSets" / "Segmentation"
        existing = sorted(p.stem for p in lists.glob("*.txt"))
        if split == TRAIN_AUG:
            if sbd is None:
                raise DataError(f"split {TRAIN_AUG!r} is VOC train plus the SBD annotations: pass {SBD_HINT} "
                                "(the unpacked benchmark.tgz of the Semantic Boundaries Dataset).")
            entries = _train_aug(voc, _find_sbd(sbd))
        elif split not in existing:
            raise DataError(
                f"VOC root {voc} has no split {split!r}: {lists / f'{split}.txt'} does not exist. The splits "
                f"there are: {', '.join(existing + [f'{TRAIN_AUG} (with {SBD_HINT})'])}. Choose one of them."
            )
        else:
            entries = [(sid, _voc_image(voc, sid), voc / "SegmentationClass" / f"{sid}.png")
                       for sid in _read_ids(lists / f"{split}.txt")]
        checked = []
        for sid, image_path, mask_path in entries:
            if not image_path.is_file():
                raise DataError(f"VOC image {image_path} (id {sid!r} of split {split!r}) does not exist. Restore "
                                "it from the download, or remove the id from the split list.")
            if require_masks and not mask_path.is_file():
                hint = f" or (for {TRAIN_AUG}) check {SBD_HINT}" if split == TRAIN_AUG else ""
                raise DataError(
                    f"VOC image {image_path} has no mask: expected {mask_path}. Restore it from the download"
                    f"{hint}, or (for prediction only) pass --dataset-opt require_masks=false."
                )
            checked.append((sid, image_path, mask_path if require_masks else None))
        if split == TRAIN_AUG and require_masks and any(m.suffix == ".mat" for _, _, m in checked):
            import_optional("scipy.io", "voc", "reading SBD's .mat annotations (VOC train_aug)")
        super().__init__(checked, split=split, classes=CLASSES, root=voc, palette=PALETTE,
                         options={"sbd": None if sbd is None else str(sbd), "require_masks": require_masks})

    def _read_mask(self, path: Path) -> np.ndarray:
        return _read_sbd_mat(path) if path.suffix == ".mat" else super()._read_mask(path)


def _voc_folder(root: Path) -> Path | None:
    """The ``VOC2012`` folder: ``root/VOCdevkit/VOC2012``, ``root/VOC2012`` or ``root`` itself."""
    for candidate in (root / "VOCdevkit" / "VOC2012", root / "VOC2012", root):
        if (candidate / "JPEGImages").is_dir() and (candidate / "ImageSets" / "Segmentation").is_dir():
            return candidate
    return None


ROOT = RootLayout(
    "VOC", f"the voc dataset needs its folder: pass --root /path/to/data (expected layout: {LAYOUT}).", LAYOUT,
    "Unpack VOCtrainval_11-May-2012.tar and pass the folder that contains VOCdevkit (or the VOC2012 folder) "
    "with --root.", find=_voc_folder, kind="VOC 2012 root")


def _find_sbd(sbd) -> Path:
    """SBD's ``dataset`` folder, given ``benchmark_RELEASE`` (or its ``dataset`` folder)."""
    sbd = Path(sbd).expanduser()
    for candidate in (sbd / "dataset", sbd):
        if (candidate / "cls").is_dir():
            missing = [candidate / n for n in ("img", "train.txt", "val.txt") if not (candidate / n).exists()]
            if missing:
                raise DataError(f"SBD folder {candidate} lacks {', '.join(map(str, missing))}. Unpack benchmark.tgz "
                                f"completely and pass {SBD_HINT}.")
            return candidate
    problem = "does not exist" if not sbd.exists() else "is not an SBD root"
    raise DataError(f"SBD root {sbd} {problem}: expected {sbd / 'dataset' / 'cls'}/<id>.mat, dataset/img/<id>.jpg, "
                    f"dataset/train.txt and dataset/val.txt. Pass {SBD_HINT}.")


def _read_ids(list_file: Path) -> list[str]:
    """Image ids, one per line (blank lines skipped); entries may not leave the root."""
    if not list_file.is_file():
        raise DataError(f"split list {list_file} does not exist. Restore it from the download.")
    ids = []
    for line_no, line in enumerate(list_file.read_text(encoding="utf-8").splitlines(), start=1):
        entry = line.strip()
        if entry:
            ids.append(safe_relative(entry, list_file, line_no, line).as_posix())
    if not ids:
        raise DataError(f"split list {list_file} is empty; it should list one image id per line.")
    return ids


def _voc_image(voc: Path, sid: str) -> Path:
    return voc / "JPEGImages" / f"{sid}.jpg"


def _train_aug(voc: Path, sbd: Path) -> list[tuple[str, Path, Path]]:
    """``(id, image, mask)`` of (VOC train ∪ SBD train ∪ SBD val) − VOC val, preferring VOC's PNGs."""
    lists = voc / "ImageSets" / "Segmentation"
    for name in ("train", "val"):
        if not (lists / f"{name}.txt").is_file():
            raise DataError(f"{TRAIN_AUG} needs VOC's {lists / f'{name}.txt'}, which does not exist. Restore it "
                            "from VOCtrainval_11-May-2012.tar.")
    ids = set(_read_ids(lists / "train.txt")) | set(_read_ids(sbd / "train.txt")) | set(_read_ids(sbd / "val.txt"))
    ids -= set(_read_ids(lists / "val.txt"))
    entries = []
    for sid in sorted(ids):
        png = voc / "SegmentationClass" / f"{sid}.png"
        if png.is_file():
            entries.append((sid, _voc_image(voc, sid), png))
        else:
            image = sbd / "img" / f"{sid}.jpg"
            entries.append((sid, image if image.is_file() else _voc_image(voc, sid), sbd / "cls" / f"{sid}.mat"))
    return entries


def _read_sbd_mat(path: Path) -> np.ndarray:
    """SBD class map ``GTcls.Segmentation`` of a ``.mat`` file as uint8."""
    sio = import_optional("scipy.io", "voc", "reading SBD's .mat annotations (VOC train_aug)")
    try:
        segmentation = sio.loadmat(str(path), squeeze_me=True, struct_as_record=False)["GTcls"].Segmentation
        mask = np.asarray(segmentation)
    except Exception as exc:  # scipy raises ValueError, KeyError, MatReadError, ...
        raise DataError(f"cannot read SBD annotation {path} ({type(exc).__name__}: {exc}): expected a MATLAB file "
                        "with struct GTcls and its field Segmentation. Restore it from benchmark.tgz.") from exc
    valid = mask.ndim == 2 and np.issubdtype(mask.dtype, np.integer)
    if not valid or (mask.size and (mask.min() < 0 or mask.max() > 255)):
        raise DataError(f"SBD annotation {path}: GTcls.Segmentation is {mask.dtype} {mask.shape}, but a 2-D map of "
                        "class ids 0..255 is expected. Restore it from benchmark.tgz.")
    return mask.astype(np.uint8)
