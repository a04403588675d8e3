"""Issue 20: predict and evaluate refuse an input they cannot read (a dangling symbolic link) before the model
loads, naming it and the fix, instead of dropping it without a word."""
from __future__ import annotations

import os

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from fusion_seg.cli import main
from fusion_seg.errors import UserError
from fusion_seg.evaluation import evaluate as scoring
from fusion_seg.inference import predict as infer

CHECKPOINT = "no-such-checkpoint.pt"  # never loaded: the refusals come first


@pytest.fixture(autouse=True)
def no_model(monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("the model was loaded before the refusal")

    monkeypatch.setattr(infer, "load_model", fail)
    monkeypatch.setattr(scoring, "load_model", fail)


def _image(path, seed=0):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (8, 12, 3), dtype=np.uint8)).save(path)


def _dangle(path):
    os.symlink(path.parent / "gone" / path.name, path)
    return path


def test_predict_refuses_a_dangling_link_in_the_input_folder(tmp_path):
    _image(tmp_path / "in" / "a.png")
    link = _dangle(tmp_path / "in" / "b.png")
    result = CliRunner().invoke(main, ["predict", "--checkpoint", CHECKPOINT, "--input", str(tmp_path / "in"),
                                       "--out", str(tmp_path / "out"), "--device", "cpu"])
    assert result.exit_code == 2, result.output
    assert len(result.output.strip().splitlines()) == 1 and "Traceback" not in result.output
    assert str(link) in result.output and "broken" in result.output and "remove" in result.output
    assert not (tmp_path / "out").exists()


def test_predict_says_an_input_file_is_a_dangling_link(tmp_path):
    link = _dangle(tmp_path / "a.png")
    with pytest.raises(UserError, match="broken symbolic link") as info:
        infer.predict(CHECKPOINT, link, tmp_path / "out", progress=False)
    assert str(link) in str(info.value)


def test_evaluate_refuses_a_dangling_link_in_a_folder_dataset_before_loading(tmp_path):
    root = tmp_path / "data"
    root.mkdir()
    (root / "classes.txt").write_text("background\nthing\n")
    _image(root / "images" / "a.png")
    _image(root / "masks" / "a.png")
    link = _dangle(root / "images" / "b.png")
    with pytest.raises(UserError) as info:
        scoring.evaluate(CHECKPOINT, dataset="folder", root=root, split="all", out=tmp_path / "e", progress=False)
    assert str(link) in str(info.value) and "broken" in str(info.value)
    assert not (tmp_path / "e").exists()
