"""SegEvaluator against a confusion matrix worked out by hand."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from fusion_seg.evaluation.metrics import SegEvaluator

I = 255  # noqa: E741 - ignore label
# 4 classes: 0 and 1 in the ground truth, 2 only predicted, 3 nowhere.
TARGET = [[0, 0, 1, 1],
          [0, 0, 1, 1],
          [0, I, 1, 1],
          [I, I, 1, 1]]
PRED = [[0, 0, 1, 1],
        [0, 1, 1, 2],
        [1, 2, 1, 1],
        [2, 0, 1, 0]]  # the predictions at the three ignored pixels do not count
# Rows = ground truth, columns = prediction, over the 13 non-ignored pixels:
#   GT 0 at (0,0) (0,1) (1,0) (1,1) (2,0) -> predicted 0, 0, 0, 1, 1
#   GT 1 at the 8 pixels of columns 2-3   -> predicted 1, 1, 1, 2, 1, 1, 1, 0
CONFUSION = [[3, 2, 0, 0],
             [1, 6, 1, 0],
             [0, 0, 0, 0],
             [0, 0, 0, 0]]
# tp = (3, 6, 0, 0), gt = (5, 8, 0, 0), pred = (4, 8, 1, 0), union = (6, 10, 1, 0)
IOU = {"road": 3 / 6, "car": 6 / 10, "sky": 0.0, "boat": None}
MIOU = (0.5 + 0.6 + 0.0) / 3     # "boat" (empty union) left out; HRNet: 1.1 / 4 = 0.275
PIXEL_ACC = 9 / 13
MEAN_ACC = (3 / 5 + 6 / 8) / 2   # recall over classes with ground truth
NAMES = ["road", "car", "sky", "boat"]


def test_hand_computed_example():
    ev = SegEvaluator(4, ignore_index=I, class_names=NAMES)
    ev.process(torch.tensor(PRED), torch.tensor(TARGET))
    r = ev.evaluate()
    assert r["confusion"] == CONFUSION
    assert r["num_pixels"] == 13
    assert r["pixel_acc"] == pytest.approx(PIXEL_ACC)
    assert r["mean_acc"] == pytest.approx(MEAN_ACC)
    assert r["miou"] == pytest.approx(MIOU)
    assert r["per_class_iou"].keys() == IOU.keys()
    for name, iou in IOU.items():
        assert r["per_class_iou"][name] == (None if iou is None else pytest.approx(iou))


def test_batches_numpy_and_merge_accumulate():
    batch_pred = np.stack([PRED, PRED]).astype(np.uint8)
    batch_target = np.stack([TARGET, TARGET]).astype(np.uint8)
    ev = SegEvaluator(4)
    ev.process(batch_pred, batch_target)
    assert ev.confusion.tolist() == (2 * np.array(CONFUSION)).tolist()

    one = SegEvaluator(4)
    one.process(torch.tensor(PRED), torch.tensor(TARGET))
    other = SegEvaluator(4)
    other.merge(one)
    other.merge(one.confusion)
    assert other.evaluate()["confusion"] == ev.evaluate()["confusion"]
    assert other.evaluate()["miou"] == pytest.approx(MIOU)  # ratios unchanged

    ev.reset()
    assert ev.confusion.sum() == 0


def test_empty_evaluator_reports_none():
    r = SegEvaluator(3).evaluate()
    assert r["pixel_acc"] is None and r["miou"] is None and r["mean_acc"] is None
    assert r["per_class_iou"] == {"0": None, "1": None, "2": None}
    assert r["num_pixels"] == 0


def test_out_of_range_values_raise():
    ev = SegEvaluator(4)
    with pytest.raises(ValueError, match="predictions"):
        ev.process(torch.tensor([[0, 4]]), torch.tensor([[0, 1]]))
    with pytest.raises(ValueError, match="predictions"):
        ev.process(torch.tensor([[-1, 0]]), torch.tensor([[0, 1]]))
    with pytest.raises(ValueError, match="ground-truth"):
        ev.process(torch.tensor([[0, 1]]), torch.tensor([[0, 7]]))
    with pytest.raises(ValueError, match="shape"):
        ev.process(torch.zeros(2, 3, dtype=torch.long), torch.zeros(3, 2, dtype=torch.long))
    assert ev.confusion.sum() == 0
