"""Issue 20: extraction says done only when it was done.

- an --out that cannot be a feature store, and sizes that cannot fit in this machine's memory, are
  refused before any work (no store, lock file or folder is made);
- a store extracted from input files that were since replaced, added or removed is not extended;
- views skipped as bad input are counted from one source, and every command says how many.
"""
from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import zarr
from click.testing import CliRunner
from PIL import Image

from fusion_seg.cache.store import INPUTS_KEY, SKIPPED_KEY, FeatureStore
from fusion_seg.cli import main
from fusion_seg.requests import Augment, DatasetRef, EncoderSpec, ExtractRun, Resize
from fusion_seg.errors import CacheError, UserError
from fusion_seg.files import file_listing
from fusion_seg.extract.local import extract
from fusion_seg.shapes import ShapeSpec
from pipeline_helpers import ENCODER, extract_synthetic

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py

SYNTH = ["--dataset", "synthetic", "--split", "train", "--dataset-opt", "num_images=2", "--dataset-opt",
         "size=[64,64]", "--encoder", ENCODER, "--random-init", "--strides", "4,8,16,32", "--loader-workers", "0",
         "--device", "cpu"]


def one_line_error(result) -> str:
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    errors = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1, result.output
    return errors[0]


def tree(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


# --------------------------------------------------------------------------- --out that cannot be a store
def out_cases(tmp_path: Path) -> dict[str, tuple[Path, str]]:
    """name -> (the --out, what the refusal must say)."""
    (tmp_path / "a-file").write_text("x")
    store = tmp_path / "store.zarr"
    extract_synthetic(store, views=1, num_images=1)
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "notes.txt").write_text("mine")
    return {
        "a file": (tmp_path / "a-file", "is a file"),
        "under a file": (tmp_path / "a-file" / "sub" / "s.zarr", "is a file"),
        "inside a store": (store / "s4" / "new.zarr", "inside the Zarr store"),
        "inside a store, deeper": (store / "nested" / "deeper" / "new.zarr", "inside the Zarr store"),
        "a folder of other files": (tmp_path / "foreign", "not a fusion-seg feature store"),
    }


@pytest.mark.parametrize("case", ["a file", "under a file", "inside a store", "inside a store, deeper",
                                  "a folder of other files"])
def test_an_out_that_cannot_be_a_store_is_refused_before_any_work(tmp_path, case):
    out, says = out_cases(tmp_path)[case]
    before = tree(tmp_path)
    with pytest.raises(UserError, match=says) as err:
        extract_synthetic(out, views=1, num_images=1)
    assert str(out) in str(err.value) and "--out" in str(err.value)
    line = one_line_error(CliRunner().invoke(main, ["extract", *SYNTH, "--crop", "64x64", "--out", str(out)]))
    assert says in line and str(out) in line
    assert tree(tmp_path) == before  # no store, lock file or folder


def test_an_empty_folder_and_an_existing_store_are_accepted(tmp_path):
    (tmp_path / "empty").mkdir()
    assert extract_synthetic(tmp_path / "empty", views=1, num_images=1).views_written == 1
    assert extract_synthetic(tmp_path / "empty", views=1, num_images=1).views_written == 0


# --------------------------------------------------------------------------- sizes that cannot fit
GIB = 2**30


def test_memory_problem_compares_with_this_machines_memory():
    from fusion_seg.checks import memory_problem

    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    assert memory_problem(0) is None and memory_problem(total // 2) is None
    problem = memory_problem(total * 4)
    assert f"{total * 4 / GIB:.1f} GiB" in problem and f"{total / GIB:.1f} GiB" in problem


@pytest.mark.parametrize("args, option", [
    (["--views", "1000000000", "--crop", "64x64"], "--views"),
    (["--dataset-opt", "num_images=10000000000", "--crop", "64x64"], "num_images"),
    (["--crop", "100000x100000"], "--crop"),
    (["--crop", "64x64", "--size", "100000x100000"], "--size"),
    (["--crop", "64x64", "--short-side", "1000000"], "--short-side"),
    (["--no-augment", "--size", "100000x100000"], "--size"),
    (["--no-augment", "--short-side", "1000000"], "--short-side"),
    (["--dataset-opt", "num_images=1000000", "--batch-size", "1000000000", "--crop", "1024x1024"], "--batch-size"),
])
def test_sizes_that_cannot_fit_are_refused_before_anything_big(tmp_path, args, option):
    out = tmp_path / "s.zarr"
    line = one_line_error(CliRunner().invoke(main, ["extract", *SYNTH, *args, "--out", str(out)]))
    assert option in line and "GiB" in line and "this machine has" in line, line
    assert list(tmp_path.iterdir()) == []


def test_legitimate_large_settings_pass_the_size_checks():
    """Cityscapes at full resolution: 2975 images, 1024x2048 crops, 4 views, batches of 8, ResNet-50 at every
    stride. They need a few GiB: never refused on a machine that could run them."""
    from fusion_seg.extract.encode import check_view_count, check_view_size

    resnet50 = {f"s{s}": ShapeSpec(c, s) for s, c in ((2, 64), (4, 256), (8, 512), (16, 1024), (32, 2048))}
    check_view_count(2975, 4)
    check_view_size(resnet50, (1024, 2048), Augment(crop=(1024, 2048)), Resize(), batch_size=8,
                    num_views=2975 * 4, dtype="float16")
    check_view_size(resnet50, (1024, 2048), Augment(enabled=False), Resize(size=(1024, 2048)), batch_size=8,
                    num_views=500, dtype="bfloat16")


def test_a_batch_larger_than_the_dataset_is_not_refused(tmp_path):
    """A batch never holds more views than the store has: --batch-size 1000000000 on 2 views is 2 views."""
    r = extract_synthetic(tmp_path / "s.zarr", views=1, num_images=2, batch_size=1_000_000_000)
    assert r.views_written == 2


# --------------------------------------------------------------------------- changed input files
def folder_dataset(root: Path, n: int = 3, bad: str | None = None) -> Path:
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    (root / "classes.txt").write_text("bg\nthing\n")
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(root / "images" / f"im{i}.png")
        Image.fromarray((rng.random((64, 64)) > 0.5).astype(np.uint8)).save(root / "masks" / f"im{i}.png")
    if bad:
        path = root / "images" / bad
        path.write_bytes(path.read_bytes()[:60])  # truncated
    return root


def replace_image(path: Path, seed: int = 1) -> None:
    """The image at ``path`` replaced in place: same name, other pixels."""
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(path)
    os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 10**9))


def extract_folder(root: Path, out: Path, run: ExtractRun = ExtractRun(loader_workers=0), **kw):
    return extract(out, DatasetRef("folder", "all", root=str(root)), EncoderSpec(ENCODER, random_init=True,
                   strides=(4, 8, 16, 32)), augment=Augment(enabled=False), run=run, progress=False, **kw)


def test_the_input_files_are_recorded_small(tmp_path):
    root = folder_dataset(tmp_path / "data")
    out = tmp_path / "s.zarr"
    extract_folder(root, out)
    record = json.loads((out / "zarr.json").read_text())["attributes"][INPUTS_KEY]
    assert record["files"] == 6 and len(record["sha256"]) == 64  # 3 images and 3 masks
    assert len(json.dumps(record)) < 200
    # Generated data has no input files: its settings are its identity.
    extract_synthetic(tmp_path / "synth.zarr", views=1, num_images=1)
    assert INPUTS_KEY not in json.loads((tmp_path / "synth.zarr" / "zarr.json").read_text())["attributes"]


@pytest.mark.parametrize("state", ["complete", "incomplete"])
def test_an_image_replaced_in_place_is_refused_on_resume(tmp_path, state):
    root = folder_dataset(tmp_path / "data")
    out = tmp_path / "s.zarr"
    extract_folder(root, out)
    if state == "incomplete":
        FeatureStore.open(out, mode="r+").invalidate([2])
    replace_image(root / "images" / "im1.png")
    rows = FeatureStore.open(out).rows()
    for repair in (False, True):
        with pytest.raises(CacheError, match="1 input file") as err:
            extract_folder(root, out, repair=repair)
        message = str(err.value)
        assert str(root / "images" / "im1.png") in message and "--out" in message and "delete" in message
        assert "\n" not in message
    np.testing.assert_array_equal(FeatureStore.open(out).rows(), rows)  # nothing was extracted


def test_files_added_removed_and_changed_are_counted(tmp_path):
    root = folder_dataset(tmp_path / "data", n=6)
    out = tmp_path / "s.zarr"
    extract_folder(root, out)
    listing = file_listing(root.glob("*/*.png"))  # what the folder dataset reads: its images and masks
    assert len(listing) == 12
    now = [[path, size + 1, mtime] if i < 2 else [path, size, mtime] for i, (path, size, mtime) in enumerate(listing)]
    now = now[:-2] + [[str(root / "images" / "new.png"), 1, 1]]
    with pytest.raises(CacheError) as err:
        FeatureStore.open(out, mode="r+").check_inputs(now)
    message = str(err.value)
    assert "5 input files" in message and "2 changed, 1 added, 2 removed" in message
    assert listing[0][0] in message and str(out) in message
    FeatureStore.open(out, mode="r+").check_inputs(listing)  # unchanged


def test_a_store_without_a_record_still_resumes(tmp_path):
    """Stores written before inputs were recorded keep working, without the check."""
    root = folder_dataset(tmp_path / "data")
    out = tmp_path / "s.zarr"
    extract_folder(root, out)
    group = zarr.open_group(str(out), mode="r+")
    del group.attrs[INPUTS_KEY]
    shutil.rmtree(out / "inputs")
    FeatureStore.open(out, mode="r+").invalidate([1])
    replace_image(root / "images" / "im2.png")
    assert extract_folder(root, out).views_written == 1


def test_a_relative_and_an_absolute_root_of_one_folder_resume_one_store(tmp_path, monkeypatch):
    root = folder_dataset(tmp_path / "data")
    out = tmp_path / "a.zarr"
    extract_folder(root, out)
    monkeypatch.chdir(tmp_path)
    assert extract_folder(Path("data"), out).views_written == 0  # the same folder, spelt from here
    with pytest.raises(CacheError, match="dataset.root: stored"):
        extract_folder(folder_dataset(tmp_path / "other"), out)  # another folder is other settings


def test_unchanged_inputs_resume_and_the_record_is_part_of_the_content_id(tmp_path):
    root = folder_dataset(tmp_path / "data")
    a, b = tmp_path / "a.zarr", tmp_path / "b.zarr"
    extract_folder(root, a)
    assert extract_folder(root, a).views_written == 0
    extract_folder(root, b)
    assert FeatureStore.open(a).content_id() == FeatureStore.open(b).content_id()
    replace_image(root / "images" / "im0.png")
    c = tmp_path / "c.zarr"
    extract_folder(root, c)
    assert FeatureStore.open(c).content_id() != FeatureStore.open(a).content_id()


# --------------------------------------------------------------------------- views skipped as bad input
FOLDER = ["--dataset", "folder", "--split", "all", "--views", "1", "--no-augment", "--encoder", ENCODER,
          "--random-init", "--strides", "4,8,16,32", "--loader-workers", "0"]


def skipped_counts(out: Path) -> tuple[int, int]:
    """(the skipped count of `info --json`, that of `verify --json`)."""
    info = json.loads(CliRunner().invoke(main, ["info", "--json", str(out)]).output)
    verify = json.loads(CliRunner().invoke(main, ["verify", "--json", str(out)]).output)
    return len(info["skipped"]), len(verify["skipped"])


def test_skipped_views_are_counted_and_explained_by_every_command(tmp_path):
    root = folder_dataset(tmp_path / "data", bad="im1.png")
    out = tmp_path / "s.zarr"
    args = ["extract", *FOLDER, "--root", str(root), "--skip-bad", "--out", str(out)]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    summary = next(line for line in result.stdout.splitlines() if line.startswith(str(out)))
    assert "3 views written, 1 of them skipped as bad input" in summary
    assert "--repair" in result.stderr
    assert skipped_counts(out) == (1, 1)

    # A later run on the complete store says so too, and what to do about it.
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0 and "0 views written" in result.stdout, result.output
    assert "holds 1 view skipped as bad input" in result.stderr and "--repair" in result.stderr
    assert "1 skipped as bad input" in CliRunner().invoke(main, ["info", str(out)]).output

    # Killed between marking views skipped and recording why: the views still count, everywhere.
    group = zarr.open_group(str(out), mode="r+")
    del group.attrs[SKIPPED_KEY]
    assert skipped_counts(out) == (1, 1)
    info = json.loads(CliRunner().invoke(main, ["info", "--json", str(out)]).output)
    assert info["skipped"][0]["image_id"] == "im1" and "not recorded" in info["skipped"][0]["error"]

    # Fixed, then --repair: re-extracted (the changed file is the skipped view's, so it is accepted).
    replace_image(root / "images" / "im1.png")
    result = CliRunner().invoke(main, [*args, "--repair"])
    assert result.exit_code == 0, result.output
    assert "1 views written" in result.stdout and "skipped as bad input" not in result.output
    assert skipped_counts(out) == (0, 0)
    assert FeatureStore.open(out).skipped_report() == []
    assert CliRunner().invoke(main, ["verify", str(out)]).exit_code == 0
    # The record now holds the fixed file: the next run is a plain no-op.
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0 and "0 views written" in result.stdout, result.output


def test_repair_accepts_changes_only_to_the_skipped_views_files(tmp_path):
    root = folder_dataset(tmp_path / "data", bad="im1.png")
    out = tmp_path / "s.zarr"
    extract_folder(root, out, skip_bad=True)
    replace_image(root / "images" / "im1.png")
    replace_image(root / "images" / "im2.png", seed=3)  # a good view's image: its features would be stale
    with pytest.raises(CacheError, match="1 input file") as err:
        extract_folder(root, out, skip_bad=True, repair=True)
    assert "im2.png" in str(err.value) and "im1.png" not in str(err.value)
    assert len(FeatureStore.open(out).skipped_views()) == 1  # nothing was done


def test_info_says_larger_when_the_store_is_larger_than_raw_fp16(tmp_path):
    out = tmp_path / "s.zarr"
    extract_synthetic(out, views=1, num_images=2, codec="none")
    info = FeatureStore.open(out).info()
    assert info["compression_ratio"] < 1
    result = CliRunner().invoke(main, ["info", str(out)])
    assert f"{1 / info['compression_ratio']:.2f}x larger than raw fp16" in result.output
    assert "smaller" not in result.output
    assert math.isfinite(info["compression_ratio"])


def test_a_failure_while_recording_skipped_views_does_not_hide_the_error(tmp_path, monkeypatch):
    """The disk fills while views are written, after one was skipped: recording why it was skipped fails too,
    and the error the caller gets is the first one, the failed write, as one line."""
    from fusion_seg.cache import store as store_module

    root = folder_dataset(tmp_path / "data", bad="im1.png")
    real_set, full = store_module._store_set, []

    async def fill_at_view_2(store, key, value):
        if key.startswith("s4/c/2/") or full:
            full.append(key)
            raise OSError(28, "No space left on device", key)
        await real_set(store, key, value)

    monkeypatch.setattr(store_module, "_store_set", fill_at_view_2)
    with pytest.raises(UserError, match="No space left on device") as err:
        extract_folder(root, tmp_path / "s.zarr", ExtractRun(loader_workers=0, batch_size=1), skip_bad=True)
    assert "disk is full" in str(err.value) and "re-run the same command" in str(err.value)
    assert "zarr.json" in full  # the reasons could not be recorded either
    monkeypatch.undo()
    assert FeatureStore.open(tmp_path / "s.zarr").skipped_report()[0]["error"].startswith("not recorded")
