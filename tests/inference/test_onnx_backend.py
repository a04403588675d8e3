"""Issue 23: `fusion-seg export`, and `predict`/`evaluate --backend onnxruntime`: a user checks the exported model on
their data with the commands they know, and gets torch's masks and scores."""
from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from fusion_seg.cli import main
from fusion_seg.errors import UserError
from pipeline_helpers import SYNTH, tiny_checkpoint

pytest.importorskip("onnxruntime")
pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    folder = tmp_path_factory.mktemp("backend")
    checkpoint = tiny_checkpoint(folder)
    result = CliRunner().invoke(main, ["export", "--checkpoint", str(checkpoint), "--out", str(folder / "m.onnx")])
    assert result.exit_code == 0, result.output
    assert "m.onnx: resnet18 + reverse-hrnet" in result.output and "opset 18" in result.output
    return checkpoint, folder / "m.onnx"


def test_evaluate_through_onnx_runtime_gives_torchs_scores(exported, tmp_path):
    from fusion_seg.evaluation.evaluate import evaluate
    from fusion_seg.requests import DatasetRef

    checkpoint, model = exported
    data = DatasetRef("synthetic", "val", options={"num_images": 2, "size": list(SYNTH["size"])})
    torch_scores = evaluate(checkpoint, dataset=data, out=tmp_path / "t", device="cpu", progress=False)
    ort_scores = evaluate(model, dataset=data, out=tmp_path / "o", device="cpu", backend="onnxruntime", progress=False)
    assert round(ort_scores.miou, 3) == round(torch_scores.miou, 3)
    assert round(ort_scores.pixel_acc, 3) == round(torch_scores.pixel_acc, 3)
    assert (ort_scores.backend, ort_scores.precision) == ("onnxruntime", "fp32")
    assert json.loads((tmp_path / "o" / "metrics.json").read_text())["backend"] == "onnxruntime"


@pytest.mark.parametrize("options", [[], ["--flip", "--scales", "0.75,1.0"], ["--sliding-window"]])
def test_predict_with_either_backend_writes_the_same_masks(exported, tmp_path, options):
    checkpoint, model = exported
    rng = np.random.default_rng(0)
    (tmp_path / "in").mkdir()
    for i, (h, w) in enumerate([SYNTH["size"], (67, 101)]):  # one size no stride divides
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(tmp_path / "in" / f"{i}.png")
    masks = {}
    for backend, path in (("torch", checkpoint), ("onnxruntime", model)):
        out = tmp_path / backend
        result = CliRunner().invoke(main, ["predict", "--checkpoint", str(path), "--input", str(tmp_path / "in"),
                                           "--out", str(out), "--device", "cpu", "--backend", backend, *options])
        assert result.exit_code == 0, result.output
        masks[backend] = [np.asarray(Image.open(out / f"{i}.png")) for i in range(2)]
    for a, b in zip(masks["torch"], masks["onnxruntime"]):
        assert a.shape == b.shape and (a == b).mean() >= 0.999


def test_a_backend_and_a_file_that_do_not_go_together_are_refused_before_any_work(exported, tmp_path):
    from fusion_seg.inference.segmenter import load_model

    checkpoint, model = exported
    cases = [({"checkpoint": checkpoint, "backend": "onnxruntime"}, "is not a .onnx file: export it first"),
             ({"checkpoint": model}, "is an exported ONNX model: pass --backend onnxruntime"),
             ({"checkpoint": model, "backend": "onnxruntime", "precision": "bf16"}, "--precision bf16 runs with"),
             ({"checkpoint": model, "backend": "onnxruntime", "weights": "w.pth"}, "holds its encoder's weights"),
             ({"checkpoint": model, "backend": "tensorrt"}, "backend='tensorrt': choose one of 'torch', 'onnxruntime'")]
    for kwargs, message in cases:
        with pytest.raises(UserError, match=message):
            load_model(device="cpu", **kwargs)
    result = CliRunner().invoke(main, ["predict", "--checkpoint", str(checkpoint), "--input", str(tmp_path),
                                       "--out", str(tmp_path / "p"), "--backend", "onnxruntime"])
    assert result.exit_code == 2 and "Traceback" not in result.output and not (tmp_path / "p").exists()


def test_the_end_to_end_hrnet_baseline_is_refused_with_one_line_and_no_file(tmp_path):
    """Its padding to a multiple of 32 is fixed at the traced size by the exporter: export's own check against
    torch refuses the graph, naming the decoder and the fix, and writes nothing."""
    from fusion_seg.inference.export import export_onnx
    from fusion_seg.requests import Augment, DatasetRef
    from fusion_seg.training.train import train_online
    from pipeline_helpers import tiny_config

    opts = {"num_images": 2, "size": (72, 100)}
    train_online(tmp_path / "hrnet", tiny_config(epochs=1, decoder="hrnet", decoder_config={}),
                 dataset=DatasetRef("synthetic", "train", options=opts), augment=Augment(enabled=False),
                 progress=False)
    with pytest.raises(UserError) as info:
        export_onnx(tmp_path / "hrnet" / "last.pt", tmp_path / "hrnet.onnx", progress=False)
    message = str(info.value)
    assert "\n" not in message and "the hrnet decoder" in message and "torch backend" in message, message
    assert not (tmp_path / "hrnet.onnx").exists() and list(tmp_path.glob("*.onnx*")) == []
