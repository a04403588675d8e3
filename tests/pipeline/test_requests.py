"""Issue 13: the typed requests (dataset, encoder, views, store format, run) are built in one place from option
values, so the command line and a recipe stage with the same values make the same requests; and what --crop means
(a feature-space crop from a cache, the augmentation crop online) is decided there, once."""
from __future__ import annotations

import functools
import inspect
from types import SimpleNamespace

import pytest

from fusion_seg.errors import UserError
from click.testing import CliRunner

from fusion_seg.cli import main
from fusion_seg.requests import Augment, DatasetRef, EncoderSpec, ExtractRun, Resize, StoreFormat
from fusion_seg.extract.local import ExtractResult, extract
from fusion_seg import requests
from fusion_seg.pipeline.stages import run_stage


@pytest.fixture
def calls(monkeypatch):
    """extract(), train_online() and train_decoder() replaced by recorders of their arguments (nothing runs)."""
    import fusion_seg.extract.local
    import fusion_seg.training.train

    seen: dict[str, list] = {"extract": [], "train_online": [], "train_decoder": []}
    trained = SimpleNamespace(run_dir="r", epochs=1, steps=0, seconds=0.0, best_miou=None, losses=[],
                              previous_run=None, stopped_early=None)

    def record(module, name, result):
        @functools.wraps(getattr(module, name))  # the same signature: the recipe runner reads it
        def fake(*args, **kwargs):
            seen[name].append((args, kwargs))
            return result
        monkeypatch.setattr(module, name, fake)

    record(fusion_seg.extract.local, "extract", ExtractResult("s", 0, 0, 0.0))
    record(fusion_seg.training.train, "train_online", trained)
    record(fusion_seg.training.train, "train_decoder", trained)
    return seen


def effective(arguments: dict) -> dict:
    """extract()'s arguments with its defaults for those left out."""
    bound = inspect.signature(extract).bind(**arguments)
    bound.apply_defaults()
    return dict(bound.arguments)


def cli(*args):
    result = CliRunner().invoke(main, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    return result.output


EXTRACT_CLI = ["extract", "--dataset", "folder", "--root", "data", "--split", "all", "--dataset-opt", "limit=3",
               "--views", "2", "--crop", "64x96", "--scale-range", "0.75", "1.5", "--no-flip", "--short-side", "100",
               "--encoder", "resnet18", "--random-init", "--seed", "7", "--strides", "4,8", "--device", "cpu",
               "--dtype", "uint8", "--codec", "lz4", "--batch-size", "3", "--loader-workers", "0",
               "--dask-workers", "2", "--skip-bad", "--repair", "--out", "s.zarr"]
EXTRACT_STAGE = dict(kind="extract", dataset="folder", root="data", split="all", dataset_options={"limit": 3},
                     views=2, crop=[64, 96], scale_range=[0.75, 1.5], flip=False, short_side=100, encoder="resnet18",
                     random_init=True, seed=7, strides=[4, 8], device="cpu", dtype="uint8", codec="lz4",
                     batch_size=3, loader_workers=0, workers=2, skip_bad=True, repair=True, out="s.zarr")


def test_the_command_line_and_a_recipe_stage_make_the_same_extract_request(calls):
    cli(*EXTRACT_CLI)
    run_stage(EXTRACT_STAGE, progress=False)
    (_, from_cli), (_, from_stage) = calls["extract"]
    assert from_stage == {**from_cli, "progress": False}
    assert from_cli == dict(
        out="s.zarr", views=2, repair=True, skip_bad=True,
        dataset=DatasetRef("folder", "all", root="data", options={"limit": 3}),
        encoder=EncoderSpec("resnet18", random_init=True, seed=7, strides=(4, 8)),
        augment=Augment(crop=(64, 96), scale_range=(0.75, 1.5), flip=False, seed=7),
        resize=Resize(short_side=100),
        storage=StoreFormat(dtype="uint8", codec="lz4"),
        run=ExtractRun(device="cpu", batch_size=3, loader_workers=0, dask_workers=2))


def test_extract_defaults_are_the_same_from_both(calls):
    cli("extract", "--dataset", "synthetic", "--split", "train", "--out", "s.zarr")
    run_stage(dict(kind="extract", dataset="synthetic", split="train", out="s.zarr"), progress=False)
    (_, from_cli), (_, from_stage) = calls["extract"]
    assert effective(from_stage) == effective({**from_cli, "progress": False})
    assert from_cli["augment"] == Augment() and from_cli["encoder"] == EncoderSpec()
    assert from_cli["run"] == ExtractRun() and from_cli["storage"] == StoreFormat()
    # --no-augment: the whole image, without a crop or a flip (as the store records it).
    cli("extract", "--dataset", "synthetic", "--split", "train", "--no-augment", "--out", "s.zarr")
    run_stage(dict(kind="extract", dataset="synthetic", split="train", augment=False, out="s.zarr"), progress=False)
    (_, from_cli), (_, from_stage) = calls["extract"][2:]
    assert from_cli["augment"] == from_stage["augment"] == Augment(enabled=False, crop=None, flip=False)
    assert from_cli["augment"].to_json() == {"enabled": False, "crop": None, "scale_range": [0.5, 2.0],
                                             "flip": False, "seed": 0}


ONLINE_CLI = ["train-decoder", "--online", "--dataset", "synthetic", "--split", "train", "--dataset-opt",
              "num_images=2", "--crop", "48x48", "--size", "64x96", "--encoder", "resnet18", "--random-init",
              "--seed", "3", "--strides", "4,8,16,32", "--epochs", "1", "--batch-size", "2", "--workers", "0",
              "--device", "cpu", "--loss", "ce", "--allow-val-on-train", "--out", "run"]
ONLINE_STAGE = dict(kind="train", online=True, dataset="synthetic", split="train", dataset_options={"num_images": 2},
                    crop=[48, 48], size=[64, 96], encoder="resnet18", random_init=True, seed=3, strides=[4, 8, 16, 32],
                    epochs=1, batch_size=2, workers=0, device="cpu", loss="ce", allow_val_on_train=True, out="run")


def test_the_command_line_and_a_recipe_stage_make_the_same_online_request(calls, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cli(*ONLINE_CLI)
    run_stage(ONLINE_STAGE, progress=False)
    (cli_args, from_cli), (stage_args, from_stage) = calls["train_online"]
    assert cli_args == stage_args  # (out, cfg): the same TrainConfig
    # A recipe's train stage continues the run in out only when it has these settings and data (issue 20: it
    # used to pass resume=True whenever last.pt existed); the command line resumes only with --resume.
    assert from_stage == {**from_cli, "progress": False, "resume": "auto"}
    assert from_cli == dict(
        dataset=DatasetRef("synthetic", "train", options={"num_images": 2}),
        encoder=EncoderSpec("resnet18", random_init=True, seed=3, strides=(4, 8, 16, 32)),
        augment=Augment(crop=(48, 48), seed=3), resize=Resize(size=(64, 96)),
        val_cache=None, resume=False, allow_val_on_train=True)
    cfg = cli_args[1]
    assert cfg.crop is None and cfg.seed == 3  # online, --crop is the views' crop; --seed seeds the views too


def test_crop_is_a_feature_crop_from_a_cache_and_the_view_crop_online(calls, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cli("train-decoder", "--cache", "s.zarr", "--crop", "64x64", "--device", "cpu", "--out", "run")
    run_stage(dict(kind="train", cache="s.zarr", crop=[64, 64], device="cpu", out="run"), progress=False)
    (cli_args, _), (stage_args, _) = calls["train_decoder"]
    assert cli_args[2].crop == stage_args[2].crop == [64, 64]  # TrainConfig's, as a checkpoint records it
    assert cli_args == stage_args
    # Online without --crop: the augmentation's default, 512x512.
    cli("train-decoder", "--online", "--dataset", "synthetic", "--out", "run")
    run_stage(dict(kind="train", online=True, dataset="synthetic", split="train", out="run"), progress=False)
    (_, from_cli), (_, from_stage) = calls["train_online"]
    assert from_cli["augment"] == from_stage["augment"] == Augment(crop=(512, 512))


def test_split_train_options():
    options = dict(dataset="synthetic", split="train", crop=(48, 48), seed=2, epochs=1, strides=(4, 8))
    rest, online = requests.split_train_options(options, online=True)
    assert rest == dict(seed=2, epochs=1)
    assert online == dict(dataset="synthetic", split="train", crop=(48, 48), seed=2, strides=(4, 8))
    rest, _ = requests.split_train_options(options, online=False)
    assert rest == dict(crop=(48, 48), seed=2, epochs=1)  # from a cache: TrainConfig's feature-space crop


def test_builders_make_one_form_of_each_request():
    """A recipe's lists and the command line's tuples make equal requests (so equal store specs)."""
    assert requests.augment(crop=[64, 64], scale_range=[0.5, 1.0]) == requests.augment(crop=(64, 64),
                                                                                        scale_range=(0.5, 1.0))
    assert requests.resize(size=[64, 96]) == Resize(size=(64, 96))
    assert requests.encoder_spec(strides=[4, 8]) == EncoderSpec(strides=(4, 8))
    assert requests.augment(augment=False) == Augment(enabled=False)
    with pytest.raises(UserError, match="--crop 64x64 has no effect with --no-augment"):  # issue 20: not ignored
        requests.augment(augment=False, crop=(64, 64))
    assert requests.dataset_ref(dataset="camvid", split="val") == DatasetRef("camvid", "val", options={})
    with pytest.raises(TypeError, match="epochs"):
        requests.extract_arguments(dict(dataset="synthetic", split="train", out="s.zarr", epochs=1))


def test_every_builder_option_is_a_command_line_option():
    """The builders' options are the commands' options, by their recipe names: all of extract's (but ``writers``,
    a recipe's only), and train-decoder's online ones."""
    from fusion_seg.cli import option_values

    def names(command) -> set[str]:
        return set(option_values({p.name: () if p.multiple else None for p in main.commands[command].params}))

    extract_options = set(requests.option_names(requests.EXTRACT_REQUESTS.values())) | set(requests.EXTRACT_PLAIN)
    assert extract_options - {"writers"} == names("extract")
    assert set(requests.online_request_keys()) <= names("train-decoder")
