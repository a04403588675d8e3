import math

import numpy as np
import pytest
import zarr

from fusion_seg.cache.store import SCHEMA_VERSION, FeatureStore
from fusion_seg.requests import Augment, DatasetRef, EncoderSpec, ExtractRun
from fusion_seg.errors import CacheError, UserError
from PIL import Image

from fusion_seg.extract.local import extract
from pipeline_helpers import ENCODER, extract_synthetic


def _arrays(path):
    g = zarr.open_group(str(path), mode="r")
    return {name: g[name][:] for name in ("s4", "s8", "s16", "s32", "labels", "views")}


def test_layout_metadata_and_info(tmp_path):
    out = tmp_path / "train.zarr"
    r = extract_synthetic(out, views=2, crop=(64, 64))
    assert (r.views_total, r.views_written) == (12, 12)
    store = FeatureStore.open(out)
    spec = store.spec
    assert spec.views_per_image == 2 and len(spec.image_ids) == 6
    assert spec.classes[0] == "background" and spec.ignore_index == 255
    assert spec.augment["crop"] == [64, 64] and spec.augment["scale_range"] == [0.5, 2.0]
    assert spec.encoder["weights"] == "random-init:0" and spec.encoder["init"]["zero_init_last"] is False
    g = zarr.open_group(str(out), mode="r")
    assert g["s4"].shape == (12, 64, 16, 16) and g["s4"].chunks == (1, 64, 16, 16)
    assert g["s32"].shape == (12, 512, 2, 2) and str(g["s4"].dtype) == "float16"
    assert g["labels"].shape == (12, 64, 64) and str(g["labels"].dtype) == "uint8"
    codecs = [type(c).__name__ for c in g["s4"].compressors]
    assert codecs == ["ZstdCodec", "Crc32cCodec"]  # the default, zstd-1 (see storage.DEFAULT_CODEC)
    feats, labels, meta = store.read_view(3)
    assert labels.shape == (64, 64) and feats["s8"].shape == (128, 8, 8)
    assert meta["image_index"] == 1 and meta["view_index"] == 1 and 0.5 <= meta["scale"] <= 2.0
    info = store.info()
    assert info["views_complete"] == 12 and info["bytes_on_disk"] > 0 and info["compression_ratio"] > 1


def test_whole_images_resized_by_short_side(tmp_path):
    out = tmp_path / "val.zarr"
    extract_synthetic(out, views=1, augment=False, short_side=48, num_images=2)
    store = FeatureStore.open(out)
    assert store.spec.augment["enabled"] is False and store.spec.resize["short_side"] == 48
    feats, labels, meta = store.read_view(0)
    assert labels.shape == (48, 72) and (meta["valid_h"], meta["valid_w"]) == (48, 72)
    assert feats["s32"].shape[1:] == (2, 3)  # ceil(48/32), ceil(72/32)


def test_whole_images_of_different_sizes_are_padded(tmp_path):
    root = tmp_path / "data"
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    (root / "classes.txt").write_text("bg\nthing\n")
    rng = np.random.default_rng(0)
    for name, (h, w) in {"a": (40, 70), "b": (66, 50)}.items():
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(root / "images" / f"{name}.png")
        Image.fromarray((rng.random((h, w)) > 0.5).astype(np.uint8)).save(root / "masks" / f"{name}.png")
    out = tmp_path / "f.zarr"
    extract(out, DatasetRef("folder", "all", root=root), EncoderSpec(ENCODER, random_init=True, strides=(4, 32)),
            augment=Augment(enabled=False), run=ExtractRun(loader_workers=0), progress=False)
    store = FeatureStore.open(out)
    assert store.spec.label_shape == (66, 70)
    _, labels_a, meta_a = store.read_view(0)
    feats_b, labels_b, _ = store.read_view(1)
    assert labels_a.shape == (40, 70) and (meta_a["valid_h"], meta_a["valid_w"]) == (40, 70)
    assert labels_b.shape == (66, 50) and feats_b["s4"].shape[1:] == (17, 13)
    g = zarr.open_group(str(out), mode="r")
    assert (g["labels"][0, 40:, :] == 255).all()  # padding is ignore
    assert (g["s4"][0, :, 10:, :] == 0).all()


def test_resume_fills_only_missing_views_and_is_bit_identical(tmp_path):
    full, partial = tmp_path / "full.zarr", tmp_path / "partial.zarr"
    extract_synthetic(full)
    extract_synthetic(partial)
    # Simulate an interruption: views 2, 5 and 7 lost their completion record and their chunks.
    g = zarr.open_group(str(partial), mode="r+")
    for v in (2, 5, 7):
        g["views"][v] = np.full(g["views"].shape[1], math.nan)
        g["s8"][v] = 0
    assert FeatureStore.open(partial).completed().sum() == 9
    r = extract_synthetic(partial)
    assert r.views_written == 3
    a, b = _arrays(full), _arrays(partial)
    for name in a:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)
    assert extract_synthetic(partial).views_written == 0  # complete: a no-op


def test_a_lone_resumed_view_equals_the_batched_one(tmp_path):
    """A view re-extracted alone gets the bytes it got inside a batch (a lone image is padded to a pair)."""
    full, partial = tmp_path / "full.zarr", tmp_path / "partial.zarr"
    kw = dict(views=1, num_images=4, crop=(128, 160), batch_size=4)
    extract_synthetic(full, **kw)
    extract_synthetic(partial, **kw)
    FeatureStore.open(partial, mode="r+").invalidate([2])
    assert extract_synthetic(partial, **kw).views_written == 1
    a, b = _arrays(full), _arrays(partial)
    for name in a:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)


def test_resume_with_other_settings_is_refused(tmp_path):
    out = tmp_path / "s.zarr"
    extract_synthetic(out)
    with pytest.raises(CacheError, match="views_per_image"):
        extract_synthetic(out, views=3)
    with pytest.raises(CacheError, match="encoder"):
        extract_synthetic(out, seed=1)


def test_newer_schema_and_non_store_refused(tmp_path):
    out = tmp_path / "s.zarr"
    extract_synthetic(out, num_images=1, views=1)
    g = zarr.open_group(str(out), mode="r+")
    attrs = g.attrs["fusion_seg"]
    g.attrs["fusion_seg"] = {**attrs, "schema_version": SCHEMA_VERSION + 1}
    with pytest.raises(CacheError, match="newer"):
        FeatureStore.open(out)
    with pytest.raises(CacheError, match="not a fusion-seg feature store"):
        FeatureStore.open(tmp_path)


def test_corrupt_chunk_names_view_and_file(tmp_path):
    out = tmp_path / "s.zarr"
    extract_synthetic(out, num_images=2, views=1)
    chunk = out / "s16" / "c" / "1" / "0" / "0" / "0"
    data = bytearray(chunk.read_bytes())
    data[len(data) // 2] ^= 0xFF
    chunk.write_bytes(bytes(data))
    store = FeatureStore.open(out)
    store.read_view(0)
    with pytest.raises(CacheError, match="view 1") as err:
        store.read_view(1)
    assert "s16/c/1/0/0/0" in str(err.value)


def test_incomplete_store_refused_for_training(tmp_path):
    out = tmp_path / "s.zarr"
    extract_synthetic(out, num_images=2, views=1)
    g = zarr.open_group(str(out), mode="r+")
    g["views"][1] = np.full(g["views"].shape[1], math.nan)
    with pytest.raises(CacheError, match="Re-run the same"):
        FeatureStore.open(out).check_complete()


def test_bad_extract_arguments(tmp_path):
    with pytest.raises(UserError, match="--views 1"):
        extract_synthetic(tmp_path / "unused.zarr", views=2, augment=False)
    assert list(tmp_path.iterdir()) == []  # refused before anything was created, lock file included


def test_resume_with_other_settings_names_only_what_differs(tmp_path):
    from fusion_seg.errors import CacheError
    from pipeline_helpers import extract_synthetic

    extract_synthetic(tmp_path / "s.zarr", views=1, crop=(64, 64), num_images=2)
    with pytest.raises(CacheError) as e:
        extract_synthetic(tmp_path / "s.zarr", views=1, crop=(32, 32), num_images=2)
    msg = str(e.value)
    assert "augment.crop: stored [64, 64], requested [32, 32]" in msg
    assert "'scale_range'" not in msg and "augment.flip" not in msg  # the unchanged entries are not listed
