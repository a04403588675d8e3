"""Issue 20: a store whose Zarr metadata is damaged is named, never a traceback.

A truncated or invalid ``zarr.json`` of an array, or one edited so that the array no longer
matches the store's settings, is refused by ``info`` and by training (``FeatureStore.open``),
reported by ``verify`` (exit 1), and rewritten from the store's settings by ``extract --repair``.
A damaged root ``zarr.json`` (which holds the settings) is one line naming it and the fix.
"""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import zarr
from click.testing import CliRunner

from fusion_seg.cache.store import FeatureStore
from fusion_seg.cli import main
from fusion_seg.errors import CacheError
from fusion_seg.training.train import train_decoder
from pipeline_helpers import extract_synthetic, tiny_config

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py

ARRAYS = ("s4", "s8", "s16", "s32", "labels", "views")


def build(out, **kw):
    """Batches of one view, so that a repaired view is bit-identical to the one first extracted."""
    return extract_synthetic(out, views=2, num_images=3, batch_size=1, **kw)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    out = tmp_path_factory.mktemp("ref") / "ref.zarr"
    build(out)
    return out


def copy(store, tmp_path):
    out = tmp_path / "s.zarr"
    shutil.copytree(store, out)
    return out


def assert_same_store(a, b) -> None:
    left, right = zarr.open_group(str(a), mode="r"), zarr.open_group(str(b), mode="r")
    for name in ARRAYS:
        np.testing.assert_array_equal(left[name][:], right[name][:], err_msg=name)


def one_line_error(result, exit_code: int = 2) -> str:
    assert result.exit_code == exit_code, result.output
    assert "Traceback" not in result.output
    errors = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1, result.output
    return errors[0]


CORRUPTIONS = {
    "truncated": lambda text: text[: len(text) // 2],
    "invalid JSON": lambda text: "{nope",
    "not an object": lambda text: "[1, 2]",
    "empty": lambda text: "",
}


@pytest.mark.parametrize("array", ["s4", "labels", "views"])
@pytest.mark.parametrize("corruption", list(CORRUPTIONS))
def test_corrupt_array_metadata_is_named_everywhere(reference, tmp_path, array, corruption):
    out = copy(reference, tmp_path)
    meta = out / array / "zarr.json"
    meta.write_text(CORRUPTIONS[corruption](meta.read_text()))

    line = one_line_error(CliRunner().invoke(main, ["info", str(out)]))
    assert str(meta) in line and "--repair" in line

    result = CliRunner().invoke(main, ["verify", str(out)])
    assert result.exit_code == 1 and "Traceback" not in result.output, result.output
    assert f"BAD array {array}: {meta}" in result.output and "--repair" in result.output
    report = json.loads(CliRunner().invoke(main, ["verify", "--json", str(out)]).output)
    assert not report["ok"] and [m["array"] for m in report["metadata"]] == [array]

    with pytest.raises(CacheError, match=str(meta)):
        FeatureStore.open(out)
    with pytest.raises(CacheError, match=str(meta)):
        train_decoder(str(out), tmp_path / "run", tiny_config(epochs=1), progress=False)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("array, key, value, says", [
    ("s8", "shape", [6, 128, 8, 9], "shape"),
    ("s8", "shape", [7, 128, 8, 8], "shape"),
    ("labels", "data_type", "float32", "dtype"),
    ("s16", "chunk_grid", {"name": "regular", "configuration": {"chunk_shape": [2, 256, 4, 4]}}, "chunks"),
])
def test_metadata_that_no_longer_matches_the_settings(reference, tmp_path, array, key, value, says):
    out = copy(reference, tmp_path)
    meta = out / array / "zarr.json"
    doc = json.loads(meta.read_text())
    doc[key] = value
    meta.write_text(json.dumps(doc))

    result = CliRunner().invoke(main, ["verify", str(out)])
    assert result.exit_code == 1 and "Traceback" not in result.output, result.output
    assert f"BAD array {array}: {meta}" in result.output and says in result.output
    line = one_line_error(CliRunner().invoke(main, ["info", str(out)]))
    assert array in line and says in line and "--repair" in line
    with pytest.raises(CacheError, match=f"{array}.*{says}"):
        FeatureStore.open(out)


def test_repair_rewrites_array_metadata_from_the_settings(reference, tmp_path):
    """What the messages promise: `extract --repair` makes such a store whole again, bit for bit."""
    out = copy(reference, tmp_path)
    (out / "s4" / "zarr.json").write_text("{")
    doc = json.loads((out / "labels" / "zarr.json").read_text())
    doc["shape"] = [1, 64, 64]
    (out / "labels" / "zarr.json").write_text(json.dumps(doc))
    (out / "views" / "zarr.json").write_text("")
    with pytest.raises(CacheError, match="--repair"):
        build(out)  # resuming without --repair is refused, naming the fix
    assert build(out, repair=True).views_written == 0  # the chunks were intact: nothing to re-extract
    assert FeatureStore.open(out).verify()["ok"]
    assert_same_store(reference, out)


@pytest.mark.parametrize("corruption", list(CORRUPTIONS) + ["a string", "an array's document"])
def test_corrupt_root_metadata_is_one_line(reference, tmp_path, corruption):
    out = copy(reference, tmp_path)
    root = out / "zarr.json"
    if corruption == "a string":
        root.write_text('"fusion-seg"')
    elif corruption == "an array's document":
        root.write_text((out / "s4" / "zarr.json").read_text())
    else:
        root.write_text(CORRUPTIONS[corruption](root.read_text()))
    for command in (["info", str(out)], ["verify", str(out)]):
        line = one_line_error(CliRunner().invoke(main, command))
        assert str(root) in line and "delete" in line, line
    with pytest.raises(CacheError, match=str(root)):
        FeatureStore.open(out)
    with pytest.raises(CacheError, match=str(root)):
        build(out)  # resuming the extraction
    with pytest.raises(CacheError, match=str(root)):
        build(out, repair=True)


def test_invalid_settings_in_the_root_are_one_line(reference, tmp_path):
    out = copy(reference, tmp_path)
    root = out / "zarr.json"
    doc = json.loads(root.read_text())
    del doc["attributes"]["fusion_seg"]["image_ids"]
    root.write_text(json.dumps(doc))
    line = one_line_error(CliRunner().invoke(main, ["info", str(out)]))
    assert str(root) in line and "image_ids" in line


def test_a_missing_array_is_named_and_made_again_on_resume(reference, tmp_path):
    """An array without its zarr.json (a creation killed half-way, a file lost in a copy): opening names it,
    resuming makes it again over its chunks, which read back as they were."""
    out = copy(reference, tmp_path)
    meta = out / "s8" / "zarr.json"
    meta.unlink()
    with pytest.raises(CacheError, match=f"{meta}: missing"):
        FeatureStore.open(out)
    assert build(out).views_written == 0
    assert FeatureStore.open(out).verify()["ok"]
    assert_same_store(reference, out)
