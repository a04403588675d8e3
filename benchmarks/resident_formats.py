"""What each resident format costs in CamVid val mIoU (issue 21): the recipe's configuration trained with its
training views held as float16, uint8, float8 and int4 (`train-decoder --resident-dtype`), the same seed and
schedule, and float16, int4 and uint8 with a second seed, so that a format's difference can be read against the
spread between seeds. The rows float16-bf16-s0 and float16-fp32-s0 are float16-s0 with the decoder step in
bf16 autocast and in fp32 (`--precision`, issue 23), run one at a time with the same torch threads, so that
they differ in the precision alone.

The configuration is pipelines/camvid.toml's (the half-resolution recipe): images resized to 240x180, 4 views a
training image at a 160x224 crop, strides 2-32, a seeded random-init ResNet-50 (`--random-init --seed 0`, which
is `zero_init_last=False`: no pretrained weights exist on the development machine), the reverse HRNet `w18`
with 5 streams, 12 epochs at batch 8, lr 0.01, inverse-log class weights. Each row is scored on the val store
(held as stored, float16: what the encoder gives at inference), at its best epoch.

Rows run through the `fusion-seg` command line under `/usr/bin/time -v`, one process a row; each finished row
goes to OUT/results/ROW.json and is skipped when the script runs again (two copies with disjoint --rows can
share the machine's cores: their times then are not a quiet machine's; the step time against the in-memory
step is `fusion-seg bench`'s, measured paired). Then the table is printed as markdown.

    python benchmarks/resident_formats.py --root ../shared/data/camvid
    python benchmarks/resident_formats.py --rows float16-s0,int4-s0
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from camvid_ablation import load_results, run

ROWS = {"float16-s0": ("float16", 0), "uint8-s0": ("uint8", 0), "float8-s0": ("float8", 0),
        "int4-s0": ("int4", 0), "float16-s1": ("float16", 1), "int4-s1": ("int4", 1), "uint8-s1": ("uint8", 1),
        "float16-bf16-s0": ("float16", 0), "float16-fp32-s0": ("float16", 0)}
# Rows that train with other settings than their format's (issue 23: the decoder step in bf16 autocast on the CPU).
EXTRA = {"float16-bf16-s0": ["--precision", "bf16"], "float16-fp32-s0": ["--precision", "fp32"]}
RECIPE = ["--decoder", "reverse-hrnet", "--preset", "w18", "--streams", "5", "--class-weights", "inverse-log"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", default="../shared/data/camvid")
    ap.add_argument("--cache", default="cache/camvid-formats")
    ap.add_argument("--out", default="runs/camvid-formats")
    ap.add_argument("--epochs", type=int, default=12)
    ap.add_argument("--rows", default="", help=f"Comma-separated rows (default: all): {', '.join(ROWS)}.")
    args = ap.parse_args()
    rows = [r for r in args.rows.split(",") if r] or list(ROWS)
    unknown = [r for r in rows if r not in ROWS]
    if unknown:
        raise SystemExit(f"--rows: unknown row {unknown[0]!r}; known: {', '.join(ROWS)}")
    cache, out = Path(args.cache), Path(args.out)
    (out / "results").mkdir(parents=True, exist_ok=True)
    encoder = ["--encoder", "resnet50", "--random-init", "--seed", "0", "--strides", "2,4,8,16,32",
               "--batch-size", "4"]
    train, val = cache / "train.zarr", cache / "val.zarr"
    once(out, "extract-val", ["extract", "--dataset", "camvid", "--root", args.root, "--split", "val", "--views", "1",
                              "--no-augment", "--size", "180x240", *encoder, "--out", str(val)])
    once(out, "extract-train", ["extract", "--dataset", "camvid", "--root", args.root, "--split", "train", "--views",
                                "4", "--crop", "160x224", "--scale-range", "0.5", "2.0", "--size", "180x240",
                                *encoder, "--out", str(train)])
    for row in rows:
        fmt, seed = ROWS[row]
        once(out, row, ["train-decoder", "--cache", str(train), "--val-cache", str(val), *RECIPE, "--epochs",
                        str(args.epochs), "--batch-size", "8", "--lr", "0.01", "--seed", str(seed), "--device", "cpu",
                        "--cache-mode", "device", "--resident-dtype", fmt, "--log-every", "50",
                        *EXTRA.get(row, []), "--out", str(out / row)], out / row)
    print(table(load_results(out)))


def once(out: Path, key: str, argv: list[str], run_dir: Path | None = None) -> dict:
    """Run a row unless a finished one is recorded; its figures, with the cache tier's from the run's summary."""
    path = out / "results" / f"{key}.json"
    if path.is_file():
        return json.loads(path.read_text())
    result = run(argv, run_dir)
    if run_dir is not None:
        summary = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()
                   if '"summary"' in line][-1]
        result["cache"] = summary.get("cache")
    path.write_text(json.dumps(result, indent=2))
    print(f"{key}: val mIoU {result.get('miou', float('nan')):.4f}", flush=True)
    return result


def table(results: dict) -> str:
    """Rows in ROWS order: format, seed, val mIoU and its change from float16 (seed 0) in points, resident bytes a
    view and the load time, training time and peak memory, and per-class IoU."""
    done = [r for r in ROWS if r in results and "miou" in results[r]]
    if not done:
        return "(no finished rows)"
    base = results.get("float16-s0", {}).get("miou")
    classes = list(results[done[0]]["per_class_iou"])
    head = ["row", "format", "seed", "val mIoU", "vs float16 s0 (points)", "bytes a view", "resident", "load",
            "train time", "peak MiB", *[c[:5] for c in classes]]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    views = 367 * 4
    for k in done:
        r, (fmt, seed) = results[k], ROWS[k]
        cache = r.get("cache") or {}
        delta = f"{100 * (r['miou'] - base):+.2f}" if base is not None else "-"
        cells = [k, fmt, str(seed), f"{r['miou']:.4f}", delta,
                 f"{cache.get('resident_bytes', 0) / views / 2**10:.0f} KiB",
                 f"{cache.get('resident_bytes', 0) / 2**30:.2f} GiB", f"{cache.get('load_seconds', 0):.0f} s",
                 f"{r['train_seconds'] / 60:.1f} min", f"{r['max_rss_MiB']:.0f}",
                 *[f"{r['per_class_iou'][c]:.3f}" for c in classes]]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
