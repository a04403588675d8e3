"""One list of image extensions (fusion_seg.data.io.IMAGE_EXTENSIONS) for predict's --input and the datasets."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from fusion_seg.data.datasets import build_dataset
from fusion_seg.data.datasets import base as dataset_base
from fusion_seg.data.io import IMAGE_EXTENSIONS
from fusion_seg.errors import UserError
from fusion_seg.inference import predict as infer


def _image(path, seed=0):
    rgb = np.random.default_rng(seed).integers(0, 256, size=(8, 10, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(path, **({"lossless": True} if path.suffix == ".webp" else {}))
    return rgb


def test_predict_and_the_datasets_list_images_with_one_function():
    from fusion_seg.data import io
    from fusion_seg.data.datasets import camvid, folder

    assert folder.IMAGE_EXTENSIONS is IMAGE_EXTENSIONS and folder.list_images is io.list_images
    assert camvid.list_images is io.list_images and infer.list_image_files is io.list_images
    assert not hasattr(infer, "IMAGE_SUFFIXES") and not hasattr(dataset_base, "list_images")  # no second list


def test_predict_skips_hidden_files_as_the_datasets_do(tmp_path):
    _image(tmp_path / "a.png")
    _image(tmp_path / "._a.png")  # macOS resource fork: not an image
    assert [p.name for p in infer.list_images(tmp_path)] == ["a.png"]


def test_predict_lists_a_webp_image(tmp_path):
    _image(tmp_path / "a.webp")
    _image(tmp_path / "b.PNG")
    (tmp_path / "notes.txt").write_text("not an image")
    assert [p.name for p in infer.list_images(tmp_path)] == ["a.webp", "b.PNG"]


def test_predict_names_every_accepted_extension_when_a_folder_has_none(tmp_path):
    (tmp_path / "notes.txt").write_text("not an image")
    with pytest.raises(UserError) as err:
        infer.list_images(tmp_path)
    assert all(suffix in str(err.value) for suffix in IMAGE_EXTENSIONS)


def test_the_folder_dataset_accepts_a_webp_image(tmp_path):
    (tmp_path / "classes.txt").write_text("background\nthing\n")
    (tmp_path / "images").mkdir()
    (tmp_path / "masks").mkdir()
    rgb = _image(tmp_path / "images" / "one.webp")
    mask = np.zeros((8, 10), np.uint8)
    mask[2:5, 3:7] = 1
    Image.fromarray(mask).save(tmp_path / "masks" / "one.png")
    ds = build_dataset("folder", root=str(tmp_path), split="all")
    assert len(ds) == 1
    sample = ds[0]
    assert sample.id == "one"
    np.testing.assert_array_equal(sample.image, rgb)
    np.testing.assert_array_equal(sample.mask, mask)


def test_a_split_list_may_name_a_webp_image_with_its_suffix(tmp_path):
    (tmp_path / "classes.txt").write_text("background\nthing\n")
    (tmp_path / "images").mkdir()
    (tmp_path / "masks").mkdir()
    (tmp_path / "splits").mkdir()
    _image(tmp_path / "images" / "one.webp")
    Image.fromarray(np.zeros((8, 10), np.uint8)).save(tmp_path / "masks" / "one.png")
    (tmp_path / "splits" / "val.txt").write_text("one.webp\n")
    ds = build_dataset("folder", root=str(tmp_path), split="val")
    assert [ds[i].id for i in range(len(ds))] == ["one"]
