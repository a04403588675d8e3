"""Resizing, HRNet-style training views and normalisation."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from fusion_seg.data.transforms import hrnet_train_view, resize_pair, resized_shape, to_tensor, view_rng


def _pair(h=40, w=60, seed=0, labels=(0, 3, 7)):
    rng = np.random.default_rng(seed)
    image = rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
    mask = rng.choice(np.array(labels, dtype=np.uint8), size=(h, w))
    return image, mask


# ----- resize_pair ------------------------------------------------------------------------------

def test_resize_pair_nearest_keeps_label_values():
    image, mask = _pair()
    out_image, out_mask = resize_pair(image, mask, size=(27, 91))
    assert out_image.shape == (27, 91, 3) and out_image.dtype == np.uint8
    assert out_mask.shape == (27, 91) and out_mask.dtype == np.uint8
    assert set(np.unique(out_mask)) <= {0, 3, 7}


def test_resize_pair_short_side_keeps_aspect():
    image, mask = _pair(100, 200)
    out_image, out_mask = resize_pair(image, mask, short_side=50)
    assert out_image.shape[:2] == (50, 100) and out_mask.shape == (50, 100)
    out_image, out_mask = resize_pair(image, None, short_side=150)
    assert out_image.shape[:2] == (150, 300) and out_mask is None


def test_resized_shape_matches_resize_pair():
    image, mask = _pair(37, 91)
    for kwargs in ({"short_side": 20}, {"short_side": 64}, {"size": (5, 7)}, {}):
        assert resized_shape((37, 91), **kwargs) == resize_pair(image, mask, **kwargs)[0].shape[:2]
    assert resized_shape((37, 91), short_side=20) == (20, 49)
    with pytest.raises(ValueError):
        resized_shape((37, 91), short_side=10, size=(10, 10))


def test_resize_pair_neither_or_both():
    image, mask = _pair()
    out_image, out_mask = resize_pair(image, mask)
    assert out_image is image and out_mask is mask
    with pytest.raises(ValueError):
        resize_pair(image, mask, short_side=10, size=(10, 10))


# ----- hrnet_train_view -------------------------------------------------------------------------

@pytest.mark.parametrize("hw", [(40, 60), (300, 500)])
def test_view_has_exact_crop_size_and_no_new_labels(hw):
    image, mask = _pair(*hw)
    for view in range(5):
        v_image, v_mask, meta = hrnet_train_view(image, mask, view_rng(0, 0, view), crop=(64, 96))
        assert v_image.shape == (64, 96, 3) and v_image.dtype == np.uint8
        assert v_mask.shape == (64, 96) and v_mask.dtype == np.uint8
        assert set(np.unique(v_mask)) <= {0, 3, 7, 255}
        assert 0.5 <= meta["scale"] <= 2.0
        assert meta["resized_hw"] == [round(hw[0] * meta["scale"]), round(hw[1] * meta["scale"])]
        assert meta["crop_box"][2:] == [64, 96]


def test_padding_uses_ignore_for_mask_and_mean_for_image():
    image, mask = _pair(20, 30)
    v_image, v_mask, meta = hrnet_train_view(image, mask, view_rng(1, 2, 3), crop=(50, 40),
                                             scale_range=(1.0, 1.0), flip=False)
    assert meta["resized_hw"] == [20, 30] and meta["crop_box"] == [0, 0, 50, 40]
    np.testing.assert_array_equal(v_image[:20, :30], image)
    np.testing.assert_array_equal(v_mask[:20, :30], mask)
    assert (v_mask[20:] == 255).all() and (v_mask[:, 30:] == 255).all()
    assert (v_image[20:] == [124, 116, 104]).all() and (v_image[:, 30:] == [124, 116, 104]).all()


def test_crop_box_locates_the_view():
    image, mask = _pair(80, 120)
    v_image, v_mask, meta = hrnet_train_view(image, mask, view_rng(5, 0, 0), crop=(32, 48),
                                             scale_range=(1.0, 1.0), flip=False)
    y0, x0, h, w = meta["crop_box"]
    np.testing.assert_array_equal(v_image, image[y0:y0 + h, x0:x0 + w])
    np.testing.assert_array_equal(v_mask, mask[y0:y0 + h, x0:x0 + w])


def test_flip_flips_image_and_mask():
    image, mask = _pair(30, 50)
    seen = set()
    for view in range(16):
        v_image, v_mask, meta = hrnet_train_view(image, mask, view_rng(0, 0, view), crop=(30, 50),
                                                 scale_range=(1.0, 1.0))
        expected_image = image[:, ::-1] if meta["flip"] else image
        expected_mask = mask[:, ::-1] if meta["flip"] else mask
        np.testing.assert_array_equal(v_image, expected_image)
        np.testing.assert_array_equal(v_mask, expected_mask)
        seen.add(meta["flip"])
    assert seen == {True, False}
    for view in range(8):
        assert hrnet_train_view(image, mask, view_rng(0, 0, view), crop=(30, 50), flip=False)[2]["flip"] is False


def test_same_seed_same_view_regardless_of_order():
    images = [_pair(60, 80, seed=s) for s in range(3)]
    keys = [(i, v) for i in range(3) for v in range(2)]

    def views(order):
        out = {}
        for i, v in order:
            out[(i, v)] = hrnet_train_view(*images[i], view_rng(7, i, v), crop=(48, 48))
        return out

    forward, backward = views(keys), views(keys[::-1])
    for key in keys:
        np.testing.assert_array_equal(forward[key][0], backward[key][0])
        np.testing.assert_array_equal(forward[key][1], backward[key][1])
        assert forward[key][2] == backward[key][2]
    metas = [forward[k][2] for k in keys]
    assert len({m["scale"] for m in metas}) == len(keys)  # different views really differ


def test_view_without_mask():
    image, _ = _pair()
    v_image, v_mask, _ = hrnet_train_view(image, None, view_rng(0, 0, 0), crop=(16, 16))
    assert v_image.shape == (16, 16, 3) and v_mask is None


# ----- normalisation ----------------------------------------------------------------------------

def test_to_tensor_normalises_channels_first():
    image = np.zeros((2, 3, 3), dtype=np.uint8)
    image[..., 0], image[..., 1], image[..., 2] = 255, 0, 51
    tensor = to_tensor(image, mean=(0.5, 0.5, 0.2), std=(0.5, 0.25, 0.1))
    assert tensor.shape == (3, 2, 3) and tensor.dtype == torch.float32
    torch.testing.assert_close(tensor[:, 0, 0], torch.tensor([1.0, -2.0, 0.0]))
