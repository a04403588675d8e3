"""Issue 20: sliding-window inference over many windows (a huge image, a small training crop) shows its
progress, in predict and evaluate alike; an image of a few windows stays quiet.

FUSION_SEG_PROGRESS_SECONDS=0 on a stream that is not a terminal (pytest's captured stderr) prints a line
per update, so the test sees every report without waiting.
"""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from fusion_seg.evaluation.evaluate import evaluate
from fusion_seg.inference.predict import predict
from fusion_seg.inference.sliding_window import PROGRESS_WINDOWS, window_grid
from pipeline_helpers import SYNTH, tiny_checkpoint

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py

CROP = (64, 64)  # tiny_checkpoint's training crop
BIG = (400, 400)  # 9 x 9 windows of 64x64 every 42 pixels


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return tiny_checkpoint(tmp_path_factory.mktemp("windows"))


@pytest.fixture(autouse=True)
def every_update(monkeypatch):
    monkeypatch.setenv("FUSION_SEG_PROGRESS_SECONDS", "0")


def window_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("sliding window:")]


def test_the_big_image_has_many_windows_and_the_small_one_few():
    rows, cols = window_grid(*BIG, CROP)
    assert len(rows) * len(cols) == 81 >= PROGRESS_WINDOWS
    rows, cols = window_grid(*SYNTH["size"], CROP)
    assert len(rows) * len(cols) == 2 < PROGRESS_WINDOWS


def test_predict_reports_the_windows_of_a_big_image(checkpoint, tmp_path, capsys):
    rng = np.random.default_rng(0)
    for name, size in (("big.png", BIG), ("small.png", SYNTH["size"])):
        (tmp_path / "in").mkdir(exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(tmp_path / "in" / name)
    predict(checkpoint, tmp_path / "in", tmp_path / "out", sliding_window=True, device="cpu")
    lines = window_lines(capsys.readouterr().err)
    assert lines and "/81 windows" in lines[-1] and "81/81" in lines[-1], lines  # the big image only
    predict(checkpoint, tmp_path / "in", tmp_path / "out", sliding_window=True, device="cpu", progress=False)
    assert not window_lines(capsys.readouterr().err)


def test_evaluate_reports_the_windows_of_every_pass(checkpoint, tmp_path, capsys):
    evaluate(checkpoint, dataset="synthetic", split="val", dataset_options={"num_images": 1, "size": list(BIG)},
             out=tmp_path / "e", sliding_window=True, flip=True, device="cpu")
    lines = window_lines(capsys.readouterr().err)
    assert lines and "162/162 windows" in lines[-1], lines  # 81 windows, the image and its mirror
    evaluate(checkpoint, dataset="synthetic", split="val", dataset_options={"num_images": 1, "size": list(BIG)},
             out=tmp_path / "e", device="cpu")  # no sliding window: one pass, nothing to report
    assert not window_lines(capsys.readouterr().err)
