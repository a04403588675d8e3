"""A recipe is checked whole before its first stage runs (and by --dry-run), and its relative paths
mean the same from any working directory."""
import os
from pathlib import Path

import pytest
from click.testing import CliRunner

from fusion_seg.cli import main
from fusion_seg.errors import UserError
from fusion_seg.pipeline.recipes import load_recipe, run_recipe
from pipeline_helpers import extract_synthetic

ROOT = Path(__file__).resolve().parents[2]

EXTRACT = """
[[stage]]
kind = "extract"
dataset = "synthetic"
split = "train"
dataset_options = { num_images = 2, size = [64, 96] }
views = 1
crop = [64, 64]
encoder = "resnet18"
random_init = true
strides = [4, 8, 16, 32]
loader_workers = 0
device = "cpu"
out = "w/train.zarr"
"""

TRAIN = """
[[stage]]
kind = "train"
cache = "w/train.zarr"
epochs = 1
batch_size = 2
workers = 0
loss = "ce"
device = "cpu"
out = "w/run"
"""


def recipe(tmp_path, *stages, name="r.toml", head=""):
    path = tmp_path / name
    path.write_text(head + "".join(stages))
    return path


def problems(path, **kw) -> list[str]:
    with pytest.raises(UserError) as err:
        run_recipe(path, echo=lambda s: None, progress=False, **kw)
    return str(err.value).splitlines()


def test_every_problem_is_reported_together_before_the_first_stage(tmp_path):
    """A good first stage, then one problem of each sort: the run refuses before extracting anything."""
    path = recipe(tmp_path, EXTRACT,
                  TRAIN.replace("epochs = 1", "epoch = 1").replace('batch_size = 2', 'batch_size = "2"'),
                  TRAIN.replace('loss = "ce"', 'decoder = "nope"\ncrop = [64]').replace("w/run", "w/run2"),
                  '[[stage]]\nkind = "evaluate"\ncheckpoint = "w/run/best.pt"\ndataset = "synthtic"\n',
                  '[[stage]]\nkind = "bake"\n',
                  TRAIN.replace('loss = "ce"', 'decoder = "linear"\nstreams = 5').replace("w/run", "w/run3"))
    lines = problems(path)
    text = "\n".join(lines)
    assert lines[0] == f"{path} has 8 problems (no stage was run):"
    assert all(line.startswith(f"{path}: stage") for line in lines[1:])  # each names the recipe and the stage
    assert "stage 2 (train): unknown key 'epoch' (did you mean 'epochs'?); allowed keys: " in text
    assert 'stage 2 (train): batch_size = "2" should be an integer.' in text
    assert "stage 3 (train): unknown decoder 'nope'; known decoders: " in text
    assert "stage 3 (train): crop = [64] should be a list of 2 integers." in text
    assert "stage 4 (evaluate): missing required key 'split'." in text
    assert "stage 4 (evaluate): unknown dataset 'synthtic'; known datasets: " in text
    assert "stage 5 has kind 'bake'; expected one of 'extract', 'train', 'evaluate', 'predict'." in text
    assert "stage 6 (train): decoder 'linear' has no option 'streams'" in text
    assert not (tmp_path / "w").exists()  # not even the first (valid) stage ran


def test_dry_run_runs_the_same_check(tmp_path):
    path = recipe(tmp_path, EXTRACT, TRAIN.replace("epochs = 1", "epochs = 1.5"))
    assert problems(path, dry_run=True) == problems(path)
    assert problems(path, dry_run=True) == [f"{path}: stage 2 (train): epochs = 1.5 should be an integer."]


def test_the_cli_prints_every_problem_and_exits_2(tmp_path):
    path = recipe(tmp_path, EXTRACT.replace("views = 1", "views = true"),
                  TRAIN.replace("epochs = 1", "epochs = 1\nlearning_rate = 0.1"))
    result = CliRunner().invoke(main, ["run", str(path), "--dry-run"])
    assert result.exit_code == 2
    assert "Traceback" not in result.output
    assert "stage 1 (extract): views = true should be an integer." in result.output
    assert "stage 2 (train): unknown key 'learning_rate'" in result.output


def test_undefined_variables_and_top_level_typos_are_collected_too(tmp_path):
    path = recipe(tmp_path, EXTRACT.replace('"w/train.zarr"', '"${work}/train.zarr"'),
                  TRAIN.replace("epochs = 1", "epochs = 0"), head="stages = 2\n")
    lines = problems(path, dry_run=True)
    text = "\n".join(lines)
    assert "unknown top-level key 'stages'" in text
    assert "stage 1: ${work} is used but not defined in [vars]" in text
    assert "stage 2 (train): cache" in text  # made by no stage (stage 1's out is unknown) and not on disk
    assert any("stage 2 (train): " in line and "epochs" in line for line in lines)  # TrainConfig's range check


def test_range_checks_of_the_library_surface_before_the_first_stage(tmp_path):
    """extract()'s and TrainConfig's own range checks run in the check, so they name a stage too."""
    path = recipe(tmp_path, EXTRACT.replace("views = 1", "views = 0"),
                  TRAIN.replace("batch_size = 2", "batch_size = 0"))
    lines = problems(path, dry_run=True)
    assert len(lines) == 3, lines
    assert lines[1].startswith(f"{path}: stage 1 (extract): ") and "views" in lines[1]
    assert lines[2].startswith(f"{path}: stage 2 (train): ") and "batch-size" in lines[2]


def test_references_between_stages(tmp_path):
    # A train stage's cache: made by no stage and not on disk.
    lines = problems(recipe(tmp_path, TRAIN), dry_run=True)
    assert lines == [f"{tmp_path / 'r.toml'}: stage 1 (train): cache {tmp_path / 'w' / 'train.zarr'} does not exist "
                     "and no earlier stage makes it; fix the path, or add an extract stage with this out before this "
                     "stage."]
    # An evaluate stage reading the checkpoint of a train stage that runs after it.
    evaluate = ('[[stage]]\nkind = "evaluate"\ncheckpoint = "w/run/best.pt"\ndataset = "synthetic"\n'
                'split = "val"\n')
    text = "\n".join(problems(recipe(tmp_path, EXTRACT, evaluate, TRAIN), dry_run=True))
    assert "stage 2 (evaluate): checkpoint" in text and "is made by stage 3, which runs after this one" in text
    # In order, it passes; and so does a checkpoint that exists on disk without a stage making it.
    run_recipe(recipe(tmp_path, EXTRACT, TRAIN, evaluate), dry_run=True, echo=lambda s: None)
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "best.pt").write_bytes(b"")
    run_recipe(recipe(tmp_path, evaluate.replace("w/run", "old")), dry_run=True, echo=lambda s: None)
    predict = '[[stage]]\nkind = "predict"\ncheckpoint = "old/best.pt"\ninput = "pics"\nout = "p"\n'
    assert "input " + str(tmp_path / "pics") + " does not exist" in "\n".join(
        problems(recipe(tmp_path, predict), dry_run=True))


def test_decoders_are_built_from_the_shapes_they_will_get(tmp_path):
    """A 5-stream reverse HRNet needs stride 2: refused from the extract stage's strides, and from a store on disk."""
    five = TRAIN.replace('loss = "ce"', 'loss = "ce"\nstreams = 5')
    text = "\n".join(problems(recipe(tmp_path, EXTRACT, five), dry_run=True))
    assert "stage 2 (train): " in text and "stride" in text and "5" in text
    extract_synthetic(tmp_path / "w" / "train.zarr", views=1, num_images=2)  # strides 4..32
    text = "\n".join(problems(recipe(tmp_path, five), dry_run=True))
    assert "stage 1 (train): " in text and "stride" in text
    run_recipe(recipe(tmp_path, TRAIN), dry_run=True, echo=lambda s: None)  # 4 streams: fine
    # The end-to-end HRNet baseline cannot train from a cache; online it can.
    text = "\n".join(problems(recipe(tmp_path, TRAIN.replace('loss = "ce"', 'decoder = "hrnet"')), dry_run=True))
    assert "end to end from images" in text
    online = ('[[stage]]\nkind = "train"\nonline = true\ndecoder = "hrnet"\ndataset = "synthetic"\nsplit = "train"\n'
              'crop = [64, 64]\nout = "w/online"\n')
    run_recipe(recipe(tmp_path, online), dry_run=True, echo=lambda s: None)
    text = "\n".join(problems(recipe(tmp_path, online.replace("online = true", "online = true\nviews = 2")),
                              dry_run=True))
    assert "unknown key 'views'" in text  # cached views do not exist online


def test_every_key_a_stage_accepts_is_one_its_function_takes():
    """The schema is read from the functions: every key reaches them (none is refused at run time)."""
    import inspect
    from dataclasses import fields

    from fusion_seg.extract.local import extract
    from fusion_seg.evaluation.evaluate import evaluate
    from fusion_seg.inference.predict import predict
    from fusion_seg import requests
    from fusion_seg.pipeline.schema import DECODER_KEYS, stage_schema, trainer_keys
    from fusion_seg.training.config import TrainConfig
    from fusion_seg.training.train import train_online

    # extract()'s plain arguments, and the options of the builders of its typed requests (fusion_seg/requests.py).
    arguments = set(inspect.signature(extract).parameters) - {"progress"}
    assert set(requests.EXTRACT_REQUESTS) | set(requests.EXTRACT_PLAIN) == arguments
    assert set(stage_schema("extract")) == (set(requests.EXTRACT_PLAIN)
                                            | set(requests.option_names(requests.EXTRACT_REQUESTS.values())))
    assert set(stage_schema("evaluate")) == set(inspect.signature(evaluate).parameters) - {"progress"}
    assert set(stage_schema("predict")) == (set(inspect.signature(predict).parameters) - {"progress", "inputs"}
                                            | {"input"})
    config = {f.name for f in fields(TrainConfig)}
    own = {"out", "online", "val_cache", "decoder_options", *DECODER_KEYS}
    assert set(stage_schema("train")) == config | own | {"cache"} | set(trainer_keys(online=False))
    online = set(stage_schema("train", online=True))
    assert online == ((config - {"crop", "views"}) | own | set(trainer_keys(online=True))
                      | set(requests.online_request_keys()))
    assert {"dataset", "root", "crop", "strides", "encoder"} <= set(requests.online_request_keys())
    assert set(requests.ONLINE_REQUESTS) <= set(inspect.signature(train_online).parameters)  # built, then passed


# --------------------------------------------------------------------------- relative paths
RELATIVE = """
[vars]
data = "data"
[[stage]]
kind = "extract"
dataset = "folder"
root = "${data}/images"
split = "all"
views = 1
augment = false
encoder = "resnet18"
random_init = true
out = "../cache/x.zarr"
[[stage]]
kind = "train"
cache = "../cache/x.zarr"
epochs = 1
out = "../runs/x"
[[stage]]
kind = "predict"
checkpoint = "../runs/x/best.pt"
input = "${data}/images"
out = "../runs/x/pred"
"""


def test_relative_paths_are_relative_to_the_recipe_folder_from_any_directory(tmp_path, monkeypatch):
    folder = tmp_path / "project" / "pipelines"
    (folder / "data" / "images").mkdir(parents=True)
    path = folder / "r.toml"
    path.write_text(RELATIVE)
    seen = []
    for cwd in (tmp_path, folder, tmp_path / "project"):
        monkeypatch.chdir(cwd)
        seen.append(load_recipe(os.path.relpath(path, cwd))["stages"])
    assert seen[0] == seen[1] == seen[2]
    extract, train, predict = seen[0]
    assert extract["root"] == str(folder / "data" / "images") == predict["input"]
    assert extract["out"] == str(tmp_path / "project" / "cache" / "x.zarr") == train["cache"]
    assert train["out"] == str(tmp_path / "project" / "runs" / "x")
    assert predict["checkpoint"] == str(tmp_path / "project" / "runs" / "x" / "best.pt")
    # The --dry-run listing is the same from anywhere too.
    listings = []
    for cwd in (tmp_path, folder):
        monkeypatch.chdir(cwd)
        lines = []
        run_recipe(path, dry_run=True, echo=lines.append)
        listings.append(lines)
    assert listings[0] == listings[1] and str(tmp_path / "project" / "runs" / "x" / "pred") in "\n".join(listings[0])


def test_a_relative_path_given_with_set_is_relative_to_the_current_directory(tmp_path, monkeypatch):
    folder = tmp_path / "pipelines"
    folder.mkdir()
    (tmp_path / "mine" / "images").mkdir(parents=True)
    path = folder / "r.toml"
    path.write_text(RELATIVE)
    monkeypatch.chdir(tmp_path)
    extract, _, predict = load_recipe(path, overrides={"data": "mine"})["stages"]
    assert extract["root"] == str(tmp_path / "mine" / "images") == predict["input"]
    assert extract["out"] == str(tmp_path / "cache" / "x.zarr")  # the recipe's own paths: still its folder's


def test_make_pipelines_writes_where_it_did(monkeypatch, tmp_path):
    """`make pipelines` runs pipelines/demo.toml from the repository: cache/ and runs/demo there, as before."""
    for cwd in (ROOT, tmp_path):
        monkeypatch.chdir(cwd)
        stages = load_recipe(ROOT / "pipelines" / "demo.toml")["stages"]
        assert stages[0]["out"] == str(ROOT / "cache" / "demo-train.zarr")
        assert stages[2]["out"] == str(ROOT / "runs" / "demo")
        assert stages[4]["input"] == str(ROOT / "pipelines" / "demo-images")
        assert stages[4]["out"] == str(ROOT / "runs" / "demo" / "predictions")
