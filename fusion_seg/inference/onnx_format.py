"""The exported model's contract, shared by ``export`` (which writes it) and the onnxruntime backend (which runs it):
the graph's input and output names, the metadata's key and format, the ``onnx`` extra's check, and an ONNX Runtime
session with torch's threads. See export.py's docstring for the graph and its metadata.
"""
from __future__ import annotations

import importlib

import torch

from fusion_seg.errors import UserError

ONNX_INSTALL = "pip install 'fusion-seg[onnx]'"
METADATA_KEY = "fusion_seg"  # the metadata_props key of the JSON that load_onnx reads
METADATA_FORMAT = 1
INPUT, OUTPUT = "image", "logits"
NORMALISATION = "(pixel/255 - mean)/std"


def first_line(exc: BaseException) -> str:
    """``Type: the first line of its message`` (at most 300 characters): a long error as one line."""
    message = str(exc).strip()
    return f"{type(exc).__name__}: {message.splitlines()[0][:300]}" if message else type(exc).__name__


def require_onnx(what: str, modules: tuple[str, ...] = ("onnx", "onnxscript", "onnxruntime")) -> None:
    """Refuse (a one-line :class:`UserError` with the install command) when one of ``modules`` of the ``onnx``
    extra cannot be imported; ``what`` is the command or function that needs them ("fusion-seg export")."""
    for name in modules:
        try:
            importlib.import_module(name)
        except ImportError as exc:
            raise UserError(f"{what} needs the onnx extra: {ONNX_INSTALL} ({name} cannot be imported: "
                            f"{first_line(exc)}).") from exc


def new_session(model: str | bytes, providers: list, *, log_severity: int = 3):
    """An ``onnxruntime.InferenceSession`` of ``model`` (a path, or the bytes of one) with torch's number of
    threads, logging ``log_severity`` and above (3: errors, not every session's provider-placement warnings;
    4: nothing but fatal errors, for a caller that reports the exceptions itself)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    options.log_severity_level = log_severity
    return ort.InferenceSession(model, options, providers=providers)
