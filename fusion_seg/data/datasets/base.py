"""The dataset contract shared by every dataset.

A :class:`SegDataset` is a sequence of :class:`SegSample`. Every sample is
checked on read (mask values, image/mask size), so a broken label file fails
with a message naming it instead of silently training on garbage.
:class:`FileSegDataset` implements the contract for datasets stored as
image/mask file pairs.
"""
from __future__ import annotations

import abc
import importlib
import operator
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from fusion_seg.data.io import default_palette, image_size, read_image, read_mask
from fusion_seg.errors import DataError
from fusion_seg.registry import Registry


@dataclass(frozen=True, eq=False)
class SegSample:
    """One image with its mask.

    ``image`` is ``(H, W, 3)`` uint8 RGB; ``mask`` is ``(H, W)`` uint8 class
    ids with ``ignore_index`` for unlabelled pixels, or None when the split
    has no labels; ``id`` is unique and stable within the split. (``eq=False``:
    field-wise ``==`` on arrays is ambiguous, so samples compare by identity.)
    """

    image: np.ndarray
    mask: np.ndarray | None
    id: str


@dataclass(frozen=True)
class RootLayout:
    """What an official dataset's ``--root`` holds: the one root check every such dataset makes (:meth:`check`).

    ``find`` returns the dataset's folder under a candidate root (the root itself, or one inside it, as VOC's
    ``VOCdevkit/VOC2012``), or None; ``inside`` tells a folder inside the root passed by mistake, so the error
    can suggest its parent.
    """

    title: str                               # "Cityscapes": "Cityscapes root R does not exist: ..."
    missing: str                             # the message when no root is given at all
    layout: str                              # what a root must hold: "expected LAYOUT."
    fix: str                                 # the sentence that follows: "Pass the folder that contains ..."
    find: Callable[[Path], Path | None]
    kind: str = ""                           # "is not a KIND root" (default: the title), and why
    inside: Callable[[Path], bool] | None = None

    def check(self, root) -> Path:
        """The dataset's folder under ``root``; a DataError naming the root, its layout and the fix otherwise."""
        if root is None:
            raise DataError(self.missing)
        root = Path(root).expanduser()
        found = self.find(root)
        if found is not None:
            return found
        problem = "does not exist" if not root.exists() else f"is not a {self.kind or self.title + ' root'}"
        hint = (f" It looks like you passed a folder inside the root: try --root {root.parent}."
                if self.inside is not None and self.inside(root) else "")
        raise DataError(f"{self.title} root {root} {problem}: expected {self.layout}. {self.fix}{hint}")


class SegDataset(Sequence, abc.ABC):
    """Base class: a ``Sequence[SegSample]`` plus class names, palette and a JSON description.

    Subclasses set ``name``, call ``__init__`` and implement ``__len__``,
    ``ids``, ``image_size`` and ``_load``; ``__getitem__`` validates what
    ``_load`` returns.
    """

    name: str = ""
    ignore_index: int = 255

    def __init__(self, *, split: str, classes, root=None, palette=None, options: dict | None = None):
        self.split = split
        self.classes = tuple(str(c) for c in classes)
        self.root = None if root is None else Path(root)
        self.palette = (default_palette(len(self.classes)) if palette is None
                        else np.asarray(palette, dtype=np.uint8).reshape(len(self.classes), 3))
        self.options = dict(options or {})

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @abc.abstractmethod
    def __len__(self) -> int: ...

    @property
    @abc.abstractmethod
    def ids(self) -> list[str]:
        """Sample ids in index order."""

    @abc.abstractmethod
    def image_size(self, i: int) -> tuple[int, int]:
        """``(H, W)`` of sample ``i``, without decoding pixels where possible."""

    @abc.abstractmethod
    def _load(self, i: int) -> SegSample:
        """Read sample ``i`` (``0 <= i < len``) without validating it."""

    def input_files(self) -> list[Path]:
        """The files this split's samples are read from (images, masks, annotation files): what tells,
        listed with their sizes and modification times (:func:`fusion_seg.files.file_listing`), whether
        the data changed since a store or a result was made from it. None for generated data."""
        return [p for i in range(len(self)) for p in self.sample_files(i)]

    def sample_files(self, i: int) -> list[Path]:
        """The files sample ``i`` is read from (its image and mask files); none for generated data."""
        return []

    def _sources(self, i: int) -> tuple[str, str]:
        """Names of sample ``i``'s image and mask for error messages (file paths for file datasets)."""
        where = f"{self.name} {self.split} sample {i} ({self.ids[i]})"
        return f"image of {where}", f"mask of {where}"

    def __getitem__(self, i) -> SegSample:
        i = operator.index(i)
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"index {i} out of range for {self.name} {self.split} with {n} samples")
        i %= n
        sample = self._load(i)
        if sample.mask is not None:
            image_src, mask_src = self._sources(i)
            check_pair(sample.image, sample.mask, image_src, mask_src)
            check_mask_values(sample.mask, mask_src, self.num_classes, self.ignore_index)
        return sample

    def describe(self) -> dict:
        """A plain-JSON description (for run records and cache metadata)."""
        return {
            "name": self.name,
            "split": self.split,
            "root": None if self.root is None else str(self.root),
            "num_classes": self.num_classes,
            "classes": list(self.classes),
            "ignore_index": self.ignore_index,
            "len": len(self),
            "options": dict(self.options),
        }


#: Datasets by name, in registration order (the order of the imports in ``fusion_seg.data.datasets``).
def _named(name: str, cls: type) -> None:
    """A registered dataset's ``name`` is its registry name (the name in messages and descriptions)."""
    if cls.__dict__.get("name", name) != name:
        raise ValueError(f"{cls.__qualname__}.name is {cls.__dict__['name']!r}, registered as {name!r}")
    cls.name = name


DATASETS = Registry("dataset", SegDataset, on_register=_named)
register_dataset = DATASETS.register  # @register_dataset("camvid") on the class; sets its ``name``


def check_pair(image: np.ndarray, mask: np.ndarray, image_src, mask_src) -> None:
    """Image and mask must have the same height and width."""
    if image.shape[:2] != mask.shape[:2]:
        (ih, iw), (mh, mw) = image.shape[:2], mask.shape[:2]
        raise DataError(
            f"image {image_src} is {iw}x{ih} (WxH) but its mask {mask_src} is {mw}x{mh}; "
            "every mask must have its image's size. Re-export the mask at the image's resolution."
        )


def check_mask_values(mask: np.ndarray, mask_src, num_classes: int, ignore_index: int) -> None:
    """Every mask value must be a class id (``< num_classes``) or ``ignore_index``."""
    if mask.size == 0 or int(mask.max()) < num_classes:
        return
    bad = np.unique(mask[(mask >= num_classes) & (mask != ignore_index)])
    if bad.size:
        shown = ", ".join(str(int(v)) for v in bad[:20]) + (" ..." if bad.size > 20 else "")
        raise DataError(
            f"mask {mask_src} contains values {shown}, but valid values are class ids 0..{num_classes - 1} "
            f"and {ignore_index} (ignore). Fix the mask, or add the missing classes to the dataset's "
            "class list."
        )


class FileSegDataset(SegDataset):
    """A dataset of image files with optional mask files, listed at construction.

    Subclasses build ``entries`` — ``(id, image_path, mask_path or None)`` —
    and may set ``label_map``, a 256-entry uint8 lookup table applied to raw
    mask values before validation (e.g. CamVid's void class 11 -> 255).
    """

    label_map: np.ndarray | None = None

    def __init__(self, entries: list[tuple[str, Path, Path | None]], **kwargs):
        super().__init__(**kwargs)
        self._entries = list(entries)
        seen: dict[str, Path] = {}
        for sid, image_path, _ in self._entries:
            if sid in seen:
                raise DataError(
                    f"two images share the id {sid!r}: {seen[sid]} and {image_path}. "
                    "Rename or remove one of them."
                )
            seen[sid] = image_path

    def __len__(self) -> int:
        return len(self._entries)

    def keep_sequences(self, names: list[str]) -> None:
        """Keep only the samples of the sequences ``names`` (the ``sequences`` option): a sample's sequence is its
        id up to the first ``_`` (CamVid's drive, ``0016E5`` of ``0016E5_07959``; Cityscapes' city). A name
        that is no sequence of this split is refused, listing those there are; recorded in :meth:`describe`."""
        present = sorted({sequence_of(sid) for sid in self.ids})
        unknown = [n for n in names if n not in present]
        if unknown:
            raise DataError(f"--dataset-opt sequences: {', '.join(unknown)} is no sequence of "
                            f"{self.name}/{self.split}; its sequences (an image id up to its first '_'): {', '.join(present)}.")
        self._entries = [e for e in self._entries if sequence_of(e[0]) in names]
        self.options["sequences"] = sorted(names)

    def keep_ids(self, path: Path) -> None:
        """Keep only the samples whose ids the text file ``path`` lists, one a line (the ``ids_file`` option; blank
        lines and ``#`` comments skipped), in the dataset's order. An id that is not in this split is refused,
        naming its line; recorded in :meth:`describe` (the file's path; the image ids themselves go into every
        store's and run's record)."""
        try:
            lines = Path(path).expanduser().read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as exc:
            reason = getattr(exc, "strerror", None) or exc
            raise DataError(f"--dataset-opt ids_file={path}: cannot read it ({reason}); pass a text file of image ids, "
                            "one a line.") from None
        wanted: dict[str, int] = {}
        for line_no, line in enumerate(lines, start=1):
            entry = line.split("#", 1)[0].strip()
            if entry:
                wanted.setdefault(entry, line_no)
        if not wanted:
            raise DataError(f"--dataset-opt ids_file={path} lists no image id; write one id a line.")
        known = set(self.ids)
        missing = [(sid, n) for sid, n in wanted.items() if sid not in known]
        if missing:
            sid, line_no = missing[0]
            more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
            raise DataError(f"{path}, line {line_no}: {sid!r} is no image id of {self.name}/{self.split}{more}; ids are "
                            f"file names without the extension, e.g. {self.ids[0]!r}. Fix the line or the --split.")
        self._entries = [e for e in self._entries if e[0] in wanted]
        self.options["ids_file"] = str(path)

    def keep_first(self, n: int) -> None:
        """Keep only the first ``n`` samples (the ``limit`` option); recorded in :meth:`describe`."""
        if n < 1:
            raise DataError(f"limit must be at least 1, not {n}.")
        self._entries = self._entries[:n]
        self.options["limit"] = n

    @property
    def ids(self) -> list[str]:
        return [sid for sid, _, _ in self._entries]

    def image_size(self, i: int) -> tuple[int, int]:
        return image_size(self._entries[i][1])

    def _sources(self, i: int) -> tuple[str, str]:
        _, image_path, mask_path = self._entries[i]
        return str(image_path), str(mask_path)

    def sample_files(self, i: int) -> list[Path]:
        _, image_path, mask_path = self._entries[i]
        return [image_path] if mask_path is None else [image_path, mask_path]

    def _load(self, i: int) -> SegSample:
        sid, image_path, mask_path = self._entries[i]
        image = read_image(image_path)
        mask = None if mask_path is None else self._read_mask(mask_path)
        return SegSample(image=image, mask=mask, id=sid)

    def _read_mask(self, path: Path) -> np.ndarray:
        """A mask file as uint8 class ids, before validation: ``read_mask`` then ``label_map``.

        Datasets whose label files differ per sample (encodings, file formats) override this.
        """
        mask = read_mask(path)
        return mask if self.label_map is None else self.label_map[mask]


def sequence_of(sample_id: str) -> str:
    """The sequence of an image id: its part before the first ``_`` (the whole id when it has none)."""
    return sample_id.split("_", 1)[0]


def import_optional(module: str, extra: str, purpose: str):
    """Import an optional dependency, or raise a DataError saying which extra installs it."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise DataError(
            f"{purpose} needs the Python package {module.split('.')[0]!r}, which is not installed "
            f"({exc}). Install it with: pip install 'fusion-seg[{extra}]'"
        ) from exc


def safe_relative(entry: str, list_file: Path, line_no: int, line: str) -> Path:
    """A list-file entry as a path relative to the dataset root; refuses absolute paths and ``..`` escapes.

    The check is lexical (no symlink resolution), so a root whose folders are
    symlinks elsewhere still works. ``line`` is the whole line, for the message.
    """
    posix = entry.replace("\\", "/")
    parts: list[str] = []
    escaped = posix.startswith("/")
    for part in posix.split("/"):
        if part in ("", "."):
            continue
        if part == "..":
            if not parts:
                escaped = True
                break
            parts.pop()
        else:
            parts.append(part)
    if escaped or not parts:
        raise DataError(
            f"{list_file}, line {line_no} ({line.strip()!r}): {entry!r} points outside the dataset root. "
            "List files may only name files inside the root (relative paths without leading '..')."
        )
    return Path(*parts)
