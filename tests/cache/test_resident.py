"""Resident cache tiers (--cache-mode device|ram|stream|auto): same batches, same losses, honest sizes."""
import json

import numpy as np
import pytest
import torch

from fusion_seg.cache import resident
from fusion_seg.cache.store import FeatureStore
from fusion_seg.cache.reader import CachedViews, collate_views
from fusion_seg.errors import UserError
from fusion_seg.cache.resident import ResidentViews, choose_tier, resident_bytes, shard
from fusion_seg.training.train import train_decoder
from pipeline_helpers import direct_batch_equal_to_staged, extract_synthetic, tiny_config

NAMES = ["s4", "s8", "s16", "s32"]
GiB = 2**30


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    d = tmp_path_factory.mktemp("resident")
    extract_synthetic(d / "train.zarr", views=2, crop=(64, 64))
    extract_synthetic(d / "val.zarr", split="val", views=1, augment=False, num_images=3)
    extract_synthetic(d / "u8.zarr", views=1, crop=(64, 64), num_images=4, dtype="uint8")
    extract_synthetic(d / "bf16.zarr", views=1, crop=(64, 64), num_images=4, dtype="bfloat16")
    # Whole images of two sizes: the smaller one is stored top-left in arrays sized for the larger.
    extract_synthetic(d / "whole.zarr", views=1, augment=False, num_images=4)
    return d


def streamed(path, positions, crop=None, epoch=0, seed=0):
    views = CachedViews(str(path), NAMES, crop=crop, seed=seed)
    views.set_epoch(epoch)
    features, labels = collate_views([views[p] for p in positions])
    return {k: v.float() for k, v in features.items()}, labels


@pytest.mark.parametrize("store", ["train.zarr", "u8.zarr", "bf16.zarr", "whole.zarr"])
@pytest.mark.parametrize("mode", ["device", "ram"])
@pytest.mark.parametrize("crop", [None, (32, 32), (96, 96)])
def test_resident_batches_equal_the_streamed_ones(stores, store, mode, crop):
    """Bit for bit, for every storage dtype (uint8 dequantised per batch), with crops inside the
    view, crops larger than it (padding), and whole views."""
    res = ResidentViews(str(stores / store), NAMES, torch.device("cpu"), mode, crop=crop, progress=False)
    for epoch in (0, 3):
        positions = [2, 0, 1]
        features, labels = res.batch(positions, epoch)
        want_f, want_l = streamed(stores / store, positions, crop, epoch)
        assert labels.dtype == torch.int64 and torch.equal(labels, want_l)
        for k in NAMES:
            assert features[k].dtype == torch.float32
            assert torch.equal(features[k], want_f[k]), (k, epoch)
    # The features are not all zeros: this compares real content.
    assert float(features["s4"].abs().sum()) > 0


@pytest.mark.parametrize("store", ["train.zarr", "u8.zarr", "bf16.zarr"])
def test_staged_batches_equal_the_direct_ones(stores, store):
    """The ram tier on CUDA cuts batches in host RAM in the storage dtype and decodes them on the device;
    forced here on the CPU, it gives the batches the direct path (and so the stream tier) gives."""
    res = ResidentViews(str(stores / store), NAMES, torch.device("cpu"), "ram", crop=(96, 96), progress=False)
    assert not res.staged
    direct_batch_equal_to_staged(res, [1, 0, 2], epoch=1)


def test_uint8_stays_uint8_in_memory(stores):
    res = ResidentViews(str(stores / "u8.zarr"), NAMES, torch.device("cpu"), "device", progress=False)
    assert all(t.dtype == torch.uint8 for t in res.features.values())
    f16 = ResidentViews(str(stores / "bf16.zarr"), NAMES, torch.device("cpu"), "device", progress=False)
    assert res.nbytes < 0.6 * f16.nbytes  # half the bytes of a 16-bit store, plus small scales


def test_resident_bytes_is_what_is_held(stores):
    for store in ("train.zarr", "u8.zarr"):
        res = ResidentViews(str(stores / store), NAMES[1:], torch.device("cpu"), "device", progress=False)
        held = sum(t.nbytes for t in res.features.values()) + sum(t.nbytes for t in res.scales.values())
        held += res.labels.nbytes
        spec = FeatureStore.open(stores / store).spec
        assert resident_bytes(spec, NAMES[1:], len(res)) == held == res.nbytes


def test_ram_tier_does_not_pin_without_cuda(stores):
    """pin_memory needs CUDA: on a CPU-only machine the ram tier holds plain host tensors."""
    assert not torch.cuda.is_available()
    res = ResidentViews(str(stores / "train.zarr"), NAMES, torch.device("cpu"), "ram", crop=(32, 32), progress=False)
    assert not res.pinned and not res.labels.is_pinned()
    features, _ = res.batch([0, 1])
    assert not features["s4"].is_pinned()


@pytest.mark.parametrize("mode", ["device", "ram"])
def test_tiers_train_with_identical_losses(stores, tmp_path, mode):
    """Same seed: the resident tiers draw the stream tier's batches and crops, so the losses agree
    (and validation gives the same mIoU)."""
    cfg = dict(epochs=2, crop=[32, 32])
    ref = train_decoder(str(stores / "train.zarr"), tmp_path / "stream", tiny_config(cache_mode="stream", **cfg),
                        val_cache=str(stores / "val.zarr"), progress=False)
    got = train_decoder(str(stores / "train.zarr"), tmp_path / mode, tiny_config(cache_mode=mode, **cfg),
                        val_cache=str(stores / "val.zarr"), progress=False)
    assert ref.cache["mode"] == "stream" and got.cache["mode"] == mode and got.cache["val_resident"]
    assert len(got.losses) == len(ref.losses) == 12
    assert got.losses == pytest.approx(ref.losses, rel=1e-6, abs=1e-7)
    assert got.losses[0] != got.losses[-1]
    assert got.val["miou"] == pytest.approx(ref.val["miou"], abs=1e-9)
    summary = [json.loads(line) for line in (tmp_path / mode / "metrics.jsonl").read_text().splitlines()][-1]
    assert summary["cache"]["mode"] == mode and summary["cache"]["resident_bytes"] > 0


def test_auto_is_the_default_and_picks_memory_when_it_fits(stores, tmp_path):
    r = train_decoder(str(stores / "train.zarr"), tmp_path / "auto", tiny_config(epochs=1), progress=False)
    assert r.cache["requested"] == "auto" and r.cache["mode"] == "device"


# --------------------------------------------------------------------------- choosing a tier
CPU, CUDA = torch.device("cpu"), torch.device("cuda")


def test_auto_picks_device_then_ram_then_stream():
    free = {"device": 80 * GiB, "ram": 100 * GiB}
    assert choose_tier("auto", 10 * GiB, 1 * GiB, CUDA, free).mode == "device"
    # Too big for the GPU (80% of 80 GiB less 2 GiB = 62 GiB), fits pinned host RAM.
    t = choose_tier("auto", 70 * GiB, 0, CUDA, free)
    assert t.mode == "ram" and "pinned" in t.where
    # Fits nowhere: stream, and say so.
    t = choose_tier("auto", 500 * GiB, 0, CUDA, free)
    assert t.mode == "stream" and "does not fit" in t.reason and "fusion-seg plan" in t.reason
    # On CPU the device is RAM: auto takes device, which needs no copy.
    assert choose_tier("auto", 10 * GiB, 0, CPU, {"device": 20 * GiB, "ram": 20 * GiB}).mode == "device"


def test_validation_is_streamed_when_only_training_fits():
    t = choose_tier("auto", 20 * GiB, 50 * GiB, CUDA, {"device": 40 * GiB, "ram": 40 * GiB})
    assert t.mode == "device" and not t.val_resident and "streamed" in t.reason


def test_a_tier_that_does_not_fit_is_refused_with_sizes_and_alternatives():
    with pytest.raises(UserError) as e:
        choose_tier("device", 30 * GiB, 0, CUDA, {"device": 16 * GiB, "ram": 200 * GiB})
    msg = str(e.value)
    assert "--cache-mode device needs 30.00 GiB" in msg and "16.00 GiB free" in msg
    assert "--cache-mode ram (fits)" in msg and "--cache-mode stream" in msg
    assert "a more compact --resident-dtype (int4" in msg  # held compactly, without extracting again (#21)


def test_host_ram_is_shared_by_the_processes_of_a_node():
    free = {"device": 100 * GiB, "ram": 100 * GiB}
    assert choose_tier("ram", 30 * GiB, 0, CUDA, free).mode == "ram"
    with pytest.raises(UserError):
        choose_tier("ram", 30 * GiB, 0, CUDA, free, local_processes=4)


def test_refused_before_loading_in_train_decoder(stores, tmp_path, monkeypatch):
    # Sizes faked small: a few kB usable, less than the store's views.
    tiny = int(resident.HOST_RESERVE / resident.MEMORY_FRACTION) + 4000
    monkeypatch.setattr(resident, "available_memory", lambda device: {"device": tiny, "ram": tiny})
    with pytest.raises(UserError, match="--cache-mode device needs"):
        train_decoder(str(stores / "train.zarr"), tmp_path / "r", tiny_config(cache_mode="device"), progress=False)
    assert not (tmp_path / "r" / "last.pt").exists()
    # auto falls back to streaming and still trains.
    r = train_decoder(str(stores / "train.zarr"), tmp_path / "a", tiny_config(epochs=1), progress=False)
    assert r.cache["mode"] == "stream" and r.steps == 6


def test_shards_are_disjoint_equal_and_cover_floor_n_over_world():
    views = np.arange(11)
    parts = [shard(views, r, 3) for r in range(3)]
    assert [len(p) for p in parts] == [3, 3, 3]
    assert not set(parts[0]) & set(parts[1]) and not set(parts[1]) & set(parts[2])
    with pytest.raises(UserError, match="cannot be shared"):
        shard(np.arange(2), 0, 3)


def test_unknown_mode_refused():
    with pytest.raises(UserError, match="--cache-mode"):
        choose_tier("gpu", 1, 0, CPU, {"device": GiB, "ram": GiB})


def test_every_reader_of_a_cache_refuses_a_crop_off_the_coarsest_stride_with_one_message(stores):
    """Issue 22: the feature-space crop rule lives in one function (checks.require_feature_crop): the stream
    reader, the resident views and TrainConfig give the same one-line error, naming the option and a size that
    works."""
    messages = []
    for make in (lambda: CachedViews(str(stores / "train.zarr"), NAMES, crop=(40, 64)),
                 lambda: ResidentViews(str(stores / "train.zarr"), NAMES, torch.device("cpu"), "device",
                                       crop=(40, 64), progress=False),
                 lambda: tiny_config(crop=[40, 64])):
        with pytest.raises(UserError) as err:
            make()
        messages.append(str(err.value))
    assert len(set(messages)) == 1 and messages[0].startswith("--crop 40x64: a feature-space crop must be a "
                                                              "multiple of 32") and "e.g. 64x64" in messages[0]
