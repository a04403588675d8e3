"""Issue 20: editing a recipe and running it again is how users work; "skipped" and "done" must be true.

A stage is skipped only when its settings and the identity of its inputs are unchanged (a store's
content, a checkpoint's hash, an image folder's listing); a train stage continues the run in its
``out`` only when that run has the same settings and data, else keeps it under a new name and trains
afresh. Variables that refer to themselves, option values of the wrong type given with ``--set``, and
a predict stage that would write among its own input images are refused by ``--dry-run``.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from fusion_seg.checkpoint import load_checkpoint
from fusion_seg.errors import UserError
from fusion_seg.pipeline.recipes import run_recipe

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py

DEMO_IMAGES = Path(__file__).parents[2] / "pipelines" / "demo-images"

RECIPE = """
[vars]
work = "{work}"
images = "{images}"
lr = 0.01
num_images = 4

[[stage]]
kind = "extract"
dataset = "synthetic"
split = "train"
dataset_options = {{ num_images = "${{num_images}}", size = [64, 96] }}
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
lr = "${{lr}}"
workers = 0
loss = "ce"
device = "cpu"
out = "${{work}}/run"

[[stage]]
kind = "predict"
checkpoint = "${{work}}/run/best.pt"
input = "${{images}}"
device = "cpu"
out = "${{work}}/predictions"
"""


@pytest.fixture
def recipe(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    for name in ("synthetic-test-0.png", "synthetic-test-1.png"):
        shutil.copy(DEMO_IMAGES / name, images / name)
    path = tmp_path / "r.toml"
    path.write_text(RECIPE.format(work=tmp_path / "w", images=images))
    return path


def run(path, lines=None, **overrides):
    out = lines if lines is not None else []
    return run_recipe(path, overrides={k: str(v) for k, v in overrides.items()}, echo=out.append, progress=False)


def statuses(results) -> list[str]:
    return [r["status"] for r in results]


def test_an_unchanged_recipe_skips_its_stages(recipe):
    run(recipe)
    lines = []
    assert statuses(run(recipe, lines)) == ["ran", "skipped", "skipped"]
    assert sum("up to date (same settings and inputs), skipped" in line for line in lines) == 2


def test_a_train_stage_reruns_when_its_store_was_extracted_again_with_more_images(recipe, tmp_path):
    run(recipe)
    shutil.rmtree(tmp_path / "w" / "train.zarr")  # the user re-extracts the training store, with more images
    lines = []
    results = run(recipe, lines, num_images=6)
    assert statuses(results) == ["ran", "ran", "ran"]  # the train stage's settings are the same, its input is not
    assert any("train" in line and "cache" in line and "changed since its last run" in line for line in lines)
    train = results[1]["summary"]
    assert train["steps_this_run"] == 3  # 6 images / batch 2: trained again, not "resumed" into 0 steps
    assert results[1]["summary"]["previous_run_kept_as"] == str(tmp_path / "w" / "run.previous-1")
    assert (tmp_path / "w" / "run.previous-1" / "best.pt").is_file()  # the earlier run is kept, not overwritten
    assert load_checkpoint(tmp_path / "w" / "run" / "last.pt")["data"]["dataset"]["len"] == 6


def test_a_changed_lr_retrains_instead_of_resuming_the_finished_run(recipe, tmp_path):
    run(recipe)
    first = load_checkpoint(tmp_path / "w" / "run" / "best.pt")
    lines = []
    results = run(recipe, lines, lr=0.02)
    assert statuses(results) == ["ran", "ran", "ran"]
    assert results[1]["summary"]["steps_this_run"] == 2  # a new run of 2 steps, not 0 steps of the old one
    assert results[1]["summary"]["previous_run_kept_as"] == str(tmp_path / "w" / "run.previous-1")
    assert any("train" in line and "settings (lr) changed since its last run" in line for line in lines)
    new = load_checkpoint(tmp_path / "w" / "run" / "best.pt")
    assert new["train"]["lr"] == 0.02 and not new.get("lr_changes")
    kept = load_checkpoint(tmp_path / "w" / "run.previous-1" / "best.pt")
    assert kept["train"]["lr"] == 0.01 and kept["model"].keys() == first["model"].keys()


def test_an_interrupted_run_with_the_same_settings_is_continued(recipe, tmp_path, monkeypatch):
    from pipeline_helpers import raise_after_checkpoint

    recipe.write_text(recipe.read_text().replace("epochs = 1", "epochs = 2"))
    raise_after_checkpoint(monkeypatch, epoch=1, exc=KeyboardInterrupt)
    with pytest.raises(KeyboardInterrupt):
        run(recipe)
    monkeypatch.undo()
    results = run(recipe)
    assert results[1]["summary"]["steps_this_run"] == 2 and results[1]["summary"]["steps"] == 4  # epoch 2 only
    assert not (tmp_path / "w" / "run.previous-1").exists()


def test_a_predict_stage_reruns_when_an_input_image_is_added_or_replaced(recipe, tmp_path):
    run(recipe)
    images, predictions = tmp_path / "images", tmp_path / "w" / "predictions"
    shutil.copy(DEMO_IMAGES / "synthetic-test-2.png", images / "synthetic-test-2.png")  # added
    lines = []
    assert statuses(run(recipe, lines)) == ["ran", "skipped", "ran"]
    assert any("input" in line and "changed since its last run" in line for line in lines)
    assert (predictions / "synthetic-test-2.png").is_file()
    before = (predictions / "synthetic-test-0.png").stat().st_mtime_ns
    shutil.copy(DEMO_IMAGES / "synthetic-test-3.png", images / "synthetic-test-0.png")  # replaced in place
    os.utime(images / "synthetic-test-0.png", ns=(before + 10**9, before + 10**9))
    assert statuses(run(recipe)) == ["ran", "skipped", "ran"]
    assert (predictions / "synthetic-test-0.png").stat().st_mtime_ns != before


def test_a_predict_stage_whose_out_is_its_input_folder_is_refused_by_dry_run(recipe, tmp_path):
    recipe.write_text(recipe.read_text().replace('out = "${work}/predictions"', 'out = "${images}"'))
    with pytest.raises(UserError, match="would overwrite the input image"):  # the results of a.png: a.png
        run_recipe(recipe, dry_run=True, echo=lambda s: None)
    assert not (tmp_path / "w").exists()


@pytest.mark.parametrize("variables, cycle", [
    ('a = "${a}"', "${a} -> ${a}"),
    ('a = "${b}/x"\nb = "${a}"', "${a} -> ${b} -> ${a}"),
    ('a = "${b}"\nb = "${c}"\nc = "${a}/runs"', "${a} -> ${b} -> ${c} -> ${a}"),
])
def test_a_variable_that_refers_back_to_itself_is_refused(tmp_path, variables, cycle):
    path = tmp_path / "cyc.toml"
    # out is never checked for existence: before, the literal "${a}" went into the path and --dry-run passed
    path.write_text(f'[vars]\n{variables}\n[[stage]]\nkind = "extract"\ndataset = "synthetic"\nsplit = "train"\n'
                    'random_init = true\nencoder = "resnet18"\nout = "${a}/store.zarr"\n')
    with pytest.raises(UserError) as err:
        run_recipe(path, dry_run=True, echo=lambda s: None)
    assert cycle in str(err.value) and "refers back to itself" in str(err.value)


def test_variables_that_use_variables_are_resolved(tmp_path):
    path = tmp_path / "r.toml"
    path.write_text('[vars]\nroot = "data"\nruns = "${root}/runs"\nrun = "${runs}/a"\n[[stage]]\nkind = "extract"\n'
                    'dataset = "synthetic"\nsplit = "train"\nrandom_init = true\nencoder = "resnet18"\n'
                    'out = "${run}/s.zarr"\n')
    lines = []
    run_recipe(path, dry_run=True, echo=lines.append)
    assert f"extract -> {tmp_path / 'data' / 'runs' / 'a' / 's.zarr'}" in lines[0]


@pytest.mark.parametrize("value, message", [("abc", 'num_images = "abc" should be an integer'),
                                            ("1.5", "num_images = 1.5 should be an integer")])
def test_set_values_of_the_wrong_type_are_caught_by_dry_run(recipe, tmp_path, value, message):
    with pytest.raises(UserError, match=message):
        run_recipe(recipe, overrides={"num_images": value}, dry_run=True, echo=lambda s: None)
    assert not (tmp_path / "w").exists()


@pytest.mark.parametrize("reference", ["${ work }", "${work", "${1work}"])
def test_a_malformed_variable_reference_is_refused_not_left_in_a_path(tmp_path, reference):
    path = tmp_path / "r.toml"
    path.write_text(f'[vars]\nwork = "w"\n[[stage]]\nkind = "extract"\ndataset = "synthetic"\nsplit = "train"\n'
                    f'random_init = true\nencoder = "resnet18"\nout = "{reference}/s.zarr"\n')
    with pytest.raises(UserError, match="is no variable reference"):
        run_recipe(path, dry_run=True, echo=lambda s: None)


def test_a_stamp_that_cannot_be_written_says_the_stage_finished(recipe, tmp_path, monkeypatch):
    import errno

    import fusion_seg.pipeline.recipes

    def full(path, obj, **kw):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(fusion_seg.pipeline.recipes, "write_json_atomic", full)
    with pytest.raises(UserError) as err:
        run(recipe)
    message = str(err.value)
    assert "cannot write the stage's stamp" in message and "the disk is full" in message
    assert "The stage itself finished; a re-run repeats it." in message and "\n" not in message
