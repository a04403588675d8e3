"""End to end through the command line (click's CliRunner), on generated data.

The program in a child process of its own: tests/system/test_cli_startup.py."""
import json
from pathlib import Path

import numpy as np
from click.testing import CliRunner
from PIL import Image

from fusion_seg.cli import main
from fusion_seg.data.datasets import build_dataset

DATA = ["--dataset", "synthetic", "--dataset-opt", "num_images=4", "--dataset-opt", "size=[64,96]"]
ENC = ["--encoder", "resnet18", "--random-init", "--seed", "0", "--strides", "4,8,16,32", "--device", "cpu"]
EXTRACT_ENC = [*ENC, "--loader-workers", "0"]


def invoke(*args):
    result = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.output


def test_extract_train_evaluate_predict(tmp_path):
    train, val, run = tmp_path / "train.zarr", tmp_path / "val.zarr", tmp_path / "runs" / "demo"
    out = invoke("extract", *DATA, "--split", "train", "--views", "2", "--crop", "64x64", *EXTRACT_ENC, "--out", train)
    assert "8 views written" in out
    invoke("extract", *DATA, "--split", "val", "--views", "1", "--no-augment", *EXTRACT_ENC, "--out", val)
    info = invoke("info", train)
    assert "8 of 8 complete" in info and "resnet18" in info and "random-init:0" in info
    assert json.loads(invoke("info", "--json", val))["views"] == 4

    out = invoke("train-decoder", "--cache", train, "--val-cache", val, "--epochs", "2", "--batch-size", "4",
                 "--workers", "0", "--device", "cpu", "--loss", "ce", "--out", run)
    assert "8 steps" not in out and "best val mIoU" in out
    assert (run / "best.pt").exists() and (run / "metrics.jsonl").exists()
    assert Image.open(run / "curves.png").size[0] > 300  # training curve beside metrics.jsonl

    out = invoke("evaluate", "--checkpoint", run / "best.pt", *DATA, "--split", "val", "--device", "cpu")
    assert "mIoU" in out and "background" in out
    results = Path(out.strip().splitlines()[-1].removeprefix("written to "))  # the default: eval-best-synthetic-val-*
    assert results.parent == run and results.name.startswith("eval-best-synthetic-val")
    metrics = json.loads((results / "metrics.json").read_text())
    assert 0 <= metrics["miou"] <= 1 and metrics["images"] == 4
    confusion = json.loads((results / "confusion.json").read_text())
    assert np.asarray(confusion["matrix"]).sum() == metrics["num_pixels"]
    assert (results / "confusion.png").exists()

    images = tmp_path / "my images"
    images.mkdir()
    ds = build_dataset("synthetic", split="test", num_images=2, size=(64, 96))
    for i in range(2):
        Image.fromarray(ds[i].image).save(images / f"ünïcode {i}.png")
    for extra in ([], ["--sliding-window"]):
        preds = tmp_path / f"preds{len(extra)}"
        out = invoke("predict", "--checkpoint", run / "best.pt", "--input", images, "--out", preds,
                     "--device", "cpu", *extra)
        assert "2 image(s)" in out
        mask = np.asarray(Image.open(preds / "ünïcode 0.png"))
        assert mask.shape == (64, 96) and mask.max() < len(ds.classes)
        assert np.asarray(Image.open(preds / "ünïcode 0_overlay.png").convert("RGB")).shape == (64, 96, 3)

    out = invoke("visualize", "--checkpoint", run / "best.pt", "--checkpoint", run / "last.pt",
                 "--input", images / "ünïcode 0.png", "--out", tmp_path / "fig.png")
    assert "written" in out and Image.open(tmp_path / "fig.png").size[1] > 200


def test_predict_refuses_weights_of_another_encoder(tmp_path):
    import timm
    import torch

    train = tmp_path / "train.zarr"
    invoke("extract", *DATA, "--split", "train", "--views", "1", "--crop", "64x64", *EXTRACT_ENC, "--out", train)
    invoke("train-decoder", "--cache", train, "--epochs", "1", "--batch-size", "2", "--workers", "0",
           "--device", "cpu", "--loss", "ce", "--out", tmp_path / "run")
    torch.save(timm.create_model("resnet18").state_dict(), tmp_path / "other.pth")
    (tmp_path / "in").mkdir()
    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(tmp_path / "in" / "x.png")
    result = CliRunner().invoke(main, ["predict", "--checkpoint", str(tmp_path / "run" / "best.pt"), "--input",
                                       str(tmp_path / "in"), "--out", str(tmp_path / "p"), "--weights",
                                       str(tmp_path / "other.pth"), "--device", "cpu"])
    assert result.exit_code == 2 and "does not match" in result.output and "weights_sha256" in result.output
    assert not (tmp_path / "p" / "x.png").exists()


def test_online_training_from_cli(tmp_path):
    out = invoke("train-decoder", "--online", *DATA, "--split", "train", "--crop", "64x64", *ENC, "--workers", "0",
                 "--epochs", "1", "--batch-size", "2", "--loss", "ce", "--out", tmp_path / "online")
    assert "2 steps" in out


def test_user_errors_have_no_traceback(tmp_path):
    result = CliRunner().invoke(main, ["info", str(tmp_path / "nope.zarr")])
    assert result.exit_code == 2
    assert "not a fusion-seg feature store" in result.output and "Traceback" not in result.output
    result = CliRunner().invoke(main, ["extract", "--dataset", "camvid", "--root", str(tmp_path / "missing"),
                                       "--split", "train", "--random-init", "--out", str(tmp_path / "x.zarr")])
    assert result.exit_code == 2 and "missing" in result.output and "Traceback" not in result.output
    result = CliRunner().invoke(main, ["train-decoder", "--out", str(tmp_path / "r")])
    assert result.exit_code == 2 and "--cache" in result.output


# --- issue 12: help that is true, and a fast start --------------------------------------------------------------------

def test_the_clis_names_are_the_registries():
    """The CLI (cli/names.py) lists names without importing the registries' modules (torch, PIL); they must stay the same."""
    from fusion_seg import cli
    from fusion_seg.cache.reader import ALIGN
    from fusion_seg.checks import FEATURE_CROP_ALIGN
    from fusion_seg.reports.compare import DEFAULT_DECODERS
    from fusion_seg.data.datasets import DATASETS
    from fusion_seg.decoders import DECODERS
    from fusion_seg.encoder.identity import DEFAULT_ENCODER, DEFAULT_STRIDES
    from fusion_seg.cache.resident import CACHE_MODES

    assert cli.DATASET_NAMES == tuple(DATASETS)
    assert cli.DECODER_NAMES == tuple(DECODERS)
    assert set(cli.CACHE_DECODER_NAMES) == {n for n, c in DECODERS.items() if not getattr(c, "end_to_end", False)}
    assert cli.CACHE_DECODER_NAMES == DEFAULT_DECODERS
    assert (cli.DEFAULT_ENCODER, cli.DEFAULT_STRIDES) == (DEFAULT_ENCODER, DEFAULT_STRIDES)
    assert FEATURE_CROP_ALIGN == ALIGN
    options = {p.name: p for p in cli.cache_options(lambda: None).__click_params__}
    assert tuple(options["cache_mode"].type.choices) == CACHE_MODES
    from fusion_seg.cache.formats import FORMATS

    assert tuple(options["resident_dtype"].type.choices) == ("auto", *FORMATS)


def test_help_lists_every_dataset_and_decoder_and_no_false_default():
    from fusion_seg.data.datasets import DATASETS
    from fusion_seg.decoders import DECODERS

    for command in ("extract", "evaluate", "train-decoder", "plan"):
        out = invoke(command, "--help")
        assert all(name in out for name in DATASETS), (command, out)
    out = invoke("train-decoder", "--help")
    assert all(name in out for name in DECODERS)
    crop = out[out.index("--crop"):out.index("--scale-range")]
    assert "feature space" in crop and "--online" in crop and "[default" not in crop
    assert "Seed of every random draw" in out
    seeds = [p for p in main.commands["compare"].params if p.name == "seed"]
    assert seeds[0].help


def test_workers_means_dataloader_processes_in_every_command():
    for name, command in main.commands.items():
        for param in command.params:
            if "--workers" in param.opts:
                assert param.name in ("workers", "loader_workers"), (name, param.name)
                assert "DataLoader" in param.help, (name, param.help)
    dask = [p for p in main.commands["extract"].params if "--dask-workers" in p.opts]
    assert dask and dask[0].name == "dask_workers"
