"""Issue 12: nothing silently wrong in a feature store.

A deleted chunk is an error (never zeros or an all-ignore view), validation on the training
store is refused unless asked for, and a writer leaves no lock file behind.
"""
from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import zarr
from click.testing import CliRunner

from fusion_seg import locks as locks_module
from fusion_seg.cache.locations import writer_lock
from fusion_seg.cache.store import FeatureStore
from fusion_seg.cli import main
from fusion_seg.requests import Augment, DatasetRef, EncoderSpec, ExtractRun
from fusion_seg.errors import CacheError, DataError, UserError
from fusion_seg.extract.local import extract
from fusion_seg.training.train import train_decoder, train_online
from pipeline_helpers import ENCODER, SYNTH, extract_synthetic, tiny_config

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py

ARRAYS = ("s4", "s8", "s16", "s32", "labels", "views")


def build(out, **kw):
    """Batches of one view, so that a repaired view is bit-identical to the one first extracted."""
    return extract_synthetic(out, views=2, num_images=4, batch_size=1, **kw)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    out = tmp_path_factory.mktemp("ref") / "ref.zarr"
    build(out)
    return out


@pytest.fixture(scope="module")
def reference_u8(tmp_path_factory):
    out = tmp_path_factory.mktemp("ref8") / "ref8.zarr"
    build(out, dtype="uint8")
    return out


def copy(store, tmp_path, name="s.zarr"):
    out = tmp_path / name
    shutil.copytree(store, out)
    return out


def chunk_file(store, name: str, v: int):
    ndim = len(zarr.open_group(str(store), mode="r")[name].shape)
    return store.joinpath(name, "c", str(v), *["0"] * (ndim - 1))


def assert_same_store(a, b) -> None:
    left, right = zarr.open_group(str(a), mode="r"), zarr.open_group(str(b), mode="r")
    for name in ARRAYS:
        np.testing.assert_array_equal(left[name][:], right[name][:], err_msg=name)


# --------------------------------------------------------------------------- a missing chunk
@pytest.mark.parametrize("array", ["s8", "labels"])
def test_missing_chunk_is_found_refused_and_repaired(reference, tmp_path, array):
    out = copy(reference, tmp_path)
    chunk = chunk_file(out, array, 3)
    chunk.unlink()
    relative = f"{array}/c/3/" + "/".join(["0"] * (3 if array != "labels" else 2))

    # verify names the view, the array and the chunk; the CLI exits 1
    report = FeatureStore.open(out).verify()
    assert not report["ok"]
    assert [(b["view"], b["array"]) for b in report["bad"]] == [(3, array)]
    assert report["bad"][0]["chunk"].endswith(relative) and "missing" in report["bad"][0]["error"]
    result = CliRunner().invoke(main, ["verify", str(out)])
    assert result.exit_code == 1, result.output
    assert "BAD view 3" in result.output and relative in result.output and "1 corrupt" in result.output

    # both readers refuse the view, naming it and the chunk
    store = FeatureStore.open(out)
    store.read_view(2)
    for read in (lambda: store.read_view(3), lambda: store.read_stored_view(3, ["s4", "s8", "s16", "s32"])):
        with pytest.raises(CacheError, match="view 3") as err:
            read()
        assert relative in str(err.value) and "missing" in str(err.value) and "--repair" in str(err.value)

    # training refuses it: streamed, and loaded into memory
    for mode in ("stream", "device"):
        with pytest.raises(CacheError, match="view 3") as err:
            train_decoder(str(out), tmp_path / f"run-{mode}", tiny_config(epochs=1, cache_mode=mode), progress=False)
        assert relative in str(err.value), mode

    # --repair re-extracts exactly that view; the store then verifies clean and equals the reference
    result = build(out, repair=True)
    assert result.views_written == 1
    assert chunk.is_file()
    result = CliRunner().invoke(main, ["verify", str(out)])
    assert result.exit_code == 0, result.output
    assert_same_store(reference, out)


def test_missing_scale_chunk_of_a_uint8_store(reference_u8, tmp_path):
    out = copy(reference_u8, tmp_path)
    chunk_file(out, "scale_s16", 5).unlink()
    report = FeatureStore.open(out).verify()
    assert [(b["view"], b["array"]) for b in report["bad"]] == [(5, "scale_s16")]
    with pytest.raises(CacheError, match="view 5") as err:
        FeatureStore.open(out).read_view(5)
    assert "scale_s16/c/5/0" in str(err.value)
    assert build(out, dtype="uint8", repair=True).views_written == 1
    assert FeatureStore.open(out).verify()["ok"]


def test_a_view_equal_to_the_fill_value_is_stored_and_reads_back(reference, tmp_path):
    """All-zero features and all-ignore labels are written as chunks, so an absent chunk is always an error."""
    out = copy(reference, tmp_path)
    store = FeatureStore.open(out, mode="r+")
    features = {name: np.zeros(shape, np.float16) for name, shape in store.spec.feature_shapes.items()}
    labels = np.full(store.spec.label_shape, store.spec.ignore_index, np.uint8)
    store.write_view(4, features, labels, store.view_meta(4))
    for name in ("s4", "s8", "s16", "s32", "labels"):
        assert chunk_file(out, name, 4).is_file(), name
    store = FeatureStore.open(out)
    assert store.verify()["ok"]
    feats, lbl, _ = store.read_view(4)
    assert (lbl == store.spec.ignore_index).all() and all((a == 0).all() for a in feats.values())


# --------------------------------------------------------------------------- validation on the training store
def test_val_cache_equal_to_the_training_store_is_refused(reference, tmp_path, capsys):
    cfg = tiny_config(epochs=1)
    with pytest.raises(UserError, match="training") as err:
        train_decoder(str(reference), tmp_path / "run", cfg, val_cache=str(reference), progress=False)
    assert "\n" not in str(err.value) and "--allow-val-on-train" in str(err.value)
    assert not (tmp_path / "run").exists()
    # another path, the same dataset split and augmentation: the same training crops
    twin = copy(reference, tmp_path, "twin.zarr")
    with pytest.raises(UserError, match="training"):
        train_decoder(str(reference), tmp_path / "run", cfg, val_cache=str(twin), progress=False)
    # asked for: a warning, and it trains
    capsys.readouterr()
    r = train_decoder(str(reference), tmp_path / "run", cfg, val_cache=str(twin), allow_val_on_train=True,
                      progress=False)
    assert r.best_miou is not None
    assert "warning" in capsys.readouterr().err.lower()


def test_val_cache_of_another_split_is_accepted(reference, tmp_path):
    val = tmp_path / "val.zarr"
    extract_synthetic(val, split="val", views=1, augment=False, num_images=2)
    r = train_decoder(str(reference), tmp_path / "run", tiny_config(epochs=1), val_cache=str(val), progress=False)
    assert r.best_miou is not None


def test_val_on_train_from_the_cli(reference, tmp_path):
    args = ["train-decoder", "--cache", str(reference), "--val-cache", str(reference), "--epochs", "1",
            "--batch-size", "2", "--workers", "0", "--device", "cpu", "--loss", "ce", "--streams", "4",
            "--preset", "small"]
    result = CliRunner().invoke(main, [*args, "--out", str(tmp_path / "a")])
    assert result.exit_code == 2, result.output
    assert "--allow-val-on-train" in result.output and "Traceback" not in result.output
    result = CliRunner().invoke(main, [*args, "--allow-val-on-train", "--out", str(tmp_path / "b")])
    assert result.exit_code == 0, result.output
    assert "warning" in result.stderr.lower()


def test_online_training_validating_on_its_own_split_is_refused(reference, tmp_path):
    kw = dict(dataset=DatasetRef("synthetic", "train", options={"num_images": 4, "size": SYNTH["size"]}),
              encoder=EncoderSpec(ENCODER, random_init=True, strides=(4, 8, 16, 32)), augment=Augment(crop=(64, 64)),
              progress=False)
    with pytest.raises(UserError, match="--allow-val-on-train"):
        train_online(tmp_path / "run", tiny_config(epochs=1), val_cache=str(reference), **kw)
    r = train_online(tmp_path / "run", tiny_config(epochs=1), val_cache=str(reference), allow_val_on_train=True, **kw)
    assert r.best_miou is not None


# --------------------------------------------------------------------------- no orphan lock files
def lock_file(out):
    return out.with_name(out.name + ".lock")


def test_no_lock_file_after_a_successful_or_failed_extract(tmp_path, monkeypatch):
    out = tmp_path / "ok.zarr"
    extract_synthetic(out, views=1, num_images=2)
    assert out.is_dir() and not lock_file(out).exists()

    # fails after the lock is taken: a dataset root that does not exist
    bad = tmp_path / "bad.zarr"
    with pytest.raises(DataError):
        extract(bad, DatasetRef("camvid", "train", root=tmp_path / "missing"), EncoderSpec(ENCODER, random_init=True),
                run=ExtractRun(loader_workers=0), progress=False)
    assert not lock_file(bad).exists() and not bad.exists()

    # fails half-way through writing
    def boom(self, *args):
        raise RuntimeError("injected")

    monkeypatch.setattr(FeatureStore, "write_view", boom)
    broken = tmp_path / "broken.zarr"
    with pytest.raises(RuntimeError, match="injected"):
        extract_synthetic(broken, views=1, num_images=2, writers=1)
    assert (broken / "zarr.json").is_file() and not lock_file(broken).exists()


def test_lock_is_removed_by_its_holder_and_still_excludes(tmp_path):
    out = tmp_path / "s.zarr"
    with writer_lock(out):
        assert lock_file(out).read_text() == str(os.getpid())
        with pytest.raises(CacheError, match="another fusion-seg process"):
            with writer_lock(out):
                pass
    assert not lock_file(out).exists()
    with writer_lock(out):  # and it can be taken again
        assert lock_file(out).exists()
    assert not lock_file(out).exists()


def _hold_lock_in_a_process(path, owner: str) -> subprocess.Popen:
    """Another process that holds a record lock on ``path``, writing ``owner`` into it, once it returns."""
    script = textwrap.dedent(f"""
        import fcntl, os, sys, time
        f = open({str(path)!r}, "a+")
        fcntl.lockf(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        f.write({owner!r}); f.flush()
        print("held", flush=True)
        time.sleep(60)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_a_lock_on_a_removed_file_is_not_taken_for_the_lock(tmp_path, monkeypatch):
    """The race: this process opens STORE.lock, the holder removes it and releases it, a third process
    creates and locks a new one; this process's lock then succeeds on the removed file, and must not count."""
    out = tmp_path / "s.zarr"
    path = lock_file(out)
    real_lockf = fcntl.lockf
    third = []

    def lockf_then_replaced(fd, op):
        real_lockf(fd, op)
        if not third:  # the first lock succeeds on a file that is then replaced under its name
            os.unlink(path)
            third.append(_hold_lock_in_a_process(path, "4242"))

    monkeypatch.setattr(locks_module.fcntl, "lockf", lockf_then_replaced)
    try:
        with pytest.raises(CacheError, match="pid 4242"):
            with writer_lock(out):
                pytest.fail("took a lock on a removed file")
    finally:
        third[0].kill()
        third[0].wait()


def test_a_killed_holders_children_do_not_keep_the_lock(tmp_path):
    """Issue 20: an extraction killed (SIGKILL, or the OOM killer) while its forked DataLoader workers still
    live must not block the re-run: the lock is the holder's own (a POSIX record lock), not its children's."""
    out = tmp_path / "s.zarr"
    script = textwrap.dedent(f"""
        import os, time
        from fusion_seg.cache.locations import writer_lock
        with writer_lock({str(out)!r}):
            if os.fork() == 0:  # a worker, forked while the lock is held
                time.sleep(60); os._exit(0)
            print("held", flush=True)
            time.sleep(60)
    """)
    holder = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    with pytest.raises(CacheError, match=f"pid {holder.pid}"):
        with writer_lock(out):
            pass
    holder.kill()
    holder.wait()
    with writer_lock(out):  # at once, while the forked child still sleeps with the file open
        assert lock_file(out).read_text() == str(os.getpid())
