import json
from pathlib import Path

import pytest

from fusion_seg.checkpoint import load_checkpoint
from fusion_seg.errors import UserError
from fusion_seg.pipeline.recipes import load_recipe, run_recipe

RECIPE = """
name = "tiny"
[vars]
work = "{work}"
images = "4"

[[stage]]
kind = "extract"
dataset = "synthetic"
split = "train"
dataset_options = {{ num_images = 4, size = [64, 96] }}
views = 1
crop = [64, 64]
encoder = "resnet18"
random_init = true
strides = [4, 8, 16, 32]
loader_workers = 0
device = "cpu"
out = "${{work}}/train.zarr"

[[stage]]
kind = "train"
cache = "${{work}}/train.zarr"
epochs = 1
batch_size = 2
workers = 0
loss = "ce"
device = "cpu"
out = "${{work}}/run"

[[stage]]
kind = "evaluate"
checkpoint = "${{work}}/run/best.pt"
dataset = "synthetic"
dataset_options = {{ num_images = 2, size = [64, 96] }}
split = "val"
device = "cpu"
out = "${{work}}/eval"
"""


def write(tmp_path, text=RECIPE):
    path = tmp_path / "r.toml"
    path.write_text(text.format(work=tmp_path / "w"))
    return path


def test_dry_run_prints_resolved_stages(tmp_path):
    lines = []
    run_recipe(write(tmp_path), overrides={"work": "/elsewhere"}, dry_run=True, echo=lines.append)
    text = "\n".join(lines)
    assert "[1/3] extract -> /elsewhere/train.zarr" in text
    assert 'cache = "/elsewhere/train.zarr"' in text
    assert not (tmp_path / "w").exists()


def test_run_then_skip(tmp_path):
    path = write(tmp_path)
    results = run_recipe(path, echo=lambda s: None, progress=False)
    assert [r["status"] for r in results] == ["ran", "ran", "ran"]
    assert json.loads((tmp_path / "w" / "eval" / "metrics.json").read_text())["images"] == 2
    again = run_recipe(path, echo=lambda s: None, progress=False)
    assert again[0]["summary"]["written"] == 0  # extraction resumed a complete store: nothing to do
    assert [r["status"] for r in again[1:]] == ["skipped", "skipped"]


def test_recipe_errors(tmp_path):
    with pytest.raises(UserError, match="no variable"):
        load_recipe(write(tmp_path), overrides={"nope": "1"})
    bad = tmp_path / "bad.toml"
    bad.write_text('[[stage]]\nkind = "bake"\n')
    with pytest.raises(UserError, match="bake"):
        load_recipe(bad)
    bad.write_text('[[stage]]\nkind = "extract"\nout = "${missing}"\n')
    with pytest.raises(UserError, match="missing"):
        load_recipe(bad)
    bad.write_text("not = = toml")
    with pytest.raises(UserError, match="not valid TOML"):
        load_recipe(bad)


DATA_VARS = ("root", "coco", "voc", "sbd", "mapillary", "cityscapes", "camvid")  # dataset folders in the recipes


def test_shipped_recipes_dry_run(tmp_path):
    """Every shipped recipe passes the whole check (decoders built, keys and types right) given its data folders."""
    recipes = sorted(Path(__file__).parents[2].glob("pipelines/*.toml"))
    assert {r.stem for r in recipes} >= {"demo", "camvid", "cityscapes", "voc", "mapillary_to_cityscapes",
                                         "mapillary_to_camvid", "coco_to_voc"}
    for recipe in recipes:
        variables = load_recipe(recipe, validate=False)["vars"]
        data = {k: str(tmp_path) for k in DATA_VARS if k in variables}
        lines = []
        run_recipe(recipe, overrides=data, dry_run=True, echo=lines.append)
        assert lines and "${" not in "\n".join(lines), recipe


def test_dry_run_reports_missing_data_folders(tmp_path):
    recipe = Path(__file__).parents[2] / "pipelines" / "cityscapes.toml"
    with pytest.raises(UserError) as err:
        run_recipe(recipe, overrides={"root": str(tmp_path / "nowhere")}, dry_run=True, echo=lambda s: None)
    assert str(err.value).count("\n") == 0  # one problem, in the three stages that read the dataset
    assert "stages 1 (extract), 2 (extract), 4 (evaluate): root" in str(err.value)
    assert "--set root=" in str(err.value)


def test_typed_variables_and_epoch_scale(tmp_path):
    path = tmp_path / "r.toml"
    path.write_text('[vars]\nepochs = 484\nflag = false\nroot = "/d"\n'
                    '[[stage]]\nkind = "extract"\ndataset = "synthetic"\nsplit = "train"\nrandom_init = "${flag}"\n'
                    'out = "${root}/c.zarr"\n'
                    '[[stage]]\nkind = "train"\nepochs = "${epochs}"\ncache = "${root}/c.zarr"\nout = "r"\n')
    extract, train = load_recipe(path, overrides={"flag": "true"})["stages"]
    assert train["epochs"] == 484 and extract["random_init"] is True and train["cache"] == "/d/c.zarr"
    assert train["out"] == str(tmp_path / "r")  # relative to the recipe's folder
    lines = []
    run_recipe(path, dry_run=True, epoch_scale=0.1, echo=lines.append)
    assert "epochs = 48" in "\n".join(lines)


def test_online_train_stage(tmp_path):
    path = tmp_path / "online.toml"
    path.write_text(f"""
[[stage]]
kind = "train"
online = true
dataset = "synthetic"
split = "train"
dataset_options = {{ num_images = 2, size = [64, 96] }}
crop = [64, 64]
encoder = "resnet18"
random_init = true
strides = [4, 8, 16, 32]
epochs = 1
batch_size = 2
workers = 0
loss = "ce"
device = "cpu"
out = "{tmp_path / 'run'}"
""")
    results = run_recipe(path, echo=lambda s: None, progress=False)
    assert results[0]["summary"]["steps"] == 1
    ckpt = load_checkpoint(tmp_path / "run" / "last.pt")
    assert ckpt["data"]["source"]["online"] is True and ckpt["data"]["augment"]["crop"] == [64, 64]
