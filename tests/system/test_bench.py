"""`fusion-seg bench` end to end on tiny settings: every section runs and its figures hang together.

Timings are not asserted (they are the bench's output, not a test); what is asserted is
that each section measures what it says: ratios are the quotients of their figures, the
lossless formats are lossless and the lossy ones are not, the tables name every section.
"""
from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from fusion_seg.reports.bench import BenchConfig, render_markdown, run_bench, update_benchmarks
from fusion_seg.cli import main
from pipeline_helpers import ENCODER


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    work = tmp_path_factory.mktemp("bench")
    cfg = BenchConfig(encoder=ENCODER, camvid=None, size=(64, 96), scaling_sizes=((64, 96),), views=4, repeats=1,
                      warmup=1, batch_size=2, loader_workers=0, workdir=str(work), forward_sizes=((64, 96), (32, 64)))
    return run_bench(cfg)


def test_every_section_reports(results):
    s = results["sections"]
    assert set(s) == {"extraction", "format", "training", "scaling", "inference"}
    ext = s["extraction"]
    assert ext["bare_forward_views_per_s"] > 0 and ext["extract_views_per_s"] > 0
    assert ext["ratio"] == pytest.approx(ext["extract_views_per_s"] / ext["bare_forward_views_per_s"])
    assert ext["views"] == 4 and ext["data"] == "synthetic images"


def test_bare_forward_at_each_forward_size(results):
    ext = results["sections"]["extraction"]
    rows = ext["forward_sizes"]
    assert [r["size"] for r in rows] == [[64, 96], [32, 64]]
    assert rows[0]["views_per_s"] == ext["bare_forward_views_per_s"]  # cfg.size is measured once
    for r in rows:
        assert r["views_per_s"] > 0 and r["ms_per_view"] == pytest.approx(1e3 / r["views_per_s"])
    assert ext["forward_precision"] == "fp32"  # bf16 autocast and channels_last are CUDA's
    md = render_markdown(results)
    assert "| 96x64 |" in md and "| 64x32 |" in md


def test_format_rows_cover_every_dtype_and_codec_and_measure_error(results):
    rows = results["sections"]["format"]["rows"]
    assert {(r["dtype"], r["codec"]) for r in rows} == {(d, c) for d in ("float16", "bfloat16", "uint8")
                                                        for c in ("none", "zstd", "blosc-zstd", "blosc-lz4", "lz4")}
    by = {(r["dtype"], r["codec"]): r for r in rows}
    assert by[("float16", "none")]["ratio_to_raw_fp16"] == pytest.approx(1.0, rel=0.02)
    assert by[("uint8", "none")]["ratio_to_raw_fp16"] == pytest.approx(2.0, rel=0.05)
    for codec in ("zstd", "blosc-zstd", "lz4"):
        assert by[("float16", codec)]["ratio_to_raw_fp16"] > 1.0  # post-ReLU zeros compress
    assert by[("float16", "zstd")]["max_rel_error"] < 2**-10  # fp16 rounding only
    assert 2**-10 < by[("bfloat16", "zstd")]["max_rel_error"] <= 2**-8
    assert 0 < by[("uint8", "zstd")]["max_rel_error"] <= 0.5 / 255 + 1e-6


def test_training_section_compares_the_same_decoder_three_ways(results):
    t = results["sections"]["training"]
    modes = t["modes"]
    assert set(modes) == {"memory", "device", "ram", "cache", "online", "finetune",  # and #21's:
                          "checkpointed", "device-uint8", "device-float8", "device-int4"}
    for m in modes.values():
        assert m["step_s"] > 0 and m["peak_MiB"] > m["baseline_rss_MiB"] > 0 and m["batch"] == 2
    assert t["ratios"]["online/cache"]["time"] == pytest.approx(modes["online"]["step_s"] / modes["cache"]["step_s"])
    assert t["cache_vs_memory_step"] == pytest.approx(modes["cache"]["step_s"] / modes["memory"]["step_s"])
    rows = t["whole_schedule"]
    assert [r["epochs"] for r in rows] == sorted(r["epochs"] for r in rows)
    # extraction is paid once: the cache's cost per extra epoch is its step cost
    a, b = rows[0], rows[1]
    per_epoch = (b["cache_s"] - a["cache_s"]) / (b["epochs"] - a["epochs"])
    assert per_epoch == pytest.approx(367 // 2 * modes["cache"]["step_s"])


def test_training_section_measures_every_cache_tier(results):
    t = results["sections"]["training"]
    modes, rows = t["modes"], {r["tier"]: r for r in t["tiers"]}
    # the compact resident formats of #21 too, in the device tier (on a CPU the ram tier is the same memory)
    assert set(rows) == {"device", "ram", "stream", "device-uint8", "device-float8", "device-int4"}
    for fmt in ("uint8", "float8", "int4"):
        m = modes[f"device-{fmt}"]
        assert m["format"] == fmt and m["paired_vs_memory"] > 0
        assert m["resident_MiB"] < modes["device"]["resident_MiB"]  # fewer bytes than float16 (labels aside)
    cp = t["checkpointing"]  # --checkpoint-activations: its time and the step memory it saves
    assert cp["step_s"] > 0 and cp["step_MiB"] > 0 and cp["finetune_over_checkpointed"] > 0
    for tier, key in (("device", "device"), ("ram", "ram"), ("stream", "cache")):
        assert rows[tier]["vs_memory"] == pytest.approx(modes[key]["step_s"] / modes["memory"]["step_s"])
        assert rows[tier]["loader_cpu_ms_per_view"] > 0
    for tier in ("device", "ram"):
        m = modes[tier]
        assert m["resident_views"] == 4 and m["load_s"] > 0 and m["resident_MiB"] > 0
        # On CPU the resident store is in the RSS: the step's own memory is the peak less the store.
        assert rows[tier]["step_MiB"] == pytest.approx(rows[tier]["peak_MiB"] - m["resident_MiB"])
        # Timed in turn with the in-memory step of the same process: its own ratio, not the cross-process one.
        assert m["paired_vs_memory"] > 0 and m["paired_memory_step_s"] > 0 and rows[tier]["paired_vs_memory"] == \
            m["paired_vs_memory"]
    assert rows["stream"]["resident_MiB"] == 0 and rows["stream"]["load_s"] == 0
    sched = {r["epochs"]: r for r in t["whole_schedule"]}
    assert sorted(sched) == [10, 100, 200]
    r = sched[100]
    steps = 367 // 2
    # The resident rows pay extraction and a one-off load, then the tier's step; the bound is K·B + E·D.
    load = 367 * 2 * modes[r["resident_tier"]]["load_s"] / 4
    assert r["resident_s"] == pytest.approx(r["extract_s"] + load + 100 * steps * modes[r["resident_tier"]]["step_s"])
    bare = results["sections"]["extraction"]["bare_forward_views_per_s"]
    assert r["bound_s"] == pytest.approx(367 * 2 / bare + 100 * steps * modes["memory"]["step_s"])
    assert r["resident_vs_bound"] == pytest.approx(r["resident_s"] / r["bound_s"])
    md = render_markdown(results)
    assert "| device |" in md and "| ram |" in md and "bound K·B + E·D" in md
    assert "| device-int4 | int4 |" in md and "--checkpoint-activations" in md


def test_scaling_and_inference(results):
    row = results["sections"]["scaling"]["rows"][0]
    assert row["size"] == [64, 96] and set(row["steps"]) == {"memory", "cache", "online", "finetune"}
    inf = results["sections"]["inference"]["images_per_s"]
    assert inf["whole image"] > 0 and inf["sliding window"] > 0


def test_markdown_and_benchmarks_block(results, tmp_path):
    md = render_markdown(results)
    for title in ("1. Extraction", "2. Cache format", "3-4. Loader and training", "5. Scaling", "6. Inference"):
        assert title in md
    path = tmp_path / "BENCHMARKS.md"
    path.write_text("# Benchmarks\n\nhand-written text\n")
    update_benchmarks(path, md, heading="cpu")
    update_benchmarks(path, "second run\n", heading="cpu")
    update_benchmarks(path, "gpu run\n", heading="cuda")
    text = path.read_text()
    assert "hand-written text" in text and "second run" in text and "gpu run" in text
    assert "1. Extraction" not in text  # the cpu block was replaced, not appended
    assert text.count("fusion-seg bench: begin cpu") == 1


def test_cli_refuses_unknown_sections_and_missing_cuda(tmp_path):
    r = CliRunner().invoke(main, ["bench", "--sections", "extraction,nonsense", "--camvid", str(tmp_path)])
    assert r.exit_code == 2 and "nonsense" in r.output
    r = CliRunner().invoke(main, ["bench", "--forward-sizes", "360x480,big", "--camvid", str(tmp_path)])
    assert r.exit_code == 2 and "'big' is not a size" in r.output
    import torch

    if not torch.cuda.is_available():
        r = CliRunner().invoke(main, ["bench", "--device", "cuda"])
        assert r.exit_code == 2 and "CUDA is not available" in r.output


def test_results_are_plain_json(results):
    json.loads(json.dumps(results))


# --------------------------------------------------------------------------- shared pieces, without running the bench
def test_median_seconds_warms_up_then_times_each_repetition(monkeypatch):
    from fusion_seg.reports import timing

    clock = iter([0.0, 3.0, 10.0, 11.0, 20.0, 26.0])  # repetitions of 3 s, 1 s and 6 s (of 3 calls each)
    monkeypatch.setattr(timing.time, "perf_counter", lambda: next(clock))
    calls, syncs = [], []
    seconds = timing.median_seconds(lambda: calls.append(1), repeats=3, warmup=2, sync=lambda: syncs.append(1),
                                    calls_per_repeat=3)
    assert seconds == pytest.approx(1.0)  # the median repetition, 3 s, over its 3 calls
    assert len(calls) == 2 + 3 * 3 and len(syncs) == 1 + 3


def test_compare_and_the_bench_time_with_the_one_median_timer():
    from fusion_seg.reports import compare, timing
    from fusion_seg.reports.bench import extraction, training

    assert compare.median_seconds is extraction.median_seconds is training.median_seconds is timing.median_seconds


@pytest.mark.parametrize("seconds, shown", [(7.2, "7s"), (54, "54s"), (157, "2m37s"), (3599.4, "59m59s"),
                                            (4980, "1h23m"), (81420, "22h37m"), (float("nan"), "?")])
def test_bench_tables_show_durations_in_the_progress_format(seconds, shown):
    from fusion_seg.progress import format_duration

    assert format_duration(seconds) == shown


def test_updating_benchmarks_and_saving_json_leave_no_temporary_file(tmp_path):
    from fusion_seg.reports.bench import save_json

    path = tmp_path / "BENCHMARKS.md"
    update_benchmarks(path, "first · run\n", heading="cpu")  # a missing file is started
    update_benchmarks(path, "second · run\n", heading="cpu")
    assert "second · run" in path.read_text(encoding="utf-8") and "first" not in path.read_text(encoding="utf-8")
    save_json({"a": [1, 2]}, tmp_path / "new" / "bench.json")  # a missing folder is made
    assert json.loads((tmp_path / "new" / "bench.json").read_text()) == {"a": [1, 2]}
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["BENCHMARKS.md", "bench.json", "new"]


def test_a_modes_peak_is_counted_from_its_steps_not_its_setup():
    """The bench resets the peak after a mode's setup: memory touched and freed before (128 MiB here) no longer
    stands for the step's peak, as a 890 MiB floor did for every mode of a run. Anonymous mappings, so that
    the pages are new and returned whatever the allocator keeps."""
    import mmap
    import os

    import torch

    from fusion_seg.reports.bench.common import peak_memory, reset_peak_memory

    if not os.path.exists("/proc/self/clear_refs"):
        pytest.skip("needs Linux's /proc/self/clear_refs")

    def touched(mib: int) -> mmap.mmap:
        m = mmap.mmap(-1, mib * 2**20)
        m.write(b"\x01" * (mib * 2**20))
        return m

    cpu = torch.device("cpu")
    touched(128).close()  # the setup's transient
    before = peak_memory(cpu)["peak_MiB"]
    reset_peak_memory(cpu)
    after = peak_memory(cpu)["peak_MiB"]
    assert after < before - 100, (before, after)
    step = touched(64)  # live during "the step"
    assert peak_memory(cpu)["peak_MiB"] >= after + 60
    step.close()


def test_the_bench_decoder_is_any_cache_decoder_with_its_own_options(tmp_path):
    """Issue 22 (a bug fixed): `bench --decoder fpn` passed the reverse HRNet's streams=4 to fpn, which has no such
    option; now the default options are the reverse HRNet's alone, --decoder-opt sets any decoder's, and an
    option the decoder lacks is one line before any work."""
    from fusion_seg.reports.bench.common import decoder_for_store
    from pipeline_helpers import extract_synthetic

    assert BenchConfig().decoder_config == {"preset": "small", "streams": 4}
    assert BenchConfig(decoder="fpn").decoder_config == {}
    extract_synthetic(tmp_path / "s.zarr", views=1, num_images=2)
    from fusion_seg.cache.store import FeatureStore

    maps = set(FeatureStore.open(tmp_path / "s.zarr").spec.input_shapes())
    for decoder in ("fpn", "linear"):  # built from the store with their own defaults (fpn raised a TypeError)
        _built, names = decoder_for_store(BenchConfig(decoder=decoder), str(tmp_path / "s.zarr"))
        assert names and set(names) <= maps
    r = CliRunner().invoke(main, ["bench", "--decoder", "fpn", "--decoder-opt", "streams=4", "--camvid", str(tmp_path)])
    assert r.exit_code == 2 and "decoder 'fpn' has no option(s) streams" in r.output, r.output
    assert len(r.output.strip().splitlines()) == 1


def test_the_deploy_section_compares_backends_precisions_and_compile(tmp_path, monkeypatch):
    """Issue 23: the encoder forward four ways, predict with each backend and precision (their masks compared
    with torch fp32's), and the decoder step in bf16 against fp32 at the bench's and the recipe's decoder (its
    batch and crop made small here: the recipe's take seconds a step on a CPU)."""
    pytest.importorskip("onnxruntime")
    from fusion_seg.reports.bench import deploy

    monkeypatch.setattr(deploy, "RECIPE_BATCH", 2)
    monkeypatch.setattr(deploy, "RECIPE_CROP", (64, 96))
    cfg = BenchConfig(encoder=ENCODER, camvid=None, size=(64, 96), views=4, repeats=1, warmup=1, batch_size=2,
                      loader_workers=0, workdir=str(tmp_path), forward_sizes=((64, 96),))
    r = run_bench(cfg, sections=("deploy",), echo=lambda m: None)
    d = r["sections"]["deploy"]
    assert set(d["encoder_forward_s"]) == {"torch fp32", "torch bf16", "torch.compile fp32", "onnxruntime fp32",
                                           "torch.compile first call"}
    assert all(v > 0 for v in d["encoder_forward_s"].values())
    predict = d["predict"]
    assert set(predict) == {"torch fp32", "torch bf16", "onnxruntime fp32"}
    assert predict["torch fp32"]["same_class"] == 1.0 and predict["onnxruntime fp32"]["same_class"] >= 0.999
    assert all(row["images_per_s"] > 0 for row in predict.values())
    for row in d["step"].values():
        assert row["bf16_s"] > 0 and row["fp32_s"] > 0 and row["bf16_over_fp32"] > 0
    assert "recipe" in d["step"] and "w18" in d["step"]["recipe"]["what"]
    md = render_markdown(r)
    assert "7. Deploying" in md and "| onnxruntime fp32 |" in md and "bf16 / fp32 (paired)" in md
