"""benchmarks/camvid_ablation.py's bookkeeping, on hand-written run logs: what a row's figures are read as,
how the equal-wall-clock HRNet budget is counted, and what the table prints. The rows themselves are hours of
CPU and run only by hand (BENCHMARKS.md)."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "camvid_ablation.py"


@pytest.fixture(scope="module")
def ablation():
    spec = importlib.util.spec_from_file_location("camvid_ablation", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _iou(value):
    return {"Sky": value, "Pole": 0.0}


def _write_metrics(run_dir: Path, records: list[dict]) -> Path:
    run_dir.mkdir(parents=True)
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return run_dir


def test_read_run_takes_the_best_epoch_and_sums_the_training_sessions(ablation, tmp_path):
    run_dir = _write_metrics(tmp_path / "row", [
        {"type": "step", "epoch": 1, "step": 50, "loss": 1.0},
        {"type": "epoch", "epoch": 1, "val": {"miou": 0.2, "pixel_acc": 0.6, "per_class_iou": _iou(0.4)}},
        {"type": "epoch", "epoch": 2, "val": {"miou": 0.5, "pixel_acc": 0.8, "per_class_iou": _iou(0.9)}},
        {"type": "summary", "seconds": 100.0},  # interrupted, then resumed: two sessions
        {"type": "epoch", "epoch": 3, "val": {"miou": 0.4, "pixel_acc": 0.7, "per_class_iou": _iou(0.8)}},
        {"type": "summary", "seconds": 50.5},
    ])
    r = ablation.read_run(run_dir)
    assert r["best_epoch"] == 2 and r["miou"] == 0.5 and r["pixel_acc"] == 0.8
    assert r["per_class_iou"] == _iou(0.9)
    assert r["curve"] == [[1, 0.2, 0.6], [2, 0.5, 0.8], [3, 0.4, 0.7]]
    assert r["epochs"] == 3 and r["train_seconds"] == 150.5


def test_read_run_without_validation_leaves_the_score_to_evaluate(ablation, tmp_path):
    run_dir = _write_metrics(tmp_path / "online", [
        {"type": "epoch", "epoch": 1}, {"type": "epoch", "epoch": 2}, {"type": "summary", "seconds": 30.0}])
    r = ablation.read_run(run_dir)
    assert r == {"curve": [], "best_epoch": 2, "epochs": 2, "train_seconds": 30.0}
    assert "miou" not in r


def test_equal_time_budget_counts_the_extraction_once(ablation):
    results = {"w18-4": {"train_seconds": 1000.0}, "extract-train": {"wall_seconds": 200.0},
               "hrnet-probe": {"train_seconds": 110.0, "epochs": 1}}
    assert ablation.equal_time_epochs(results) == 10  # 1200 s // 110 s
    # the equal-steps row, when it ran, times an epoch better than the one-epoch probe
    results["hrnet-steps"] = {"train_seconds": 48 * 100.0, "epochs": 48}
    assert ablation.equal_time_epochs(results) == 12
    results["w18-4"]["train_seconds"] = results["extract-train"]["wall_seconds"] = 1.0
    assert ablation.equal_time_epochs(results) == 1  # never zero epochs


def test_table_lists_finished_rows_in_order_with_extraction_added_to_cached_rows(ablation):
    row = {"miou": 0.5, "pixel_acc": 0.8, "per_class_iou": _iou(0.9), "best_epoch": 2, "epochs": 3,
           "curve": [[1, 0.2, 0.6]], "train_seconds": 600.0, "max_rss_MiB": 4096.0}
    online = {**row, "curve": [], "scored_by": "evaluate", "evaluate": {"miou": 0.5}, "train_seconds": 1200.0}
    results = {"hrnet-time": online, "small-4": row, "extract-train": {"wall_seconds": 120.0, "max_rss_MiB": 1.0},
               "hrnet-probe": {"curve": [], "epochs": 1, "train_seconds": 99.0}}
    lines = ablation.table(results).splitlines()
    assert lines[0].split(" | ")[-4:] == ["train time", "+ extraction", "peak MiB", "evaluate mIoU |"]
    body = [line for line in lines[2:] if line.startswith("| ")]
    assert [line.split(" | ")[0] for line in body] == ["| small-4", "| hrnet-time"]  # the probe has no score
    small, hrnet = (line.split(" | ") for line in body)
    assert small[1] == "val store" and small[-4:] == ["10.0 min", "12.0 min", "4096", "- |"]
    assert hrnet[1] == "evaluate" and hrnet[-4:] == ["20.0 min", "20.0 min", "4096", "0.5000 |"]
    assert "Extraction (counted once" in lines[-1]


def _fake_fusion_seg(calls: list[list[str]]):
    """Stands in for the script's `run` (one fusion-seg process per row): records each command and answers what
    the real process would leave behind (a training row's figures, evaluate's metrics.json)."""
    def run(argv, run_dir):
        calls.append(argv)
        if argv[0] == "evaluate":
            ev = Path(argv[argv.index("--out") + 1])
            ev.mkdir(parents=True)
            (ev / "metrics.json").write_text(json.dumps({"miou": 0.5, "pixel_acc": 0.8, "per_class_iou": _iou(0.9)}))
        result = {"wall_seconds": 1.0, "max_rss_MiB": 1.0}
        if run_dir is not None:
            result.update(curve=[], best_epoch=48, epochs=48, train_seconds=1.0)
        return result
    return run


def test_weighted_end_to_end_row_trains_online_with_class_weights_and_is_scored_by_evaluate(
        ablation, tmp_path, monkeypatch):
    calls: list[list[str]] = []
    monkeypatch.setattr(ablation, "run", _fake_fusion_seg(calls))
    out = tmp_path / "runs"
    monkeypatch.setattr("sys.argv", ["camvid_ablation.py", "--root", "camvid", "--cache", str(tmp_path / "cache"),
                                     "--out", str(out), "--epochs", "12", "--weighted-rows", "hrnet-steps",
                                     "--rows", "hrnet-steps+inverse-log"])
    ablation.main()
    assert [c[0] for c in calls] == ["extract", "extract", "train-decoder", "evaluate"]
    train = calls[2]
    assert "--online" in train and train[train.index("--decoder") + 1] == "hrnet"
    assert train[train.index("--epochs") + 1] == "48"  # equal steps: 4 views x 12 epochs
    assert train[train.index("--class-weights") + 1] == "inverse-log"
    assert train[-1] == str(out / "hrnet-steps+inverse-log")
    assert calls[3][calls[3].index("--checkpoint") + 1] == str(out / "hrnet-steps+inverse-log" / "best.pt")
    row = json.loads((out / "results" / "hrnet-steps+inverse-log.json").read_text())
    assert row["scored_by"] == "evaluate" and row["miou"] == 0.5
    assert "| hrnet-steps+inverse-log | evaluate | 0.5000 |" in ablation.table(ablation.load_results(out))


def test_unknown_weighted_row_is_refused_before_any_work(ablation, tmp_path, monkeypatch):
    calls: list[list[str]] = []
    monkeypatch.setattr(ablation, "run", _fake_fusion_seg(calls))
    monkeypatch.setattr("sys.argv", ["camvid_ablation.py", "--out", str(tmp_path / "runs"),
                                     "--weighted-rows", "w18-5,hrnet-time"])
    with pytest.raises(SystemExit, match=r"--weighted-rows: unknown row 'hrnet-time'"):
        ablation.main()
    assert calls == [] and not (tmp_path / "runs").exists()
