"""Storage dtypes and codecs: round trips, error bounds, and stores written with each."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from fusion_seg.cache import codecs as storage
from fusion_seg.cache.store import FeatureStore
from fusion_seg.cache.reader import CachedViews
from fusion_seg.errors import CacheError, UserError
from pipeline_helpers import extract_synthetic


def _relu_map(seed=0, shape=(8, 5, 7)):
    x = np.random.default_rng(seed).normal(size=shape).astype(np.float32)
    return np.maximum(x, 0) * 3


def test_float16_is_the_fp16_cast():
    x = _relu_map()
    stored, scale = storage.encode(x, "float16")
    assert scale is None and stored.dtype == np.float16
    np.testing.assert_array_equal(storage.decode(stored, "float16"), x.astype(np.float16))


def test_bfloat16_matches_torch_rounding():
    x = np.random.default_rng(1).normal(size=(4, 9, 11)).astype(np.float32) * 100
    stored, _ = storage.encode(x, "bfloat16")
    assert stored.dtype == np.uint16
    expected = torch.from_numpy(x).to(torch.bfloat16).float().numpy()
    np.testing.assert_array_equal(storage.decode(stored, "bfloat16"), expected)


def test_uint8_error_is_at_most_half_a_step_and_zeros_stay_exact():
    x = _relu_map()
    x[3] = 0  # an all-zero channel
    stored, scale = storage.encode(x, "uint8")
    assert stored.dtype == np.uint8 and scale.shape == (8,)
    back = storage.decode(stored, "uint8", scale)
    err = np.abs(back - x).reshape(8, -1).max(axis=1)
    assert np.all(err <= scale / 2 + 1e-6)
    assert np.all(back[x == 0] == 0)
    np.testing.assert_allclose(back.reshape(8, -1).max(axis=1), x.reshape(8, -1).max(axis=1), rtol=1e-6)


def test_uint8_refuses_negative_features():
    with pytest.raises(CacheError, match="post-ReLU"):
        storage.encode(np.array([[[-1.0, 2.0]]], np.float32), "uint8")


def test_unknown_names_are_user_errors():
    with pytest.raises(UserError, match="float16"):
        storage.check_dtype("float8")
    with pytest.raises(UserError, match="blosc-zstd"):
        storage.codec_spec("gzip")


@pytest.mark.parametrize("codec", sorted(storage.CODECS))
def test_every_codec_round_trips_fp16_exactly(tmp_path, codec):
    ref = extract_synthetic(tmp_path / "ref.zarr", views=1, num_images=2)
    other = extract_synthetic(tmp_path / f"{codec}.zarr", views=1, num_images=2, codec=codec)
    a, b = FeatureStore.open(ref.store), FeatureStore.open(other.store)
    assert b.spec.codec == storage.CODECS[codec]
    for v in range(a.num_views):
        fa, la, _ = a.read_view(v)
        fb, lb, _ = b.read_view(v)
        np.testing.assert_array_equal(la, lb)
        for name in fa:
            np.testing.assert_array_equal(fa[name], fb[name])


@pytest.mark.parametrize("dtype", ["bfloat16", "uint8"])
def test_lossy_stores_read_close_to_fp16(tmp_path, dtype):
    ref = FeatureStore.open(extract_synthetic(tmp_path / "ref.zarr", views=1, num_images=2).store)
    lossy = FeatureStore.open(extract_synthetic(tmp_path / f"{dtype}.zarr", views=1, num_images=2, dtype=dtype).store)
    assert lossy.info()["dtype"] == dtype
    for v in range(ref.num_views):
        fa, _, _ = ref.read_view(v)
        fb, _, _ = lossy.read_view(v)
        for name in fa:
            a = fa[name].astype(np.float32)
            assert fb[name].dtype == np.float32
            # bf16 keeps 8 significant bits, uint8 a 255th of each channel's maximum
            bound = np.abs(a).max() * (2**-8 if dtype == "bfloat16" else 1 / 255) + 1e-3
            assert np.abs(fb[name] - a).max() <= bound
            assert np.abs(fb[name] - a).max() > 0  # it is lossy: the test would notice a silent fp16 store


def test_resuming_with_another_dtype_is_refused(tmp_path):
    extract_synthetic(tmp_path / "s.zarr", views=1, num_images=2)
    with pytest.raises(CacheError, match="dtype"):
        extract_synthetic(tmp_path / "s.zarr", views=1, num_images=2, dtype="uint8")


def test_first_k_views_of_a_store_are_a_k_view_store(tmp_path):
    """--views K on an 8-view store trains on exactly what a K-view extraction stores."""
    big = extract_synthetic(tmp_path / "v4.zarr", views=4, num_images=3)
    small = extract_synthetic(tmp_path / "v2.zarr", views=2, num_images=3)
    subset = CachedViews(big.store, ["s4", "s32"], max_views_per_image=2)
    whole = CachedViews(small.store, ["s4", "s32"])
    assert len(subset) == len(whole) == 6
    for j in range(len(whole)):
        (fa, la), (fb, lb) = subset[j], whole[j]
        assert torch.equal(la, lb)
        assert all(torch.equal(fa[k], fb[k]) for k in fa)
    with pytest.raises(CacheError, match="holds 4"):
        CachedViews(big.store, ["s4"], max_views_per_image=5)
