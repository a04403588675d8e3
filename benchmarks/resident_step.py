"""The resident step against the in-memory step at a recipe's own configuration, per resident format (issue 21).

`fusion-seg bench` pairs the resident tiers against the in-memory step with its light default decoder (the
`small` reverse HRNet, 4 streams, batch 2, whole 480x360 views): there, cutting and decoding a batch (2-4 ms a
view of CPU) is 5-10% of an 80 ms step, and the paired ratio moves by about 0.1 between runs. This script asks
the question a user of the recipe asks: with the decoder, batch and crop that `pipelines/camvid.toml` trains
(the reverse HRNet `w18`, 5 streams, batch 8, 160x224 crops drawn per epoch from the study store of
benchmarks/resident_formats.py), what does each resident format cost against the same step on one batch
already in memory?

For each format, in one process: the store's views (one a training image, `--views-per-image`; the step does
not depend on how many are held) are loaded into the device tier (on a CPU: RAM) in that format; then the
resident step (the next batch cut and decoded from memory at a seeded crop, then one optimisation step) and
the in-memory step (one fixed batch, decoded once) are timed in turn, A B A B
(`fusion_seg.reports.bench.training.paired_ratio`: median over `--repeats` pairs of the ratio of `--calls`
steps each). The step is `fusion_seg.reports.bench.common.decoder_step`, the bench's. Time it on an idle
machine.

    python benchmarks/resident_step.py --json benchmarks/resident_step.json
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from fusion_seg.cache import formats
from fusion_seg.cache.resident import ResidentViews
from fusion_seg.cache.store import FeatureStore
from fusion_seg.decoders import build_decoder
from fusion_seg.reports.bench.common import decoder_step
from fusion_seg.reports.bench.training import endless_positions, paired_ratio


def measure(store: str, fmt: str, args) -> dict:
    spec = FeatureStore.open(store).spec
    torch.manual_seed(0)
    decoder = build_decoder("reverse-hrnet", spec.input_shapes(), len(spec.classes), preset=args.preset,
                            streams=args.streams)
    device = torch.device("cpu")
    views = ResidentViews(store, decoder.in_features, device, "device", crop=args.crop, seed=0,
                          max_views_per_image=args.views_per_image, progress=False, fmt=fmt)
    step = decoder_step(decoder, device)
    order, epoch = endless_positions(len(views), args.batch_size, 0), {"n": 0}
    cut = {"cpu_s": 0.0, "views": 0}

    def resident():
        c0 = time.process_time()
        features, labels = views.batch(next(order), epoch["n"] // 8)  # a new epoch's crops every 8 steps
        cut["cpu_s"] += time.process_time() - c0
        cut["views"] += args.batch_size
        epoch["n"] += 1
        step(features, labels)

    fixed = views.batch(list(range(args.batch_size)))
    paired = paired_ratio(resident, lambda: step(*fixed), args.repeats, 1, calls=args.calls)
    return {"format": fmt, "paired_vs_memory": paired["ratio"], "resident_step_s": paired["a_s"],
            "memory_step_s": paired["b_s"], "cut_cpu_ms_per_view": 1e3 * cut["cpu_s"] / max(1, cut["views"]),
            "views": len(views), "resident_MiB": views.nbytes / 2**20, "load_s": views.load_seconds}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cache", default="cache/camvid-formats/train.zarr")
    ap.add_argument("--formats", default=",".join(formats.FORMATS))
    ap.add_argument("--preset", default="w18")
    ap.add_argument("--streams", type=int, default=5)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--crop", default="160x224", help="HxW, a multiple of 32")
    ap.add_argument("--views-per-image", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--calls", type=int, default=4)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    if not Path(args.cache, "zarr.json").is_file():
        raise SystemExit(f"--cache {args.cache}: no feature store there; run benchmarks/resident_formats.py first "
                         "(it extracts the study store), or pass another store.")
    args.crop = tuple(int(x) for x in args.crop.split("x"))
    rows = []
    for fmt in args.formats.split(","):
        row = measure(args.cache, fmt, args)
        rows.append(row)
        print(f"{fmt}: resident {row['resident_step_s']:.3f} s, in memory {row['memory_step_s']:.3f} s, "
              f"paired {row['paired_vs_memory']:.3f}x, cutting {row['cut_cpu_ms_per_view']:.2f} ms a view", flush=True)
    result = {"date": time.strftime("%Y-%m-%d %H:%M"), "torch_threads": torch.get_num_threads(),
              "config": {k: v for k, v in vars(args).items() if k != "json"}, "rows": rows}
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    print("| format | paired (A B A B) | resident step | in-memory step | cutting CPU a view | views held |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['format']} | {r['paired_vs_memory']:.3f}x | {r['resident_step_s']:.3f} s | "
              f"{r['memory_step_s']:.3f} s | {r['cut_cpu_ms_per_view']:.2f} ms | {r['views']} |")


if __name__ == "__main__":
    sys.exit(main())
