"""Image/mask I/O: conversions, EXIF, and DataErrors that name the bad file."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from fusion_seg.errors import DataError
from fusion_seg.data.io import (IMAGE_EXTENSIONS, default_palette, image_size, overlay, read_image, read_mask,
                                write_mask_png, write_rgb_png)


def _rgb(h=12, w=16, seed=0):
    return np.random.default_rng(seed).integers(0, 256, size=(h, w, 3), dtype=np.uint8)


# ----- unreadable files -------------------------------------------------------------------------

def _truncated(path, data: bytes):
    path.write_bytes(data[: len(data) // 2])
    return path


@pytest.mark.parametrize("make", ["empty", "text", "truncated_png", "truncated_jpeg", "missing"])
@pytest.mark.parametrize("reader", [read_image, read_mask])
def test_bad_files_raise_data_error_naming_the_path(tmp_path, make, reader):
    folder = tmp_path / "bad dir é"
    folder.mkdir()
    if make == "empty":
        path = folder / "empty.png"
        path.write_bytes(b"")
    elif make == "text":
        path = folder / "notes.png"
        path.write_text("this is not an image\n")
    elif make == "truncated_png":
        good = folder / "good.png"
        Image.fromarray(_rgb(64, 64)).save(good)
        path = _truncated(folder / "cut.png", good.read_bytes())
    elif make == "truncated_jpeg":
        good = folder / "good.jpg"
        Image.fromarray(_rgb(64, 64)).save(good, quality=95)
        path = _truncated(folder / "cut.jpg", good.read_bytes())
    else:
        path = folder / "absent.png"
    with pytest.raises(DataError) as info:
        reader(path)
    message = str(info.value)
    assert str(path) in message
    if make != "missing":
        assert "re-export" in message.lower() or "remove" in message.lower()


# ----- conversions ------------------------------------------------------------------------------

def test_rgb_png_round_trip_with_unicode_path(tmp_path):
    image = _rgb()
    path = tmp_path / "my images ü" / "straße 1.png"
    write_rgb_png(path, image)
    np.testing.assert_array_equal(read_image(path), image)
    assert image_size(path) == (12, 16)
    assert [p.name for p in path.parent.iterdir()] == ["straße 1.png"]  # no temp file left behind


@pytest.mark.parametrize("suffix", IMAGE_EXTENSIONS)
def test_every_listed_image_extension_is_readable(tmp_path, suffix):
    """Datasets and predict list files by IMAGE_EXTENSIONS: each one must be a format read_image decodes."""
    image = _rgb()
    path = tmp_path / f"img{suffix}"
    lossless = {".jpg": {"quality": 100}, ".jpeg": {"quality": 100}, ".webp": {"lossless": True}}
    Image.fromarray(image).save(path, **lossless.get(suffix, {}))
    got = read_image(path)
    assert got.shape == image.shape and got.dtype == np.uint8
    assert image_size(path) == (12, 16)
    if suffix not in (".jpg", ".jpeg"):
        np.testing.assert_array_equal(got, image)


def test_image_extensions_are_lower_case_suffixes():
    assert all(s.startswith(".") and s == s.lower() for s in IMAGE_EXTENSIONS)
    assert ".webp" in IMAGE_EXTENSIONS and len(set(IMAGE_EXTENSIONS)) == len(IMAGE_EXTENSIONS)


def test_a_failed_png_write_keeps_the_old_file_and_leaves_no_temp_file(tmp_path, monkeypatch):
    path = tmp_path / "mask.png"
    write_mask_png(path, np.zeros((4, 5), np.uint8))
    before = path.read_bytes()

    def broken_save(self, fp, *args, **kwargs):
        fp.write(b"\x89PNG half")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Image.Image, "save", broken_save)
    with pytest.raises(OSError):
        write_mask_png(path, np.ones((4, 5), np.uint8))
    assert path.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["mask.png"]


def test_grayscale_becomes_three_equal_channels(tmp_path):
    grey = np.arange(12 * 16, dtype=np.uint8).reshape(12, 16)
    Image.fromarray(grey).save(tmp_path / "g.png")
    out = read_image(tmp_path / "g.png")
    assert out.shape == (12, 16, 3) and out.dtype == np.uint8
    for c in range(3):
        np.testing.assert_array_equal(out[:, :, c], grey)


def test_rgba_drops_alpha(tmp_path):
    rgba = np.dstack([_rgb(), np.full((12, 16), 7, np.uint8)])
    Image.fromarray(rgba).save(tmp_path / "a.png")
    np.testing.assert_array_equal(read_image(tmp_path / "a.png"), rgba[:, :, :3])


def test_palette_image_gives_palette_colours(tmp_path):
    idx = np.array([[0, 1], [2, 1]], dtype=np.uint8)
    img = Image.fromarray(idx)
    img.putpalette([10, 20, 30, 200, 0, 0, 0, 0, 250] + [0] * (256 * 3 - 9))
    img.save(tmp_path / "p.png")
    out = read_image(tmp_path / "p.png")
    assert out.shape == (2, 2, 3)
    np.testing.assert_array_equal(out[0, 0], [10, 20, 30])
    np.testing.assert_array_equal(out[0, 1], [200, 0, 0])
    np.testing.assert_array_equal(out[1, 0], [0, 0, 250])


def test_16bit_grayscale_is_scaled_not_clipped(tmp_path):
    values = np.array([[0, 257, 32896, 65535]], dtype=np.uint16)
    Image.fromarray(values).save(tmp_path / "g16.png")
    assert Image.open(tmp_path / "g16.png").mode.startswith("I")
    out = read_image(tmp_path / "g16.png")
    assert out.shape == (1, 4, 3) and out.dtype == np.uint8
    np.testing.assert_array_equal(out[0, :, 0], [0, 1, 128, 255])


def test_cmyk_jpeg_becomes_rgb(tmp_path):
    Image.new("CMYK", (10, 6), (0, 255, 255, 0)).save(tmp_path / "c.jpg", quality=95)
    assert Image.open(tmp_path / "c.jpg").mode == "CMYK"
    out = read_image(tmp_path / "c.jpg")
    assert out.shape == (6, 10, 3) and out.dtype == np.uint8
    r, g, b = out.reshape(-1, 3).mean(axis=0)
    assert r > 200 and g < 60 and b < 60  # cyan=0, magenta=yellow=full -> red


def test_exif_orientation_6_is_applied(tmp_path):
    stored = np.zeros((20, 40, 3), dtype=np.uint8)  # H=20, W=40 as stored
    stored[:10, :10] = 255  # white block top-left
    exif = Image.Exif()
    exif[0x0112] = 6  # display = stored rotated 90 degrees clockwise
    path = tmp_path / "rot.jpg"
    Image.fromarray(stored).save(path, exif=exif, quality=100)
    out = read_image(path)
    assert out.shape == (40, 20, 3)
    assert image_size(path) == (40, 20)
    assert out[:10, -10:].mean() > 200  # top-left moved to top-right
    assert out[:10, :10].mean() < 50


# ----- masks ------------------------------------------------------------------------------------

def test_palette_mask_reads_as_indices(tmp_path):
    mask = np.array([[0, 1, 2], [3, 255, 1]], dtype=np.uint8)
    path = tmp_path / "m.png"
    write_mask_png(path, mask, palette=default_palette(4))
    assert Image.open(path).mode == "P"
    out = read_mask(path)
    assert out.dtype == np.uint8
    np.testing.assert_array_equal(out, mask)


def test_grey_and_16bit_masks(tmp_path):
    mask = np.array([[0, 4, 255]], dtype=np.uint8)
    Image.fromarray(mask).save(tmp_path / "l.png")
    np.testing.assert_array_equal(read_mask(tmp_path / "l.png"), mask)
    Image.fromarray(mask.astype(np.uint16)).save(tmp_path / "ok16.png")
    np.testing.assert_array_equal(read_mask(tmp_path / "ok16.png"), mask)
    Image.fromarray(np.array([[0, 300]], dtype=np.uint16)).save(tmp_path / "big16.png")
    with pytest.raises(DataError, match="300") as info:
        read_mask(tmp_path / "big16.png")
    assert str(tmp_path / "big16.png") in str(info.value)


def test_rgb_mask_is_refused_with_explanation(tmp_path):
    Image.fromarray(_rgb()).save(tmp_path / "colour.png")
    with pytest.raises(DataError, match="single-channel") as info:
        read_mask(tmp_path / "colour.png")
    assert str(tmp_path / "colour.png") in str(info.value)


# ----- overlay and palette ----------------------------------------------------------------------

def test_overlay_blends_and_keeps_ignore_pixels():
    image = np.full((1, 3, 3), 100, dtype=np.uint8)
    mask = np.array([[0, 1, 255]], dtype=np.uint8)
    palette = np.array([[0, 0, 0], [200, 100, 0]], dtype=np.uint8)
    out = overlay(image, mask, palette, alpha=0.5)
    np.testing.assert_array_equal(out[0, 0], [50, 50, 50])
    np.testing.assert_array_equal(out[0, 1], [150, 100, 50])
    np.testing.assert_array_equal(out[0, 2], [100, 100, 100])


def test_default_palette_is_voc_and_distinct():
    palette = default_palette(21)
    assert palette.shape == (21, 3) and palette.dtype == np.uint8
    np.testing.assert_array_equal(palette[:4], [[0, 0, 0], [128, 0, 0], [0, 128, 0], [128, 128, 0]])
    assert len({tuple(c) for c in default_palette(256)}) == 256
