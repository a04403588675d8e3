"""Section 1: ``extract`` throughput against the bare encoder forward on tensors already in memory."""
from __future__ import annotations

import shutil
import statistics
from pathlib import Path

import torch

from fusion_seg.cache import codecs
from fusion_seg.reports.bench.common import BenchConfig, build_frozen_encoder, data_label, dataset_args, images, synchronizer
from fusion_seg.reports.timing import median_seconds


def bare_forward_views_per_second(cfg: BenchConfig, encoder, size, batch: int, device) -> float:
    """The encoder alone, on a batch already on the device: the limit extraction can approach.

    On CUDA the batch and the encoder's weights are channels_last and the forward runs in bf16 autocast (the
    encoder's precision, as extract's: :func:`~fusion_seg.reports.bench.common.build_frozen_encoder`).
    """
    from fusion_seg.device import memory_format, to_device

    x, _ = images(cfg, size, batch, encoder)
    x = to_device(x, device)
    encoder = encoder.to(device, memory_format=memory_format(device))

    def forward():
        encoder(x)

    return batch / median_seconds(forward, cfg.repeats, cfg.warmup, synchronizer(device))


def extract_views_per_second(cfg: BenchConfig, size, views: int, workdir: Path, batch: int,
                             keep: Path | None = None, **options) -> dict:
    """``fusion-seg extract`` of ``views`` whole images at ``size`` into a fresh store, ``cfg.repeats`` times (at most 3)."""
    from fusion_seg.extract.local import extract
    from fusion_seg.requests import extract_arguments

    rates, result = [], None
    for r in range(min(3, cfg.repeats)):
        out = workdir / f"extract-{size[0]}x{size[1]}-{r}.zarr"
        # As the command line's options (extract_arguments builds the requests from them).
        result = extract(**extract_arguments({
            **dataset_args(cfg, size, views), "out": out, "views": 1, "augment": False, "encoder": cfg.encoder,
            "weights": cfg.weights, "random_init": cfg.weights is None, "seed": cfg.seed, "batch_size": batch,
            "device": cfg.device, **options}), progress=False)
        rates.append(result.views_per_second)
        if keep is not None and r == 0:
            if keep.exists():
                shutil.rmtree(keep)
            shutil.move(str(out), keep)
        else:
            shutil.rmtree(out, ignore_errors=True)
    return {"views_per_second": statistics.median(rates), "runs": rates, "views": result.views_total}


def forward_precision(device: torch.device) -> str:
    return "bf16 autocast, channels_last" if device.type == "cuda" else "fp32"


def run(cfg: BenchConfig, workdir: Path, keep_store: Path) -> dict:
    device = torch.device(cfg.device)
    encoder = build_frozen_encoder(cfg)
    batch = 4
    bare = bare_forward_views_per_second(cfg, encoder, cfg.size, batch, device)
    forward = []
    for size in cfg.forward_sizes:  # cfg.size's figure is the one just measured
        same = tuple(size) == tuple(cfg.size)
        rate = bare if same else bare_forward_views_per_second(cfg, encoder, size, batch, device)
        forward.append({"size": list(size), "views_per_s": rate, "ms_per_view": 1e3 / rate})
    ext = extract_views_per_second(cfg, cfg.size, cfg.views, workdir, batch, keep=keep_store)
    # The same without compression: what compressing costs when it shares the encoder's cores.
    raw = extract_views_per_second(cfg, cfg.size, cfg.views, workdir, batch, codec="none")
    return {"size": list(cfg.size), "batch": batch, "data": data_label(cfg), "bare_forward_views_per_s": bare,
            "extract_views_per_s": ext["views_per_second"], "extract_runs": ext["runs"], "views": ext["views"],
            "codec": codecs.codec_label(codecs.codec_spec(codecs.DEFAULT_CODEC)),
            "extract_uncompressed_views_per_s": raw["views_per_second"],
            "ratio": ext["views_per_second"] / bare, "ratio_uncompressed": raw["views_per_second"] / bare, "goal": 0.9,
            "forward_sizes": forward, "forward_precision": forward_precision(device), "forward_repeats": cfg.repeats}


def to_markdown(r: dict) -> str:
    lines = [
        f"Whole {r['data']} at {r['size'][1]}x{r['size'][0]}, batch {r['batch']}, {r['views']} views per extraction "
        f"(median of {len(r['extract_runs'])}); `extract` with its default codec ({r['codec']}) and without compression.",
        "",
        "| bare encoder forward (views/s) | `extract` (views/s) | ratio | goal | `extract --codec none` (views/s) | ratio |",
        "|---|---|---|---|---|---|",
        f"| {r['bare_forward_views_per_s']:.2f} | {r['extract_views_per_s']:.2f} | **{r['ratio']:.2f}** | >= {r['goal']} | "
        f"{r['extract_uncompressed_views_per_s']:.2f} | {r['ratio_uncompressed']:.2f} |",
    ]
    if r.get("forward_sizes"):
        lines += ["", f"The bare encoder forward by input size ({r['forward_precision']}, batch {r['batch']}, "
                      f"median of {r['forward_repeats']}):", "",
                  "| size (WxH) | views/s | ms/view |", "|---|---|---|"]
        lines += [f"| {f['size'][1]}x{f['size'][0]} | {f['views_per_s']:.2f} | {f['ms_per_view']:.1f} |"
                  for f in r["forward_sizes"]]
    return "\n".join(lines)
