"""The identity of what a recipe stage reads, so that a stage is skipped only when its inputs are unchanged.

A stage's stamp (recipes.py) records its settings and, from here, one identity per input:

- a feature store (``cache``, ``val_cache``): its content id (:meth:`FeatureStore.content_id`: spec,
  input-file record and every view's completion row), which re-extraction with more images changes;
- a checkpoint (``checkpoint``, ``init``): the sha256 of the file, which retraining changes;
- a weights or class-weights file: its listing (size and modification time);
- images (``input`` of predict): the listing of the image files, which adding or replacing one changes;
- a dataset split (evaluate, online training): the listing of the files its samples are read from,
  with its description (for generated data, its settings are its identity).

An input that cannot be read is identified by the error it gives: the stage then runs and reports it.
"""
from __future__ import annotations

import hashlib
from pathlib import Path

from fusion_seg.errors import UserError
from fusion_seg.files import listing_digest

STORE_KEYS = ("cache", "val_cache")
CHECKPOINT_KEYS = ("checkpoint", "init")
FILE_KEYS = ("weights", "class_weights")


def stage_inputs(stage: dict) -> dict[str, str]:
    """``{input name: identity}`` of every input ``stage`` reads (see the module docstring)."""
    out = {}
    for key in STORE_KEYS:
        if isinstance(stage.get(key), str):
            out[key] = _identity(store_identity, stage[key])
    for key in CHECKPOINT_KEYS:
        if isinstance(stage.get(key), str):
            out[key] = _identity(file_sha256, stage[key])
    for key in FILE_KEYS:
        value = stage.get(key)
        if isinstance(value, str) and Path(value).is_file():  # class_weights may name a method instead
            out[key] = _identity(lambda p: listing_digest([p]), value)
    if stage.get("kind") == "predict" and isinstance(stage.get("input"), str):
        out["input"] = _identity(images_identity, stage["input"])
    reads_dataset = stage.get("kind") == "evaluate" or (stage.get("kind") == "train" and stage.get("online") is True)
    if reads_dataset and isinstance(stage.get("dataset"), str):
        out["dataset"] = _identity(dataset_identity, stage)
    return out


def _identity(fn, arg) -> str:
    try:
        return fn(arg)
    except (UserError, OSError) as exc:
        return f"unreadable: {exc}"


def store_identity(path: str) -> str:
    from fusion_seg.cache.store import FeatureStore

    return FeatureStore.open(path).content_id()


def file_sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def images_identity(path: str) -> str:
    """The listing of predict's input images: the file, or the images of the folder."""
    from fusion_seg.inference.predict import list_images

    return listing_digest(list_images(path))


def dataset_identity(stage: dict) -> str:
    """The description and the listing of the files of the dataset split a stage reads."""
    import json

    from fusion_seg.data.datasets import build_dataset

    ds = build_dataset(stage["dataset"], root=stage.get("root"), split=stage.get("split", "train"),
                       **(stage.get("dataset_options") or {}))
    return hashlib.sha256((json.dumps(ds.describe(), sort_keys=True) + listing_digest(ds.input_files())).encode()
                          ).hexdigest()
