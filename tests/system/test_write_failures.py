"""Issue 20: a read-only or full disk is one line naming the file and the fix, for the commands whose own
suites do not cover it: compare and plan (extract, train-decoder, predict, evaluate and visualize have theirs;
a recipe's stamps are tests/pipeline/test_recipe_reruns.py's). Real read-only and full file systems, in a private mount namespace (tests/mounts.py).
"""
from __future__ import annotations

import pytest

from mounts import cli, run_with_mounts
from pipeline_helpers import extract_synthetic
from reports.test_plan import bench_json


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    d = tmp_path_factory.mktemp("stores")
    extract_synthetic(d / "s.zarr", views=1, num_images=4)
    return d / "s.zarr"


def one_line(done, *words):
    assert done.returncode == 2, done.stderr[-2000:]
    assert "Traceback" not in done.stderr and len(done.stderr.strip().splitlines()) == 1, done.stderr
    for word in words:
        assert word in done.stderr, done.stderr


def test_compare_into_a_read_only_folder_is_refused_before_training(store, tmp_path):
    locked = tmp_path / "ro"
    locked.mkdir()
    done = run_with_mounts(cli("compare", "--cache", store, "--decoders", "linear", "--epochs", "1", "--device", "cpu",
                               "--out", locked / "cmp"), read_only=[locked])
    one_line(done, "read-only", str(locked / "cmp"))
    assert "training" not in done.stderr


@pytest.mark.parametrize("disk", ["read_only", "full"])
def test_plan_json_on_a_read_only_or_full_disk_is_one_line(store, tmp_path, disk):
    target = tmp_path / "target"
    target.mkdir()
    done = run_with_mounts(cli("plan", store, "--bench-json", bench_json(tmp_path / "b.json"), "--batch-size", "2",
                               "--json", target / "plan.json"), **{disk: [target]})
    one_line(done, "cannot write", "plan.json", "read-only" if disk == "read_only" else "full")
