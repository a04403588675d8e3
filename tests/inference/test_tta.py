"""Test-time augmentation (evaluate --flip --scales): logits averaged over mirrored and rescaled passes."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fusion_seg.inference.segmenter import load_segmenter, predict_logits
from pipeline_helpers import SYNTH, tiny_checkpoint

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return tiny_checkpoint(tmp_path_factory.mktemp("tta"))


@pytest.fixture(scope="module")
def model(checkpoint):
    return load_segmenter(checkpoint, device="cpu")


@pytest.fixture
def image():
    return np.random.default_rng(0).integers(0, 255, (*SYNTH["size"], 3), dtype=np.uint8)


def plain(model, image):
    m, ckpt = model
    return predict_logits(m, image, ckpt)


def test_default_is_one_plain_pass(model, image):
    m, ckpt = model
    with torch.inference_mode():
        x = m.encoder.identity
        from fusion_seg.data.transforms import to_tensor
        expected = m(to_tensor(image, x.mean, x.std).unsqueeze(0)).float()
    assert torch.allclose(plain(model, image), expected, atol=1e-5)


def test_flip_averages_the_mirrored_pass_mirrored_back(model, image):
    m, ckpt = model
    mirrored = predict_logits(m, np.ascontiguousarray(image[:, ::-1]), ckpt)
    expected = (plain(model, image) + mirrored.flip(-1)) / 2
    assert torch.allclose(predict_logits(m, image, ckpt, flip=True), expected, atol=1e-5)


def test_flip_tta_is_mirror_symmetric(model, image):
    """Flip TTA of the mirrored image is the mirror of flip TTA of the image (a property plain inference lacks)."""
    m, ckpt = model
    a = predict_logits(m, image, ckpt, flip=True)
    b = predict_logits(m, np.ascontiguousarray(image[:, ::-1]), ckpt, flip=True)
    assert torch.allclose(a, b.flip(-1), atol=1e-5)
    assert not torch.allclose(plain(model, image), plain(model, np.ascontiguousarray(image[:, ::-1])).flip(-1),
                              atol=1e-5)


def test_scales_average_rescaled_passes_upsampled_to_the_image(model, image):
    m, ckpt = model
    h, w = image.shape[:2]
    got = predict_logits(m, image, ckpt, scales=(0.75, 1.0, 1.25))
    assert got.shape == (1, 4, h, w) and torch.isfinite(got).all()
    from fusion_seg.data.transforms import to_tensor
    ident = m.encoder.identity
    x = to_tensor(image, ident.mean, ident.std).unsqueeze(0)
    passes = []
    with torch.inference_mode():
        for s in (0.75, 1.0, 1.25):
            xs = F.interpolate(x, size=(round(h * s), round(w * s)), mode="bilinear", align_corners=False)
            passes.append(F.interpolate(m(xs).float(), size=(h, w), mode="bilinear", align_corners=False))
    assert torch.allclose(got, sum(passes) / 3, atol=1e-5)
    assert torch.allclose(predict_logits(m, image, ckpt, scales=(1.0, 1.0)), plain(model, image), atol=1e-5)


def test_evaluate_records_the_augmentation_and_scores_every_image(model, tmp_path):
    from fusion_seg.evaluation.evaluate import evaluate

    checkpoint = tmp_path / "best.pt"
    from fusion_seg.checkpoint import save_checkpoint
    save_checkpoint(checkpoint, model[1])
    data = dict(dataset="synthetic", split="val", dataset_options={"num_images": 2, "size": SYNTH["size"]},
                device="cpu", progress=False)
    plain_r = evaluate(checkpoint, out=tmp_path / "plain", **data)
    tta = evaluate(checkpoint, out=tmp_path / "tta", flip=True, scales=(0.75, 1.0, 1.25), **data)
    assert (plain_r["flip"], plain_r["scales"]) == (False, [1.0])
    assert (tta["flip"], tta["scales"]) == (True, [0.75, 1.0, 1.25])
    assert sum(map(sum, tta["confusion"])) == sum(map(sum, plain_r["confusion"]))  # every labelled pixel scored
    import json
    assert json.loads((tmp_path / "tta" / "metrics.json").read_text())["scales"] == [0.75, 1.0, 1.25]


def test_evaluate_refuses_bad_scales_before_loading(tmp_path):
    from fusion_seg.errors import UserError
    from fusion_seg.evaluation.evaluate import evaluate

    with pytest.raises(UserError, match="--scales"):
        evaluate(tmp_path / "missing.pt", dataset="synthetic", split="val", scales=(0.0,), device="cpu")


def test_predict_writes_the_tta_masks(tmp_path, image, checkpoint, monkeypatch):
    """Issue 22: predict takes --flip/--scales as evaluate does: they reach the model, and its masks are
    SegmentationModel.predict's with them (this tiny model's argmax is the same with and without: the calls
    are recorded to show which ran)."""
    from click.testing import CliRunner

    from fusion_seg.cli import main
    from fusion_seg.data.io import read_mask, write_rgb_png
    from fusion_seg.inference.segmenter import load_model

    ckpt = checkpoint
    (tmp_path / "in").mkdir()
    write_rgb_png(tmp_path / "in" / "a.png", image)
    from fusion_seg.inference.segmenter import SegmentationModel

    model = load_model(ckpt, device="cpu")
    tta = model.predict(image, flip=True, scales=(0.75, 1.0))
    calls, real = [], SegmentationModel.predict
    monkeypatch.setattr(SegmentationModel, "predict", lambda self, img, **kw: calls.append(kw) or real(self, img, **kw))
    result = CliRunner().invoke(main, ["predict", "--checkpoint", str(ckpt), "--input", str(tmp_path / "in"), "--out",
                                       str(tmp_path / "out"), "--flip", "--scales", "0.75,1.0", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert np.array_equal(read_mask(tmp_path / "out" / "a.png"), tta)
    assert [(c["flip"], c["scales"]) for c in calls] == [(True, (0.75, 1.0))]
    result = CliRunner().invoke(main, ["predict", "--checkpoint", str(ckpt), "--input", str(tmp_path / "in"), "--out",
                                       str(tmp_path / "bad"), "--scales", "0,1", "--device", "cpu"])
    assert result.exit_code == 2 and "--scales" in result.output and not (tmp_path / "bad").exists()


def test_evaluate_and_predict_return_typed_results_that_read_as_before(checkpoint, tmp_path, image):
    """Issue 22: evaluate and predict return frozen dataclasses (EvaluationResult, PredictionResult) that still
    read as the dicts they replaced: the same keys, values and JSON."""
    import dataclasses
    import json

    import fusion_seg as fs
    from fusion_seg.data.io import write_rgb_png

    r = fs.evaluate(checkpoint, dataset="synthetic", split="val", out=tmp_path / "eval", device="cpu", progress=False,
                    dataset_options={"num_images": 2, "size": SYNTH["size"]})
    assert isinstance(r, fs.EvaluationResult) and r.miou == r["miou"] and r.out == str(tmp_path / "eval")
    written = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert set(r) == set(written) | {"confusion", "out"} and "extra" not in r
    assert {k: r[k] for k in written} == written and dict(r) == r.as_dict()
    with pytest.raises(dataclasses.FrozenInstanceError):
        r.miou = 1.0
    (tmp_path / "in").mkdir()
    write_rgb_png(tmp_path / "in" / "a.png", image)
    p = fs.predict(checkpoint, tmp_path / "in", tmp_path / "pred", device="cpu", progress=False)
    assert isinstance(p, fs.PredictionResult) and p.images == p["images"] == 1
    assert set(p) == {"images", "out", "seconds", "images_per_second"} and p.get("nothing") is None
