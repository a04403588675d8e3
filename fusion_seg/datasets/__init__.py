"""Dataset registry: ``build_dataset("camvid", root, "val")`` and friends."""
from __future__ import annotations

import inspect

from ..errors import UserError
from .base import SegDataset, SegSample
from .camvid import CamVidDataset
from .folder import FolderDataset
from .synthetic import SyntheticDataset

DATASETS: dict[str, type[SegDataset]] = {
    "synthetic": SyntheticDataset,
    "camvid": CamVidDataset,
    "folder": FolderDataset,
}

__all__ = ["DATASETS", "SegDataset", "SegSample", "build_dataset"]


def build_dataset(name: str, root=None, split: str = "train", **options) -> SegDataset:
    """The dataset ``name`` at ``root`` (ignored by ``synthetic``), split ``split``.

    ``options`` are the dataset's own keyword arguments (e.g. ``num_images``
    for synthetic, ``require_masks`` for camvid and folder).
    """
    if name not in DATASETS:
        raise UserError(f"unknown dataset {name!r}; known datasets: {', '.join(sorted(DATASETS))}.")
    cls = DATASETS[name]
    accepted = [p for p in inspect.signature(cls).parameters if p not in ("root", "split")]
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise UserError(f"dataset {name!r} has no option {', '.join(unknown)}; "
                        f"its options are: {', '.join(accepted) or 'none'}.")
    return cls(root=root, split=split, **options)
