"""Dataset registry: ``build_dataset("camvid", root, "val")`` and friends."""
from __future__ import annotations

import inspect

from fusion_seg.errors import UserError
from fusion_seg.options import keyword_errors
from fusion_seg.data.datasets.base import DATASETS, FileSegDataset, SegDataset, SegSample, register_dataset
# Importing the dataset modules registers them (@register_dataset); DATASETS lists them in this order.
from fusion_seg.data.datasets.synthetic import SyntheticDataset
from fusion_seg.data.datasets.camvid import CamVidDataset
from fusion_seg.data.datasets.folder import FolderDataset
from fusion_seg.data.datasets.cityscapes import CityscapesDataset
from fusion_seg.data.datasets.mapillary import MapillaryDataset
from fusion_seg.data.datasets.voc import VOCDataset
from fusion_seg.data.datasets.coco import COCODataset

__all__ = ["COCODataset", "CamVidDataset", "CityscapesDataset", "DATASETS", "FolderDataset",
           "MapillaryDataset", "SegDataset", "SegSample", "SyntheticDataset", "VOCDataset", "build_dataset",
           "register_dataset"]


SUBSET_OPTIONS = ("sequences", "ids_file")  # every file dataset's, besides limit


def build_dataset(name: str, root=None, split: str = "train", **options) -> SegDataset:
    """The dataset ``name`` at ``root`` (ignored by ``synthetic``), split ``split``.

    ``options`` are the dataset's own keyword arguments (e.g. ``num_images``
    for synthetic, ``require_masks`` for the file datasets, ``version`` for
    mapillary, ``sbd`` for voc, ``classes`` and ``min_pixels`` for coco), plus
    ``limit=N`` for every file dataset: only its first N samples (quick trials, benchmarks). Two more subset a
    file dataset before ``limit``: ``sequences`` (names, a list or ``"A,B"``: the images whose id up to its first
    ``_`` is one of them, CamVid's drives; see docs/datasets.md's cross-sequence protocol) and ``ids_file`` (a
    text file of image ids, one a line).
    """
    options = dict(options)
    subsets = {key: options.pop(key) for key in SUBSET_OPTIONS if key in options}
    limit = options.pop("limit", None)
    if name not in DATASETS:
        raise UserError(f"unknown dataset {name!r}; known datasets: {', '.join(sorted(DATASETS))}.")
    cls = DATASETS[name]
    accepted = [p for p in inspect.signature(cls).parameters if p not in ("root", "split")]
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise UserError(f"dataset {name!r} has no option {', '.join(unknown)}; "
                        f"its options are: {', '.join(accepted) or 'none'}.")
    problems = keyword_errors(cls, options, f"dataset {name!r}", skip=("root", "split"))  # value types
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int)):
        problems.append(f"limit = {limit!r} should be an integer.")
    sequences = subsets.get("sequences")
    if isinstance(sequences, str):
        sequences = [s.strip() for s in sequences.split(",") if s.strip()]
    if sequences is not None and (not isinstance(sequences, list) or not sequences
                                  or not all(isinstance(s, str) for s in sequences)):
        problems.append(f"sequences = {subsets['sequences']!r} should be names, e.g. sequences=0001TP,0016E5.")
    ids_file = subsets.get("ids_file")
    if ids_file is not None and not isinstance(ids_file, str):
        problems.append(f"ids_file = {ids_file!r} should be a path to a text file of image ids.")
    if problems:
        raise UserError(f"--dataset-opt: {' '.join(problems)}")
    dataset = cls(root=root, split=split, **options)
    if subsets and not isinstance(dataset, FileSegDataset):
        raise UserError(f"dataset {name!r} takes no {', '.join(subsets)} option (synthetic: use num_images).")
    if sequences is not None:
        dataset.keep_sequences(sequences)
    if ids_file is not None:
        dataset.keep_ids(ids_file)
    if limit is not None:
        if not isinstance(dataset, FileSegDataset):
            raise UserError(f"dataset {name!r} takes no limit option (synthetic: use num_images).")
        dataset.keep_first(int(limit))
    return dataset
