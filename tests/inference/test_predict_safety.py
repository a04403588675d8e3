"""Issue 12: predict and evaluate never destroy data, and refuse a bad --out before any work."""
from __future__ import annotations

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from fusion_seg.evaluation import evaluate as scoring
from fusion_seg.inference import predict as infer
from fusion_seg.cli import main
from fusion_seg.errors import UserError
from pipeline_helpers import SYNTH, tiny_checkpoint

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return tiny_checkpoint(tmp_path_factory.mktemp("predict"))


def image(path, seed=0):
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (*SYNTH["size"], 3), dtype=np.uint8)).save(path)
    return path.read_bytes()


@pytest.fixture
def no_model(monkeypatch):
    """Refusals must come before the model is loaded (and so before any image is read or written)."""
    def fail(*args, **kwargs):
        raise AssertionError("the model was loaded before the refusal")

    monkeypatch.setattr(infer, "load_model", fail)
    monkeypatch.setattr(scoring, "load_model", fail)


def snapshot(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_predict_into_the_input_folder_is_refused_and_inputs_are_kept(checkpoint, tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    image(images / "a.png", 0)
    image(images / "b.png", 1)
    before = snapshot(images)
    result = CliRunner().invoke(main, ["predict", "--checkpoint", str(checkpoint), "--input", str(images),
                                       "--out", str(images), "--device", "cpu"])
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output and len(result.output.strip().splitlines()) == 1
    assert str(images / "a.png") in result.output and "--out" in result.output
    assert snapshot(images) == before


def test_predict_of_one_file_onto_itself_is_refused(checkpoint, tmp_path, no_model):
    src = tmp_path / "x.png"
    before = image(src)
    with pytest.raises(UserError, match="x.png"):
        infer.predict(checkpoint, src, tmp_path, device="cpu", progress=False)
    assert src.read_bytes() == before


def test_two_inputs_that_would_write_one_output_are_refused(checkpoint, tmp_path, no_model):
    images = tmp_path / "images"
    images.mkdir()
    image(images / "a.png")
    image(images / "a.jpg", 1)
    with pytest.raises(UserError) as err:
        infer.predict(checkpoint, images, tmp_path / "out", device="cpu", progress=False)
    message = str(err.value)
    assert "a.png" in message and "a.jpg" in message and str(tmp_path / "out" / "a.png") in message
    assert "\n" not in message and not (tmp_path / "out").exists()
    # a mask of one and the overlay of another: x_overlay.png and x.png both make x_overlay.png
    other = tmp_path / "other"
    other.mkdir()
    image(other / "x.png")
    image(other / "x_overlay.jpg", 1)
    with pytest.raises(UserError, match="x_overlay.png"):
        infer.predict(checkpoint, other, tmp_path / "out2", device="cpu", progress=False)


def test_out_that_is_a_file_or_under_a_file_is_refused(checkpoint, tmp_path, no_model):
    src = tmp_path / "in.png"
    image(src)
    blocker = tmp_path / "notes.txt"
    blocker.write_text("keep me")
    for out in (blocker, blocker / "preds"):
        with pytest.raises(UserError, match="notes.txt"):
            infer.predict(checkpoint, src, out, device="cpu", progress=False)
    assert blocker.read_text() == "keep me"
    # an output path that is a folder
    (tmp_path / "out" / "in.png").mkdir(parents=True)
    with pytest.raises(UserError, match="in.png"):
        infer.predict(checkpoint, src, tmp_path / "out", device="cpu", progress=False)


def test_predict_still_writes_masks(checkpoint, tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    image(images / "a.png")
    r = infer.predict(checkpoint, images, tmp_path / "out", device="cpu", progress=False)
    assert r["images"] == 1
    assert (tmp_path / "out" / "a.png").is_file() and (tmp_path / "out" / "a_overlay.png").is_file()
    assert (tmp_path / "out" / "legend.png").is_file()  # the overlay colours, named
    # a second run into the same folder replaces its own results
    infer.predict(checkpoint, images, tmp_path / "out", device="cpu", progress=False)


def test_an_input_named_like_the_legend_is_refused(checkpoint, tmp_path, no_model):
    images = tmp_path / "images"
    images.mkdir()
    image(images / "legend.jpg")
    with pytest.raises(UserError, match="class legend"):
        infer.predict(checkpoint, images, tmp_path / "out", device="cpu", progress=False)


def test_evaluate_refuses_a_bad_out_before_scoring(checkpoint, tmp_path, no_model):
    blocker = tmp_path / "metrics"
    blocker.write_text("keep me")
    data = dict(dataset="synthetic", split="val", dataset_options={"num_images": 1, "size": SYNTH["size"]},
                device="cpu", progress=False)
    for out in (blocker, blocker / "sub"):
        with pytest.raises(UserError, match="metrics"):
            scoring.evaluate(checkpoint, out=out, **data)
    (tmp_path / "e" / "metrics.json").mkdir(parents=True)
    with pytest.raises(UserError, match="metrics.json"):
        scoring.evaluate(checkpoint, out=tmp_path / "e", **data)
    assert blocker.read_text() == "keep me"


def test_predict_into_its_own_input_folder_is_refused_even_when_no_name_collides(checkpoint, tmp_path, no_model):
    """Issue 20: a.jpg's results are a.png and a_overlay.png, which overwrite nothing, but they would be written
    among the images and read as inputs by the next run."""
    images = tmp_path / "images"
    images.mkdir()
    Image.fromarray(np.zeros((64, 96, 3), np.uint8)).save(images / "a.jpg")
    result = CliRunner().invoke(main, ["predict", "--checkpoint", str(checkpoint), "--input", str(images),
                                       "--out", str(images)])
    assert result.exit_code == 2 and "is the --input folder" in result.output, result.output
    assert sorted(p.name for p in images.iterdir()) == ["a.jpg"]


@pytest.mark.parametrize("name, what", [("a.png", "the label map of"), ("a_overlay.png", "the overlay of"),
                                        ("legend.png", "the class legend")])
def test_a_file_of_the_users_where_a_result_would_go_is_refused_not_overwritten(checkpoint, tmp_path, no_model,
                                                                               name, what):
    images, out = tmp_path / "images", tmp_path / "out"
    images.mkdir()
    out.mkdir()
    image(images / "a.jpg")
    mine = image(out / name, seed=1)  # a PNG, but not one predict wrote
    with pytest.raises(UserError, match=f"--out {out}: {name} is there and was not written by fusion-seg predict; "
                                        f"{what}"):
        infer.predict(checkpoint, images, out, device="cpu", progress=False)
    assert (out / name).read_bytes() == mine


def test_results_are_marked_and_a_rerun_replaces_them(checkpoint, tmp_path):
    from fusion_seg.data.io import png_text

    images, out = tmp_path / "images", tmp_path / "out"
    images.mkdir()
    image(images / "a.jpg")
    infer.predict(checkpoint, images, out, device="cpu", progress=False)
    assert {png_text(out / n, "Software") for n in ("a.png", "a_overlay.png", "legend.png")} == {"fusion-seg predict"}
    image(images / "a.jpg", seed=2)
    infer.predict(checkpoint, images, out, device="cpu", progress=False)  # its own results: replaced
    assert np.array(Image.open(out / "a.png")).shape == SYNTH["size"]


def test_files_of_the_input_folder_that_are_not_images_are_named_not_ignored(checkpoint, tmp_path, capsys):
    images = tmp_path / "images"
    images.mkdir()
    image(images / "a.png")
    (images / "notes.txt").write_text("x")
    (images / "b.gif").write_bytes(b"GIF89a")
    (images / ".hidden").write_text("x")
    (images / "sub").mkdir()
    r = infer.predict(checkpoint, images, tmp_path / "out", device="cpu", progress=False)
    assert r["images"] == 1
    err = capsys.readouterr().err
    assert f"predict: skipping 2 files of {images} that are not an image type it reads (b.gif, notes.txt)" in err
