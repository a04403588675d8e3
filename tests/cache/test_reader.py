import numpy as np
import pytest

from fusion_seg.cache.reader import aligned_crop_box, crop_view

STRIDES = {"s4": 4, "s8": 8, "s16": 16, "s32": 32}


def _coordinate_maps(h, w):
    """Feature maps whose cells hold the pixel coordinates they cover, and labels likewise."""
    feats = {}
    for name, s in STRIDES.items():
        fh, fw = -(-h // s), -(-w // s)
        yy, xx = np.meshgrid(np.arange(fh) * s, np.arange(fw) * s, indexing="ij")
        feats[name] = np.stack([yy, xx]).astype(np.float32)
    yy, xx = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    return feats, (yy // 32 * 1000 + xx // 32)


@pytest.mark.parametrize("hw", [(360, 480), (100, 140), (64, 64)])
def test_crop_is_aligned_and_consistent_across_strides(hw):
    feats, labels = _coordinate_maps(*hw)
    crop = (64, 96)
    rng = np.random.default_rng(0)
    for _ in range(20):
        y0, x0 = aligned_crop_box(hw, crop, rng)
        assert y0 % 32 == 0 and x0 % 32 == 0
        assert y0 <= max(0, hw[0] - crop[0]) and x0 <= max(0, hw[1] - crop[1])
        out, out_labels = crop_view(feats, labels.astype(np.int32), STRIDES, (y0, x0), crop, ignore_index=255)
        assert out_labels.shape == crop
        for name, s in STRIDES.items():
            assert out[name].shape[1:] == (crop[0] // s, crop[1] // s)
            valid_h = min(crop[0], hw[0] - y0) // s
            valid_w = min(crop[1], hw[1] - x0) // s
            # Cell (i, j) of every stride covers pixel (y0 + i*s, x0 + j*s).
            np.testing.assert_array_equal(out[name][0, :valid_h, 0], y0 + np.arange(valid_h) * s)
            np.testing.assert_array_equal(out[name][1, 0, :valid_w], x0 + np.arange(valid_w) * s)
        # The labels under the top-left cell agree with the stride-32 map's coordinates.
        assert out_labels[0, 0] == (y0 // 32) * 1000 + x0 // 32


def test_small_view_is_padded_with_ignore():
    feats, labels = _coordinate_maps(40, 40)
    out, out_labels = crop_view(feats, labels.astype(np.uint8), STRIDES, (0, 0), (64, 64), ignore_index=255)
    assert out_labels.shape == (64, 64)
    assert (out_labels[40:, :] == 255).all() and (out_labels[:, 40:] == 255).all()
    assert out["s4"].shape == (2, 16, 16) and (out["s4"][:, 10:, :] == 0).all()


def test_crop_box_is_random_but_seeded():
    a = [aligned_crop_box((360, 480), (128, 128), np.random.default_rng([0, e, 3])) for e in range(10)]
    b = [aligned_crop_box((360, 480), (128, 128), np.random.default_rng([0, e, 3])) for e in range(10)]
    assert a == b and len(set(a)) > 1
