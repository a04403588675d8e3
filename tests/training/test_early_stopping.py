"""Issue 24: ``--patience N`` ends a run once the val mIoU has not improved for N epochs.

The validation scores are scripted (``validate`` replaced) so that the epoch the run must stop at is known:
best.pt keeps the best epoch, last.pt the one it stopped after, and a resume of a stopped run trains nothing
unless it is given more patience (a run setting, which a resume may change).
"""
from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from fusion_seg.checkpoint import load_checkpoint
from fusion_seg.cli import main
from fusion_seg.errors import CheckpointError
from fusion_seg.training import trainer
from fusion_seg.training.train import train_decoder
from pipeline_helpers import extract_synthetic, tiny_config

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py

SCORES = [0.30, 0.50, 0.40, 0.45, 0.60, 0.20, 0.20, 0.20]  # the val mIoU after epoch 1, 2, ...


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    d = tmp_path_factory.mktemp("stores")
    extract_synthetic(d / "train.zarr", views=1, num_images=4)
    extract_synthetic(d / "val.zarr", split="val", views=1, augment=False, num_images=2)
    return d


@pytest.fixture
def scripted(monkeypatch):
    """Validation returns SCORES in turn; the epochs it was called after are listed."""
    calls = []

    def validate(decoder, views, num_classes, classes, device, precision):
        miou = SCORES[len(calls)]
        calls.append(miou)
        return {"miou": miou, "pixel_acc": miou, "mean_acc": miou, "per_class_iou": [miou] * num_classes}

    monkeypatch.setattr(trainer, "validate", validate)
    return calls


def run(stores, out, resume=False, **kw):
    cfg = tiny_config(**{"epochs": 8, **kw})
    return train_decoder(str(stores / "train.zarr"), out, cfg, val_cache=str(stores / "val.zarr"), resume=resume,
                         progress=False)


def records(out, kind):
    lines = (out / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["type"] == kind]


def test_the_run_stops_once_the_val_miou_has_not_improved_for_patience_epochs(stores, tmp_path, scripted):
    out = tmp_path / "run"
    r = run(stores, out, patience=2)  # best 0.50 at epoch 2; 0.40, 0.45 after it: stop after epoch 4
    assert scripted == SCORES[:4] and r.epochs == 4 and len(r.losses) == 4 * 2
    assert r.stopped_early == {"epoch": 4, "best_epoch": 2, "patience": 2} and r.best_miou == 0.50
    assert load_checkpoint(out / "best.pt")["epoch"] == 2 and load_checkpoint(out / "last.pt")["epoch"] == 4
    assert records(out, "early_stop") == [{"type": "early_stop", "step": 8, "epoch": 4, "best_epoch": 2,
                                           "patience": 2}]
    assert records(out, "summary")[0]["stopped_early"] == r.stopped_early
    assert records(out, "summary")[0]["epoch"] == 4

    again = run(stores, out, resume=True, patience=2)  # stopped: nothing to train, and said once
    assert again.losses == [] and again.stopped_early == r.stopped_early and len(scripted) == 4
    assert len(records(out, "early_stop")) == 1
    with pytest.raises(CheckpointError, match="that run is finished \\(stopped early after epoch 4 by --patience 2\\)"):
        run(stores, out, resume=True, patience=2, lr=0.05)  # a new lr would change no step: not stamped on it
    assert load_checkpoint(out / "last.pt")["train"]["lr"] == 0.01

    more = run(stores, out, resume=True, patience=3)  # more patience (a run setting) continues from epoch 5
    assert more.epochs == 8 and len(more.losses) == 4 * 2 and more.best_miou == 0.60 and len(scripted) == 8
    assert more.stopped_early is None and records(out, "early_stop") == []
    assert load_checkpoint(out / "best.pt")["epoch"] == 5


def test_patience_counts_at_validations_only(stores, tmp_path, scripted):
    # validated after epochs 2, 4, 6 (scores 0.30, 0.50, 0.40): one validation without a gain stops it after 6
    r = run(stores, tmp_path / "run", patience=1, val_every=2)
    assert r.stopped_early == {"epoch": 6, "best_epoch": 4, "patience": 1} and len(scripted) == 3


def test_without_patience_every_epoch_trains(stores, tmp_path, scripted):
    r = run(stores, tmp_path / "run")
    assert r.epochs == 8 and r.stopped_early is None and len(scripted) == 8


def test_patience_without_a_val_cache_is_refused_before_any_work(stores, tmp_path):
    out = tmp_path / "run"
    result = CliRunner().invoke(main, ["train-decoder", "--cache", str(stores / "train.zarr"), "--patience", "3",
                                       "--out", str(out)])
    assert result.exit_code == 2 and "--patience 3 stops the run by its val mIoU" in result.output
    assert "pass --val-cache STORE" in result.output and not out.exists()
