"""One pipeline stage (fusion_seg/pipeline/: schema.py, stage_checks.py, stages.py), through its public functions: stage_schema says what a
stage accepts, check_stage says what is wrong with one (one line per problem) without running it, run_stage runs it."""
from __future__ import annotations

import pytest

from fusion_seg.cache.store import FeatureStore
from fusion_seg.errors import UserError
from fusion_seg.pipeline.schema import KINDS, stage_schema
from fusion_seg.pipeline.stage_checks import check_stage
from fusion_seg.pipeline.stages import run_stage
from fusion_seg.shapes import ShapeSpec
from pipeline_helpers import ENCODER

SHAPES = {f"s{s}": ShapeSpec(c, s) for s, c in ((4, 64), (8, 128), (16, 256), (32, 512))}  # resnet18's


def extract_stage(out="x.zarr", **kw):
    return {"kind": "extract", "dataset": "synthetic", "split": "train", "out": str(out), "views": 2,
            "crop": [64, 64], "encoder": ENCODER, "random_init": True, "strides": [4, 8, 16, 32],
            "loader_workers": 0, "dataset_options": {"num_images": 2, "size": [64, 96]}, **kw}


def train_stage(**kw):
    return {"kind": "train", "cache": "x.zarr", "out": "run", "epochs": 1, "batch_size": 2, "loss": "ce", **kw}


def online_stage(**kw):
    return {"kind": "train", "online": True, "dataset": "synthetic", "split": "train", "out": "run",
            "encoder": ENCODER, "random_init": True, "epochs": 1, "crop": [64, 64], **kw}


def one_line(problems: list[str]) -> str:
    assert len(problems) == 1, problems
    assert "\n" not in problems[0] and "Traceback" not in problems[0]
    return problems[0]


def test_valid_stages_have_no_problems():
    assert check_stage(extract_stage()) == []
    assert check_stage(train_stage(), shapes=SHAPES) == []
    assert check_stage(train_stage(decoder="fpn"), shapes=SHAPES) == []
    assert check_stage(train_stage()) == []  # shapes not known: the decoder is checked by name and options only
    assert check_stage(online_stage()) == []


@pytest.mark.parametrize("stage,key,suggestion", [
    (extract_stage(crops=[64, 64]), "crops", "crop"),
    (train_stage(epoch=2), "epoch", "epochs"),
    (online_stage(batchsize=2), "batchsize", "batch_size"),
    (train_stage(colour="red"), "colour", None),
])
def test_an_unknown_key_is_one_line_naming_it(stage, key, suggestion):
    message = one_line(check_stage(stage, shapes=SHAPES))
    assert message.startswith(f"unknown key {key!r}")
    if suggestion:
        assert f"did you mean {suggestion!r}" in message
    assert "allowed keys: " in message


@pytest.mark.parametrize("kind", ["segment", "Extract", None])
def test_an_unknown_kind_is_a_one_line_user_error_naming_it(kind):
    with pytest.raises(UserError) as err:
        check_stage({"kind": kind, "out": "x"})
    message = str(err.value)
    assert f"unknown stage kind {kind!r}" in message and "\n" not in message
    assert all(k in message for k in KINDS)
    with pytest.raises(UserError, match="unknown stage kind"):
        stage_schema(kind)


def test_wrong_types_missing_keys_and_ranges_name_the_key():
    assert one_line(check_stage(extract_stage(views="2"))) == 'views = "2" should be an integer.'
    assert one_line(check_stage({k: v for k, v in extract_stage().items() if k != "out"})) == \
        "missing required key 'out'."
    assert "--views 0" in one_line(check_stage(extract_stage(views=0)))
    assert one_line(check_stage(extract_stage(dataset="nope"))).startswith("unknown dataset 'nope'")
    assert "'nope'" in one_line(check_stage(train_stage(decoder="nope"), shapes=SHAPES))
    assert "'streams'" in one_line(check_stage(train_stage(decoder="linear", streams=4), shapes=SHAPES))
    # Every problem of a stage at once, each on its own line.
    both = check_stage(extract_stage(crops=[1, 1], views="x"))
    assert len(both) == 2 and any("'crops'" in p for p in both) and any(p.startswith("views = ") for p in both)


def test_stage_schema_is_what_the_stage_accepts():
    extract = stage_schema("extract")
    assert {k for k, o in extract.items() if o.required} == {"dataset", "split", "out"}
    assert not extract["views"].required and extract["views"].default == 1
    assert {"crop", "encoder", "strides", "dataset_options"} <= set(extract)
    train = stage_schema("train")
    assert train["cache"].required and train["out"].required and "epochs" in train
    online = stage_schema("train", online=True)
    assert "cache" not in online and {"dataset", "encoder", "out"} <= set(online)
    for kind in KINDS:
        assert "kind" not in stage_schema(kind) and "progress" not in stage_schema(kind)


def test_run_stage_runs_a_tiny_extract_stage_and_resumes_it(tmp_path):
    stage = extract_stage(tmp_path / "s.zarr")
    assert check_stage(stage) == []
    first = run_stage(dict(stage), progress=False)
    assert first["store"] == str(tmp_path / "s.zarr") and first["views"] == 4 and first["written"] == 4
    assert first["views_per_second"] > 0
    store = FeatureStore.open(tmp_path / "s.zarr")
    assert store.completed().all() and store.spec.views_per_image == 2
    assert list(store.spec.feature_shapes) == ["s4", "s8", "s16", "s32"]
    assert run_stage(dict(stage), progress=False)["written"] == 0  # done: the same stage again has nothing to do
