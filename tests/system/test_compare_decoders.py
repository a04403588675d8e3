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


def test_compare_trains_each_decoder_with_the_whole_schedule(tmp_path):
    """Issue 22: what a caller asks for is what each decoder's run trained with, every field of the TrainConfig
    (class weights, views, OHEM settings, crop, seed...) but the decoder and its options, which are each
    decoder's own defaults; the command line takes train-decoder's options, --class-weights included; and a
    changed schedule into the same folder trains again, keeping the earlier run aside."""
    from dataclasses import asdict, replace

    from fusion_seg.reports.compare import compare
    from fusion_seg.training.config import TrainConfig

    extract_synthetic(tmp_path / "t.zarr", views=2, crop=(64, 64), num_images=4)
    cfg = TrainConfig(epochs=1, batch_size=2, lr=0.02, loss="ohem", ohem_thresh=0.7, ohem_min_kept=1000,
                      class_weights="inverse-log", views=1, crop=[32, 32], seed=3, workers=0, device="cpu",
                      cache_mode="device", resident_dtype="uint8", log_every=1)
    compare(str(tmp_path / "t.zarr"), tmp_path / "api", cfg, decoders=("linear",), repeats=1, progress=False)
    ran = json.loads((tmp_path / "api" / "linear" / "config.json").read_text())
    assert ran["train"] == asdict(replace(cfg, decoder="linear", decoder_config={}))
    assert len(ran["data"]["class_weights"]["weights"]) == 4  # resolved from the store's labels
    recorded = json.loads((tmp_path / "api" / "compare.json").read_text())["schedule"]
    assert {k: v for k, v in recorded.items() if k not in ("decoder", "decoder_config")} == \
        {k: v for k, v in ran["train"].items() if k not in ("decoder", "decoder_config")}

    base = ["compare", "--cache", str(tmp_path / "t.zarr"), "--decoders", "linear", "--epochs", "1", "--batch-size",
            "2", "--workers", "0", "--device", "cpu", "--repeats", "1", "--out", str(tmp_path / "cli")]
    result = CliRunner().invoke(main, [*base, "--class-weights", "median-freq", "--views", "1", "--ohem-min-kept", "500"])
    assert result.exit_code == 0, result.output
    ran = json.loads((tmp_path / "cli" / "linear" / "config.json").read_text())["train"]
    assert (ran["class_weights"], ran["views"], ran["ohem_min_kept"]) == ("median-freq", 1, 500)
    result = CliRunner().invoke(main, [*base, "--class-weights", "inverse-log"])
    assert result.exit_code == 0, result.output
    ran = json.loads((tmp_path / "cli" / "linear" / "config.json").read_text())["train"]
    assert ran["class_weights"] == "inverse-log" and ran["views"] is None
    kept = json.loads((tmp_path / "cli" / "linear.previous-1" / "config.json").read_text())["train"]
    assert kept["class_weights"] == "median-freq"
