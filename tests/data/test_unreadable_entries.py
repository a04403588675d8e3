"""Issue 20: an image folder entry that cannot be read (a dangling symlink, a link loop) is an error that
names it and the fix, in every listing of images: predict's --input folder and each dataset that lists a
folder (what extract, train-decoder --online and evaluate read). It used to be skipped without a word."""
from __future__ import annotations

import os
import shutil

import numpy as np
import pytest
from click.testing import CliRunner
from fake_layouts import write_cityscapes, write_coco, write_mapillary
from PIL import Image

from fusion_seg.cli import main
from fusion_seg.data.datasets import build_dataset
from fusion_seg.data.io import list_images, read_image
from fusion_seg.errors import DataError

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")  # pycocotools


def _image(path, seed=0):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (8, 12, 3), dtype=np.uint8)).save(path)


def _dangle(path):
    """Replace ``path`` (if any) by a symbolic link to a file that does not exist; return the link."""
    path.unlink(missing_ok=True)
    os.symlink(path.parent / "gone" / path.name, path)
    return path


def _refused(fn, *args, **kwargs) -> str:
    with pytest.raises(DataError) as info:
        fn(*args, **kwargs)
    message = str(info.value)
    assert "\n" not in message
    return message


def _names_link_and_fix(message: str, link) -> None:
    assert str(link) in message and "broken" in message and "remove" in message, message


def test_list_images_refuses_a_dangling_link_and_a_link_loop(tmp_path):
    _image(tmp_path / "a.png")
    link = _dangle(tmp_path / "b.png")
    _names_link_and_fix(_refused(list_images, tmp_path), link)
    link.unlink()
    os.symlink("c.png", tmp_path / "c.png")  # a link to itself
    assert str(tmp_path / "c.png") in _refused(list_images, tmp_path)
    (tmp_path / "c.png").unlink()
    (tmp_path / "notes.txt").symlink_to(tmp_path / "nowhere.txt")  # not an image by its name: not listed
    (tmp_path / ".hidden.png").symlink_to(tmp_path / "nowhere.png")  # hidden: not listed
    (tmp_path / "sub.png").mkdir()  # a folder
    assert [p.name for p in list_images(tmp_path)] == ["a.png"]


def test_reading_a_dangling_link_says_it_is_one(tmp_path):
    link = _dangle(tmp_path / "a.png")
    _names_link_and_fix(_refused(read_image, link), link)


def _folder_root(root, n=2):
    (root / "classes.txt").parent.mkdir(parents=True, exist_ok=True)
    (root / "classes.txt").write_text("background\nthing\n")
    for i in range(n):
        _image(root / "images" / f"im{i}.png", i)
        _image(root / "masks" / f"im{i}.png", i)  # values are checked on read only
    return root


def test_the_folder_dataset_refuses_a_dangling_image_link(tmp_path):
    root = _folder_root(tmp_path / "data")
    link = _dangle(root / "images" / "im1.png")
    _names_link_and_fix(_refused(build_dataset, "folder", root=root, split="all"), link)
    (root / "splits").mkdir()
    (root / "splits" / "val.txt").write_text("im1\n")
    _names_link_and_fix(_refused(build_dataset, "folder", root=root, split="val"), link)


def test_camvid_refuses_a_dangling_image_link(tmp_path):
    root = tmp_path / "camvid"
    for i in range(2):
        _image(root / "val" / f"v{i}.png", i)
        _image(root / "valannot" / f"v{i}.png", i)
    link = _dangle(root / "val" / "v1.png")
    _names_link_and_fix(_refused(build_dataset, "camvid", root=root, split="val"), link)


def test_mapillary_refuses_a_dangling_image_link(tmp_path):
    root = write_mapillary(tmp_path / "vistas", {"training": 2})
    link = _dangle(sorted((root / "training" / "images").iterdir())[1])
    _names_link_and_fix(_refused(build_dataset, "mapillary", root=root, split="training"), link)


def test_cityscapes_refuses_a_dangling_image_link_and_city_folder(tmp_path):
    root = write_cityscapes(tmp_path / "cs", {"val": 2})
    images = sorted((root / "leftImg8bit" / "val").glob("*/*_leftImg8bit.png"))
    link = _dangle(images[0])
    _names_link_and_fix(_refused(build_dataset, "cityscapes", root=root, split="val"), link)
    shutil.rmtree(link.parent)
    city = _dangle(link.parent)  # a whole city folder that is a broken link
    assert str(city) in _refused(build_dataset, "cityscapes", root=root, split="val")


def test_coco_refuses_a_dangling_image_link(tmp_path):
    root = write_coco(tmp_path / "coco", {"val": 2})
    link = _dangle(sorted((root / "val2017").iterdir())[0])
    _names_link_and_fix(_refused(build_dataset, "coco", root=root, split="val"), link)


def test_extract_refuses_a_dangling_image_link(tmp_path):
    root = _folder_root(tmp_path / "data")
    link = _dangle(root / "images" / "im0.png")
    result = CliRunner().invoke(main, ["extract", "--dataset", "folder", "--root", str(root), "--split", "all",
                                       "--encoder", "resnet18", "--random-init", "--strides", "4,8,16,32",
                                       "--device", "cpu", "--out", str(tmp_path / "s.zarr")])
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output and str(link) in result.output and "broken" in result.output


def test_an_image_too_large_to_read_says_so(tmp_path, monkeypatch):
    """Pillow refuses an image of more than 2 * MAX_IMAGE_PIXELS as a decompression bomb: not a broken file."""
    _image(tmp_path / "big.png")  # 8x12 = 96 pixels
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 40)
    message = _refused(read_image, tmp_path / "big.png")
    assert "big.png" in message and "96 pixels" in message and "80" in message and "smaller" in message
    assert "truncated" not in message
