"""The default pipeline reaches its promised accuracy (slow: `make test-all`)."""
import json
from pathlib import Path

import pytest

from fusion_seg.pipeline.recipes import run_recipe

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_demo_recipe_reaches_0_9_miou(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)  # the recipe's predict input is relative to the repository
    run_recipe(ROOT / "pipelines" / "demo.toml", overrides={"cache": str(tmp_path / "cache"),
                                                          "runs": str(tmp_path / "runs")},
               echo=lambda s: None, progress=False)
    metrics = json.loads((tmp_path / "runs" / "demo" / "eval-val" / "metrics.json").read_text())
    assert metrics["miou"] >= 0.9, metrics
    assert len(list((tmp_path / "runs" / "demo" / "predictions").glob("*_overlay.png"))) == 4
