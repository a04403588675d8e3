"""fusion-seg: train segmentation decoders on a frozen backbone from a cache of its features.

The Python API (README, "Python API") is the library the command line calls. Importing
``fusion_seg`` is cheap: each name below loads its module on first use (``fusion-seg --help``
imports no torch).

- requests: ``DatasetRef``, ``EncoderSpec``, ``Augment``, ``Resize``, ``StoreFormat``, ``ExtractRun``,
  ``TrainConfig`` (a ``Schedule``, what a run learns, and its ``RunSettings``, how it works);
- stages: ``extract_features`` (``fusion-seg extract``), ``train`` over ``CachedData`` or ``OnlineData``
  (``fusion-seg train-decoder [--online]``; ``train_decoder`` and ``train_online`` are it with one or the
  other), ``evaluate``, ``predict`` (returning ``EvaluationResult``, ``PredictionResult``: frozen
  dataclasses that also read as mappings); ``run_recipe`` (``fusion-seg run``: a TOML recipe's stages);
- models: ``load_model`` (a checkpoint as a :class:`SegmentationModel`: image in, mask out; or with
  ``backend="onnxruntime"`` the model ``export_onnx`` (``fusion-seg export``) wrote),
  ``build_decoder`` (from ``{name: ShapeSpec(channels, stride)}``) and the registries ``DECODERS`` and
  ``DATASETS``; ``FeatureStore`` (a cache);
- errors: ``UserError``, the base of every error a caller's input or settings can cause (one line that
  names the file or option and the fix).

``extract_features`` is ``fusion_seg.extract.local.extract``: the name ``extract`` is the sub-package.
"""
from __future__ import annotations

import importlib

_API = {  # name -> (module, attribute)
    "DatasetRef": ("fusion_seg.requests", "DatasetRef"),
    "DATASETS": ("fusion_seg.data.datasets", "DATASETS"),
    "EncoderSpec": ("fusion_seg.requests", "EncoderSpec"),
    "Augment": ("fusion_seg.requests", "Augment"),
    "Resize": ("fusion_seg.requests", "Resize"),
    "StoreFormat": ("fusion_seg.requests", "StoreFormat"),
    "ExtractRun": ("fusion_seg.requests", "ExtractRun"),
    "extract_features": ("fusion_seg.extract.local", "extract"),
    "FeatureStore": ("fusion_seg.cache.store", "FeatureStore"),
    "TrainConfig": ("fusion_seg.training.config", "TrainConfig"),
    "Schedule": ("fusion_seg.training.config", "Schedule"),
    "RunSettings": ("fusion_seg.training.config", "RunSettings"),
    "train": ("fusion_seg.training.train", "train"),
    "CachedData": ("fusion_seg.training.train", "CachedData"),
    "OnlineData": ("fusion_seg.training.train", "OnlineData"),
    "train_decoder": ("fusion_seg.training.train", "train_decoder"),
    "train_online": ("fusion_seg.training.train", "train_online"),
    "evaluate": ("fusion_seg.evaluation.evaluate", "evaluate"),
    "EvaluationResult": ("fusion_seg.evaluation.evaluate", "EvaluationResult"),
    "predict": ("fusion_seg.inference.predict", "predict"),
    "PredictionResult": ("fusion_seg.inference.predict", "PredictionResult"),
    "load_model": ("fusion_seg.inference.segmenter", "load_model"),
    "export_onnx": ("fusion_seg.inference.export", "export_onnx"),
    "SegmentationModel": ("fusion_seg.inference.segmenter", "SegmentationModel"),
    "build_decoder": ("fusion_seg.decoders", "build_decoder"),
    "ShapeSpec": ("fusion_seg.shapes", "ShapeSpec"),
    "UserError": ("fusion_seg.errors", "UserError"),
    "DECODERS": ("fusion_seg.decoders", "DECODERS"),
    "run_recipe": ("fusion_seg.pipeline.recipes", "run_recipe"),
}
__all__ = sorted(_API)


def __getattr__(name: str):
    if name not in _API:
        raise AttributeError(f"module 'fusion_seg' has no attribute {name!r}")
    module, attribute = _API[name]
    value = getattr(importlib.import_module(module), attribute)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_API))
