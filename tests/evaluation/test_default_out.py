"""Issue 20: evaluate's default output folder (beside the checkpoint) is one per evaluation that differs, so that
evaluating best.pt, then last.pt, then with --flip no longer replaces the last results; its name stays readable."""
from __future__ import annotations

import json
import os

import pytest

from fusion_seg.evaluation.evaluate import default_out_folder, evaluate
from pipeline_helpers import SYNTH, tiny_checkpoint

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py

BASE = dict(dataset="camvid", split="val", root="data/camvid", dataset_options={}, flip=False, scales=(1.0,),
            sliding_window=False, weights=None)


def folder(checkpoint="runs/a/best.pt", **changes):
    return default_out_folder(checkpoint, **{**BASE, **changes})


def test_every_setting_that_changes_the_results_changes_the_folder():
    variants = [folder(), folder("runs/a/last.pt"), folder(dataset="folder"), folder(split="test"),
                folder(flip=True), folder(scales=(0.75, 1.0, 1.25)), folder(sliding_window=True),
                folder(root="data/other"), folder(dataset_options={"require_masks": False}),
                folder(weights="weights/resnet50.safetensors")]
    assert len(set(variants)) == len(variants), variants
    assert all(f.parent.as_posix() == "runs/a" for f in variants)


def test_the_same_evaluation_gets_the_same_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert folder() == folder(scales=[1.0]) == folder(root=str(tmp_path / "data" / "camvid"))  # the root, resolved
    assert folder(dataset_options={"a": 1, "b": 2}) == folder(dataset_options={"b": 2, "a": 1})


def test_the_folder_name_is_readable():
    assert folder(root=None).name == "eval-best-camvid-val"  # no root, no options: no hash either
    name = folder("runs/a/last.pt", flip=True, scales=(0.75, 1.0, 1.25), sliding_window=True).name
    assert name.startswith("eval-last-camvid-val-flip-scales0.75_1_1.25-sliding-") and len(name) < 70
    assert os.sep not in folder(split="a/b").name


def test_evaluating_best_then_last_then_with_flip_keeps_each_result(tmp_path):
    best = tiny_checkpoint(tmp_path)
    last = best.with_name("last.pt")
    data = dict(dataset="synthetic", split="val", dataset_options={"num_images": 1, "size": list(SYNTH["size"])},
                device="cpu", progress=False)
    outs = [evaluate(best, **data)["out"], evaluate(last, **data)["out"], evaluate(best, flip=True, **data)["out"]]
    assert len(set(outs)) == 3
    for out in outs:
        metrics = json.loads((tmp_path / out / "metrics.json").read_text())
        assert metrics["checkpoint"] in (str(best), str(last))
    assert json.loads((tmp_path / outs[2] / "metrics.json").read_text())["flip"] is True


def test_evaluate_takes_a_dataset_ref_or_the_same_settings_one_by_one(tmp_path):
    from fusion_seg.errors import UserError
    from fusion_seg.requests import DatasetRef

    best = tiny_checkpoint(tmp_path)
    options = {"num_images": 1, "size": list(SYNTH["size"])}
    typed = evaluate(best, dataset=DatasetRef("synthetic", "val", options=options), device="cpu", progress=False)
    loose = evaluate(best, dataset="synthetic", split="val", dataset_options=options, device="cpu", progress=False)
    assert typed.out == loose.out and typed.miou == loose.miou  # the same evaluation, the same folder
    with pytest.raises(UserError, match=r"the DatasetRef holds the split, root and options; drop split"):
        evaluate(best, dataset=DatasetRef("synthetic", "val"), split="val", device="cpu", progress=False)
    with pytest.raises(UserError, match=r"split=None: pass a name, e.g. split='val'"):
        evaluate(best, dataset="synthetic", device="cpu", progress=False)
