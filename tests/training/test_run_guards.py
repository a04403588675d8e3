"""Issue 20: a run directory is written by one run, holds only runs, and is continued only with its own data.

- two ``train-decoder`` runs into one ``--out`` at once: the second is refused (a lock beside it);
- an ``--out`` that is a file, lies under one, or holds something that is not a run: refused before any work;
- ``--resume`` with another training or validation store (or the same path re-extracted): refused, naming it;
- ``--resume --lr`` of a finished run (which would stamp the new lr on the old model): refused;
- training data without a labelled pixel: one clear error, never "mean loss 0.0000" or "diverged";
- ``resume="auto"`` (recipes): another run in ``out`` is kept under a new name, and the run says so;
- the Python API refuses a ``dict`` or ``str`` where a TrainConfig or request goes.
"""
from __future__ import annotations

import json
import shutil
import subprocess

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from fusion_seg.checkpoint import load_checkpoint
from fusion_seg.cli import main
from fusion_seg.errors import CheckpointError, UserError
from fusion_seg.training.run_dir import RunDirectory
from fusion_seg.training.train import train_decoder, train_online
from mounts import cli, run_with_mounts
from pipeline_helpers import ENCODER, extract_synthetic, tiny_config

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    d = tmp_path_factory.mktemp("stores")
    extract_synthetic(d / "train.zarr", views=1, num_images=4)
    extract_synthetic(d / "more.zarr", views=1, num_images=6)
    extract_synthetic(d / "val.zarr", split="val", views=1, augment=False, num_images=2)
    return d


def train_cli(stores, out, *extra):
    return CliRunner().invoke(main, ["train-decoder", "--cache", str(stores / "train.zarr"), "--epochs", "1",
                                     "--batch-size", "2", "--workers", "0", "--device", "cpu", "--loss", "ce",
                                     "--out", str(out), *map(str, extra)])


# --------------------------------------------------------------------------- one run per directory
def test_a_second_run_into_the_same_out_is_refused_while_the_first_holds_it(stores, tmp_path):
    out = tmp_path / "run"
    with RunDirectory(out).claimed():
        second = subprocess.run(cli("train-decoder", "--cache", stores / "train.zarr", "--epochs", "1",
                                    "--batch-size", "2", "--workers", "0", "--device", "cpu", "--out", out),
                                capture_output=True, text=True)
        with pytest.raises(UserError, match="being trained into by another fusion-seg process"):
            with RunDirectory(out).claimed():  # in this process too
                pass
    assert second.returncode == 2, second.stderr
    assert "being trained into by another fusion-seg process" in second.stderr and "Traceback" not in second.stderr
    assert not (out / "last.pt").exists()
    assert train_cli(stores, out).exit_code == 0  # free again once the holder is done
    assert not (tmp_path / "run.lock").exists()


@pytest.mark.parametrize("content", [{"config.json": '{"model_type": "bert"}'}, {"curves.png": "png"},
                                     {"notes.txt": "mine", "data": None}])
def test_a_folder_that_holds_something_else_is_refused(stores, tmp_path, content):
    out = tmp_path / "folder"
    out.mkdir()
    for name, text in content.items():
        (out / name).mkdir() if text is None else (out / name).write_text(text)
    before = sorted(p.name for p in out.iterdir())
    result = train_cli(stores, out)
    assert result.exit_code == 2 and "not a fusion-seg run" in result.output, result.output
    assert sorted(p.name for p in out.iterdir()) == before  # nothing written into it
    assert (out / next(iter(content))).exists()


def test_an_out_that_is_a_file_or_under_one_is_refused(stores, tmp_path):
    (tmp_path / "file").write_text("x")
    for out, message in ((tmp_path / "file", "is a file, not a folder"),
                         (tmp_path / "file" / "run", "lies under")):
        result = train_cli(stores, out)
        assert result.exit_code == 2 and message in result.output, result.output
        assert "Traceback" not in result.output
    assert (tmp_path / "file").read_text() == "x" and not (tmp_path / "file.lock").exists()


def test_a_read_only_out_is_one_line_naming_the_lock_file(stores, tmp_path):
    locked = tmp_path / "ro"
    locked.mkdir()
    done = run_with_mounts(cli("train-decoder", "--cache", stores / "train.zarr", "--epochs", "1", "--batch-size",
                               "2", "--workers", "0", "--device", "cpu", "--out", locked / "run"), read_only=[locked])
    assert done.returncode == 2, done.stderr
    assert "read-only" in done.stderr and str(locked / "run.lock") in done.stderr
    assert "Traceback" not in done.stderr and len(done.stderr.strip().splitlines()) == 1


# --------------------------------------------------------------------------- resume only the same run
def test_resume_with_another_training_store_is_refused(stores, tmp_path):
    out = tmp_path / "run"
    train_decoder(str(stores / "train.zarr"), out, tiny_config(epochs=2), progress=False)
    with pytest.raises(CheckpointError, match=r"training store .*train\.zarr vs .*more\.zarr"):
        train_decoder(str(stores / "more.zarr"), out, tiny_config(epochs=3), resume=True, progress=False)


def test_resume_with_the_same_path_re_extracted_is_refused(stores, tmp_path):
    store, out = tmp_path / "train.zarr", tmp_path / "run"
    shutil.copytree(stores / "train.zarr", store)
    train_decoder(str(store), out, tiny_config(epochs=2), progress=False)
    shutil.rmtree(store)
    shutil.copytree(stores / "more.zarr", store)  # re-extracted at the same path, with more images
    with pytest.raises(CheckpointError, match=r"train\.zarr \(its content changed since the checkpoint"):
        train_decoder(str(store), out, tiny_config(epochs=3), resume=True, progress=False)


def test_resume_with_another_validation_store_is_refused(stores, tmp_path):
    out = tmp_path / "run"
    train_decoder(str(stores / "train.zarr"), out, tiny_config(epochs=2), progress=False)
    with pytest.raises(CheckpointError, match="validation store none vs"):
        train_decoder(str(stores / "train.zarr"), out, tiny_config(epochs=3), val_cache=str(stores / "val.zarr"),
                      resume=True, progress=False)


def test_resume_of_a_finished_run_with_another_lr_is_refused_and_with_its_own_trains_nothing(stores, tmp_path):
    out = tmp_path / "run"
    assert train_cli(stores, out).exit_code == 0
    before = load_checkpoint(out / "last.pt")
    result = train_cli(stores, out, "--resume", "--lr", "0.05")
    assert result.exit_code == 2 and "that run is finished" in result.output, result.output
    assert load_checkpoint(out / "last.pt")["train"]["lr"] == before["train"]["lr"]  # no new lr on the old model
    again = train_cli(stores, out, "--resume")
    assert again.exit_code == 0 and "already finished (1 epochs, 2 steps), nothing to train" in again.output


def test_auto_keeps_a_run_of_other_settings_and_says_so(stores, tmp_path, capsys):
    out = tmp_path / "run"
    train_decoder(str(stores / "train.zarr"), out, tiny_config(epochs=1), progress=False)
    result = train_decoder(str(stores / "train.zarr"), out, tiny_config(epochs=1, lr=0.02), resume="auto")
    kept = tmp_path / "run.previous-1"
    assert result.previous_run == str(kept) and len(result.losses) == 2
    assert load_checkpoint(kept / "last.pt")["train"]["lr"] == 0.01
    err = capsys.readouterr().err
    assert f"held a run with other settings or data (lr 0.01 vs 0.02); kept it as {kept}" in err
    same = train_decoder(str(stores / "train.zarr"), out, tiny_config(epochs=1, lr=0.02), resume="auto",
                         progress=False)
    assert same.previous_run is None and same.losses == [] and not (tmp_path / "run.previous-2").exists()


# --------------------------------------------------------------------------- nothing to learn
def folder_dataset(root, masks):
    """A folder dataset (classes.txt, images/, masks/) of 64x96 images with the given masks."""
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    (root / "classes.txt").write_text("background\nthing\n")
    rng = np.random.default_rng(0)
    for i, mask in enumerate(masks):
        Image.fromarray(rng.integers(0, 255, (64, 96, 3), dtype=np.uint8)).save(root / "images" / f"{i}.png")
        Image.fromarray(mask).save(root / "masks" / f"{i}.png")
    return root


def unlabelled_store(tmp_path, name="unlabelled"):
    from fusion_seg.extract.local import extract
    from fusion_seg.requests import extract_arguments

    root = folder_dataset(tmp_path / name, [np.full((64, 96), 255, np.uint8)] * 4)
    out = tmp_path / f"{name}.zarr"
    extract(**extract_arguments(dict(dataset="folder", root=root, split="all", out=out, views=1, crop=(64, 64),
                                     encoder=ENCODER, random_init=True, strides=(4, 8, 16, 32),
                                     loader_workers=0)), progress=False)
    return out


@pytest.mark.parametrize("loss", ["ce", "ohem"])
def test_a_training_store_without_a_labelled_pixel_is_refused_before_training(tmp_path, loss):
    store = unlabelled_store(tmp_path)
    result = CliRunner().invoke(main, ["train-decoder", "--cache", str(store), "--epochs", "1", "--batch-size", "2",
                                       "--workers", "0", "--device", "cpu", "--loss", loss,
                                       "--out", str(tmp_path / "run")])
    assert result.exit_code == 2, result.output
    assert "holds no labelled pixel" in result.output and "ignore index 255" in result.output
    assert "diverged" not in result.output and "Traceback" not in result.output
    assert not (tmp_path / "run").exists()


def test_a_validation_store_without_a_labelled_pixel_is_refused(stores, tmp_path):
    val = unlabelled_store(tmp_path, "val")
    with pytest.raises(UserError, match=r"--val-cache .* holds no labelled pixel"):
        train_decoder(str(stores / "train.zarr"), tmp_path / "run", tiny_config(epochs=1), val_cache=str(val),
                      progress=False)
    assert not (tmp_path / "run").exists()


def test_online_training_without_a_labelled_pixel_stops_after_its_first_epoch(tmp_path):
    from fusion_seg.requests import DatasetRef
    from fusion_seg.requests import Augment
    from fusion_seg.requests import EncoderSpec

    root = folder_dataset(tmp_path / "data", [np.full((64, 96), 255, np.uint8)] * 4)
    with pytest.raises(UserError) as err:
        train_online(tmp_path / "run", tiny_config(epochs=3, loss="ohem"), dataset=DatasetRef("folder", "all", str(root)),
                     encoder=EncoderSpec(ENCODER, random_init=True, strides=(4, 8, 16, 32)),
                     augment=Augment(crop=(64, 64)), progress=False)
    assert "epoch 1 saw no labelled pixel" in str(err.value) and "diverged" not in str(err.value)
    assert not (tmp_path / "run" / "last.pt").exists()


def test_a_batch_without_a_labelled_pixel_has_loss_zero_not_nan():
    import torch

    from fusion_seg.training.losses import build_loss

    logits = torch.randn(2, 3, 4, 4, requires_grad=True)
    target = torch.full((2, 4, 4), 255, dtype=torch.long)
    for name in ("ce", "ohem"):
        loss = build_loss(name, 255)(logits, target)
        loss.backward()
        assert float(loss) == 0.0 and torch.isfinite(logits.grad).all()


# --------------------------------------------------------------------------- the Python API's types
def test_the_api_refuses_a_dict_or_str_where_a_config_or_request_goes(stores, tmp_path):
    with pytest.raises(UserError, match=r"must be a TrainConfig, not dict .*fusion_seg\.TrainConfig\(\*\*that_dict\)"):
        train_decoder(str(stores / "train.zarr"), tmp_path / "run", {"epochs": 1}, progress=False)
    with pytest.raises(UserError, match="train_online's dataset must be a DatasetRef, not str"):
        train_online(tmp_path / "run", tiny_config(), dataset="synthetic", progress=False)
    with pytest.raises(UserError, match="resume='yes'"):
        train_decoder(str(stores / "train.zarr"), tmp_path / "run", tiny_config(), resume="yes", progress=False)
    assert not (tmp_path / "run").exists()


def test_decoder_options_of_the_wrong_type_are_refused_by_train_config():
    with pytest.raises(UserError, match='widths = "abc" should be a list of integers'):
        tiny_config(decoder_config={"widths": "abc"})
    with pytest.raises(UserError, match=r"has no option\(s\) width \(did you mean widths\?\)"):
        tiny_config(decoder_config={"width": 128})
    with pytest.raises(UserError, match="--decoder 'nope' is not a decoder"):
        tiny_config(decoder="nope")


def test_train_config_is_a_schedule_and_run_settings_and_a_resume_may_change_only_the_settings(stores, tmp_path):
    from dataclasses import asdict, fields

    from fusion_seg.training.config import RunSettings, Schedule, TrainConfig

    names = [f.name for f in fields(TrainConfig)]
    assert names == [f.name for f in fields(Schedule)] + [f.name for f in fields(RunSettings)]
    cfg = tiny_config(epochs=1)
    assert TrainConfig.of(cfg.schedule(), cfg.run_settings()) == cfg
    assert TrainConfig.of(cfg.schedule()).run_settings() == RunSettings()
    with pytest.raises(UserError, match="--epochs 0"):
        Schedule(epochs=0)
    with pytest.raises(UserError, match="--cache-mode 'x'"):
        RunSettings(cache_mode="x")
    with pytest.raises(UserError, match='RunSettings: workers="2" should be an integer'):
        RunSettings(workers="2")
    out = tmp_path / "run"
    train_decoder(str(stores / "train.zarr"), out, cfg, progress=False)
    record = load_checkpoint(out / "last.pt")["train"]
    assert record == asdict(cfg)  # one flat record, as before the split: older checkpoints read the same
    settings = TrainConfig.of(cfg.schedule(), RunSettings(workers=0, log_every=3, cache_mode="stream"))
    train_decoder(str(stores / "train.zarr"), out, settings, resume=True, progress=False)  # finished: nothing to do
    longer = TrainConfig.of(Schedule(**{**asdict(cfg.schedule()), "batch_size": cfg.batch_size + 1}), cfg.run_settings())
    with pytest.raises(CheckpointError, match="batch_size"):
        train_decoder(str(stores / "train.zarr"), out, longer, resume=True, progress=False)


def test_the_config_json_of_a_run_is_recognised_as_a_run(stores, tmp_path):
    out = tmp_path / "run"
    train_decoder(str(stores / "train.zarr"), out, tiny_config(epochs=1), progress=False)
    assert RunDirectory(out).holds_run() and json.loads((out / "config.json").read_text())["data"]["source"][
        "cache_id"]
    result = train_cli(stores, out)  # a run is there: refused without --resume, as before
    assert result.exit_code == 2 and "already holds a run" in result.output


def test_online_training_checks_its_view_requests_as_extract_does(tmp_path):
    """The command line refuses --scale-range 2 0.5; train_online used to draw views from the reversed range."""
    from fusion_seg.requests import DatasetRef
    from fusion_seg.requests import Augment, Resize
    from fusion_seg.requests import EncoderSpec

    for bad, option in ((dict(augment=Augment(scale_range=(2.0, 0.5))), "--scale-range"),
                        (dict(augment=Augment(crop=(0, 64))), "--crop"),
                        (dict(resize=Resize(short_side=0)), "--short-side"),
                        (dict(encoder=EncoderSpec(ENCODER, random_init=True, strides=(8, 4))), "--strides")):
        with pytest.raises(UserError, match=option):
            train_online(tmp_path / "run", tiny_config(), dataset=DatasetRef("synthetic", "train"), **bad,
                         progress=False)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("out, message", [("model.pt", "names a .pt file"), ("train.zarr/run", "inside the Zarr store")])
def test_a_run_folder_named_as_a_file_or_inside_a_store_is_refused(stores, tmp_path, out, message):
    shutil.copytree(stores / "train.zarr", tmp_path / "train.zarr")
    result = train_cli(stores, tmp_path / out)
    assert result.exit_code == 2 and message in result.output, result.output
    assert not (tmp_path / out).exists()


def test_resume_after_the_init_checkpoint_was_retrained_is_refused(stores, tmp_path):
    first = tmp_path / "first"
    train_decoder(str(stores / "train.zarr"), first, tiny_config(epochs=1), progress=False)
    init = str(first / "best.pt")
    train_decoder(str(stores / "train.zarr"), tmp_path / "run", tiny_config(epochs=2, init=init), progress=False)
    shutil.rmtree(first)
    train_decoder(str(stores / "train.zarr"), first, tiny_config(epochs=1, seed=1), progress=False)  # retrained
    with pytest.raises(CheckpointError, match="the checkpoint the run started from changed since"):
        train_decoder(str(stores / "train.zarr"), tmp_path / "run", tiny_config(epochs=2, init=init), resume=True,
                      progress=False)
