"""Issue 24: a dataset split by sequence or by a list of ids (`--dataset-opt sequences=...`, `ids_file=...`), for
every file dataset, from the CLI, recipes and the Python API: what a cross-sequence validation is made of."""
from __future__ import annotations

import numpy as np
import pytest
from click.testing import CliRunner

from fake_layouts import write_image, write_index_png
from fusion_seg.cli import main
from fusion_seg.data.datasets import build_dataset
from fusion_seg.errors import UserError

DRIVES = {"0001TP": 2, "0006R0": 3, "0016E5": 2}


@pytest.fixture
def camvid(tmp_path):
    """A CamVid root whose train split holds three drives, named as CamVid names its frames."""
    root = tmp_path / "camvid"
    rng = np.random.default_rng(0)
    for drive, count in DRIVES.items():
        for i in range(count):
            name = f"{drive}_{i:06d}.png"
            write_image(root / "train" / name, (32, 48), seed=i)
            write_index_png(root / "trainannot" / name, rng.integers(0, 11, (32, 48), dtype=np.uint8))
    return root


def test_sequences_keep_the_frames_of_those_drives_and_are_recorded(camvid):
    two = build_dataset("camvid", root=camvid, split="train", sequences="0001TP,0016E5")
    assert [i.split("_")[0] for i in two.ids] == ["0001TP"] * 2 + ["0016E5"] * 2
    held_out = build_dataset("camvid", root=camvid, split="train", sequences=["0006R0"])
    assert len(held_out) == 3 and set(held_out.ids).isdisjoint(two.ids)
    assert two.describe()["options"]["sequences"] == ["0001TP", "0016E5"]
    assert build_dataset("camvid", root=camvid, split="train", sequences="0006R0", limit=2).ids == held_out.ids[:2]


def test_an_ids_file_keeps_those_images_in_the_datasets_order(camvid, tmp_path):
    ids = tmp_path / "ids.txt"
    ids.write_text("0016E5_000001\n# a comment\n\n0001TP_000000  # the first\n")
    ds = build_dataset("camvid", root=camvid, split="train", ids_file=str(ids))
    assert ds.ids == ["0001TP_000000", "0016E5_000001"] and ds.describe()["options"]["ids_file"] == str(ids)


@pytest.mark.parametrize("options,message", [
    ({"sequences": "0006R0,Seq05VD"}, "Seq05VD is no sequence of camvid/train; its sequences (an image id up to its "
                                      "first '_'): 0001TP, 0006R0, 0016E5"),
    ({"sequences": 7}, "sequences = 7 should be names"),
    ({"sequences": ""}, "sequences = '' should be names"),
    ({"ids_file": "missing.txt"}, "ids_file=missing.txt: cannot read it"),
])
def test_a_subset_that_names_nothing_there_is_refused_with_what_is(camvid, options, message):
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)")):
        build_dataset("camvid", root=camvid, split="train", **options)


def test_an_id_that_is_not_in_the_split_is_refused_naming_its_line(camvid, tmp_path):
    ids = tmp_path / "ids.txt"
    ids.write_text("0001TP_000000\n0001TP_999999\n")
    with pytest.raises(UserError, match=r"ids.txt, line 2: '0001TP_999999' is no image id of camvid/train"):
        build_dataset("camvid", root=camvid, split="train", ids_file=str(ids))
    with pytest.raises(UserError, match="dataset 'synthetic' takes no sequences option"):
        build_dataset("synthetic", split="train", sequences="a")


def test_extract_and_recipes_take_them_and_held_out_drive_is_a_validation_store(camvid, tmp_path):
    """The cross-sequence protocol: train on two drives of the train split, validate on the third; the
    validation store shares no image with training, so it is not refused as training data."""
    from fusion_seg.cache.store import FeatureStore
    from fusion_seg.pipeline.stage_checks import dataset_errors
    from fusion_seg.training.train import train_decoder
    from pipeline_helpers import tiny_config

    common = ["--dataset", "camvid", "--root", str(camvid), "--split", "train", "--encoder", "resnet18",
              "--random-init", "--strides", "4,8,16,32", "--workers", "0"]
    for out, drives, views in (("train.zarr", "0001TP,0016E5", ["--views", "1", "--crop", "32x32"]),
                               ("heldout.zarr", "0006R0", ["--views", "1", "--no-augment"])):
        r = CliRunner().invoke(main, ["extract", *common, *views, "--dataset-opt", f"sequences={drives}",
                                      "--out", str(tmp_path / out)])
        assert r.exit_code == 0, r.output
    held_out = FeatureStore.open(tmp_path / "heldout.zarr").spec
    assert len(held_out.image_ids) == 3 and held_out.dataset["options"]["sequences"] == ["0006R0"]
    result = train_decoder(str(tmp_path / "train.zarr"), tmp_path / "run", tiny_config(epochs=1),
                           val_cache=str(tmp_path / "heldout.zarr"), progress=False)
    assert result.val is not None and 0 <= result.val["miou"] <= 1
    assert dataset_errors("camvid", {"sequences": "0006R0", "ids_file": "ids.txt", "limit": 2}) == []
    assert dataset_errors("camvid", {"sequences": 1.5}) != []
