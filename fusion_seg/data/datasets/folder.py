"""The user's own data in a plain folder layout.

::

    root/classes.txt            one class name per line (line k = class id k; blank lines ignored)
    root/images/<stem>.<ext>    png, jpg, jpeg, bmp, tif, tiff or webp
    root/masks/<stem>.png       single-channel class ids, 255 = ignore

Splits, first match wins: ``root/splits/<split>.txt`` (one stem per line,
relative to ``images/``); ``root/images/<split>/`` with masks in
``root/masks/<split>/``; split ``all`` = every image directly in
``root/images/``.
"""
from __future__ import annotations

from pathlib import Path

from fusion_seg.errors import DataError
from fusion_seg.data.datasets.base import FileSegDataset, register_dataset, safe_relative
from fusion_seg.data.io import IMAGE_EXTENSIONS, list_images

ALL = "all"


@register_dataset("folder")
class FolderDataset(FileSegDataset):
    """Images with same-stem PNG masks under ``root``.

    A mask is required for every image unless ``require_masks=False``, in
    which case no masks are read and every sample's mask is None (prediction).
    """

    def __init__(self, root=None, split: str = ALL, *, require_masks: bool = True):
        if root is None:
            raise DataError("the folder dataset needs its folder: pass --root /path/to/data "
                            "(with classes.txt, images/ and masks/ inside).")
        root = Path(root).expanduser()
        if not root.is_dir():
            raise DataError(f"dataset root {root} does not exist or is not a folder; pass the right --root.")
        classes = _read_classes(root / "classes.txt")
        images_dir = root / "images"
        if not images_dir.is_dir():
            raise DataError(f"dataset root {root} has no images/ folder; put the images in {images_dir}.")
        images, masks_dir = _split_images(root, split)
        entries = []
        for image_path, sid in images:
            mask_path = masks_dir / f"{sid}.png"  # ids are stems relative to the images folder
            if require_masks and not mask_path.is_file():
                raise DataError(
                    f"image {image_path} has no mask: expected {mask_path}. Add the mask, remove the image, "
                    "or (for prediction only) build the dataset with require_masks=False."
                )
            entries.append((sid, image_path, mask_path if require_masks else None))
        super().__init__(entries, split=split, classes=classes, root=root,
                         options={"require_masks": require_masks})


def _read_classes(path: Path) -> tuple[str, ...]:
    """Class names from ``classes.txt``: one per line, blank lines ignored, at most 255, no duplicates."""
    if not path.is_file():
        raise DataError(f"{path} not found: the folder dataset needs a classes.txt with one class name per "
                        "line (line k names class id k).")
    classes = tuple(line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip())
    if not classes:
        raise DataError(f"{path} lists no classes; write one class name per line.")
    if len(classes) > 255:
        raise DataError(f"{path} lists {len(classes)} classes, but at most 255 fit in a uint8 mask "
                        "(255 is the ignore value).")
    duplicates = sorted({c for c in classes if classes.count(c) > 1})
    if duplicates:
        raise DataError(f"{path} lists these classes more than once: {', '.join(duplicates)}. "
                        "Keep one of each.")
    return classes


def _available_splits(root: Path) -> list[str]:
    """Split names defined under ``root``, for error messages."""
    splits_dir, images_dir = root / "splits", root / "images"
    names = set()
    if splits_dir.is_dir():
        names |= {p.stem for p in splits_dir.glob("*.txt")}
    names |= {p.name for p in images_dir.iterdir() if p.is_dir() and not p.name.startswith(".")}
    if list_images(images_dir):
        names.add(ALL)
    return sorted(names)


def _split_images(root: Path, split: str) -> tuple[list[tuple[Path, str]], Path]:
    """``([(image_path, id), ...], masks_dir)`` of ``split``, in a deterministic order."""
    list_file = root / "splits" / f"{split}.txt"
    images_dir, masks_dir = root / "images", root / "masks"
    if list_file.is_file():
        return _read_split_list(list_file, images_dir), masks_dir
    if (images_dir / split).is_dir():
        images_dir, masks_dir = images_dir / split, masks_dir / split
    elif split != ALL:
        available = _available_splits(root)
        raise DataError(
            f"dataset root {root} has no split {split!r}; the splits there are: "
            f"{', '.join(available) or 'none'}. "
            f"Choose one of them, or define it with {list_file} or {images_dir / split}/."
        )
    images = list_images(images_dir)
    if not images:
        others = [s for s in _available_splits(root) if s != split]
        hint = f"choose one of the splits there ({', '.join(others)})" if others else "pass another --root"
        raise DataError(f"image folder {images_dir} is empty (no {'/'.join(IMAGE_EXTENSIONS)} files). "
                        f"Add images or {hint}.")
    return [(p, p.stem) for p in images], masks_dir


def _read_split_list(list_file: Path, images_dir: Path) -> list[tuple[Path, str]]:
    """One image stem per line, relative to ``images/``; each must match exactly one image file."""
    listings: dict[Path, dict[str, list[Path]]] = {}  # folder -> stem -> image files
    found = []
    for line_no, line in enumerate(list_file.read_text(encoding="utf-8").splitlines(), start=1):
        entry = line.strip()
        if not entry:
            continue
        rel = safe_relative(entry, list_file, line_no, line)
        if rel.suffix.lower() in IMAGE_EXTENSIONS:  # tolerate "name.png" for "name"
            rel = rel.with_suffix("")
        folder = images_dir / rel.parent
        if folder not in listings:
            listings[folder] = {}
            for p in list_images(folder) if folder.is_dir() else []:
                listings[folder].setdefault(p.stem, []).append(p)
        matches = listings[folder].get(rel.name, [])
        if len(matches) != 1:
            problem = ("matches no image" if not matches
                       else f"matches several images ({', '.join(map(str, matches))})")
            raise DataError(
                f"{list_file}, line {line_no}: {entry!r} {problem} in {folder}. Each line must name one "
                "image by its stem; fix the line or the image files."
            )
        found.append((matches[0], rel.as_posix()))
    if not found:
        raise DataError(f"split list {list_file} is empty; add one image stem per line.")
    return found
