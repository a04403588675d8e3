"""Issue 20: `fusion-seg extract` on real read-only and full file systems, and on inputs changed between
runs: one line on stderr, exit status 2, no traceback, and the store resumes once the cause is gone.

The file systems are real mounts in a private mount namespace (tests/mounts.py).
"""
from __future__ import annotations

import os
import shutil
import subprocess

import numpy as np
import pytest
from PIL import Image

from fusion_seg.cache.store import FeatureStore
from mounts import cli, run_with_mounts
from pipeline_helpers import ENCODER

EXTRACT = ["extract", "--dataset", "synthetic", "--dataset-opt", "num_images=3", "--dataset-opt", "size=[64,64]",
           "--split", "train", "--views", "2", "--crop", "64x64", "--encoder", ENCODER, "--random-init",
           "--strides", "4,8,16,32", "--loader-workers", "0", "--batch-size", "1", "--device", "cpu"]
ENV = {"OMP_NUM_THREADS": "1"}


def one_line_error(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-3000:])
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    return lines[0]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    out = tmp_path_factory.mktemp("ref") / "ref.zarr"
    subprocess.run(cli(*EXTRACT, "--out", out), check=True, capture_output=True, env={**os.environ, **ENV})
    return out


def test_out_on_a_read_only_file_system(reference, tmp_path):
    folder = tmp_path / "ro"
    folder.mkdir()
    line = one_line_error(run_with_mounts(cli(*EXTRACT, "--out", folder / "s.zarr"), read_only=[folder], env=ENV))
    assert "read-only" in line and str(folder / "s.zarr") in line and "--out" in line
    assert list(folder.iterdir()) == []
    # Resuming a store that lives on a read-only disk: refused the same way; reading it works.
    shutil.copytree(reference, folder / "s.zarr")
    line = one_line_error(run_with_mounts(cli(*EXTRACT, "--out", folder / "s.zarr"), read_only=[folder], env=ENV))
    assert "read-only" in line
    proc = run_with_mounts(cli("verify", folder / "s.zarr"), read_only=[folder], env=ENV)
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_out_on_a_full_disk(tmp_path):
    """The --out folder's disk is full from the start: the first file written (the lock file) fails."""
    folder = tmp_path / "full"
    folder.mkdir()
    line = one_line_error(run_with_mounts(cli(*EXTRACT, "--out", folder / "s.zarr"), full=[folder], env=ENV))
    assert "full" in line and str(folder / "s.zarr") in line


def test_disk_full_while_writing_views_is_one_line_and_resumes(reference, tmp_path):
    """The disk holding view 3's chunk folder fills while the store is resumed: the write of that chunk fails."""
    out = tmp_path / "s.zarr"
    shutil.copytree(reference, out)
    FeatureStore.open(out, mode="r+").invalidate([3])
    chunk_folder = out / "s8" / "c" / "3"
    shutil.rmtree(chunk_folder)
    chunk_folder.mkdir()
    line = one_line_error(run_with_mounts(cli(*EXTRACT, "--out", out), full=[chunk_folder], env=ENV))
    assert "disk is full" in line and str(out) in line and "re-run the same command" in line
    assert not out.with_name("s.zarr.lock").exists()
    # Space freed (the full file system went with the process): the same command finishes the store.
    subprocess.run(cli(*EXTRACT, "--out", out), check=True, capture_output=True, env={**os.environ, **ENV})
    assert FeatureStore.open(out).verify()["ok"]
    for name in ("s8", "labels", "views"):
        np.testing.assert_array_equal(FeatureStore.open(out).group[name][:], FeatureStore.open(reference).group[name][:])


def test_an_input_replaced_between_runs_is_refused_by_the_command(tmp_path):
    root = tmp_path / "data"
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    (root / "classes.txt").write_text("bg\nthing\n")
    rng = np.random.default_rng(0)
    for i in range(2):
        Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(root / "images" / f"im{i}.png")
        Image.fromarray((rng.random((64, 64)) > 0.5).astype(np.uint8)).save(root / "masks" / f"im{i}.png")
    args = ["extract", "--dataset", "folder", "--root", root, "--split", "all", "--no-augment", "--encoder", ENCODER,
            "--random-init", "--strides", "4,8,16,32", "--loader-workers", "0", "--device", "cpu",
            "--out", tmp_path / "s.zarr"]
    subprocess.run(cli(*args), check=True, capture_output=True, env={**os.environ, **ENV})
    image = root / "images" / "im0.png"
    Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(image)
    os.utime(image, ns=(image.stat().st_atime_ns, image.stat().st_mtime_ns + 10**9))
    proc = subprocess.run(cli(*args), capture_output=True, text=True, env={**os.environ, **ENV})
    line = one_line_error(proc)
    assert str(image) in line and "--out" in line


def test_a_store_inside_a_store_is_refused_by_the_command(reference, tmp_path):
    out = tmp_path / "s.zarr"
    shutil.copytree(reference, out)
    proc = subprocess.run(cli(*EXTRACT, "--out", out / "labels" / "x.zarr"), capture_output=True, text=True,
                          env={**os.environ, **ENV})
    assert "inside the Zarr store" in one_line_error(proc)
    assert not (out / "labels" / "x.zarr").exists() and not (out / "labels" / "x.zarr.lock").exists()
    assert FeatureStore.open(out).verify()["ok"]
