"""Loaders of the official download layouts: Cityscapes, Mapillary Vistas, PASCAL VOC (+ SBD), COCO."""
from __future__ import annotations

import json
import sys

import numpy as np
import pytest
from fake_layouts import (
    COCO_CATEGORIES,
    cityscapes_files,
    sbd_mask,
    voc_mask,
    write_cityscapes,
    write_coco,
    write_image,
    write_index_png,
    write_mapillary,
    write_sbd,
    write_voc,
)
from PIL import Image

from fusion_seg.data.datasets import DATASETS, build_dataset
from fusion_seg.data.datasets.base import import_optional
from fusion_seg.data.datasets.cityscapes import label_id_table
from fusion_seg.errors import DataError, UserError
from fusion_seg.data.io import read_image


pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")  # pycocotools


def _raw(path) -> np.ndarray:
    with Image.open(path) as img:
        return np.array(img)


def _error(fn, *args, **kwargs) -> str:
    with pytest.raises(DataError) as info:
        fn(*args, **kwargs)
    return str(info.value)


def test_registered_with_their_options():
    assert {"cityscapes", "mapillary", "voc", "coco"} <= set(DATASETS)
    with pytest.raises(UserError) as info:
        build_dataset("coco", root="/nowhere", split="val", clases="voc")
    message = str(info.value)
    assert "clases" in message and "classes" in message and "min_pixels" in message


def test_optional_dependency_error_names_the_extra():
    message = _error(import_optional, "no_such_module_xyz", "voc", "reading SBD")
    assert "pip install 'fusion-seg[voc]'" in message and "no_such_module_xyz" in message


# ----- Cityscapes -------------------------------------------------------------------------------

# Every labelId 0..33, then 255 (how -1, license plate, lands in a uint8 PNG), mapped by hand
# from cityscapesscripts helpers/labels.py.
CS_RAW = list(range(34)) + [255]
CS_EXPECTED = [255, 255, 255, 255, 255, 255, 255,  # 0 unlabeled .. 6 ground
               0, 1, 255, 255,                      # 7 road, 8 sidewalk, 9 parking, 10 rail track
               2, 3, 4, 255, 255, 255,              # 11 building, 12 wall, 13 fence, 14-16 guard rail/bridge/tunnel
               5, 255, 6, 7,                        # 17 pole, 18 polegroup, 19 traffic light, 20 traffic sign
               8, 9, 10, 11, 12, 13, 14, 15,        # 21 vegetation .. 28 bus
               255, 255, 16, 17, 18,                # 29 caravan, 30 trailer, 31 train, 32 motorcycle, 33 bicycle
               255]


@pytest.fixture
def cityscapes(tmp_path):
    return write_cityscapes(tmp_path / "city scapes", {"train": 3, "val": 1, "test": 1})


def test_cityscapes_label_ids_to_train_ids_by_hand(cityscapes):
    table = label_id_table()
    assert table.shape == (256,) and table.dtype == np.uint8
    np.testing.assert_array_equal(table[CS_RAW], CS_EXPECTED)
    assert (table[34:] == 255).all()

    files = cityscapes_files(cityscapes, "train", "aachen", "aachen_000000_000000")
    raw = np.resize(np.array(CS_RAW, dtype=np.uint8), 64 * 128).reshape(64, 128)
    write_index_png(files["label_ids"], raw)
    mask = build_dataset("cityscapes", root=cityscapes, split="train")[0].mask
    np.testing.assert_array_equal(mask, np.resize(np.array(CS_EXPECTED, dtype=np.uint8), 64 * 128).reshape(64, 128))


def test_cityscapes_prefers_label_train_ids(cityscapes):
    files = cityscapes_files(cityscapes, "train", "aachen", "aachen_000000_000000")
    hand = np.full((64, 128), 5, dtype=np.uint8)
    hand[:, :10] = 255
    hand[:20] = 18
    write_index_png(files["train_ids"], hand)
    ds = build_dataset("cityscapes", root=cityscapes, split="train")
    np.testing.assert_array_equal(ds[0].mask, hand)  # used as is, not through the table
    assert ds[1].mask.max() == 255 and ds[1].mask[ds[1].mask != 255].max() <= 18  # others: labelIds

    hand[0, 0] = 19
    write_index_png(files["train_ids"], hand)
    message = _error(ds.__getitem__, 0)
    assert str(files["train_ids"]) in message and "19" in message and "0..18" in message


def test_cityscapes_splits_classes_and_instances(cityscapes):
    train = build_dataset("cityscapes", root=cityscapes, split="train")
    assert train.ids == ["aachen_000000_000000", "aachen_000000_000002", "bremen_000000_000001"]
    assert train.classes == ("road", "sidewalk", "building", "wall", "fence", "pole", "traffic light",
                             "traffic sign", "vegetation", "terrain", "sky", "person", "rider", "car", "truck",
                             "bus", "train", "motorcycle", "bicycle")
    assert train.palette[0].tolist() == [128, 64, 128] and train.palette[13].tolist() == [0, 0, 142]
    assert train.image_size(0) == (64, 128)
    sample = train[0]
    assert sample.image.shape == (64, 128, 3) and sample.mask.shape == (64, 128)
    info = train.describe()
    assert json.loads(json.dumps(info)) == info and info["options"] == {"require_masks": True}
    assert info["num_classes"] == 19 and info["len"] == 3

    inst = train.instance_ids(0)
    raw = _raw(cityscapes_files(cityscapes, "train", "aachen", "aachen_000000_000000")["label_ids"])
    assert inst.dtype == np.int32 and inst.shape == (64, 128)
    assert set(np.unique(inst[raw == 26]).tolist()) <= {26000, 26001, 26002}
    np.testing.assert_array_equal(inst[raw != 26], raw[raw != 26])

    test = build_dataset("cityscapes", root=cityscapes, split="test")
    assert test[0].mask is None and test.describe()["options"] == {"require_masks": False}
    forced = build_dataset("cityscapes", root=cityscapes, split="test", require_masks=True)
    assert forced[0].mask is not None

    unlabelled = write_cityscapes(cityscapes.parent / "only images", {"val": 1}, instance_ids=False, labels=False)
    ds = build_dataset("cityscapes", root=unlabelled, split="val", require_masks=False)
    assert ds.instance_ids(0) is None and ds[0].mask is None


def test_cityscapes_errors_name_path_and_fix(cityscapes, tmp_path):
    for root in (tmp_path / "missing", tmp_path):
        message = _error(build_dataset, "cityscapes", root=root, split="train")
        assert str(root) in message and "--root" in message and "leftImg8bit" in message
    message = _error(build_dataset, "cityscapes", root=cityscapes / "leftImg8bit", split="train")
    assert f"--root {cityscapes}" in message
    assert "--root" in _error(build_dataset, "cityscapes", root=None, split="train")

    message = _error(build_dataset, "cityscapes", root=cityscapes, split="train_extra")
    assert "'train_extra'" in message and "test, train, val" in message

    files = cityscapes_files(cityscapes, "val", "aachen", "aachen_000000_000000")
    files["label_ids"].unlink()
    message = _error(build_dataset, "cityscapes", root=cityscapes, split="val")
    assert str(files["image"]) in message and str(files["label_ids"]) in message
    assert "require_masks=false" in message


# ----- Mapillary Vistas -------------------------------------------------------------------------

@pytest.fixture
def mapillary(tmp_path):
    root = write_mapillary(tmp_path / "vistas", {"training": 2, "validation": 1, "testing": 1}, version="v1.1")
    return write_mapillary(root, {"training": 2, "validation": 1}, version="v1.2")


def test_mapillary_classes_palette_and_unlabeled_ignored(mapillary):
    ds = build_dataset("mapillary", root=mapillary, split="training")
    config = json.loads((mapillary / "config_v1.2.json").read_text())["labels"]
    assert len(config) == 66 and ds.num_classes == 65
    assert ds.classes[:3] == ("Bird", "Ground Animal", "Curb") and "Unlabeled" not in ds.classes
    np.testing.assert_array_equal(ds.palette, [label["color"] for label in config[:65]])
    assert ds.ids == ["tr00000000000000000000", "tr00000000000000000001"]

    label_file = mapillary / "training" / "v1.2" / "labels" / f"{ds.ids[0]}.png"
    assert Image.open(label_file).mode == "P"
    raw = _raw(label_file)
    assert raw.max() == 65
    mask = ds[0].mask
    np.testing.assert_array_equal(mask[raw < 65], raw[raw < 65])
    assert (mask[raw == 65] == 255).all()
    info = ds.describe()
    assert json.loads(json.dumps(info)) == info and info["options"] == {"version": "v1.2", "require_masks": True}

    raw[0, 0] = 70  # neither a class nor ignore
    write_index_png(label_file, raw)
    message = _error(ds.__getitem__, 0)
    assert str(label_file) in message and "70" in message and "0..64" in message


def test_mapillary_versions_and_split_aliases(mapillary, tmp_path):
    v12 = build_dataset("mapillary", root=mapillary, split="val")
    v11 = build_dataset("mapillary", root=mapillary, split="validation", version="v1.1")
    assert v12.split == v11.split == "validation" and v12.ids == v11.ids
    assert v12.options["version"] == "v1.2" and v11.options["version"] == "v1.1"
    raw11 = _raw(mapillary / "validation" / "labels" / f"{v11.ids[0]}.png")
    assert not np.array_equal(v12[0].mask, v11[0].mask)
    np.testing.assert_array_equal(v11[0].mask, np.where(raw11 == 65, 255, raw11))

    test = build_dataset("mapillary", root=mapillary, split="test")
    assert test.split == "testing" and test[0].mask is None

    old = write_mapillary(tmp_path / "old", {"training": 1}, version="v1.1")
    assert build_dataset("mapillary", root=old, split="train").options["version"] == "v1.1"
    message = _error(build_dataset, "mapillary", root=old, split="train", version="v1.2")
    assert str(old / "config_v1.2.json") in message and "version=auto" in message
    message = _error(build_dataset, "mapillary", root=old, split="train", version="v2.0")
    assert "v1.2" in message and "v1.1" in message


def test_mapillary_errors_name_path_and_fix(mapillary, tmp_path):
    for root in (tmp_path / "missing", tmp_path):
        message = _error(build_dataset, "mapillary", root=root, split="training")
        assert str(root) in message and "--root" in message and "v1.2/labels" in message
    assert f"--root {mapillary}" in _error(build_dataset, "mapillary", root=mapillary / "training", split="training")

    empty = tmp_path / "only train"
    write_mapillary(empty, {"training": 1})
    message = _error(build_dataset, "mapillary", root=empty, split="val")
    assert "'validation'" in message and "training" in message

    orphan = write_image(mapillary / "validation" / "images" / "zz_orphan.jpg")
    message = _error(build_dataset, "mapillary", root=mapillary, split="validation")
    assert str(orphan) in message and str(mapillary / "validation" / "v1.2" / "labels" / "zz_orphan.png") in message


# ----- PASCAL VOC 2012 + SBD --------------------------------------------------------------------

VOC_CLASSES = ("background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
               "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train",
               "tvmonitor")


@pytest.fixture
def voc(tmp_path):
    return write_voc(tmp_path / "voc data", {"train": ["2007_000001", "2007_000002"], "val": ["2007_000003"]})


@pytest.fixture
def sbd(tmp_path):
    return write_sbd(tmp_path / "sbd", {"train": ["2007_000001", "2008_000001", "2008_000002"],
                                        "val": ["2007_000003", "2008_000003"]})


def test_voc_classes_palette_border_and_roots(voc):
    ds = build_dataset("voc", root=voc, split="train")
    assert ds.classes == VOC_CLASSES and ds.ids == ["2007_000001", "2007_000002"]
    assert ds.palette[1].tolist() == [128, 0, 0] and ds.palette[15].tolist() == [192, 128, 128]
    label_file = voc / "VOCdevkit" / "VOC2012" / "SegmentationClass" / "2007_000001.png"
    assert Image.open(label_file).mode == "P"
    mask = ds[0].mask
    np.testing.assert_array_equal(mask, voc_mask("2007_000001"))
    assert set(np.unique(mask).tolist()) == {0, 2, 255}  # the border stays 255 (ignored)
    assert ds.describe()["options"] == {"sbd": None, "require_masks": True}
    assert len(build_dataset("voc", root=voc, split="trainval")) == 3

    for root in (voc / "VOCdevkit", voc / "VOCdevkit" / "VOC2012"):
        assert build_dataset("voc", root=root, split="val").ids == ["2007_000003"]
    flat = write_voc(voc.parent / "VOC2012", {"val": 1}, nested=False)
    assert build_dataset("voc", root=flat, split="val").ids == ["2007_000001"]

    write_index_png(label_file, np.where(mask == 2, 21, mask).astype(np.uint8))
    message = _error(ds.__getitem__, 0)
    assert str(label_file) in message and "21" in message and "0..20" in message


def test_voc_train_aug_composition(voc, sbd):
    ds = build_dataset("voc", root=voc, split="train_aug", sbd=str(sbd))
    # (VOC train ∪ SBD train ∪ SBD val) − VOC val: 2007_000003 is in SBD val but VOC val.
    assert ds.ids == ["2007_000001", "2007_000002", "2008_000001", "2008_000002", "2008_000003"]
    np.testing.assert_array_equal(ds[0].mask, voc_mask("2007_000001"))  # in both: VOC's PNG wins
    assert not np.array_equal(voc_mask("2007_000001"), sbd_mask("2007_000001"))
    for i in (2, 3, 4):
        sample = ds[i]
        np.testing.assert_array_equal(sample.mask, sbd_mask(sample.id))
        np.testing.assert_array_equal(sample.image, read_image(sbd / "dataset" / "img" / f"{sample.id}.jpg"))
    assert ds.image_size(4) == (64, 128)
    assert ds.describe()["options"]["sbd"] == str(sbd)
    assert build_dataset("voc", root=voc, split="train_aug", sbd=str(sbd / "dataset")).ids == ds.ids


def test_voc_errors_name_path_and_fix(voc, sbd, tmp_path, monkeypatch):
    message = _error(build_dataset, "voc", root=voc, split="train_aug")
    assert "--dataset-opt sbd=/path/to/benchmark_RELEASE" in message
    message = _error(build_dataset, "voc", root=voc, split="train_aug", sbd=str(tmp_path / "nosbd"))
    assert str(tmp_path / "nosbd") in message and "sbd=/path/to/benchmark_RELEASE" in message

    for root in (tmp_path / "missing", tmp_path):
        message = _error(build_dataset, "voc", root=root, split="train")
        assert str(root) in message and "--root" in message and "VOCdevkit/VOC2012" in message

    message = _error(build_dataset, "voc", root=voc, split="test")
    assert "'test'" in message and "train, trainval, val" in message and "train_aug" in message

    lists = voc / "VOCdevkit" / "VOC2012" / "ImageSets" / "Segmentation"
    (lists / "evil.txt").write_text("2007_000001\n../../../etc/passwd\n")
    message = _error(build_dataset, "voc", root=voc, split="evil")
    assert "line 2" in message and "outside" in message

    with monkeypatch.context() as patch:
        patch.setitem(sys.modules, "scipy.io", None)  # as if scipy were not installed
        message = _error(build_dataset, "voc", root=voc, split="train_aug", sbd=str(sbd))
        assert "pip install 'fusion-seg[voc]'" in message
        assert len(build_dataset("voc", root=voc, split="train")) == 2  # plain VOC needs no scipy

    (voc / "VOCdevkit" / "VOC2012" / "SegmentationClass" / "2007_000002.png").unlink()
    message = _error(build_dataset, "voc", root=voc, split="train")
    assert "2007_000002.jpg" in message and "SegmentationClass" in message and "2007_000002.png" in message
    assert build_dataset("voc", root=voc, split="train", require_masks=False)[1].mask is None


# ----- COCO -------------------------------------------------------------------------------------

@pytest.fixture
def coco(tmp_path):
    return write_coco(tmp_path / "co co", {"train": 2, "val": 1})


def _coco_expected(person, car, stop_sign) -> np.ndarray:
    """The fake image's mask by hand (boxes of fake_layouts.COCO_OBJECTS)."""
    mask = np.zeros((64, 128), dtype=np.uint8)
    mask[4:20, 90:120] = stop_sign
    mask[8:40, 8:40] = person      # person_a (polygon)
    mask[30:50, 0:16] = person     # person_b overlaps person_a: same class, stays
    mask[16:48, 32:72] = car       # car (RLE)
    mask[16:40, 32:40] = 255       # person_a and car: two classes
    mask[48:60, 80:120] = 255      # crowd person (uncompressed RLE)
    return mask


def test_coco_voc_classes(coco):
    ds = build_dataset("coco", root=coco, split="val")
    assert ds.classes == VOC_CLASSES and ds.palette[15].tolist() == [192, 128, 128]
    assert ds.ids == ["000000000003"] and ds.image_size(0) == (64, 128)
    sample = ds[0]
    assert sample.image.shape == (64, 128, 3)
    np.testing.assert_array_equal(sample.mask, _coco_expected(person=15, car=7, stop_sign=0))
    info = ds.describe()
    assert json.loads(json.dumps(info)) == info
    assert info["options"] == {"classes": "voc", "min_pixels": 0, "require_masks": True}
    assert build_dataset("coco", root=coco, split="val2017").ids == ds.ids


def test_coco_things_classes(coco):
    ds = build_dataset("coco", root=coco, split="train", classes="things")
    assert ds.num_classes == 81 and ds.classes[0] == "background"
    assert ds.classes[1:] == tuple(COCO_CATEGORIES[c] for c in sorted(COCO_CATEGORIES))
    assert ds.classes[12] == "stop sign" and ds.classes[80] == "toothbrush"
    assert ds.ids == ["000000000001", "000000000002"]
    np.testing.assert_array_equal(ds[1].mask, _coco_expected(person=1, car=3, stop_sign=12))


def test_coco_min_pixels_from_area(coco):
    ann_file = coco / "annotations" / "instances_train2017.json"
    data = json.loads(ann_file.read_text())
    data["images"].append({"id": 99, "file_name": "000000000099.jpg", "height": 64, "width": 128})
    ann_file.write_text(json.dumps(data))
    write_image(coco / "train2017" / "000000000099.jpg")
    assert build_dataset("coco", root=coco, split="train").options["min_pixels"] == 1000
    assert len(build_dataset("coco", root=coco, split="train")) == 2  # the unannotated image is dropped
    assert len(build_dataset("coco", root=coco, split="train", min_pixels=0)) == 3
    # Non-crowd areas: person_a 1024 + person_b 320 + car 1280 = 2624 (voc); + stop sign 480 = 3104 (things).
    voc = build_dataset("coco", root=coco, split="train", min_pixels=3000)
    assert len(voc) == 0 and voc.describe()["dropped_by_min_pixels"] == 3
    assert len(build_dataset("coco", root=coco, split="train", min_pixels=3000, classes="things")) == 2
    assert len(build_dataset("coco", root=coco, split="train", min_pixels=2624)) == 2


def test_coco_errors_name_path_and_fix(coco, tmp_path, monkeypatch):
    for root in (tmp_path / "missing", tmp_path):
        message = _error(build_dataset, "coco", root=root, split="val")
        assert str(root) in message and "--root" in message and "instances_" in message
    assert f"--root {coco}" in _error(build_dataset, "coco", root=coco / "val2017", split="val")

    message = _error(build_dataset, "coco", root=coco, split="test")
    assert "'test'" in message and "train2017, val2017" in message
    message = _error(build_dataset, "coco", root=coco, split="val", classes="stuff")
    assert "classes=voc" in message and "classes=things" in message

    image = coco / "val2017" / "000000000003.jpg"
    image.unlink()
    message = _error(build_dataset, "coco", root=coco, split="val")
    assert str(image) in message and "instances_val2017.json" in message

    ann_file = coco / "annotations" / "instances_train2017.json"
    data = json.loads(ann_file.read_text())
    data["images"][0]["file_name"] = "../val2017/x.jpg"
    ann_file.write_text(json.dumps(data))
    message = _error(build_dataset, "coco", root=coco, split="train")
    assert str(ann_file) in message and "../val2017/x.jpg" in message

    monkeypatch.setitem(sys.modules, "pycocotools.mask", None)  # as if pycocotools were not installed
    assert "pip install 'fusion-seg[coco]'" in _error(build_dataset, "coco", root=coco, split="val")


# ----- shared -----------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["voc", "coco"])
def test_image_size_reads_only_the_header(tmp_path, name):
    if name == "voc":
        root = write_voc(tmp_path, {"val": 1})
        image = root / "VOCdevkit" / "VOC2012" / "JPEGImages" / "2007_000001.jpg"
    else:
        root = write_coco(tmp_path, {"val": 1})
        image = root / "val2017" / "000000000001.jpg"
    data = image.read_bytes()
    image.write_bytes(data[: len(data) // 2])
    ds = build_dataset(name, root=root, split="val")
    assert ds.image_size(0) == (64, 128)
    assert str(image) in _error(ds.__getitem__, 0)


def test_datasets_pickle_for_dataloader_workers(tmp_path):
    """DataLoader workers started with spawn receive the dataset pickled."""
    import pickle

    roots = {
        "cityscapes": (write_cityscapes(tmp_path / "cs", {"val": 1}), {}),
        "mapillary": (write_mapillary(tmp_path / "mv", {"validation": 1}), {}),
        "voc": (write_voc(tmp_path / "voc", {"val": 1}), {}),
        "coco": (write_coco(tmp_path / "coco", {"val": 1}), {"classes": "things"}),
    }
    for name, (root, options) in roots.items():
        ds = build_dataset(name, root=root, split="val", **options)
        again = pickle.loads(pickle.dumps(ds))
        np.testing.assert_array_equal(again[0].mask, ds[0].mask)
        assert again.ids == ds.ids and again.describe() == ds.describe()
