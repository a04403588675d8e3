"""`fusion-seg compare`: each decoder trained in a child process of the tool, then measured and tabulated."""
import json

from click.testing import CliRunner

from fusion_seg.cli import main
from pipeline_helpers import extract_synthetic


def test_compare_trains_and_tabulates_decoders(tmp_path):
    extract_synthetic(tmp_path / "t.zarr", views=1, crop=(64, 64), num_images=4)
    extract_synthetic(tmp_path / "v.zarr", split="val", views=1, augment=False, num_images=2)
    result = CliRunner().invoke(main, ["compare", "--cache", str(tmp_path / "t.zarr"), "--val-cache",
                                       str(tmp_path / "v.zarr"), "--decoders", "reverse-hrnet,linear",
                                       "--epochs", "1", "--batch-size", "2", "--loss", "ce", "--workers", "0",
                                       "--device", "cpu", "--repeats", "1", "--out", str(tmp_path / "cmp")])
    assert result.exit_code == 0, result.output
    rows = json.loads((tmp_path / "cmp" / "compare.json").read_text())["rows"]
    assert [r["decoder"] for r in rows] == ["reverse-hrnet", "linear"]
    for r in rows:
        assert 0 <= r["miou"] <= 1 and r["params_M"] > 0 and r["gflops"] > 0 and r["step_ms"] > 0
        assert r["peak_memory_MiB"] > 100 and r["infer_images_per_s"] > 0
    linear, hrnet = rows[1], rows[0]
    assert linear["params_M"] < hrnet["params_M"]  # the probe is the smallest decoder
    table = (tmp_path / "cmp" / "compare.md").read_text()
    assert "| reverse-hrnet |" in table and "| linear |" in table
