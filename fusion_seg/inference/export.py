"""``export``: a checkpoint as one ONNX file, the whole model from the normalised image to the logits.

The graph is :class:`~fusion_seg.inference.segmenter.Segmenter`'s forward, in fp32: the frozen encoder (its
timm ``features_only`` model), the decoder, and the bilinear upsample of the logits to the input's size. Its
input ``image`` is a float32 ``(N, 3, H, W)`` batch normalised outside the graph, ``(pixel/255 - mean)/std``
with the encoder's mean and std (written in the metadata), so that predict prepares an image the same way for
both backends; its output ``logits`` is float32 ``(N, C, H, W)``. Batch, height and width are dynamic, and any
height and width work, not only multiples of 32: the graph computes what the torch model computes, the
strided convolutions' own rounding of odd sizes, the decoder's resizes to the sizes of its feature maps, and
the upsample to ``(H, W)``, so its logits at 67x101 are torch's at 67x101.

The model's metadata (``metadata_props``) hold a ``fusion_seg`` key, JSON of :func:`metadata` (classes,
encoder identity, decoder, the training data's record, the input's normalisation), from which
:func:`~fusion_seg.inference.onnx_runtime.load_onnx` rebuilds what inference needs, and plain ``classes``
(a JSON list) and ``encoder`` (the timm tag) keys for other readers.

Everything that would fail is refused before the export, each with a one-line :class:`UserError`: a
checkpoint that cannot be read, an ``out`` that is not a writable ``.onnx`` file, an encoder weights file
that is missing, the ``onnx`` extra not installed. An export that fails inside torch names the decoder and
torch's reason. So does a graph that does not compute torch's logits at sizes other than the traced one
(:func:`verify`): where a decoder's step depends on the size in a way the exporter cannot express, the
exporter narrows the dynamic sizes or fixes them at the traced example without an error (FRM's adaptive
pooling to the stride-32 size, ESeg's resize of a pooled level only where its size differs, the HRNet
baseline's padding to a multiple of 32), and the model would fail or give wrong logits at other sizes. Either
way no file is left: it is written only once the model is whole and checked, atomically
(:func:`fusion_seg.files.atomic_write`).
"""
from __future__ import annotations

import contextlib
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from fusion_seg.decoders.base import upsample_logits
from fusion_seg.errors import UserError
from fusion_seg.files import atomic_write, check_out_file, reporting_write_errors
from fusion_seg.inference import arguments
from fusion_seg.inference.onnx_format import (INPUT, METADATA_FORMAT, METADATA_KEY, NORMALISATION, OUTPUT,
                                              first_line, new_session, require_onnx)
from fusion_seg.inference.segmenter import Segmenter, load_segmenter
from fusion_seg.progress import Progress
from fusion_seg.results import ResultMapping

MIN_OPSET = 17  # the first with LayerNormalization as one op (ConvNeXt and ViT encoders)
EXAMPLE_SHAPE = (2, 3, 67, 101)  # what the exporter traces: a batch > 1 and sizes no stride divides, so none is fixed
# What verify runs both backends on: other batches, and sizes below and above the example's.
CHECK_SHAPES = ((1, 3, 29, 45), (3, 3, 131, 211))
# The largest difference verify accepts, relative to max(1, the largest |logit|): fp32 kernels that sum in another
# order differ by about 1e-6 of the logits (1e-5 at most, measured over the decoders and sizes up to 257x513),
# while a graph fixed at the traced size is off by a whole part of them (1e-2 and more).
CHECK_TOLERANCE = 1e-3


@dataclass(frozen=True, eq=False)
class ExportResult(ResultMapping):
    """What ``export_onnx`` wrote (also readable as a mapping: ``r["bytes"]``; see results.py)."""

    out: str
    opset: int
    seconds: float
    bytes: int
    encoder: str  # the timm tag
    decoder: str
    num_classes: int


class EndToEnd(nn.Module):
    """:meth:`Segmenter.forward` as the exporter can trace it, in fp32: the timm model itself, not
    :class:`~fusion_seg.encoder.build.FrozenEncoder`'s forward, whose ``torch.inference_mode`` and autocast
    the exporter does not trace through."""

    def __init__(self, segmenter: Segmenter):
        super().__init__()
        self.encoder = segmenter.encoder.model
        self.names = list(segmenter.encoder.names)
        self.decoder = segmenter.decoder

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        features = dict(zip(self.names, self.encoder(image)))
        return upsample_logits(self.decoder(features), image.shape[-2:])


def metadata(model: Segmenter, ckpt: dict) -> dict:
    """The ``fusion_seg`` metadata: what inference needs of the checkpoint (classes, the training data's record
    for the resize and the sliding window's crop, the decoder), and the input and output's contracts. The encoder
    is the exported one, which runs in fp32."""
    identity = model.identity
    return {
        "format": METADATA_FORMAT,
        "classes": list(ckpt["classes"]),
        "encoder": identity.to_dict(),
        "decoder": {k: ckpt["decoder"][k] for k in ("name", "num_classes", "config")},
        "data": ckpt["data"],
        "input": {"name": INPUT, "layout": "NCHW", "dtype": "float32", "normalisation": NORMALISATION,
                  "mean": list(identity.mean), "std": list(identity.std)},
        "output": {"name": OUTPUT, "layout": "NCHW", "dtype": "float32", "channels": ckpt["decoder"]["num_classes"],
                   "size": "the input's height and width"},
    }


def export_onnx(checkpoint: str | Path, out: str | Path, *, weights: str | Path | None = None, opset: int = 18,
                progress: bool = True) -> ExportResult:
    """Write the model of ``checkpoint`` (encoder, decoder and upsample) to the ONNX file ``out``.

    ``weights`` is the encoder's weights file, when the checkpoint was trained on one; ``opset`` the ONNX
    opset (17 or later). With ``progress``, a bar over its four steps (rebuild, export, check, write). See the
    module's docstring for the graph's input, output and metadata.
    """
    checkpoint = arguments.path("checkpoint", checkpoint, "the checkpoint's path (best.pt or last.pt of a run)")
    out = arguments.path("out", out, "the .onnx file to write")
    weights = arguments.path("weights", weights, "the encoder's weights file", optional=True)
    progress = arguments.flag("progress", progress)
    check_out(out, checkpoint)
    require_onnx("fusion-seg export")
    import onnx

    newest = onnx.defs.onnx_opset_version()
    if isinstance(opset, bool) or not isinstance(opset, int) or not MIN_OPSET <= opset <= newest:
        raise UserError(f"--opset {opset!r}: pass an ONNX opset from {MIN_OPSET} to {newest} (the installed onnx's "
                        "newest), e.g. 18.")
    t0 = time.perf_counter()
    with Progress(4, f"export {out.name}", "step", enabled=progress) as bar:
        model, ckpt = load_segmenter(checkpoint, weights=weights, device="cpu", precision="fp32")
        bar.update(1, done="model rebuilt")
        proto = trace(EndToEnd(model), f"the {ckpt['decoder']['name']} decoder on {model.identity.tag}", opset)
        bar.update(1, done="graph exported")
        info = metadata(model, ckpt)
        for key, value in ((METADATA_KEY, json.dumps(info)), ("classes", json.dumps(info["classes"])),
                           ("encoder", model.identity.tag)):
            proto.metadata_props.add(key=key, value=value)
        try:
            data = proto.SerializeToString()
        except ValueError as exc:  # protobuf's 2 GiB limit on one message
            raise UserError(f"the model of {checkpoint} is too large for a single ONNX file ({exc}); export a "
                            "smaller encoder, or run the checkpoint itself with the torch backend.") from exc
        onnx.checker.check_model(data)
        verify(model, data, ckpt["decoder"]["name"])
        bar.update(1, done="graph checked")
        with reporting_write_errors(out, "the ONNX model"):
            atomic_write(out, lambda fh: fh.write(data))
        bar.update(1, done="file written")
    return ExportResult(out=str(out), opset=opset, seconds=time.perf_counter() - t0, bytes=len(data),
                        encoder=model.identity.tag, decoder=ckpt["decoder"]["name"],
                        num_classes=int(ckpt["decoder"]["num_classes"]))


def check_out(out: Path, checkpoint: Path) -> None:
    """Refuse an ``out`` that is not a ``.onnx`` file name, is a folder, lies under a file or cannot be written."""
    if out.is_dir():
        raise UserError(f"--out {out} is a folder; pass the .onnx file to write, e.g. "
                        f"{out / (checkpoint.stem + '.onnx')}.")
    if out.suffix.lower() != ".onnx":
        raise UserError(f"--out {out}: an ONNX model's file name ends in .onnx; pass e.g. "
                        f"{out.with_name(out.stem + '.onnx')}.")
    check_out_file(out, "the ONNX model")


def trace(module: nn.Module, what: str, opset: int, outputs: tuple[str, ...] = (OUTPUT,)):
    """The ``onnx.ModelProto`` of ``module`` (an image batch in; torch.onnx's dynamo exporter, quiet), with a
    dynamic batch, height and width; a failure inside torch (an op without an ONNX form, a shape that depends on
    the data) is a :class:`UserError` naming ``what`` was exported ("the fpn decoder on resnet50") and torch's
    reason. Also the bench's export of the encoder alone."""
    from torch.export import Dim

    example = torch.randn(*EXAMPLE_SHAPE)
    try:
        with _quiet_logger("onnxscript"):  # its optimizer's notes ("Skipping constant folding ...")
            program = torch.onnx.export(
                module.eval(), (example,), None, dynamo=True, opset_version=opset, input_names=[INPUT],
                output_names=list(outputs), external_data=False, verbose=False,
                dynamic_shapes={"image": {0: Dim("batch"), 2: Dim("height"), 3: Dim("width")}})
    except Exception as exc:
        raise UserError(f"cannot export {what} to ONNX opset {opset} "
                        f"({first_line(exc)}); nothing was written. Run the checkpoint with the torch backend "
                        "instead, or try another --opset.") from exc
    return program.model_proto


def verify(model: Segmenter, data: bytes, decoder: str) -> None:
    """Refuse the exported graph (``data``) unless ONNX Runtime's logits are torch's at :data:`CHECK_SHAPES`,
    within :data:`CHECK_TOLERANCE`: a graph the exporter fixed at the traced size fails or differs there."""
    session = new_session(data, ["CPUExecutionProvider"], log_severity=4)  # its errors are reported below
    graph = f"the ONNX graph of the {decoder} decoder on {model.identity.tag}"
    fix = ("the exporter fixed a step of the decoder at the traced size; nothing was written. Run the checkpoint "
           "with the torch backend instead.")
    generator = torch.Generator().manual_seed(0)
    for shape in CHECK_SHAPES:
        images = torch.randn(*shape, generator=generator)
        batch = f"a batch of {shape[0]} at {shape[3]}x{shape[2]} (WxH)"
        with torch.inference_mode():
            expected = model(images)
        try:
            (logits,) = session.run([OUTPUT], {INPUT: images.numpy()})
        except Exception as exc:
            raise UserError(f"{graph} fails on {batch} ({first_line(exc)}): {fix}") from exc
        if logits.shape != expected.shape:
            raise UserError(f"{graph} gives logits of shape {logits.shape} on {batch}, not {tuple(expected.shape)}: "
                            f"{fix}")
        diff, largest = (torch.from_numpy(logits) - expected).abs().max().item(), expected.abs().max().item()
        if not diff <= CHECK_TOLERANCE * max(1.0, largest):
            raise UserError(f"{graph} gives logits up to {diff:.3g} away from torch's (whose largest is "
                            f"{largest:.3g}) on {batch}: {fix}")


@contextlib.contextmanager
def _quiet_logger(name: str):
    """The logger ``name`` shows errors only inside the ``with`` block."""
    logger = logging.getLogger(name)
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)
