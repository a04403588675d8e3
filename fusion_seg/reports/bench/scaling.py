"""Section 5: how extraction and training costs grow with resolution, and per epoch with the data.

At each size: the bare encoder forward and ``extract`` (a few whole images resized to that
size), then the step of the same decoder at batch 1 in the four modes of the training section.
The per-epoch table multiplies these measured per-view costs by dataset sizes (a projection,
labelled as one): it is linear in the data by construction, which is what one pass costs.
"""
from __future__ import annotations

from pathlib import Path

import torch

from fusion_seg.progress import format_duration
from fusion_seg.reports.bench.common import BenchConfig, build_frozen_encoder, data_label
from fusion_seg.reports.bench.extraction import bare_forward_views_per_second, extract_views_per_second
from fusion_seg.reports.bench.training import above_baseline, run_modes

DATASETS = {"CamVid train (367)": 367, "Cityscapes train (2975)": 2975, "Mapillary Vistas train (18000)": 18000}


def run(cfg: BenchConfig, workdir: Path) -> dict:
    device = torch.device(cfg.device)
    encoder = build_frozen_encoder(cfg)
    quick = BenchConfig(**{**cfg.to_json(), "repeats": max(1, min(cfg.repeats, 2)), "warmup": 1})
    rows = []
    for size in cfg.scaling_sizes:
        bare = bare_forward_views_per_second(quick, encoder, size, 1, device)
        store = workdir / f"scaling-{size[0]}x{size[1]}.zarr"
        ext = extract_views_per_second(BenchConfig(**{**quick.to_json(), "repeats": 1}), size, 3, workdir, 1,
                                       keep=store)
        modes = run_modes(quick, size, 1, str(store))
        rows.append({"size": list(size), "bare_forward_views_per_s": bare, "extract_views_per_s": ext["views_per_second"],
                     "steps": {m: modes[m]["step_s"] for m in modes},
                     "peak_MiB": {m: above_baseline(modes[m]) for m in modes}})
    return {"data": data_label(cfg), "batch": 1, "rows": rows}


def per_epoch(rows: list[dict], datasets=DATASETS) -> list[dict]:
    """Seconds per epoch (one view per image) from the measured per-view costs, per dataset size."""
    out = []
    for row in rows:
        for name, n in datasets.items():
            out.append({"size": row["size"], "dataset": name, "images": n,
                        "extract_once_s": n / row["extract_views_per_s"],
                        **{f"{m}_epoch_s": n * row["steps"][m] for m in ("cache", "online", "finetune")}})
    return out


def to_markdown(r: dict) -> str:
    lines = [
        f"{r['data']} resized to each size (3 views per extraction; the step at batch 1; 2 repetitions, median).",
        "",
        "| size (WxH) | bare forward (views/s) | extract (views/s) | step in memory (s) | (a) cache (s) | (b) online (s) | "
        "(c) fine-tune (s) | (b)/(a) | (c)/(a) | peak (a) / (b) / (c) MiB |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in r["rows"]:
        s, p = row["steps"], row["peak_MiB"]
        lines.append(f"| {row['size'][1]}x{row['size'][0]} | {row['bare_forward_views_per_s']:.2f} | "
                     f"{row['extract_views_per_s']:.2f} | {s['memory']:.3f} | {s['cache']:.3f} | {s['online']:.3f} | "
                     f"{s['finetune']:.3f} | {s['online'] / s['cache']:.2f}x | {s['finetune'] / s['cache']:.2f}x | "
                     f"{p['cache']:.0f} / {p['online']:.0f} / {p['finetune']:.0f} |")
    lines += ["", "Cost of one epoch as the dataset grows (projected: images x the measured per-view costs above):", "",
              "| size | dataset | extraction, once | epoch (a) cache | epoch (b) online | epoch (c) fine-tune |",
              "|---|---|---|---|---|---|"]
    for e in per_epoch(r["rows"]):
        times = [format_duration(e[k]) for k in ("extract_once_s", "cache_epoch_s", "online_epoch_s", "finetune_epoch_s")]
        lines.append(f"| {e['size'][1]}x{e['size'][0]} | {e['dataset']} | " + " | ".join(times) + " |")
    return "\n".join(lines)
