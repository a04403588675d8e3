"""Issue 5: nothing lost, nothing silently wrong. Real processes and real signals where it matters."""
from __future__ import annotations

import errno
import json
import os
import math
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from click.testing import CliRunner
from PIL import Image

from fusion_seg import faults
from fusion_seg.cache import store as store_module
from fusion_seg.cache.locations import writer_lock
from fusion_seg.cache.store import FeatureStore
from fusion_seg.checkpoint import load_checkpoint
from fusion_seg.cli import main
from fusion_seg.errors import CacheError, CheckpointError, UserError
from fusion_seg.training.train import train_decoder
from pipeline_helpers import ENCODER, extract_synthetic, tiny_config

EXTRACT = ["extract", "--dataset", "synthetic", "--dataset-opt", "num_images=8", "--dataset-opt", "size=[128,128]",
           "--split", "train", "--views", "4", "--crop", "128x128", "--encoder", ENCODER, "--random-init",
           "--strides", "4,8,16,32", "--loader-workers", "0", "--batch-size", "1"]
ARRAYS = ("s4", "s8", "s16", "s32", "labels", "views")


def cli(*args) -> list[str]:
    return [sys.executable, "-m", "fusion_seg", *map(str, args)]


def arrays(path) -> dict[str, np.ndarray]:
    g = zarr.open_group(str(path), mode="r")
    return {name: g[name][:] for name in ARRAYS}


def assert_same_store(a, b) -> None:
    left, right = arrays(a), arrays(b)
    for name in ARRAYS:
        np.testing.assert_array_equal(left[name], right[name], err_msg=name)


def kill_when_paused(args, kind: str, n: int, workdir: Path, timeout: float = 300.0) -> None:
    """Run the tool with ``args``, SIGKILL it where it pauses, after its ``n``-th ``kind`` (fusion_seg/faults.py).

    The child blocks at that point after writing a marker file; the kill is sent once the marker
    is there, so it lands mid-run on any machine. Fails if the child ends before it gets there.
    """
    marker, log = workdir / "paused", workdir / "child-stderr.txt"
    marker.unlink(missing_ok=True)
    env = {**os.environ, faults.PAUSE_AFTER: f"{kind}:{n}", faults.PAUSE_MARKER: str(marker)}
    with open(log, "w") as stderr:
        proc = subprocess.Popen(cli(*args), env=env, stdout=subprocess.DEVNULL, stderr=stderr)
    try:
        deadline = time.monotonic() + timeout
        while not marker.exists():
            assert proc.poll() is None, (f"the run ended (exit {proc.returncode}) before its pause at {kind} {n}: "
                                         f"the kill would not land. Its stderr:\n{log.read_text()[-3000:]}")
            assert time.monotonic() < deadline, f"no pause at {kind} {n} within {timeout} s"
            time.sleep(0.01)
        assert marker.read_text().split() == [str(proc.pid), kind, str(n)]
        proc.send_signal(signal.SIGKILL)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
    assert proc.returncode == -signal.SIGKILL  # killed while paused: it had not finished


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    out = tmp_path_factory.mktemp("ref") / "ref.zarr"
    subprocess.run(cli(*EXTRACT, "--out", out), check=True, capture_output=True)
    return out


def test_extraction_survives_sigkill_bit_identical(reference, tmp_path):
    """Each run is killed right after its n-th view is written, while later views are still being written.

    A run pauses at its n-th finished write with at most 4 * writers (8) more views submitted to its
    writer threads, so it completes at most n + 8 views: these pause points leave views to do in every
    run (32 views), and the first kill leaves the store incomplete.
    """
    out = tmp_path / "killed.zarr"
    ref = arrays(reference)
    kills = 0
    for trial, pause_after in enumerate((1, 3, 2, 1)):
        done_before = int(FeatureStore.open(out).completed().sum()) if (out / "zarr.json").exists() else 0
        left = 32 - done_before
        assert left >= 2, f"trial {trial}: only {left} view(s) left to extract"
        n = min(pause_after, left - 1)
        kill_when_paused([*EXTRACT, "--out", out], "view", n, tmp_path)
        kills += 1
        store = FeatureStore.open(out)
        done = int(store.completed().sum())
        assert done >= done_before + n  # the n views finished before the pause are recorded
        if trial == 0:
            assert done < 32, "the first kill should leave views to resume"
        # Every view marked complete is really complete and equal to the uninterrupted run's.
        for v in np.flatnonzero(store.completed()):
            feats, labels, _ = store.read_view(int(v))
            np.testing.assert_array_equal(labels, ref["labels"][v])
            np.testing.assert_array_equal(feats["s8"], ref["s8"][v])
    assert kills == 4, "every kill lands inside the extraction"
    subprocess.run(cli(*EXTRACT, "--out", out), check=True, capture_output=True)
    assert_same_store(reference, out)
    print(f"\nfault-injection: extraction SIGKILL trials 4, kills landed {kills}, views lost 0 (bit-identical)")


class Crash(Exception):
    pass


def test_interrupted_between_chunks_resumes(reference, tmp_path, monkeypatch):
    """A crash after some of a view's chunks are written but before its completion row."""
    out = tmp_path / "s.zarr"
    real = FeatureStore.write_view
    calls = {"n": 0}

    def crash_midway(self, v, features, labels, meta):
        calls["n"] += 1
        if calls["n"] == 5:
            self._arrays["s4"][v] = features["s4"]  # one chunk of the view lands, the rest never do
            raise Crash
        return real(self, v, features, labels, meta)

    monkeypatch.setattr(FeatureStore, "write_view", crash_midway)
    with pytest.raises(Crash):
        CliRunner().invoke(main, [*EXTRACT, "--out", str(out)], catch_exceptions=False)
    monkeypatch.undo()
    assert 0 < FeatureStore.open(out).completed().sum() < 32
    assert CliRunner().invoke(main, [*EXTRACT, "--out", str(out)]).exit_code == 0
    assert_same_store(reference, out)


def test_disk_full_is_a_clear_error_and_resumes(reference, tmp_path, monkeypatch):
    """The disk fills up part-way: the store's writes (real zarr, real files) fail with ENOSPC from then on."""
    out = tmp_path / "full.zarr"
    budget = {"left": 2_000_000}
    real_set = store_module._store_set

    async def set_until_full(store, key, value):
        if "/c/" in key:  # chunk data; metadata is small
            budget["left"] -= len(value)
            if budget["left"] < 0:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), key)
        await real_set(store, key, value)

    monkeypatch.setattr(store_module, "_store_set", set_until_full)  # the store's one write point
    result = CliRunner().invoke(main, [*EXTRACT, "--out", str(out)])
    assert result.exit_code == 2
    assert "No space left on device" in result.output and "re-run the same command" in result.output
    assert "Traceback" not in result.output
    monkeypatch.undo()
    assert budget["left"] < 0  # the failure came from the injected full disk
    assert FeatureStore.open(out).completed().sum() < 32
    assert CliRunner().invoke(main, [*EXTRACT, "--out", str(out)]).exit_code == 0  # space freed
    assert_same_store(reference, out)


def test_second_writer_is_refused(reference, tmp_path):
    out = tmp_path / "busy.zarr"
    # A real second process is refused while another holds the store (here: this test process).
    with writer_lock(out):
        second = subprocess.run(cli(*EXTRACT, "--out", out), capture_output=True, text=True)
    assert second.returncode == 2, second.stderr
    assert "being written by another fusion-seg process" in second.stderr and "Traceback" not in second.stderr
    # And while a real extraction runs, nobody else gets the lock; its store comes out whole.
    first = subprocess.Popen(cli(*EXTRACT, "--out", out), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not (out / "zarr.json").exists() and time.time() < deadline:
        time.sleep(0.01)
    with pytest.raises(CacheError, match="another fusion-seg process"):
        with writer_lock(out):
            pass
    assert first.wait() == 0
    assert_same_store(reference, out)


def test_verify_and_repair_exactly_the_bad_views(reference, tmp_path):
    out = tmp_path / "bad.zarr"
    subprocess.run(["cp", "-r", str(reference), str(out)], check=True)
    for name, v in (("s16", 3), ("labels", 17)):
        chunk = out / name / "c" / str(v) / "0" / "0"
        chunk = chunk / "0" if chunk.is_dir() else chunk
        data = bytearray(chunk.read_bytes())
        data[len(data) // 2] ^= 0xFF
        chunk.write_bytes(bytes(data))
    result = CliRunner().invoke(main, ["verify", str(out)])
    assert result.exit_code == 1
    assert "BAD view 3" in result.output and "BAD view 17" in result.output and "2 corrupt" in result.output
    with pytest.raises(CacheError, match="view 3"):
        FeatureStore.open(out).read_view(3)
    result = CliRunner().invoke(main, [*EXTRACT, "--repair", "--out", str(out)])
    assert result.exit_code == 0 and "2 views written" in result.output
    assert CliRunner().invoke(main, ["verify", str(out)]).exit_code == 0
    assert_same_store(reference, out)


def test_training_survives_sigkill_and_resumes_identically(tmp_path):
    """Killed mid-epoch, mid-epoch again, and after an epoch's last step before its checkpoint; then resumed."""
    cache = tmp_path / "c.zarr"
    extract_synthetic(cache, views=2, crop=(64, 64), num_images=6)
    args = ["train-decoder", "--cache", cache, "--epochs", 6, "--batch-size", 2, "--crop", "32x32", "--workers", 0,
            "--device", "cpu", "--loss", "ce", "--log-every", 1]
    subprocess.run(cli(*args, "--out", tmp_path / "full"), check=True, capture_output=True)
    run = tmp_path / "killed"
    steps_per_epoch = 6  # 12 views, batch 2
    kills, step = 0, 0
    for trial, pause_after in enumerate((8, 9, 12)):  # steps of this run: to steps 8, 6 + 9 = 15 and 12 + 12 = 24
        resume = ["--resume"] if trial else []
        assert (run / "last.pt").exists() == bool(trial)
        kill_when_paused([*args, *resume, "--out", run], "step", pause_after, tmp_path)
        kills += 1
        step += pause_after
        # The last checkpoint stays loadable: the one of the last epoch finished before the kill.
        epoch = load_checkpoint(run / "last.pt")["epoch"]
        assert epoch == math.ceil(step / steps_per_epoch) - 1, (step, epoch)
        step = epoch * steps_per_epoch  # where the next run resumes
    assert kills == 3, "every kill lands inside the training"
    subprocess.run(cli(*args, "--resume", "--out", run), check=True, capture_output=True)

    def losses(path):
        return [r["loss"] for r in map(json.loads, (path / "metrics.jsonl").read_text().splitlines())
                if r["type"] == "step"]

    assert len(losses(run)) == len(losses(tmp_path / "full")) == 36
    assert losses(run) == pytest.approx(losses(tmp_path / "full"), rel=1e-5, abs=1e-6)
    print(f"\nfault-injection: training SIGKILL trials 3, kills landed {kills}, losses after resume identical")


class Exploit:
    def __reduce__(self):
        return (os.system, (f"touch {Exploit.marker}",))


def test_malicious_checkpoint_does_not_run_code(tmp_path):
    Exploit.marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    with open(path, "wb") as f:
        pickle.dump({"format": "fusion-seg/decoder-checkpoint", "payload": Exploit()}, f)
    with pytest.raises(CheckpointError):
        load_checkpoint(path)
    assert not Exploit.marker.exists()
    torch.save({"format": "x", "payload": Exploit()}, tmp_path / "evil2.pt")
    with pytest.raises(CheckpointError):
        load_checkpoint(tmp_path / "evil2.pt")
    assert not Exploit.marker.exists()


def folder_dataset(root: Path, classes=("bg", "thing"), bad: dict | None = None) -> Path:
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    (root / "classes.txt").write_text("\n".join(classes) + "\n")
    rng = np.random.default_rng(0)
    for i in range(4):
        Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(root / "images" / f"im {i}.png")
        Image.fromarray((rng.random((64, 64)) > 0.5).astype(np.uint8)).save(root / "masks" / f"im {i}.png")
    for name, data in (bad or {}).items():
        (root / "images" / name).write_bytes(data)
        Image.fromarray(np.zeros((64, 64), np.uint8)).save(root / "masks" / (Path(name).stem + ".png"))
    return root


FOLDER = ["--dataset", "folder", "--split", "all", "--views", "1", "--no-augment", "--encoder", ENCODER,
          "--random-init", "--strides", "4,8,16,32", "--loader-workers", "2"]


def test_bad_image_names_the_file_without_traceback_and_skip_bad_goes_on(tmp_path):
    good = (tmp_path / "ok.png")
    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(good)
    root = folder_dataset(tmp_path / "data", bad={"truncated.png": good.read_bytes()[:60]})
    result = CliRunner().invoke(main, ["extract", *FOLDER, "--root", str(root), "--out", str(tmp_path / "s.zarr")])
    assert result.exit_code == 2
    assert "truncated.png" in result.output and "--skip-bad" in result.output
    assert "Traceback" not in result.output and "DataLoader worker" not in result.output

    result = CliRunner().invoke(main, ["extract", *FOLDER, "--skip-bad", "--root", str(root),
                                       "--out", str(tmp_path / "s.zarr")])
    assert result.exit_code == 0, result.output
    assert "skipped view" in result.output and "truncated.png" in result.output
    store = FeatureStore.open(tmp_path / "s.zarr")
    assert store.completed().all() and len(store.usable_views()) == 4
    assert [e["image_id"] for e in store.skipped_report()] == ["truncated"]
    assert "truncated" in CliRunner().invoke(main, ["info", str(tmp_path / "s.zarr")]).output
    # Training uses the usable views only.
    r = train_decoder(str(tmp_path / "s.zarr"), tmp_path / "run", tiny_config(epochs=1), progress=False)
    assert r.steps == 2


def test_val_cache_with_other_classes_refused(tmp_path):
    a = folder_dataset(tmp_path / "a")
    b = folder_dataset(tmp_path / "b", classes=("bg", "other"))
    for root, out in ((a, "a.zarr"), (b, "b.zarr")):
        CliRunner().invoke(main, ["extract", *FOLDER, "--root", str(root), "--out", str(tmp_path / out)],
                           catch_exceptions=False)
    with pytest.raises(UserError, match="classes"):
        train_decoder(str(tmp_path / "a.zarr"), tmp_path / "run", tiny_config(), val_cache=str(tmp_path / "b.zarr"),
                      progress=False)


def test_corrupt_chunk_while_training_with_workers_is_a_clean_error(tmp_path):
    """Errors met inside DataLoader workers reach the user as the one-line error, not a worker traceback."""
    extract_synthetic(tmp_path / "s.zarr", views=1, crop=(64, 64), num_images=4)
    chunk = tmp_path / "s.zarr" / "s8" / "c" / "2" / "0" / "0" / "0"
    data = bytearray(chunk.read_bytes())
    data[len(data) // 2] ^= 0xFF
    chunk.write_bytes(bytes(data))
    # Streamed by DataLoader workers, and loaded into memory by the resident tiers' reader threads.
    for mode in ("stream", "device", "ram"):
        result = CliRunner().invoke(main, ["train-decoder", "--cache", str(tmp_path / "s.zarr"), "--epochs", "1",
                                           "--batch-size", "2", "--workers", "1", "--device", "cpu", "--loss", "ce",
                                           "--cache-mode", mode, "--out", str(tmp_path / f"run-{mode}")])
        assert result.exit_code == 2, (mode, result.output)
        assert "view 2" in result.output and "s8/c/2/0/0/0" in result.output and "--repair" in result.output
        assert "Traceback" not in result.output and "DataLoader worker" not in result.output
