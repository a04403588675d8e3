"""Datasets: the synthetic default, a fake CamVid layout and the folder layout."""
from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from fusion_seg.data.datasets import DATASETS, SegSample, build_dataset
from fusion_seg.data.datasets.camvid import PALETTE as CAMVID_PALETTE
from fusion_seg.errors import DataError, UserError


def _image(path, h=8, w=12, seed=0):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path)


def _mask(path, values, h=8, w=12):
    path.parent.mkdir(parents=True, exist_ok=True)
    mask = np.resize(np.asarray(values, dtype=np.uint8), h * w).reshape(h, w)
    Image.fromarray(mask).save(path)
    return mask


# ----- registry ---------------------------------------------------------------------------------

def test_registry_names_and_unknown_dataset():
    assert set(DATASETS) == {"synthetic", "camvid", "folder", "cityscapes", "mapillary", "voc", "coco"}
    with pytest.raises(UserError) as info:
        build_dataset("ade20k")
    assert "camvid" in str(info.value) and "folder" in str(info.value) and "synthetic" in str(info.value)


def test_unknown_option_is_a_user_error():
    with pytest.raises(UserError, match="num_imgs"):
        build_dataset("synthetic", num_imgs=3)


# ----- synthetic --------------------------------------------------------------------------------

def test_synthetic_contract_and_determinism():
    ds = build_dataset("synthetic", split="train")
    assert len(ds) == 48 and len(build_dataset("synthetic", split="val")) == 16
    assert len(build_dataset("synthetic", split="test")) == 16
    sample = ds[3]
    assert isinstance(sample, SegSample)
    assert sample.image.shape == (192, 192, 3) and sample.image.dtype == np.uint8
    assert sample.mask.shape == (192, 192) and sample.mask.dtype == np.uint8
    assert ds.image_size(3) == (192, 192)
    again = build_dataset("synthetic", split="train")[3]
    np.testing.assert_array_equal(sample.image, again.image)
    np.testing.assert_array_equal(sample.mask, again.mask)
    assert sample.id == again.id == ds.ids[3]
    assert len(set(ds.ids)) == len(ds)
    np.testing.assert_array_equal(ds[-1].mask, ds[47].mask)
    with pytest.raises(IndexError):
        ds[48]


def test_synthetic_splits_and_seeds_differ():
    train, val = build_dataset("synthetic", split="train"), build_dataset("synthetic", split="val")
    other_seed = build_dataset("synthetic", split="train", seed=1)
    assert not np.array_equal(train[0].image, val[0].image)
    assert not np.array_equal(train[0].image, other_seed[0].image)
    assert train.ids[0] != val.ids[0]


def test_synthetic_classes_all_appear_and_masks_are_valid():
    ds = build_dataset("synthetic", split="train", num_images=8, size=(96, 128))
    assert ds.classes == ("background", "disk", "box", "triangle")
    seen = set()
    for sample in ds:
        assert sample.image.shape == (96, 128, 3)
        seen |= set(np.unique(sample.mask).tolist())
    assert seen == {0, 1, 2, 3}
    assert ds.palette.shape == (4, 3) and ds.palette.dtype == np.uint8


def test_synthetic_classes_have_separable_colours():
    ds = build_dataset("synthetic", split="val", num_images=6)
    means = {c: [] for c in range(4)}
    for sample in ds:
        for c in range(4):
            if (sample.mask == c).sum() > 200:
                means[c].append(sample.image[sample.mask == c].mean(axis=0))
    red, green, blue = (np.mean(means[c], axis=0) for c in (1, 2, 3))
    assert red[0] > red[1] + 80 and green[1] > green[0] + 80 and blue[2] > blue[0] + 80


def test_describe_is_plain_json():
    info = build_dataset("synthetic", split="val", num_images=5).describe()
    assert json.loads(json.dumps(info)) == info
    assert info["name"] == "synthetic" and info["len"] == 5 and info["num_classes"] == 4
    assert info["root"] is None and info["ignore_index"] == 255 and info["options"]["num_images"] == 5


# ----- camvid (fake layout) ---------------------------------------------------------------------

@pytest.fixture
def camvid_root(tmp_path):
    """Tiny SegNet-layout CamVid: train with a list file (unsorted), val without one."""
    root = tmp_path / "Cam Vid ü"
    for i, name in enumerate(["b_002.png", "a_001.png", "c_003.png"]):
        _image(root / "train" / name, seed=i)
        _mask(root / "trainannot" / name, [0, 3, 11, 10])
    (root / "train.txt").write_text(
        "/SegNet/CamVid/train/c_003.png /SegNet/CamVid/trainannot/c_003.png\n"
        "/SegNet/CamVid/train/a_001.png /SegNet/CamVid/trainannot/a_001.png\n\n"
    )
    for name in ["v2.png", "v1.png"]:
        _image(root / "val" / name)
        _mask(root / "valannot" / name, [1, 2])
    return root


def test_camvid_list_file_mapping_and_void_to_ignore(camvid_root):
    ds = build_dataset("camvid", root=camvid_root, split="train")
    assert ds.ids == ["c_003", "a_001"]  # list order, only listed files
    sample = ds[0]
    assert sample.image.shape == (8, 12, 3)
    assert set(np.unique(sample.mask).tolist()) == {0, 3, 10, 255}
    assert len(ds.classes) == 11 and ds.classes[0] == "Sky" and ds.classes[-1] == "Bicyclist"
    np.testing.assert_array_equal(ds.palette, CAMVID_PALETTE)
    assert ds.describe()["root"] == str(camvid_root)


def test_camvid_without_list_file_lists_folder_sorted(camvid_root):
    ds = build_dataset("camvid", root=camvid_root, split="val")
    assert ds.ids == ["v1", "v2"]
    assert ds.image_size(0) == (8, 12)


@pytest.mark.parametrize("entry", ["/SegNet/CamVid/../../etc/passwd.png", "/etc/passwd.png", "../outside.png"])
def test_camvid_list_entry_escaping_root_is_refused(camvid_root, entry):
    (camvid_root / "train.txt").write_text(
        "/SegNet/CamVid/train/a_001.png /SegNet/CamVid/trainannot/a_001.png\n"
        f"{entry} /SegNet/CamVid/trainannot/a_001.png\n"
    )
    with pytest.raises(DataError) as info:
        build_dataset("camvid", root=camvid_root, split="train")
    message = str(info.value)
    assert "line 2" in message and entry in message and "outside" in message


@pytest.mark.parametrize("kind", ["missing", "not_camvid", "none"])
def test_camvid_wrong_root_names_path_and_root_flag(tmp_path, kind):
    root = tmp_path / "nowhere"
    if kind == "not_camvid":
        (root / "pictures").mkdir(parents=True)
    with pytest.raises(DataError) as info:
        build_dataset("camvid", root=None if kind == "none" else root, split="train")
    message = str(info.value)
    assert "--root" in message and "trainannot" in message
    if kind != "none":
        assert str(root) in message


def test_camvid_missing_split_lists_existing(camvid_root):
    with pytest.raises(DataError) as info:
        build_dataset("camvid", root=camvid_root, split="test")
    message = str(info.value)
    assert "'test'" in message and "train, val" in message


def test_camvid_image_without_label_is_named(camvid_root):
    _image(camvid_root / "val" / "v3.png")
    with pytest.raises(DataError) as info:
        build_dataset("camvid", root=camvid_root, split="val")
    assert str(camvid_root / "val" / "v3.png") in str(info.value)
    assert str(camvid_root / "valannot" / "v3.png") in str(info.value)
    assert [s.mask for s in build_dataset("camvid", root=camvid_root, split="val", require_masks=False)] == [None] * 3


def test_camvid_bad_label_value_names_mask(camvid_root):
    _mask(camvid_root / "valannot" / "v1.png", [0, 12, 200])
    ds = build_dataset("camvid", root=camvid_root, split="val")
    with pytest.raises(DataError) as info:
        ds[0]
    message = str(info.value)
    assert str(camvid_root / "valannot" / "v1.png") in message and "12, 200" in message and "0..10" in message


# ----- folder -----------------------------------------------------------------------------------

@pytest.fixture
def folder_root(tmp_path):
    """Flat folder dataset with three classes and non-ASCII, spaced names."""
    root = tmp_path / "my data ä"
    root.mkdir()
    (root / "classes.txt").write_text("background\n\nroad\ncar\n", encoding="utf-8")
    for i, stem in enumerate(["straße 2", "a1", "b 3"]):
        _image(root / "images" / f"{stem}.jpg" if i == 1 else root / "images" / f"{stem}.png", seed=i)
        _mask(root / "masks" / f"{stem}.png", [0, 1, 2, 255])
    return root


def test_folder_all_split(folder_root):
    ds = build_dataset("folder", root=folder_root, split="all")
    assert ds.classes == ("background", "road", "car")
    assert ds.ids == ["a1", "b 3", "straße 2"]
    sample = ds[2]
    assert sample.id == "straße 2" and sample.image.shape == (8, 12, 3)
    assert set(np.unique(sample.mask).tolist()) == {0, 1, 2, 255}
    assert ds.palette.shape == (3, 3)
    assert json.loads(json.dumps(ds.describe()))["options"] == {"require_masks": True}


def test_folder_unknown_split_lists_existing(folder_root):
    with pytest.raises(DataError) as info:
        build_dataset("folder", root=folder_root, split="train")
    assert "'train'" in str(info.value) and "all" in str(info.value)


def test_folder_list_splits(folder_root):
    (folder_root / "splits").mkdir()
    (folder_root / "splits" / "val.txt").write_text("straße 2\n\nb 3.png\n", encoding="utf-8")
    ds = build_dataset("folder", root=folder_root, split="val")
    assert ds.ids == ["straße 2", "b 3"]
    np.testing.assert_array_equal(ds[0].image, build_dataset("folder", root=folder_root, split="all")[2].image)
    (folder_root / "splits" / "bad.txt").write_text("a1\n../../etc/passwd\n")
    with pytest.raises(DataError, match="line 2"):
        build_dataset("folder", root=folder_root, split="bad")
    (folder_root / "splits" / "typo.txt").write_text("a2\n")
    with pytest.raises(DataError, match="'a2' matches no image"):
        build_dataset("folder", root=folder_root, split="typo")


def test_folder_subfolder_splits(tmp_path):
    root = tmp_path / "sub"
    root.mkdir()
    (root / "classes.txt").write_text("bg\nfg\n")
    for split, stems in {"train": ["t2", "t1"], "val": ["v1"]}.items():
        for stem in stems:
            _image(root / "images" / split / f"{stem}.png")
            _mask(root / "masks" / split / f"{stem}.png", [0, 1])
    assert build_dataset("folder", root=root, split="train").ids == ["t1", "t2"]
    assert build_dataset("folder", root=root, split="val").ids == ["v1"]
    with pytest.raises(DataError) as info:
        build_dataset("folder", root=root, split="test")
    assert "train, val" in str(info.value)


def test_folder_missing_pieces_are_named(folder_root):
    _image(folder_root / "images" / "orphan.png")
    with pytest.raises(DataError) as info:
        build_dataset("folder", root=folder_root, split="all")
    assert str(folder_root / "images" / "orphan.png") in str(info.value)
    assert str(folder_root / "masks" / "orphan.png") in str(info.value)
    unlabelled = build_dataset("folder", root=folder_root, split="all", require_masks=False)
    assert len(unlabelled) == 4 and all(s.mask is None for s in unlabelled)

    (folder_root / "classes.txt").unlink()
    with pytest.raises(DataError, match="classes.txt"):
        build_dataset("folder", root=folder_root, split="all")


def test_folder_empty_images_folder_is_named(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "classes.txt").write_text("a\nb\n")
    with pytest.raises(DataError) as info:
        build_dataset("folder", root=tmp_path, split="all")
    assert str(tmp_path / "images") in str(info.value) and "empty" in str(info.value)


def test_folder_bad_mask_values_and_size_mismatch(folder_root):
    _mask(folder_root / "masks" / "a1.png", [0, 5, 3, 255])
    ds = build_dataset("folder", root=folder_root, split="all")
    with pytest.raises(DataError) as info:
        ds[0]
    message = str(info.value)
    assert str(folder_root / "masks" / "a1.png") in message and "3, 5" in message and "0..2" in message

    _mask(folder_root / "masks" / "b 3.png", [0], h=9, w=12)
    with pytest.raises(DataError) as info:
        ds[1]
    message = str(info.value)
    assert str(folder_root / "images" / "b 3.png") in message and str(folder_root / "masks" / "b 3.png") in message
    assert "12x8" in message and "12x9" in message
