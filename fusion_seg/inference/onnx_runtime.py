"""The onnxruntime backend: a model ``fusion-seg export`` wrote, run where the torch Segmenter runs.

:class:`OnnxSegmenter` has the three members that :func:`~fusion_seg.inference.segmenter.predict_logits` uses
of a :class:`~fusion_seg.inference.segmenter.Segmenter` (called on a normalised batch it returns the logits at
its size, ``identity``, ``device``), and :func:`load_onnx` returns it with a checkpoint-like dict rebuilt from
the file's metadata, so the resize, test-time augmentation, sliding window and class checks are the torch
backend's own code. The session uses as many threads as torch does, so that the two backends compare on equal
terms.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from fusion_seg.device import resolve_device
from fusion_seg.encoder.identity import EncoderIdentity
from fusion_seg.errors import UserError
from fusion_seg.inference import arguments
from fusion_seg.inference.onnx_format import (INPUT, METADATA_FORMAT, METADATA_KEY, OUTPUT, first_line, new_session,
                                              require_onnx)


class OnnxSegmenter:
    """An ``onnxruntime.InferenceSession`` of an exported model, called as a Segmenter is.

    Its inputs and outputs are CPU tensors (ONNX Runtime copies them to and from a GPU when it runs on one), so
    ``device`` is the CPU whatever provider runs the graph; the graph runs in fp32."""

    def __init__(self, session, identity: EncoderIdentity):
        self.session = session
        self.identity = identity
        self.device = torch.device("cpu")

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """float32 logits ``(N, C, H, W)`` of a normalised ``(N, 3, H, W)`` batch (any strides, any dtype)."""
        batch = images.detach().to("cpu", torch.float32).contiguous().numpy()
        (logits,) = self.session.run([OUTPUT], {INPUT: batch})
        return torch.from_numpy(logits)

    def eval(self) -> "OnnxSegmenter":
        return self  # always in inference mode; as nn.Module.eval, for callers that set it


def load_onnx(path: str | Path, *, device: str = "auto") -> tuple[OnnxSegmenter, dict]:
    """(:class:`OnnxSegmenter`, checkpoint-like dict) of a model ``fusion-seg export`` wrote.

    The dict has the checkpoint's ``classes``, ``data``, ``decoder`` (name, num_classes, config) and ``encoder``
    (identity) records, what inference and evaluate's class check read. ``device``: ``cuda`` runs the graph
    with ONNX Runtime's CUDA provider (refused when this onnxruntime has none), ``auto`` does so when both a GPU
    and the provider are there, ``cpu`` on the CPU."""
    path = arguments.path("checkpoint", path, "the .onnx file fusion-seg export wrote")
    device = arguments.text("device", device, "cpu")
    require_onnx("the onnxruntime backend", ("onnxruntime",))
    import onnxruntime as ort

    if not path.is_file():
        what = "is a folder" if path.is_dir() else "does not exist"
        raise UserError(f"--checkpoint {path} {what}; pass the .onnx file fusion-seg export wrote.")
    providers = _providers(resolve_device(device), device, ort.get_available_providers())
    try:
        session = new_session(str(path), providers)
    except Exception as exc:  # not ONNX, truncated, an op this onnxruntime lacks
        raise UserError(f"cannot read {path} as an ONNX model ({first_line(exc)}); pass a .onnx file written by "
                        "fusion-seg export, or export the checkpoint again.") from exc
    info = _metadata(path, session.get_modelmeta().custom_metadata_map)
    ckpt = {"classes": list(info["classes"]), "data": info["data"], "decoder": dict(info["decoder"]),
            "encoder": dict(info["encoder"])}
    return OnnxSegmenter(session, EncoderIdentity.from_dict(info["encoder"])), ckpt


def _providers(dev: torch.device, asked: str, available: list[str]) -> list:
    """ONNX Runtime's execution providers for ``dev``: CUDA's first on a GPU when this onnxruntime has it, the
    CPU's alone otherwise (refused when the GPU was asked for by name)."""
    if dev.type == "cuda" and "CUDAExecutionProvider" in available:
        return [("CUDAExecutionProvider", {"device_id": dev.index or 0}), "CPUExecutionProvider"]
    if dev.type == "cuda" and asked != "auto":
        raise UserError(f"--device {asked}: this onnxruntime has no CUDAExecutionProvider; install onnxruntime-gpu "
                        "in place of onnxruntime, or pass --device cpu.")
    return ["CPUExecutionProvider"]


def _metadata(path: Path, props: dict[str, str]) -> dict:
    """The ``fusion_seg`` metadata of ``path``, refused when absent, unreadable or of a newer format."""
    if METADATA_KEY not in props:
        raise UserError(f"{path} was not exported by fusion-seg export; it has no {METADATA_KEY!r} metadata. Export "
                        "the checkpoint with fusion-seg export --checkpoint best.pt --out model.onnx, or run the "
                        ".pt checkpoint with --backend torch.")
    try:
        info = json.loads(props[METADATA_KEY])
    except ValueError as exc:
        raise UserError(f"{path}: its {METADATA_KEY!r} metadata is not valid JSON ({exc}); export the checkpoint "
                        "again with fusion-seg export.") from exc
    version = info.get("format") if isinstance(info, dict) else None
    if version != METADATA_FORMAT:
        raise UserError(f"{path} has fusion-seg metadata format {version!r}, and this fusion-seg reads format "
                        f"{METADATA_FORMAT}; upgrade fusion-seg, or export the checkpoint again with this one.")
    missing = [key for key in ("classes", "data", "decoder", "encoder") if key not in info]
    if missing:
        raise UserError(f"{path}: its {METADATA_KEY!r} metadata lacks {', '.join(missing)}; export the checkpoint "
                        "again with fusion-seg export.")
    return info
