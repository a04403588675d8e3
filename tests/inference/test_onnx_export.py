"""``export_onnx`` (fusion_seg/inference/export.py) and the onnxruntime backend (onnx_runtime.py): the exported
graph computes the torch Segmenter's logits at any batch and size, plugs into ``predict_logits`` (TTA, sliding
window) with the same masks, carries the metadata inference needs, and every refusal is one line, before any
work, leaving no file.

One tiny reverse-hrnet checkpoint is exported once for the module (about 6 s); fpn and frm are trained on its
feature store (well under a second each) and exported in their own tests.
"""
from __future__ import annotations

import contextlib
import io
import json
import sys

import numpy as np
import pytest
import torch

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

from fusion_seg.checkpoint import load_checkpoint, save_checkpoint  # noqa: E402
from fusion_seg.errors import CheckpointError, UserError  # noqa: E402
from fusion_seg.inference.export import ExportResult, export_onnx  # noqa: E402
from fusion_seg.inference.onnx_runtime import OnnxSegmenter, load_onnx  # noqa: E402
from fusion_seg.inference.segmenter import load_segmenter, predict_logits  # noqa: E402
from fusion_seg.training.train import train_decoder  # noqa: E402
from pipeline_helpers import SYNTH, tiny_checkpoint, tiny_config  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py


def assert_same_logits(ours: torch.Tensor, theirs: torch.Tensor) -> None:
    """ONNX Runtime's logits are torch's up to fp32 rounding.

    Both run the same fp32 graph with kernels that sum in other orders (oneDNN's convolutions against MLAS's,
    other resize loops), which moves a logit by about 1e-6 of the logits' scale (measured: 1e-7 to 5e-6 for
    these decoders at sizes up to 257x513); 1e-4 of max(1, max |logit|) leaves a factor of 20 and more, while a
    wrong graph is off by a whole part of the logits. The argmax may flip only where two classes tie to within
    that rounding: at most 0.1% of the pixels.
    """
    assert ours.shape == theirs.shape and ours.dtype == torch.float32
    scale = max(1.0, theirs.abs().max().item())
    assert (ours - theirs).abs().max().item() <= 1e-4 * scale
    assert (ours.argmax(1) == theirs.argmax(1)).float().mean().item() >= 0.999


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return tiny_checkpoint(tmp_path_factory.mktemp("onnx_ckpt"))


@pytest.fixture(scope="module")
def exported(checkpoint, tmp_path_factory):
    """(ExportResult, the .onnx path, what the export printed on stdout and stderr)."""
    out = tmp_path_factory.mktemp("onnx") / "model.onnx"
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        result = export_onnx(checkpoint, out, progress=False)
    return result, out, stdout.getvalue() + stderr.getvalue()


@pytest.fixture(scope="module")
def backends(checkpoint, exported):
    """((torch Segmenter, its checkpoint), (OnnxSegmenter, its checkpoint-like dict)), on the CPU."""
    return load_segmenter(checkpoint, device="cpu"), load_onnx(exported[1], device="cpu")


def torch_logits(model, x: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return model(x)


def trained(checkpoint, decoder: str):
    """best.pt of a one-epoch ``decoder`` trained on the tiny checkpoint's feature store."""
    run = checkpoint.parent.parent / decoder
    train_decoder(str(checkpoint.parent.parent / "s.zarr"), run, tiny_config(epochs=1, decoder=decoder,
                                                                             decoder_config={}), progress=False)
    return run / "best.pt"


# --------------------------------------------------------------------------- the file and its metadata
def test_export_writes_one_quiet_file_with_the_metadata(checkpoint, exported):
    result, out, printed = exported
    assert printed == ""  # the exporter's progress lines and its optimizer's notes are silenced
    assert isinstance(result, ExportResult) and result["out"] == str(out) and result.opset == 18
    assert result.bytes == out.stat().st_size > 10_000_000  # resnet18's weights are inside: no external data
    assert [p.name for p in out.parent.iterdir()] == ["model.onnx"]  # no weights file beside it, no temp file
    assert (result.encoder, result.decoder, result.num_classes) == ("resnet18", "reverse-hrnet", 4)

    ckpt = load_checkpoint(checkpoint)
    model = onnx.load(str(out))
    assert max(op.version for op in model.opset_import if op.domain in ("", "ai.onnx")) >= 17
    props = {p.key: p.value for p in model.metadata_props}
    info = json.loads(props["fusion_seg"])
    assert info["format"] == 1
    assert info["classes"] == ckpt["classes"] == json.loads(props["classes"])
    assert info["encoder"] == ckpt["encoder"] and props["encoder"] == "resnet18"
    assert info["decoder"] == {k: ckpt["decoder"][k] for k in ("name", "num_classes", "config")}
    assert info["data"] == json.loads(json.dumps(ckpt["data"]))
    assert info["input"] == {"name": "image", "layout": "NCHW", "dtype": "float32",
                             "normalisation": "(pixel/255 - mean)/std", "mean": ckpt["encoder"]["mean"],
                             "std": ckpt["encoder"]["std"]}
    assert info["output"]["name"] == "logits" and info["output"]["channels"] == 4

    # Batch, height and width are symbolic; the normalisation is not in the graph: the image goes to the stem's
    # convolution as it is (and to Shape, for the size of the logits).
    dims = [[d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]
            for v in (model.graph.input[0], model.graph.output[0])]
    assert dims == [["batch", 3, "height", "width"], ["batch", 4, "height", "width"]]
    assert [v.name for v in model.graph.input] == ["image"] and [v.name for v in model.graph.output] == ["logits"]
    assert {n.op_type for n in model.graph.node if "image" in n.input} == {"Conv", "Shape"}


def test_load_onnx_rebuilds_what_inference_needs(checkpoint, backends):
    (segmenter, ckpt), (onnx_model, meta) = backends
    assert isinstance(onnx_model, OnnxSegmenter) and onnx_model.eval() is onnx_model
    assert onnx_model.identity == segmenter.identity and onnx_model.device == torch.device("cpu")
    assert meta["classes"] == ckpt["classes"] and meta["encoder"] == ckpt["encoder"]
    assert meta["decoder"]["num_classes"] == 4 and meta["data"] == json.loads(json.dumps(ckpt["data"]))
    # The session runs on torch's threads, so that the two backends compare on equal terms.
    assert onnx_model.session.get_session_options().intra_op_num_threads == torch.get_num_threads() == 1


# --------------------------------------------------------------------------- parity with torch
@pytest.mark.parametrize("shape", [(2, 3, 64, 96), (2, 3, 80, 80), (2, 3, 67, 101), (1, 3, 5, 7)])
def test_onnx_logits_are_torch_logits_at_any_batch_and_size(backends, shape):
    (segmenter, _), (onnx_model, _) = backends
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(sum(shape)))
    logits = onnx_model(x)
    assert logits.shape == (shape[0], 4, *shape[2:])
    assert_same_logits(logits, torch_logits(segmenter, x))


def test_a_non_contiguous_batch_is_read_as_its_values(backends):
    (segmenter, _), (onnx_model, _) = backends
    x = torch.randn(2, 3, 80, 130)[..., ::2]  # a strided view, as the sliding window's windows are
    assert not x.is_contiguous()
    assert_same_logits(onnx_model(x), torch_logits(segmenter, x.contiguous()))


@pytest.mark.parametrize("options", [{}, {"flip": True, "scales": (0.75, 1.0)}, {"sliding_window": True}],
                         ids=["plain", "tta", "sliding-window"])
def test_predict_logits_gives_the_same_masks_with_either_backend(backends, options):
    (segmenter, ckpt), (onnx_model, meta) = backends
    image = np.random.default_rng(1).integers(0, 256, (*SYNTH["size"], 3), dtype=np.uint8)  # 64x96 > 64x64 crop
    theirs = predict_logits(segmenter, image, ckpt, **options)
    ours = predict_logits(onnx_model, image, meta, **options)
    assert_same_logits(ours, theirs)


def test_another_decoder_exports_and_matches(checkpoint, tmp_path):
    best = trained(checkpoint, "fpn")
    result = export_onnx(best, tmp_path / "fpn.onnx", progress=False)
    assert result.decoder == "fpn"
    (segmenter, _), (onnx_model, meta) = load_segmenter(best, device="cpu"), load_onnx(tmp_path / "fpn.onnx")
    assert meta["decoder"]["name"] == "fpn"
    for shape in ((2, 3, 64, 96), (1, 3, 67, 101)):
        x = torch.randn(*shape)
        assert_same_logits(onnx_model(x), torch_logits(segmenter, x))


def test_a_graph_fixed_at_the_traced_size_is_refused(checkpoint, tmp_path):
    """FRM pools to the stride-32 size with adaptive pooling, which the exporter writes for the traced size only:
    the graph fails at other sizes. The export's check refuses it instead of writing a model that breaks later."""
    with pytest.raises(UserError, match="the ONNX graph of the frm decoder on resnet18") as err:
        export_onnx(trained(checkpoint, "frm"), tmp_path / "frm.onnx", progress=False)
    assert "torch backend" in str(err.value) and "\n" not in str(err.value)
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------- refusals
def refused(call, *fragments, error=UserError) -> str:
    with pytest.raises(error) as err:
        call()
    message = str(err.value)
    assert "\n" not in message, message
    for fragment in fragments:
        assert fragment in message, message
    return message


def test_refuses_an_out_that_cannot_be_the_onnx_file(checkpoint, tmp_path):
    refused(lambda: export_onnx(checkpoint, tmp_path / "model.pt"), "--out", "ends in .onnx", "model.onnx")
    (tmp_path / "folder.onnx").mkdir()
    refused(lambda: export_onnx(checkpoint, tmp_path / "folder.onnx"), "is a folder", "best.onnx")
    (tmp_path / "file").write_text("x")
    refused(lambda: export_onnx(checkpoint, tmp_path / "file" / "model.onnx"), "which is a file")
    refused(lambda: export_onnx(checkpoint, tmp_path / "model.onnx", opset=16), "--opset 16", "from 17")
    refused(lambda: export_onnx(tmp_path / "missing.pt", tmp_path / "model.onnx"), "checkpoint not found",
            error=CheckpointError)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file", "folder.onnx"]


def test_refuses_a_missing_encoder_weights_file(checkpoint, tmp_path):
    """A checkpoint whose encoder came from a weights file needs it again (--weights), as predict does."""
    ckpt = load_checkpoint(checkpoint)
    ckpt["encoder"] = {**ckpt["encoder"], "weights": "file:r18.pth", "init": {}}
    save_checkpoint(tmp_path / "from_file.pt", ckpt)
    out = tmp_path / "model.onnx"
    refused(lambda: export_onnx(tmp_path / "from_file.pt", out, progress=False), "'r18.pth'", "--weights FILE")
    refused(lambda: export_onnx(tmp_path / "from_file.pt", out, weights=tmp_path / "r18.pth", progress=False),
            "weights file not found", "r18.pth")
    assert not out.exists()


def test_a_failed_export_names_the_decoder_and_leaves_no_file(checkpoint, tmp_path, monkeypatch):
    def unsupported(*args, **kwargs):
        raise RuntimeError("Unsupported operator aten::frobnicate\nwith a long trace below")

    monkeypatch.setattr(torch.onnx, "export", unsupported)
    message = refused(lambda: export_onnx(checkpoint, tmp_path / "model.onnx", progress=False),
                      "reverse-hrnet decoder", "RuntimeError: Unsupported operator aten::frobnicate",
                      "nothing was written")
    assert "long trace" not in message
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("missing", ["onnx", "onnxscript", "onnxruntime"])
def test_refuses_without_the_onnx_extra(checkpoint, tmp_path, monkeypatch, missing):
    monkeypatch.setitem(sys.modules, missing, None)  # `import missing` raises ImportError
    refused(lambda: export_onnx(checkpoint, tmp_path / "model.onnx"),
            "fusion-seg export needs the onnx extra: pip install 'fusion-seg[onnx]'", missing)
    assert list(tmp_path.iterdir()) == []


def test_load_onnx_without_onnxruntime(exported, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    refused(lambda: load_onnx(exported[1]), "needs the onnx extra: pip install 'fusion-seg[onnx]'")


def test_load_onnx_refuses_what_fusion_seg_did_not_export(tmp_path):
    from onnx import TensorProto, helper

    graph = helper.make_graph([helper.make_node("Identity", ["image"], ["logits"])], "other",
                              [helper.make_tensor_value_info("image", TensorProto.FLOAT, [1, 3, 4, 4])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, 3, 4, 4])])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=10),
              str(tmp_path / "other.onnx"))
    refused(lambda: load_onnx(tmp_path / "other.onnx"), "was not exported by fusion-seg export")
    (tmp_path / "text.onnx").write_text("not a model")
    refused(lambda: load_onnx(tmp_path / "text.onnx"), "cannot read", "as an ONNX model")
    refused(lambda: load_onnx(tmp_path / "missing.onnx"), "does not exist")

