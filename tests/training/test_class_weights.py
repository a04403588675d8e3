"""--class-weights: SegNet's median frequency and ENet's inverse log against hand computations,
weight files, and the weighted losses (ce and OHEM) against their formulas."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fusion_seg.errors import UserError
from fusion_seg.training.class_weights import (ClassFrequencies, check_class_weights_option, read_weights_file,
                                               resolve_class_weights)
from fusion_seg.training.losses import build_loss

IGNORE = 255
# Two 2x2 samples, three classes. A: class 0 twice, class 1 once, one ignored pixel (3 labelled).
# B: class 0 once, class 2 three times (4 labelled).
SAMPLES = [np.array([[0, 0], [1, IGNORE]], np.uint8), np.array([[0, 2], [2, 2]], np.uint8)]
CLASSES = ["a", "b", "c"]


def test_counts_by_hand():
    f = ClassFrequencies.count(SAMPLES, 3, IGNORE)
    assert f.pixels == (3, 1, 3)
    assert f.sample_pixels == (7, 3, 4)  # class 0 is in both samples (3 + 4 labelled pixels)


def test_median_frequency_by_hand():
    # freq = [3/7, 1/3, 3/4]; median 3/7; weight = median / freq
    w = ClassFrequencies.count(SAMPLES, 3, IGNORE).median_frequency()
    assert w == pytest.approx([1.0, (3 / 7) / (1 / 3), (3 / 7) / (3 / 4)])
    assert w == pytest.approx([1.0, 9 / 7, 4 / 7])


def test_inverse_log_by_hand():
    w = ClassFrequencies.count(SAMPLES, 3, IGNORE).inverse_log()
    assert w == pytest.approx([1 / math.log(1.02 + 3 / 7), 1 / math.log(1.02 + 1 / 7), 1 / math.log(1.02 + 3 / 7)])
    assert all(1 < x <= 1 / math.log(1.02) for x in w)


def test_absent_class_gets_weight_zero_and_is_left_out_of_the_median():
    w = ClassFrequencies.count(SAMPLES, 4, IGNORE).median_frequency()
    assert w[3] == 0.0 and w[:3] == pytest.approx([1.0, 9 / 7, 4 / 7])


def test_resolve_records_method_weights_and_counts(tmp_path):
    weights, record = resolve_class_weights("median-freq", SAMPLES, CLASSES, IGNORE)
    assert record["method"] == "median-freq" and record["weights"] == weights
    assert record["frequencies"] == {"pixels": [3, 1, 3], "sample_pixels": [7, 3, 4]}
    assert resolve_class_weights("none", SAMPLES, CLASSES, IGNORE) == (None, {"method": "none"})
    assert resolve_class_weights(None, SAMPLES, CLASSES, IGNORE)[0] is None
    path = tmp_path / "w.json"
    path.write_text(json.dumps({"c": 3, "a": 1, "b": 2}))
    weights, record = resolve_class_weights(str(path), iter(()), CLASSES, IGNORE)
    assert weights == [1.0, 2.0, 3.0] and record == {"method": "file", "file": str(path), "weights": weights}


@pytest.mark.parametrize("content, message", [
    ("[1, 2]", "expected 3 weights, found 2"),
    ('{"a": 1, "b": 2}', "missing c"),
    ('{"a": 1, "b": 2, "c": 3, "d": 4}', "unknown d"),
    ("[1, -1, 2]", ">= 0"),
    ("[0, 0, 0]", "all weights are 0"),
    ("not json", "cannot read it as JSON"),
])
def test_bad_weight_files_name_the_file_and_the_fix(tmp_path, content, message):
    path = tmp_path / "w.json"
    path.write_text(content)
    with pytest.raises(UserError, match=message) as info:
        read_weights_file(path, CLASSES)
    assert str(path) in str(info.value) and "JSON list of 3" in str(info.value)


def test_option_is_a_method_or_an_existing_file(tmp_path):
    for ok in (None, "none", "median-freq", "inverse-log"):
        check_class_weights_option(ok)
    (tmp_path / "w.json").write_text("[1, 1, 1]")
    check_class_weights_option(str(tmp_path / "w.json"))
    with pytest.raises(UserError, match="--class-weights 'median'"):
        check_class_weights_option("median")


def _batch():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 3, 4, 5, generator=g)
    target = torch.randint(0, 3, (2, 4, 5), generator=g)
    target[0, 0, :2] = IGNORE
    return logits, target


def test_weighted_ce_is_the_weight_normalised_mean():
    logits, target = _batch()
    w = torch.tensor([1.0, 9 / 7, 4 / 7])
    loss = build_loss("ce", IGNORE, weight=w.tolist())(logits, target)
    valid = target != IGNORE
    nll = -F.log_softmax(logits, 1).gather(1, target.clamp(max=2).unsqueeze(1))[:, 0]
    wt = w[target.clamp(max=2)]
    assert loss.item() == pytest.approx(((wt * nll)[valid].sum() / wt[valid].sum()).item(), rel=1e-6)


def test_ohem_with_unit_weights_equals_unweighted_ohem():
    logits, target = _batch()
    a = build_loss("ohem", IGNORE, thresh=0.7, min_kept=10)(logits, target)
    b = build_loss("ohem", IGNORE, thresh=0.7, min_kept=10, weight=[1.0, 1.0, 1.0])(logits, target)
    assert a.item() == pytest.approx(b.item(), rel=1e-6)


def test_weighted_ohem_keeping_every_pixel_is_the_mean_of_weighted_losses():
    """As HRNet's OhemCrossEntropy: weighted pixel losses, mean over the kept pixels (not over their weights)."""
    logits, target = _batch()
    w = torch.tensor([1.0, 9 / 7, 4 / 7])
    loss = build_loss("ohem", IGNORE, thresh=1.0, min_kept=1000, weight=w.tolist())(logits, target)
    valid = target != IGNORE
    nll = -F.log_softmax(logits, 1).gather(1, target.clamp(max=2).unsqueeze(1))[:, 0]
    assert loss.item() == pytest.approx((w[target.clamp(max=2)] * nll)[valid].mean().item(), rel=1e-6)


def test_ohem_mines_hard_pixels_by_probability_not_by_weighted_loss():
    """The weights change each kept pixel's loss, never which pixels are kept."""
    logits, target = _batch()
    w = [1.0, 50.0, 0.1]
    plain = build_loss("ohem", IGNORE, thresh=0.5, min_kept=5, weight=[1.0, 1.0, 1.0])
    weighted = build_loss("ohem", IGNORE, thresh=0.5, min_kept=5, weight=w)
    valid = target != IGNORE
    prob = F.softmax(logits, 1).gather(1, target.clamp(max=2).unsqueeze(1))[:, 0][valid]
    min_value = prob.kthvalue(5 + 1).values
    keep = prob < torch.clamp(min_value, min=0.5)
    nll = -F.log_softmax(logits, 1).gather(1, target.clamp(max=2).unsqueeze(1))[:, 0][valid]
    wt = torch.tensor(w)[target.clamp(max=2)][valid]
    assert plain(logits, target).item() == pytest.approx(nll[keep].mean().item(), rel=1e-6)
    assert weighted(logits, target).item() == pytest.approx((wt * nll)[keep].mean().item(), rel=1e-6)


# --- through training: the weights are counted from the store, used by the loss and recorded ---------------

@pytest.fixture(scope="module")
def store(tmp_path_factory):
    from pipeline_helpers import extract_synthetic

    path = tmp_path_factory.mktemp("cw") / "s.zarr"
    extract_synthetic(path, views=1, num_images=2)
    return path


@pytest.mark.usefixtures("one_thread")
def test_training_counts_the_store_labels_and_records_the_weights(store, tmp_path):
    from fusion_seg.cache.store import FeatureStore
    from fusion_seg.checkpoint import load_checkpoint
    from fusion_seg.training.train import train_decoder
    from pipeline_helpers import tiny_config

    fs = FeatureStore.open(store)
    maps = [fs.read_view(v)[1] for v in fs.usable_views()]  # the valid region of each view's labels
    expected = ClassFrequencies.count(maps, len(fs.spec.classes), fs.spec.ignore_index)
    plain = train_decoder(str(store), tmp_path / "plain", tiny_config(epochs=1), progress=False)
    weighted = train_decoder(str(store), tmp_path / "mf", tiny_config(epochs=1, class_weights="median-freq"),
                             progress=False)
    config = json.loads((tmp_path / "mf" / "config.json").read_text())
    record = config["data"]["class_weights"]
    assert record["method"] == "median-freq"
    assert record["frequencies"] == expected.to_json()
    assert record["weights"] == pytest.approx(expected.median_frequency())
    assert load_checkpoint(tmp_path / "mf" / "last.pt")["data"]["class_weights"] == record
    assert config["train"]["class_weights"] == "median-freq"
    assert "class_weights" not in json.loads((tmp_path / "plain" / "config.json").read_text())["data"]
    assert plain.losses[0] != pytest.approx(weighted.losses[0])  # same seed and batch: only the weights differ


@pytest.mark.usefixtures("one_thread")
def test_online_training_counts_the_dataset_labels_and_records_the_weights(tmp_path):
    """--online (the end-to-end HRNet baseline's path) has no store: it counts the dataset's whole label maps."""
    from fusion_seg.data.datasets import build_dataset
    from fusion_seg.requests import Augment, DatasetRef
    from fusion_seg.training.train import train_online
    from pipeline_helpers import tiny_config

    opts = {"num_images": 4, "size": (72, 100)}
    ds = build_dataset("synthetic", split="train", **opts)
    expected = ClassFrequencies.count([ds[i].mask for i in range(len(ds))], len(ds.classes), ds.ignore_index)
    train_online(tmp_path / "hrnet", tiny_config(epochs=1, decoder="hrnet", decoder_config={},
                                                 class_weights="inverse-log"),
                 dataset=DatasetRef("synthetic", "train", options=opts), augment=Augment(enabled=False),
                 progress=False)
    record = json.loads((tmp_path / "hrnet" / "config.json").read_text())["data"]["class_weights"]
    assert record["method"] == "inverse-log"
    assert record["frequencies"] == expected.to_json()
    assert record["weights"] == pytest.approx(expected.inverse_log())


def test_cli_refuses_an_unknown_method_before_any_work(tmp_path):
    from click.testing import CliRunner

    from fusion_seg.cli import main

    r = CliRunner().invoke(main, ["train-decoder", "--cache", str(tmp_path / "none.zarr"), "--class-weights",
                                  "median", "--out", str(tmp_path / "run")])
    assert r.exit_code != 0 and "--class-weights 'median'" in r.output and "Traceback" not in r.output
    assert not (tmp_path / "run").exists()
