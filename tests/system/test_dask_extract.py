"""Issue 6: extraction on dask.distributed writes the same store, bit for bit, as in-process extraction.

One local cluster of two worker processes serves most tests (through ``scheduler=``); the
CLI test starts its own with ``--dask-workers 2``. Worker-side faults are injected with worker
plugins, which run inside the worker processes.

Bit-identity holds between processes that run the encoder with the same number of torch
threads (CPU convolutions sum in an order that depends on it), so the in-process reference
runs with the threads of one worker of a two-worker local cluster.
"""
from __future__ import annotations

import contextlib
import os
from pathlib import Path

import dask
import numpy as np
import pytest
import torch
from click.testing import CliRunner
from dask.system import CPU_COUNT
from PIL import Image

from fusion_seg.cache.store import FeatureStore
from fusion_seg.cli import main
from fusion_seg.extract.dask_cluster import local_cluster
from fusion_seg.errors import CacheError, DataError, UserError
from fusion_seg.extract.local import extract
from fusion_seg.requests import extract_arguments
from pipeline_helpers import ENCODER, extract_synthetic

distributed = pytest.importorskip("distributed")

SYNTH = dict(num_images=4, views=2, crop=(64, 64), batch_size=2)  # 8 views, 4 tasks of 2
CLI_SYNTH = ["--dataset", "synthetic", "--dataset-opt", "num_images=4", "--dataset-opt", "size=[64,96]",
             "--split", "train", "--views", "2", "--crop", "64x64", "--batch-size", "2", "--encoder", ENCODER,
             "--random-init", "--strides", "4,8,16,32"]


def store_files(path: Path) -> dict[str, bytes]:
    """Every file of a store (metadata and every chunk of every array), by relative path."""
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def assert_bit_identical(a: Path, b: Path) -> None:
    left, right = store_files(a), store_files(b)
    assert sorted(left) == sorted(right)
    assert any(name.startswith("s4/c/") for name in left) and any(name.startswith("views/c/") for name in left)
    for name in left:
        assert left[name] == right[name], f"{name} differs"


@contextlib.contextmanager
def worker_threads():
    """Run this process's encoder with the torch threads of each worker of a two-worker local cluster."""
    threads = torch.get_num_threads()
    torch.set_num_threads(max(1, CPU_COUNT // 2))
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    out = tmp_path_factory.mktemp("ref") / "ref.zarr"
    with worker_threads():
        extract_synthetic(out, **SYNTH)
    return out


@pytest.fixture(scope="module")
def cluster():
    """Two worker processes, started as `--dask-workers 2` starts them (one thread each on two cores)."""
    with local_cluster(2) as local, distributed.Client(local) as client:
        yield client


# --- worker plugins that inject faults inside the worker processes ------------------------------------------------

class CountBuilds(distributed.WorkerPlugin):
    """Appends the worker's pid to ``log`` whenever it builds an encoder (from the client's EncoderSpec)."""

    def __init__(self, log):
        self.log = str(log)

    def setup(self, worker):
        from fusion_seg.requests import EncoderSpec

        self.original = build = EncoderSpec.build

        def counted(spec):
            with open(self.log, "a") as f:
                f.write(f"{os.getpid()}\n")
            return build(spec)
        EncoderSpec.build = counted

    def teardown(self, worker):
        from fusion_seg.requests import EncoderSpec

        EncoderSpec.build = self.original


class OtherWeights(distributed.WorkerPlugin):
    """The worker builds its random-init encoder with another seed: other weights than the client's."""

    def setup(self, worker):
        from dataclasses import replace

        from fusion_seg.requests import EncoderSpec

        self.original = build = EncoderSpec.build
        EncoderSpec.build = lambda spec: build(replace(spec, seed=spec.seed + 1))

    def teardown(self, worker):
        from fusion_seg.requests import EncoderSpec

        EncoderSpec.build = self.original


class DieWhileWriting(distributed.WorkerPlugin):
    """The first worker to write view ``view`` writes a wrong s4 chunk for it, then its process dies (os._exit)."""

    def __init__(self, view, marker):
        self.view, self.marker = view, str(marker)

    def setup(self, worker):
        from fusion_seg.cache.store import FeatureStore

        self.original = write = FeatureStore.write_view

        def write_view(store, v, features, labels, meta):
            if v == self.view:
                try:
                    fd = os.open(self.marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
                except FileExistsError:
                    pass  # already died once: write normally
                else:
                    os.write(fd, str(os.getpid()).encode())
                    os.close(fd)
                    store._arrays["s4"][v] = np.zeros_like(features["s4"]) + 1
                    os._exit(1)
            return write(store, v, features, labels, meta)
        FeatureStore.write_view = write_view

    def teardown(self, worker):
        from fusion_seg.cache.store import FeatureStore

        FeatureStore.write_view = self.original


def with_plugin(client, plugin, name, fn):
    client.register_plugin(plugin, name=name)
    try:
        return fn()
    finally:
        client.unregister_worker_plugin(name)


# --- tests ------------------------------------------------------------------------------------------------------

def test_cluster_store_is_bit_identical_and_each_worker_builds_the_encoder_once(reference, cluster, tmp_path):
    out, log = tmp_path / "d.zarr", tmp_path / "builds.log"
    r = with_plugin(cluster, CountBuilds(log), "count-builds",
                    lambda: extract_synthetic(out, **SYNTH, scheduler=cluster.scheduler.address))
    assert r.views_written == r.views_total == 8
    assert_bit_identical(reference, out)
    builds = log.read_text().split()
    assert 1 <= len(builds) <= 2 and len(set(builds)) == len(builds)  # 4 tasks; at most one build per worker
    # Resuming a complete store on the cluster is a no-op.
    assert extract_synthetic(out, **SYNTH, scheduler=cluster.scheduler.address).views_written == 0


def test_worker_killed_while_writing_is_retried_and_the_store_is_right(reference, cluster, tmp_path):
    out, marker = tmp_path / "k.zarr", tmp_path / "died"
    before = set(cluster.scheduler_info()["workers"])
    r = with_plugin(cluster, DieWhileWriting(view=5, marker=marker), "die-while-writing",
                    lambda: extract_synthetic(out, **SYNTH, scheduler=cluster.scheduler.address))
    assert marker.exists(), "a worker should have died while writing view 5"
    assert int(marker.read_text()) not in cluster.run(os.getpid).values()  # that process is gone
    assert r.views_written == 8
    assert_bit_identical(reference, out)  # the half-written, wrong view 5 was rewritten by the retry
    cluster.wait_for_workers(2, timeout=120)  # the nanny restarted it
    assert set(cluster.scheduler_info()["workers"]) != before


def test_worker_with_other_weights_is_refused_by_name(cluster, tmp_path):
    out = tmp_path / "w.zarr"
    with pytest.raises(CacheError, match=r"dask worker tcp://127\.0\.0\.1:\d+ built a different encoder") as err:
        with_plugin(cluster, OtherWeights(), "other-weights",
                    lambda: extract_synthetic(out, **SYNTH, scheduler=cluster.scheduler.address))
    assert "weights_sha256" in str(err.value) and "same weights file" in str(err.value)
    assert not FeatureStore.open(out).completed().any()  # nothing written with the wrong encoder


def folder_with_a_bad_image(root: Path) -> Path:
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    (root / "classes.txt").write_text("bg\nthing\n")
    rng = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(root / "images" / f"im{i}.png")
        Image.fromarray((rng.random((64, 64)) > 0.5).astype(np.uint8)).save(root / "masks" / f"im{i}.png")
    (root / "images" / "im1.png").write_bytes((root / "images" / "im0.png").read_bytes()[:60])  # truncated
    return root


def test_skip_bad_and_repair_on_the_cluster_match_in_process(cluster, tmp_path):
    root = folder_with_a_bad_image(tmp_path / "data")
    kw = dict(dataset="folder", root=root, split="all", views=1, augment=False, encoder=ENCODER, random_init=True,
              strides=(4, 8, 16, 32), batch_size=2)

    def run(**options):  # extract() with these options as the command line gives them
        return extract(**extract_arguments({**kw, **options}), progress=False)

    with pytest.raises(DataError, match=r"im1\.png.*--skip-bad"):
        run(out=tmp_path / "c.zarr", scheduler=cluster.scheduler.address)
    assert (tmp_path / "c.zarr" / "zarr.json").exists()  # the error came from a worker, not the client's checks
    with worker_threads():
        here = run(out=tmp_path / "h.zarr", skip_bad=True, loader_workers=0)
    there = run(out=tmp_path / "c.zarr", skip_bad=True, scheduler=cluster.scheduler.address)
    assert [s["image_id"] for s in there.skipped] == [s["image_id"] for s in here.skipped] == ["im1"]
    assert FeatureStore.open(tmp_path / "c.zarr").skipped_report() == FeatureStore.open(tmp_path / "h.zarr").skipped_report()
    assert_bit_identical(tmp_path / "h.zarr", tmp_path / "c.zarr")

    # --repair on the cluster: a corrupt chunk is found by the client and re-extracted by a worker.
    chunk = tmp_path / "c.zarr" / "s8" / "c" / "2" / "0" / "0" / "0"
    data = bytearray(chunk.read_bytes())
    data[len(data) // 2] ^= 0xFF
    chunk.write_bytes(bytes(data))
    r = run(out=tmp_path / "c.zarr", skip_bad=True, repair=True, scheduler=cluster.scheduler.address)
    assert r.views_written == 2  # the corrupt view and the skipped one, tried again
    assert_bit_identical(tmp_path / "h.zarr", tmp_path / "c.zarr")


def test_cli_dask_workers_2_starts_a_local_cluster_bit_identical(reference, tmp_path):
    out = tmp_path / "cli.zarr"
    result = CliRunner().invoke(main, ["extract", *CLI_SYNTH, "--dask-workers", "2", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "8 views written" in result.output
    assert_bit_identical(reference, out)


def test_cli_refuses_bad_cluster_options(tmp_path):
    out = str(tmp_path / "x.zarr")
    result = CliRunner().invoke(main, ["extract", *CLI_SYNTH, "--dask-workers", "2", "--scheduler", "tcp://127.0.0.1:1",
                                       "--out", out])
    assert result.exit_code == 2 and "mutually exclusive" in result.output
    result = CliRunner().invoke(main, ["extract", *CLI_SYNTH, "--dask-workers", "0", "--out", out])
    assert result.exit_code == 2 and "--dask-workers" in result.output
    with pytest.raises(UserError, match="--loader-workers"):
        extract_synthetic(tmp_path / "y.zarr", workers=0)
    with dask.config.set({"distributed.comm.timeouts.connect": "1s"}):
        result = CliRunner().invoke(main, ["extract", *CLI_SYNTH, "--scheduler", "tcp://127.0.0.1:9", "--out", out])
    assert result.exit_code == 2, result.output
    assert "cannot reach the dask scheduler at tcp://127.0.0.1:9" in result.output and "Traceback" not in result.output
