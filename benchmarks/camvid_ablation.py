"""The paper's ablation on CamVid val, each row trained on a long poly schedule: reverse HRNet
`small` and `w18` with 4 and 5 streams, `linear` and `fpn` as references, the end-to-end HRNet
baseline at equal steps and at equal wall-clock time, and the best rows with class weights.

Everything runs through the `fusion-seg` command line, one process per row, under
`/usr/bin/time -v` (peak memory is the process's max RSS). Images are resized to 240x180 (half
of CamVid's 480x360) and K = 4 views per image are cached at a 160x224 crop, so that the whole
table fits in a few hours of a 2-core CPU; the encoder is a seeded random-init ResNet-50
(`--random-init --seed 0`, which is `zero_init_last=False`): no pretrained weights exist on the
development machine, so absolute numbers are not the paper's; rows on the same features compare.

Each finished row's figures go to OUT/results/ROW.json and the row is skipped when the script is
re-run (two copies with disjoint --rows can share the machine's cores); a row interrupted
half-way resumes from its last.pt. Then the table of every finished row is printed as markdown.

    python benchmarks/camvid_ablation.py --root ../shared/data/camvid            # everything
    python benchmarks/camvid_ablation.py --rows small-4,linear --epochs 10       # a subset

Cross-sequence (issue 24, docs/datasets.md): `--held-out 0006R0` trains every row on the train split's other
drives and validates it on that drive (a store of its frames, whole images), and also scores each row on the
official val (`fusion-seg evaluate`, the "evaluate" figures): give it its own --cache and --out.

    python benchmarks/camvid_ablation.py --held-out 0006R0 --cache cache/camvid-xseq --out runs/camvid-xseq \
        --rows w18-5
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

ENCODER = ["--encoder", "resnet50", "--random-init", "--seed", "0"]
CACHED = {  # row -> train-decoder options (from the cache)
    "small-4": ["--decoder", "reverse-hrnet", "--preset", "small", "--streams", "4"],
    "small-5": ["--decoder", "reverse-hrnet", "--preset", "small", "--streams", "5"],
    "w18-4": ["--decoder", "reverse-hrnet", "--preset", "w18", "--streams", "4"],
    "w18-5": ["--decoder", "reverse-hrnet", "--preset", "w18", "--streams", "5"],
    "linear": ["--decoder", "linear"],
    "fpn": ["--decoder", "fpn"],
}
WEIGHTED = ("median-freq", "inverse-log")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", default="../shared/data/camvid")
    ap.add_argument("--cache", default="cache/camvid-ablation")
    ap.add_argument("--out", default="runs/camvid-ablation")
    ap.add_argument("--size", default="180x240", help="HxW every image is resized to first.")
    ap.add_argument("--crop", default="160x224", help="HxW crop of each cached training view.")
    ap.add_argument("--views", type=int, default=4, help="Cached views per training image.")
    ap.add_argument("--epochs", type=int, default=30, help="Epochs over the K*367 cached views (poly schedule).")
    ap.add_argument("--patience", type=int, default=None,
                    help="Stop a cached row once its val mIoU has not improved for N epochs (train-decoder "
                         "--patience): with --held-out, early stopping by the held-out drive.")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--lr", type=float, default=0.01)
    ap.add_argument("--rows", default="", help="Comma-separated rows to run (default: all). Known: "
                    + ", ".join([*CACHED, "hrnet-steps", "hrnet-time", "<row>+median-freq", "<row>+inverse-log"]))
    ap.add_argument("--weighted-rows", default="", help="Rows also run with class weights: cached rows or "
                    "the end-to-end hrnet-steps (default: the two cached rows with the best val mIoU).")
    ap.add_argument("--hrnet-epochs", type=int, default=None,
                    help="Online epochs of the end-to-end HRNet row (default: views x epochs, the same samples as "
                         "a cached row: the equal-steps row; other values give the row hrnet-<N>ep).")
    ap.add_argument("--evaluate-rows", default="", help="Rows also scored by `fusion-seg evaluate` on the val "
                    "images, to compare with the end-to-end HRNet rows (which have no val store).")
    ap.add_argument("--figure", default=None, help="Also draw the val mIoU curves into this PNG.")
    ap.add_argument("--photometric", action="store_true",
                    help="Extract the training views with photometric augmentation (mmseg's defaults): give it its "
                         "own --cache and --out.")
    ap.add_argument("--held-out", default=None, metavar="DRIVE",
                    help="Validate on this drive of the train split (e.g. 0006R0), trained on the others; every row "
                         "is also scored on the official val.")
    args = ap.parse_args()
    steps_epochs = args.views * args.epochs  # one online epoch = one view of each image: the same samples
    hrnet_epochs = args.hrnet_epochs or steps_epochs
    hrnet_row = "hrnet-steps" if hrnet_epochs == steps_epochs else f"hrnet-{hrnet_epochs}ep"
    weighted = [r for r in args.weighted_rows.split(",") if r]
    unknown = [r for r in weighted if r not in CACHED and r != hrnet_row]
    if unknown:
        raise SystemExit(f"--weighted-rows: unknown row {unknown[0]!r}; give cached rows ({', '.join(CACHED)}) "
                         f"or the end-to-end row of this run ({hrnet_row})")
    cache, out = Path(args.cache), Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results").mkdir(parents=True, exist_ok=True)
    results = load_results(out)

    def scored(row):
        """The row's best.pt scored end to end on the val images (480x360 labels), added to its figures."""
        if row in results and "evaluate" not in results[row]:
            ev = out / row / "eval-val"
            run(["evaluate", "--checkpoint", str(out / row / "best.pt"), "--dataset", "camvid", "--root", args.root,
                 "--split", "val", "--device", "cpu", "--out", str(ev)], None)
            metrics = json.loads((ev / "metrics.json").read_text())
            results[row]["evaluate"] = {k: metrics[k] for k in ("miou", "pixel_acc", "per_class_iou")}
            if not results[row].get("curve"):  # trained without validation: the row is its evaluate score
                results[row].update(results[row]["evaluate"], scored_by="evaluate")
            save(row)

    def save(key):
        path = out / "results" / f"{key}.json"
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(json.dumps(results[key], indent=2))
        os.replace(tmp, path)

    def once(key, argv, run_dir=None):
        results.update(load_results(out))  # rows another copy of this script finished meanwhile
        if key not in results:
            results[key] = run(argv, run_dir)
            save(key)
            print(f"{key}: {summary(results[key])}", flush=True)
        return results[key]

    wanted = set(filter(None, args.rows.split(",")))
    want = (lambda row: not wanted or row in wanted)
    common = [*ENCODER, "--strides", "2,4,8,16,32", "--batch-size", "4"]
    val, train = cache / "val.zarr", cache / "train.zarr"
    val_split, val_subset, train_subset = "val", [], []
    if args.held_out:
        from fusion_seg.data.datasets import build_dataset
        from fusion_seg.data.datasets.base import sequence_of

        drives = sorted({sequence_of(i) for i in build_dataset("camvid", root=args.root, split="train").ids})
        if args.held_out not in drives:
            raise SystemExit(f"--held-out {args.held_out}: not a drive of the train split ({', '.join(drives)})")
        val_split, val_subset = "train", ["--dataset-opt", f"sequences={args.held_out}"]
        train_subset = ["--dataset-opt", "sequences=" + ",".join(d for d in drives if d != args.held_out)]
    once("extract-val", ["extract", "--dataset", "camvid", "--root", args.root, "--split", val_split, *val_subset,
                         "--views", "1", "--no-augment", "--size", args.size, *common, "--out", str(val)])
    once("extract-train", ["extract", "--dataset", "camvid", "--root", args.root, "--split", "train", *train_subset,
                           "--views", str(args.views), "--crop", args.crop, "--scale-range", "0.5", "2.0", "--size",
                           args.size, *(["--photometric"] if args.photometric else []), *common, "--out", str(train)])
    schedule = ["--epochs", str(args.epochs), "--batch-size", str(args.batch_size), "--lr", str(args.lr),
                "--device", "cpu", "--log-every", "50", *(["--patience", str(args.patience)] if args.patience else [])]

    def cached(row):  # a cached row's training command, without --out
        return ["train-decoder", "--cache", str(train), "--val-cache", str(val), *CACHED[row], *schedule]

    for row in CACHED:
        if want(row):
            once(row, [*cached(row), "--out", str(out / row)], out / row)
    online = ["train-decoder", "--online", "--decoder", "hrnet", "--dataset", "camvid", "--root", args.root,
              "--split", "train", "--size", args.size, "--crop", args.crop, "--scale-range", "0.5", "2.0",
              "--batch-size", str(args.batch_size), "--lr", str(args.lr), "--device", "cpu", "--log-every", "50"]
    # The end-to-end HRNet has its own stem (no frozen encoder), so no feature store validates it: it trains
    # without --val-cache and its row is scored by `fusion-seg evaluate` on the val images afterwards (the
    # "scored by" column), which is also run on the cached rows it is compared with (--evaluate-rows).
    end_to_end = [*online, "--epochs", str(hrnet_epochs)]
    if want(hrnet_row) or (args.hrnet_epochs and want("hrnet-steps")):
        once(hrnet_row, [*end_to_end, "--out", str(out / hrnet_row)], out / hrnet_row)
        scored(hrnet_row)
    if want("hrnet-time") and "w18-4" in results:
        # Equal wall-clock (see equal_time_epochs).
        if "hrnet-steps" not in results:
            once("hrnet-probe", [*online, "--epochs", "1", "--out", str(out / "hrnet-probe")], out / "hrnet-probe")
        epochs = equal_time_epochs(results)
        once("hrnet-time", [*online, "--epochs", str(epochs), "--out", str(out / "hrnet-time")], out / "hrnet-time")
        scored("hrnet-time")
    # The best rows again with class weights (--weighted-rows; by default the two best cached rows). The
    # end-to-end row takes them too (its weights counted from the training images), scored like its plain row.
    for row in weighted or best_rows(results, 2):
        for method in WEIGHTED:
            key = f"{row}+{method}"
            if want(key):
                base = cached(row) if row in CACHED else end_to_end
                once(key, [*base, "--class-weights", method, "--out", str(out / key)], out / key)
                if row not in CACHED:
                    scored(key)
    for row in filter(None, args.evaluate_rows.split(",")) if not args.held_out else list(results):
        if row in results and not row.startswith(("extract-", "hrnet-probe")):
            scored(row)  # with --held-out every row: its official-val score beside the held-out one
    final = load_results(out)
    print(table(final))
    if args.figure:
        print(f"curves: {plot_curves(final, Path(args.figure))}")


def equal_time_epochs(results: dict) -> int:
    """Online HRNet epochs that fit in the w18-4 row's budget: its training time plus the training store's
    extraction (counted once: the cached row needs it, the online row does not). An online epoch is timed by
    the equal-steps row when it ran, else by the one-epoch probe."""
    timed = results.get("hrnet-steps") or results["hrnet-probe"]
    per_epoch = timed["train_seconds"] / timed["epochs"]
    budget = results["w18-4"]["train_seconds"] + results["extract-train"]["wall_seconds"]
    return max(1, int(budget // per_epoch))


def plot_curves(results: dict, path: Path) -> Path:
    """Val mIoU by epoch, one line per row (the ablation's curves)."""
    from fusion_seg.plots import new_figure, save_figure

    fig = new_figure(8, 4.5, "the ablation's curves")
    ax = fig.add_subplot(1, 1, 1)
    for key, r in results.items():
        if "curve" in r and len(r["curve"]) > 1:
            epochs, miou = zip(*[(e, m) for e, m, _ in r["curve"]])
            ax.plot(epochs, miou, marker="o", markersize=3, label=key, linestyle="--" if "+" in key else "-")
    ax.set_xlabel("epoch (online rows: one epoch = one view of each image)")
    ax.set_ylabel("val mIoU")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, ncol=2)
    fig.tight_layout()
    return save_figure(fig, path)


def load_results(out: Path) -> dict:
    return {p.stem: json.loads(p.read_text()) for p in sorted((out / "results").glob("*.json"))}


def run(argv: list[str], run_dir: Path | None) -> dict:
    """Run ``fusion-seg ARGV`` under /usr/bin/time -v; wall time, max RSS and (training) the curves."""
    cmd = ["/usr/bin/time", "-v", sys.executable, "-m", "fusion_seg", *argv]
    if run_dir is not None and (run_dir / "last.pt").exists():
        cmd.append("--resume")
    print("$ fusion-seg " + shlex.join(argv), flush=True)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, stderr=subprocess.PIPE, text=True)
    seconds = time.perf_counter() - t0
    if proc.returncode:
        sys.stderr.write(proc.stderr[-3000:])
        raise SystemExit(f"fusion-seg {argv[0]} failed (exit {proc.returncode})")
    rss = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", proc.stderr).group(1))
    result = {"command": "fusion-seg " + shlex.join(argv), "wall_seconds": round(seconds, 1),
              "max_rss_MiB": round(rss / 1024, 1)}
    if run_dir is not None:
        result.update(read_run(run_dir))
    return result


def read_run(run_dir: Path) -> dict:
    """Val curve, best epoch and its metrics, and the training time, from the run's metrics.jsonl."""
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    epochs = [r for r in records if r.get("type") == "epoch" and r.get("val")]
    summaries = [r for r in records if r.get("type") == "summary"]
    seconds = round(sum(s["seconds"] for s in summaries), 1)
    if not epochs:  # trained without validation: scored afterwards (see scored())
        last = max(r["epoch"] for r in records if r.get("type") == "epoch")
        return {"curve": [], "best_epoch": last, "epochs": last, "train_seconds": seconds}
    best = max(epochs, key=lambda r: r["val"]["miou"])
    return {"curve": [[r["epoch"], round(r["val"]["miou"], 4), round(r["val"]["pixel_acc"], 4)] for r in epochs],
            "best_epoch": best["epoch"], "miou": best["val"]["miou"], "pixel_acc": best["val"]["pixel_acc"],
            "per_class_iou": best["val"]["per_class_iou"], "epochs": len(epochs), "train_seconds": seconds}


def best_rows(results: dict, n: int) -> list[str]:
    done = [r for r in CACHED if r in results]
    return sorted(done, key=lambda r: -results[r]["miou"])[:n]


def summary(r: dict) -> str:
    if "miou" in r:
        return (f"val mIoU {r['miou']:.4f} at epoch {r['best_epoch']}/{len(r['curve'])}, "
                f"{r['train_seconds']:.0f} s, {r['max_rss_MiB']:.0f} MiB")
    return f"{r['wall_seconds']:.0f} s, {r['max_rss_MiB']:.0f} MiB"


def table(results: dict) -> str:
    order = [*CACHED, *[f"{r}+{m}" for r in CACHED for m in WEIGHTED], "hrnet-steps", "hrnet-time", "hrnet-probe"]
    order += sorted(k for k in results if k.startswith("hrnet-") and k not in order)
    rows = sorted((k for k in results if "miou" in results[k]),
                  key=lambda k: order.index(k) if k in order else len(order))
    if not rows:
        return "(no finished rows)"
    classes = list(results[rows[0]]["per_class_iou"])
    head = ["row", "scored by", "val mIoU", "pixel acc", *[c[:5] for c in classes], "epochs to best", "train time",
            "+ extraction", "peak MiB", "evaluate mIoU"]
    extraction = results.get("extract-train", {}).get("wall_seconds", 0.0)
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for k in rows:
        r = results[k]
        scored_by = "evaluate" if r.get("scored_by") == "evaluate" else "val store"
        end_to_end = f"{r['evaluate']['miou']:.4f}" if "evaluate" in r else "-"
        cells = [k, scored_by, f"{r['miou']:.4f}", f"{r['pixel_acc']:.4f}",
                 *[f"{r['per_class_iou'][c]:.3f}" for c in classes], f"{r['best_epoch']}/{r.get('epochs', len(r['curve']))}",
                 f"{r['train_seconds'] / 60:.1f} min",
                 f"{(r['train_seconds'] + (extraction if scored_by == 'val store' else 0)) / 60:.1f} min",
                 f"{r['max_rss_MiB']:.0f}", end_to_end]
        lines.append("| " + " | ".join(cells) + " |")
    ext = [results[k] for k in ("extract-train", "extract-val") if k in results]
    if ext:
        lines.append("")
        lines.append("Extraction (counted once, shared by every cached row): "
                     + ", ".join(f"{e['wall_seconds'] / 60:.1f} min" for e in ext) + " (train, val).")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
