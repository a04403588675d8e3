"""`fusion-seg plan`: the projection's arithmetic, its honesty when online training wins, and the command."""
import json

import pytest
from click.testing import CliRunner

from fusion_seg.cli import main
from fusion_seg.progress import format_duration
from fusion_seg.reports.plan import Rates, Workload, hms, project, recommend
from pipeline_helpers import extract_synthetic

GiB = 2**30


def rates(**step):
    base = {"memory": 0.10, "device": 0.10, "ram": 0.11, "stream": 0.30, "online": 0.50, "finetune": 1.5}
    return Rates(batch=8, size=(360, 480), step_s={**base, **step}, extract_views_per_s=4.0,
                 load_s_per_view={"device": 0.02, "ram": 0.01}, step_MiB={k: 1000.0 for k in base},
                 memory_kind="cuda_max_allocated", device="cuda", source="test")


def workload(**kw):
    base = dict(images=367, views=2, epochs=100, batch=8, size=(360, 480), resident_bytes=7 * GiB, extracted=False,
                free={"device": 100 * GiB, "ram": 200 * GiB})
    return Workload(**{**base, **kw})


def test_projection_arithmetic():
    rows = {p.method: p for p in project(workload(), rates())}
    steps = 367 // 8 * 100
    extract = 367 * 2 / 4.0
    dev = rows["cache-device"]
    assert dev.parts == {"extract_s": extract, "load_s": 734 * 0.02, "train_s": pytest.approx(steps * 0.10)}
    assert dev.seconds == pytest.approx(extract + 734 * 0.02 + steps * 0.10)
    assert rows["cache-stream"].seconds == pytest.approx(extract + steps * 0.30)
    assert rows["online"].seconds == pytest.approx(steps * 0.50)
    assert rows["finetune"].seconds == pytest.approx(steps * 1.5)
    # On CUDA the device tier holds the store in device memory, the ram tier in host RAM.
    assert dev.peak_MiB == pytest.approx(1000 + 7 * 1024) and rows["cache-ram"].peak_MiB == 1000
    # A store already extracted is not charged again.
    again = {p.method: p for p in project(workload(extracted=True), rates())}
    assert again["cache-device"].seconds == pytest.approx(dev.seconds - extract)
    assert again["online"].seconds == rows["online"].seconds


def test_scaling_rates_to_the_planned_batch_and_size():
    r = rates().scaled(4, (720, 960))  # half the batch, four times the pixels per view: twice per step
    assert r.step_s["device"] == pytest.approx(0.20) and r.step_MiB["online"] == pytest.approx(2000)
    assert r.load_s_per_view["ram"] == pytest.approx(0.04) and r.extract_views_per_s == pytest.approx(1.0)


def test_recommends_online_when_it_wins_and_says_so():
    # A GPU whose encoder costs little: extraction plus reading back costs more than encoding every step.
    rows = project(workload(epochs=2), rates(online=0.101, stream=0.9))
    best, why = recommend(rows)
    assert best.method == "online" and "Online-frozen training wins on this hardware" in why


def test_cache_in_memory_wins_but_streaming_would_lose():
    best, why = recommend(project(workload(), rates(stream=0.9)))
    assert best.method == "cache-device"
    assert "streamed from the store the cache would lose to online training" in why


def test_tiers_that_do_not_fit_are_marked_and_never_recommended():
    rows = {p.method: p for p in project(workload(free={"device": 4 * GiB, "ram": 200 * GiB}), rates())}
    assert not rows["cache-device"].fits and "needs 7.00 GiB" in rows["cache-device"].note
    assert rows["cache-ram"].fits
    best, why = recommend(list(rows.values()))
    assert best.method == "cache-ram" and "Not fitting: cache, --cache-mode device" in why


@pytest.mark.parametrize("seconds, shown", [(42.4, "42s"), (59.6, "1m00s"), (248, "4m08s"), (3343, "55m43s"),
                                             (4546, "1h15m46s"), (28070, "7h47m50s")])
def test_plan_shows_durations_to_the_second(seconds, shown):
    """plan's wall times: progress.format_duration, keeping the seconds past an hour (README's plan example)."""
    assert hms(seconds) == format_duration(seconds, exact=True) == shown


def test_the_recommendation_quotes_wall_times_as_the_table_does():
    best, why = recommend(project(workload(), rates()))
    assert best.method == "cache-device" and best.seconds == pytest.approx(183.5 + 14.68 + 450)
    assert "is fastest: 10m48s," in why and "the next, cache, --cache-mode ram (11m26s)" in why


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    d = tmp_path_factory.mktemp("plan")
    extract_synthetic(d / "s.zarr", views=2, crop=(64, 64), num_images=4)
    return d / "s.zarr"


def bench_json(path, device="cpu"):
    modes = {m: {"step_s": s, "kind": "process_max_rss", "peak_MiB": 900.0, "baseline_rss_MiB": 500.0}
             for m, s in (("memory", 0.4), ("device", 0.41), ("ram", 0.41), ("cache", 0.5), ("online", 2.0),
                          ("finetune", 6.0))}
    for tier in ("device", "ram"):
        modes[tier].update(load_s=0.5, resident_views=32, resident_MiB=300.0, resident_counted_in_peak=True)
    path.write_text(json.dumps({"config": {"device": device}, "sections": {
        "extraction": {"extract_views_per_s": 3.0},
        "training": {"batch": 2, "size": [64, 64], "modes": modes}}}))
    return path


def test_plan_command_from_a_bench_json(store, tmp_path):
    out = tmp_path / "plan.json"
    r = CliRunner().invoke(main, ["plan", str(store), "--bench-json", str(bench_json(tmp_path / "b.json")),
                                  "--epochs", "10", "--batch-size", "2", "--json", str(out)])
    assert r.exit_code == 0, r.output
    for label in ("cache, --cache-mode device", "cache, --cache-mode stream", "online-frozen", "full fine-tuning"):
        assert label in r.output
    # The device tier in the store's own format (float16), the most precise that fits (#21: a row per format)
    assert "recommendation: cache, --cache-mode device --resident-dtype float16 is fastest" in r.output
    for fmt in ("uint8", "float8", "int4"):
        assert f"cache, --cache-mode device --resident-dtype {fmt}" in r.output
    data = json.loads(out.read_text())
    assert data["workload"]["images"] == 4 and data["workload"]["views"] == 2 and data["workload"]["extracted"]
    rows = {row["method"]: row for row in data["rows"]}
    assert rows["online"]["seconds"] == pytest.approx(10 * (4 // 2) * 2.0)  # same size and batch: unscaled


def test_plan_says_when_the_bench_json_timed_another_decoder(store, tmp_path):
    """Rates of a bench's `small` decoder say little of a `w18` step: the plan says so (from them it projected
    100 epochs of camvid-full.toml's w18-5 at 23 min; that run's measured steps, 1.96 s each, make 2 h 27 min)."""
    path = bench_json(tmp_path / "b.json")
    data = json.loads(path.read_text())
    data["config"].update(decoder="reverse-hrnet", decoder_config={"preset": "small", "streams": 4})
    path.write_text(json.dumps(data))
    base = ["plan", str(store), "--bench-json", str(path), "--epochs", "2", "--batch-size", "2"]
    same = CliRunner().invoke(main, [*base, "--decoder-opt", "preset=small"])
    other = CliRunner().invoke(main, [*base, "--decoder-opt", "preset=w18"])
    assert same.exit_code == 0 and other.exit_code == 0, same.output + other.output
    assert "timed reverse-hrnet" not in same.output
    assert f"{path} timed reverse-hrnet {{'preset': 'small', 'streams': 4}}, not the decoder planned" in other.output


@pytest.mark.parametrize("args, message", [
    ([], "either STORE"),
    (["--dataset", "synthetic"], "--size"),
    (["--bench-json", "/nonexistent.json"], "no such file"),
])
def test_plan_refuses_bad_input_in_one_line(store, args, message):
    r = CliRunner().invoke(main, ["plan", *([str(store)] if "--dataset" not in args and args else []), *args])
    assert r.exit_code == 2 and message in r.output and "Traceback" not in r.output


def test_plan_for_a_dataset_not_extracted_yet(tmp_path):
    """No store yet: a sample of the dataset gives the shapes and the extraction rate; extraction is charged."""
    r = CliRunner().invoke(main, ["plan", "--dataset", "synthetic", "--dataset-opt", "num_images=12", "--size", "64x64",
                                  "--encoder", "resnet18", "--views", "3", "--epochs", "4", "--batch-size", "2",
                                  "--bench-json", str(bench_json(tmp_path / "b.json")),
                                  "--json", str(tmp_path / "p.json")])
    assert r.exit_code == 0, r.output
    data = json.loads((tmp_path / "p.json").read_text())
    assert data["workload"]["images"] == 12 and data["workload"]["views"] == 3 and not data["workload"]["extracted"]
    stream = next(row for row in data["rows"] if row["method"] == "cache-stream")
    assert stream["parts"]["extract_s"] == pytest.approx(12 * 3 / 3.0)  # the bench JSON's rate, same view size


def test_the_probe_times_a_batch_larger_than_its_store(tmp_path):
    """Issue 20: plan on a store of fewer views than --batch-size (its own 8-image sample at --batch-size 16,
    or a small store) looped for ever: every probe now repeats the views to fill a batch."""
    import itertools

    import torch

    from fusion_seg.reports.bench.training import cache_loader, endless_positions
    from pipeline_helpers import extract_synthetic

    batches = list(itertools.islice(endless_positions(2, 8, seed=0), 3))
    assert [len(b) for b in batches] == [8, 8, 8] and all(set(b) == {0, 1} for b in batches)
    extract_synthetic(tmp_path / "s.zarr", views=1, num_images=2)
    features, labels = next(iter(cache_loader(str(tmp_path / "s.zarr"), ["s4"], 8, 0, torch.device("cpu"))))
    assert labels.shape[0] == 8 and features["s4"].shape[0] == 8



def test_plan_shows_every_format_and_says_when_none_fits_a_device_that_is_not_here():
    """Issue 21: the paper's Cityscapes schedule planned for a 141 GB GPU and a host of 1000 GB on this CPU machine,
    without the data (--images) nor the GPU's rates: memory alone, every format of every tier with its bytes a view."""
    r = CliRunner().invoke(main, ["plan", "--dataset", "cityscapes", "--size", "512x1024", "--views", "4", "--epochs",
                                  "100", "--device", "cuda", "--images", "2975", "--device-memory", "141",
                                  "--host-memory", "1000", "--decoder-opt", "streams=5", "--decoder-opt", "preset=w18"])
    assert r.exit_code == 0, r.output
    rows = [line for line in r.output.splitlines() if line.startswith("  cache, --cache-mode")]
    for tier in ("device", "ram"):
        for fmt in ("float16", "uint8", "float8", "int4"):
            row = next(line for line in rows if f"--cache-mode {tier} --resident-dtype {fmt} " in line)
            assert "MiB" in row and "GiB" in row  # its bytes a view, and the whole resident cache
    device_int4 = next(line for line in rows if "--cache-mode device --resident-dtype int4 " in line)
    assert device_int4.rstrip().endswith("no")  # 140 GiB of int4: more than a 141 GB GPU's usable share
    assert "memory alone" in r.output and "n/a" in device_int4
    assert "cache, --cache-mode ram --resident-dtype float16 is the most precise format that fits" in r.output
    # a device that is not here needs the memory to plan for
    r = CliRunner().invoke(main, ["plan", "--dataset", "cityscapes", "--size", "512x1024", "--device", "cuda",
                                  "--images", "2975"])
    if not __import__("torch").cuda.is_available():
        assert r.exit_code == 2 and "--device-memory and --host-memory" in r.output
