"""Issue 3: every official layout through the whole pipeline, and two-stage schedules with --init."""
import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from fusion_seg.checkpoint import load_checkpoint
from fusion_seg.cli import main
from fusion_seg.requests import Augment, DatasetRef, EncoderSpec, ExtractRun
from fusion_seg.errors import CheckpointError
from fusion_seg.extract.local import extract
from fusion_seg.training.train import train_decoder
from fake_layouts import write_camvid, write_cityscapes, write_coco, write_mapillary, write_voc
from pipeline_helpers import ENCODER, tiny_config

ENC = dict(encoder=EncoderSpec(ENCODER, random_init=True, strides=(4, 8, 16, 32)), augment=Augment(enabled=False),
           run=ExtractRun(loader_workers=0), progress=False)
CLI_ENC = ["--encoder", ENCODER, "--random-init", "--strides", "4,8,16,32", "--loader-workers", "0"]

LAYOUTS = {  # name: (writer, train split, val split, extra CLI options)
    "camvid": (lambda r: write_camvid(r), "train", "val", []),
    "cityscapes": (lambda r: write_cityscapes(r), "train", "val", []),
    "mapillary": (lambda r: write_mapillary(r), "train", "val", []),
    "voc": (lambda r: write_voc(r), "train", "val", []),
    "coco": (lambda r: write_coco(r), "train", "val", ["--dataset-opt", "min_pixels=0"]),
}


def run(*args):
    result = CliRunner().invoke(main, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    return result.output


@pytest.mark.parametrize("name", sorted(LAYOUTS))
def test_official_layout_through_the_pipeline(name, tmp_path):
    writer, train, val, opts = LAYOUTS[name]
    root = writer(tmp_path / "data")
    data = ["--dataset", name, "--root", root, *opts]
    run("extract", *data, "--split", train, "--views", "1", "--crop", "64x64", *CLI_ENC, "--out", tmp_path / "t.zarr")
    run("extract", *data, "--split", val, "--views", "1", "--no-augment", *CLI_ENC, "--out", tmp_path / "v.zarr")
    run("train-decoder", "--cache", tmp_path / "t.zarr", "--val-cache", tmp_path / "v.zarr", "--epochs", "1",
        "--batch-size", "2", "--workers", "0", "--device", "cpu", "--loss", "ce", "--out", tmp_path / "run")
    out = run("evaluate", "--checkpoint", tmp_path / "run" / "best.pt", *data, "--split", val, "--device", "cpu")
    assert "mIoU" in out
    written = Path(out.strip().splitlines()[-1].removeprefix("written to "))  # the folder evaluate chose
    assert written.parent == tmp_path / "run"
    metrics = json.loads((written / "metrics.json").read_text())
    assert metrics["images"] >= 1 and 0 <= metrics["miou"] <= 1
    if name == "cityscapes":  # instance maps present: Cityscapes' instance-level scores too
        assert "iIoU class" in out and {"iiou_class", "iou_category", "iiou_category"} <= set(metrics)
    images = (sorted(root.rglob("*_leftImg8bit.png")) or sorted(root.rglob("*.jpg"))
              or sorted((root / "val").glob("*.png")))
    run("predict", "--checkpoint", tmp_path / "run" / "best.pt", "--input", images[0], "--out", tmp_path / "pred",
        "--device", "cpu")
    assert (tmp_path / "pred" / f"{images[0].stem}.png").exists()


def _folder(root: Path, classes, seed=0):
    from PIL import Image

    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    (root / "classes.txt").write_text("\n".join(classes))
    rng = np.random.default_rng(seed)
    for i in range(4):
        Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(root / "images" / f"{i}.png")
        Image.fromarray(rng.integers(0, len(classes), (64, 64), dtype=np.uint8)).save(root / "masks" / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def first_stage(tmp_path_factory):
    d = tmp_path_factory.mktemp("stage1")
    extract(d / "a.zarr", DatasetRef("folder", "all", root=_folder(d / "a", ["bg", "road", "car"])), **ENC)
    train_decoder(str(d / "a.zarr"), d / "run", tiny_config(epochs=1), progress=False)
    return d


def _conv(state):
    return state["align.0.0.weight"]


def test_init_across_different_class_sets_reinitialises_only_the_classifier(first_stage, tmp_path):
    extract(tmp_path / "b.zarr", DatasetRef("folder", "all", root=_folder(tmp_path / "b", ["bg", "person"], seed=1)),
            **ENC)
    source = load_checkpoint(first_stage / "run" / "best.pt")
    train_decoder(str(tmp_path / "b.zarr"), tmp_path / "run", tiny_config(epochs=1, lr=0.0,
                  init=str(first_stage / "run" / "best.pt")), progress=False)
    ckpt = load_checkpoint(tmp_path / "run" / "last.pt")
    assert ckpt["init"]["reinitialised"] == ["classifier.bias", "classifier.weight"]
    assert ckpt["init"]["classes"] == ["bg", "road", "car"] and ckpt["classes"] == ["bg", "person"]
    assert ckpt["model"]["classifier.weight"].shape[0] == 2
    torch.testing.assert_close(_conv(ckpt["model"]), _conv(source["model"]))  # lr 0: carried over unchanged


def test_init_with_the_same_classes_carries_everything(first_stage, tmp_path):
    source = load_checkpoint(first_stage / "run" / "best.pt")
    train_decoder(str(first_stage / "a.zarr"), tmp_path / "run", tiny_config(epochs=1, lr=0.0,
                  init=str(first_stage / "run" / "best.pt")), progress=False)
    ckpt = load_checkpoint(tmp_path / "run" / "last.pt")
    assert ckpt["init"]["reinitialised"] == []
    torch.testing.assert_close(ckpt["model"]["classifier.weight"], source["model"]["classifier.weight"])


def test_init_from_another_encoder_or_decoder_is_refused(first_stage, tmp_path):
    extract(tmp_path / "c.zarr", DatasetRef("folder", "all", root=_folder(tmp_path / "c", ["bg", "road", "car"])),
            **{**ENC, "encoder": replace(ENC["encoder"], seed=3)})
    with pytest.raises(CheckpointError, match="another encoder"):
        train_decoder(str(tmp_path / "c.zarr"), tmp_path / "run", tiny_config(init=str(first_stage / "run" / "best.pt")),
                      progress=False)
    other = tiny_config(init=str(first_stage / "run" / "best.pt"),
                        decoder_config={"streams": 4, "preset": "small", "blocks": 2})
    with pytest.raises(CheckpointError, match="same --decoder"):
        train_decoder(str(first_stage / "a.zarr"), tmp_path / "run2", other, progress=False)


def test_mapillary_to_cityscapes_recipe_runs_on_official_layouts(tmp_path):
    """The paper's two-stage recipe end to end on small fakes, offline (random-init resnet18)."""
    from fusion_seg.pipeline.recipes import run_recipe

    overrides = {"mapillary": str(write_mapillary(tmp_path / "vistas")),
                 "cityscapes": str(write_cityscapes(tmp_path / "cs")),
                 "encoder": ENCODER, "random_init": "true", "preset": "small",
                 "cache": str(tmp_path / "cache"), "runs": str(tmp_path / "runs")}
    results = run_recipe(Path(__file__).parents[2] / "pipelines" / "mapillary_to_cityscapes.toml",
                         overrides=overrides, epoch_scale=0.001, echo=lambda s: None, progress=False)
    assert [r["status"] for r in results] == ["ran"] * 7
    ckpt = load_checkpoint(tmp_path / "runs" / "mapillary_to_cityscapes" / "best.pt")
    assert len(ckpt["classes"]) == 19 and len(ckpt["init"]["classes"]) == 65
    assert ckpt["init"]["reinitialised"] == ["classifier.bias", "classifier.weight"]
    assert ckpt["train"]["epochs"] == 1 and ckpt["train"]["batch_size"] == 12
    metrics = json.loads((tmp_path / "runs" / "mapillary_to_cityscapes" / "eval-val" / "metrics.json").read_text())
    assert len(metrics["per_class_iou"]) == 19
