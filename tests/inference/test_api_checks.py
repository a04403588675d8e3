"""Issue 20: the Python API refuses what the command line refuses, with a UserError that says what to pass.

``SegmentationModel.logits``/``predict``, ``fusion_seg.predict``, ``evaluate`` and ``visualize`` check their
arguments (scales, out_size, flags, the image, paths, options) before any work (``build_decoder`` checks its
``ShapeSpec``s: tests/decoders/test_base.py). ``load_model(ckpt).predict(img, scales=(0,))`` used to return an
all-background mask.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import fusion_seg as fs
from fusion_seg.errors import UserError
from fusion_seg.evaluation import evaluate as scoring
from fusion_seg.inference import predict as infer
from pipeline_helpers import SYNTH, tiny_checkpoint

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return tiny_checkpoint(tmp_path_factory.mktemp("api"))


@pytest.fixture(scope="module")
def model(checkpoint):
    return fs.load_model(checkpoint, device="cpu")


@pytest.fixture(scope="module")
def image():
    return np.random.default_rng(0).integers(0, 256, (*SYNTH["size"], 3), dtype=np.uint8)


def refused(call, *fragments) -> str:
    with pytest.raises(UserError) as info:
        call()
    message = str(info.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message, message
    return message


# ----- SegmentationModel ------------------------------------------------------------------------

BAD_OPTIONS = [
    ({"scales": (0,)}, ["scales", "(0, 4]"]),
    ({"scales": (0.5, 5.0)}, ["scales", "(0, 4]"]),
    ({"scales": (float("nan"),)}, ["scales"]),
    ({"scales": (True,)}, ["scales"]),
    ({"scales": ()}, ["scales", "e.g."]),
    ({"scales": 1.0}, ["scales=1.0", "tuple", "(1.0,)"]),
    ({"scales": "0.75,1.0"}, ["scales", "tuple"]),
    ({"out_size": (0, 5)}, ["out_size", "(height, width)"]),
    ({"out_size": (64,)}, ["out_size", "(height, width)"]),
    ({"out_size": "64x96"}, ["out_size", "(height, width)"]),
    ({"out_size": (64.0, 96)}, ["out_size", "(height, width)"]),
    ({"flip": "yes"}, ["flip='yes'", "True or False"]),
    ({"flip": 1}, ["flip=1", "True or False"]),
    ({"sliding_window": None}, ["sliding_window=None", "True or False"]),
]


@pytest.mark.parametrize("method", ["logits", "predict"])
@pytest.mark.parametrize("options,fragments", BAD_OPTIONS, ids=[str(o) for o, _ in BAD_OPTIONS])
def test_model_refuses_options_the_cli_refuses(model, image, method, options, fragments):
    refused(lambda: getattr(model, method)(image, **options), *fragments)


@pytest.mark.parametrize("method", ["logits", "predict"])
def test_model_refuses_an_empty_image(model, method):
    for empty in (np.zeros((0, 0, 3), np.uint8), np.zeros((0, 8, 3), np.uint8), Image.new("RGB", (0, 0))):
        refused(lambda: getattr(model, method)(empty), "has no pixel", "at least 1x1")


@pytest.mark.parametrize("path", ["street.png", Path("street.png")])
def test_model_refuses_a_path_saying_how_to_load_it(model, path):
    refused(lambda: model.predict(path), "street.png", "PIL.Image.open", "fusion_seg.predict")


def test_model_still_takes_good_options(model, image):
    mask = model.predict(Image.fromarray(image), flip=np.bool_(True), scales=[0.5, 1], out_size=(np.int64(32), 48))
    assert mask.shape == (32, 48)


# ----- predict, evaluate, visualize: refused before the model loads -----------------------------

@pytest.fixture
def no_model(monkeypatch):
    from fusion_seg.reports import visualize as vis

    def fail(*args, **kwargs):
        raise AssertionError("the model was loaded before the refusal")

    for module in (infer, scoring, vis):
        monkeypatch.setattr(module, "load_model", fail)


def test_predict_refuses_a_list_of_inputs(checkpoint, tmp_path, no_model):
    images = [tmp_path / "a.png", tmp_path / "b.png"]
    refused(lambda: fs.predict(checkpoint, images, tmp_path / "out"), "inputs", "an image file or a folder")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("options,fragments", [
    ({"sliding_window": "no"}, ["sliding_window='no'", "True or False"]),
    ({"progress": None}, ["progress=None", "True or False"]),
    ({"device": 0}, ["device=0", "'cpu'"]),
])
def test_predict_refuses_bad_options(checkpoint, tmp_path, no_model, options, fragments):
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "a.png")
    refused(lambda: fs.predict(checkpoint, tmp_path / "a.png", tmp_path / "out", **options), *fragments)


def test_predict_and_evaluate_refuse_a_model_where_a_checkpoint_path_goes(model, tmp_path, no_model):
    refused(lambda: fs.predict(model, tmp_path, tmp_path / "out"), "checkpoint", "path")
    refused(lambda: fs.evaluate(model, dataset="synthetic", split="val"), "checkpoint", "path")


EVALUATE_BAD = [
    ({"scales": 1.0}, ["scales=1.0", "tuple"]),
    ({"scales": (0.0,)}, ["--scales", "(0, 4]"]),
    ({"flip": "yes"}, ["flip='yes'", "True or False"]),
    ({"sliding_window": 1}, ["sliding_window=1", "True or False"]),
    ({"dataset_options": "num_images=2"}, ["dataset_options", "dict", "{'num_images': 2}"]),
    ({"dataset": fs.DatasetRef("synthetic", "val")}, ["dataset", "name", "dataset='synthetic'"]),
    ({"split": None}, ["split=None", "split="]),
]


@pytest.mark.parametrize("options,fragments", EVALUATE_BAD, ids=[str(o) for o, _ in EVALUATE_BAD])
def test_evaluate_refuses_bad_arguments(checkpoint, tmp_path, no_model, options, fragments):
    args = {"dataset": "synthetic", "split": "val", "out": tmp_path / "e", **options}
    refused(lambda: fs.evaluate(checkpoint, **args), *fragments)
    assert not (tmp_path / "e").exists()


def test_visualize_refuses_bad_arguments(checkpoint, image, tmp_path, no_model):
    from fusion_seg.reports.visualize import visualize

    Image.fromarray(image).save(tmp_path / "a.png")
    out = tmp_path / "fig.png"
    refused(lambda: visualize(str(checkpoint), tmp_path / "a.png", out), "checkpoints", "list")
    refused(lambda: visualize([checkpoint], image, out), "image_path", "file")
    refused(lambda: visualize([checkpoint], tmp_path / "a.png", out, dpi=0), "dpi=0")
    refused(lambda: visualize([checkpoint], tmp_path / "a.png", out, panel_width=-1), "panel_width=-1")
    assert not out.exists()


def test_a_scale_that_makes_the_image_too_big_is_refused_before_allocating(model, image, monkeypatch):
    """scales=(4,) on a huge image would allocate many GiB blindly: refused beyond the pixels fusion-seg reads."""
    from fusion_seg.inference import segmenter

    h, w = image.shape[:2]
    monkeypatch.setattr(segmenter, "MAX_PIXELS", 4 * h * w)  # as if the image were huge: 4x its pixels at most
    assert model.predict(image, scales=(2.0,)).shape == (h, w)
    refused(lambda: model.predict(image, scales=(1.0, 3.0)), "at scale 3", f"{3 * w}x{3 * h}", "smaller scales")
