"""`fusion-seg plan` without a bench JSON: it probes the device itself, each method in a spawned child process
(the bench's measure_mode, run_isolated)."""
import pytest

from fusion_seg.reports.plan import PlanRequest, plan
from pipeline_helpers import extract_synthetic


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    d = tmp_path_factory.mktemp("plan")
    extract_synthetic(d / "s.zarr", views=2, crop=(64, 64), num_images=4)
    return d / "s.zarr"


@pytest.mark.slow  # 40 s of probing; the probe's measurements are the bench's, which tests/system/test_bench.py runs
def test_plan_probes_the_device_itself(store):
    p = plan(PlanRequest(store=str(store), epochs=5, batch_size=2, device="cpu", repeats=1), echo=lambda m: None)
    rows = {row["method"]: row for row in p.rows}
    # On a CPU the ram tier is the device tier (one memory): one row for both.
    assert p.rates["source"] == "probe" and set(rows) == {"cache-device-float16", "cache-device-uint8",
                                                          "cache-device-float8", "cache-device-int4", "cache-stream",
                                                          "online", "finetune"}
    assert all(f"device-{fmt}" in p.rates["step_s"] for fmt in ("uint8", "float8", "int4"))  # probed, not assumed
    assert all(row["seconds"] > 0 for row in rows.values())
    assert p.rates["step_s"]["ram"] == p.rates["step_s"]["device"]
    assert p.recommended in rows and "measured on the CPU" in " ".join(p.notes)
