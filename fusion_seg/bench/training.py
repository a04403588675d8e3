"""Sections 3 and 4: the loader against the step, and one decoder trained three ways.

The same decoder, batch and input size in every mode:

- ``memory``: the decoder step on features already in memory (the limit for ``cache``);
- ``cache`` (a): features read from the store by the training DataLoader, as ``train-decoder`` does;
- ``online`` (b): the frozen encoder runs on the batch every step, as ``train-decoder --online``
  (images come from memory here, so (b) is not charged for decoding and augmenting them);
- ``finetune`` (c): the encoder is trained too (its BatchNorm kept in eval mode).

Each mode runs in a fresh process, so that its peak memory is its own; the import baseline
(interpreter + torch + fusion_seg) is reported separately.
"""
from __future__ import annotations

import itertools
import time
from pathlib import Path

import torch

from .common import (BenchConfig, DecoderStep, decoder_for_store, build_frozen_encoder, children_peak_rss_mib, images,
                     median_seconds, peak_memory, rss_mib, run_isolated, synchronizer)

MODES = ("memory", "cache", "online", "finetune")


def cache_loader(store: str, names, batch: int, workers: int, device, epoch_seed: int = 0):
    from ..cached_views import CachedViews, collate_views

    views = CachedViews(store, names)
    return torch.utils.data.DataLoader(
        views, batch_size=batch, shuffle=True, num_workers=workers, collate_fn=collate_views, drop_last=True,
        pin_memory=device.type == "cuda", persistent_workers=workers > 0,
        generator=torch.Generator().manual_seed(epoch_seed), prefetch_factor=4 if workers else None,
    )


def endless(loader):
    """Batches forever, epoch after epoch (the store may hold fewer views than the steps timed)."""
    for epoch in itertools.count():
        yield from loader


def measure_mode(cfg_json: dict, mode: str, size, batch: int, store: str) -> dict:
    """Median step time and peak memory of one mode; meant to run in its own process (``run_isolated``).

    ``memory`` and ``cache`` never build the encoder (train-decoder from a cache does not load it):
    their decoder is built from the store's feature shapes, as train-decoder builds it.
    """
    from ..cached_views import CachedViews, collate_views
    from ..device import autocast, to_device
    from ..errors import Failed

    import importlib

    for module in ("timm", "zarr", "fusion_seg.decoders", "fusion_seg.encoder"):  # part of the import baseline
        importlib.import_module(module)
    cfg = BenchConfig(**cfg_json)
    device = torch.device(cfg.device)
    torch.manual_seed(cfg.seed)
    baseline = rss_mib()  # interpreter + imports, before any model or data
    decoder, names = decoder_for_store(cfg, store)
    sync = synchronizer(device)

    if mode in ("memory", "cache"):
        step = DecoderStep(decoder, device)
        if mode == "memory":
            features, labels = collate_views([CachedViews(store, names)[j] for j in range(batch)])
            features = {k: to_device(v, device).float() for k, v in features.items()}
            labels = to_device(labels, device)

            def one():
                step(features, labels)
        else:
            batches = endless(cache_loader(store, names, batch, cfg.loader_workers, device))

            def one():
                features, labels = Failed.check(next(batches))
                step({k: to_device(v, device).float() for k, v in features.items()}, to_device(labels, device))
    else:
        encoder = build_frozen_encoder(cfg)
        x, y = images(cfg, size, batch, encoder)
        x, y = to_device(x, device), to_device(y, device)
        if mode == "online":
            step = DecoderStep(decoder, device)
            encoder = encoder.to(device)

            def one():
                with autocast(device):
                    feats = encoder(x)
                step({k: feats[k].float().clone() for k in names}, y)
        elif mode == "finetune":
            model = encoder.model.to(device)  # the timm features_only network, trained this time
            for p in model.parameters():
                p.requires_grad_(True)
            model.eval()  # BN in eval: running statistics frozen, as when fine-tuning at a small batch
            step = DecoderStep(decoder, device, extra_params=model.parameters())

            def one():
                with autocast(device):
                    feats = dict(zip(encoder.names, model(x)))
                step({k: feats[k] for k in names}, y)
        else:
            raise ValueError(mode)
    # The cheap modes run 8 steps per repetition: a loader that falls behind now and then shows in the mean.
    seconds = median_seconds(one, cfg.repeats, cfg.warmup, sync, calls_per_repeat=8 if mode in ("memory", "cache") else 1)
    peak = peak_memory(device)
    return {"mode": mode, "size": list(size), "batch": batch, "step_s": seconds, "baseline_rss_MiB": baseline,
            **peak, "loader_workers_peak_rss_MiB": children_peak_rss_mib() if mode == "cache" else None}


def loader_throughput(cfg: BenchConfig, store: str, names, batch: int, seconds_budget: float = 20.0) -> dict:
    """Views/s the training DataLoader delivers alone (read, decompress, collate), after its first batch."""
    device = torch.device(cfg.device)
    loader = cache_loader(store, names, batch, cfg.loader_workers, device)
    batches = endless(loader)
    next(batches)  # worker start-up is paid once per run, not per step
    count, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds_budget and count < 400:
        features, _ = next(batches)
        count += next(iter(features.values())).shape[0]
    return {"views_per_s": count / (time.perf_counter() - t0), "views": count}


def run_modes(cfg: BenchConfig, size, batch: int, store: str | None, modes=MODES) -> dict:
    return {m: run_isolated(measure_mode, cfg.to_json(), m, tuple(size), batch, store) for m in modes}


def run(cfg: BenchConfig, store: Path) -> dict:
    modes = run_modes(cfg, cfg.size, cfg.batch_size, str(store))
    _, names = decoder_for_store(cfg, str(store))
    loader = loader_throughput(cfg, str(store), names, cfg.batch_size)
    consumption = cfg.batch_size / modes["memory"]["step_s"]
    a = modes["cache"]
    return {
        "size": list(cfg.size), "batch": cfg.batch_size, "decoder": cfg.decoder, "decoder_config": cfg.decoder_config,
        "loader_workers": cfg.loader_workers, "repeats": cfg.repeats, "modes": modes,
        "loader": {"views_per_s": loader["views_per_s"], "consumed_views_per_s": consumption,
                   "ratio": loader["views_per_s"] / consumption, "goal": 2.0},
        "cache_vs_memory_step": a["step_s"] / modes["memory"]["step_s"], "cache_vs_memory_goal": 1.2,
        "ratios": {f"{m}/cache": {"time": modes[m]["step_s"] / a["step_s"],
                                  "memory": above_baseline(modes[m]) / above_baseline(a)}
                   for m in ("online", "finetune")},
    }


def above_baseline(m: dict) -> float:
    """A mode's peak memory: CUDA's max allocated, or the peak RSS above the import baseline on CPU."""
    if m["kind"] == "cuda_max_allocated":
        return m["peak_MiB"]
    return m["peak_MiB"] - m["baseline_rss_MiB"]


def whole_schedule(step_s: dict, extract_views_per_s: float, images: int, views: int, batch: int,
                   epochs=(1, 10, 50, 100, 200)) -> list[dict]:
    """Projected wall time of a whole schedule from the measured rates (an epoch = one pass over the images).

    cache: extract ``views`` views per image once, then each epoch reads one view per image;
    online and finetune: each epoch runs the encoder on every image.
    """
    steps = images // batch
    rows = []
    for e in epochs:
        cache = images * views / extract_views_per_s + e * steps * step_s["cache"]
        rows.append({"epochs": e, "cache_s": cache, "online_s": e * steps * step_s["online"],
                     "finetune_s": e * steps * step_s["finetune"]})
    return rows


def to_markdown(r: dict, schedule: list[dict] | None = None, schedule_note: str = "") -> str:
    m = r["modes"]
    mem_kind = "CUDA max allocated" if m["cache"]["kind"] == "cuda_max_allocated" else "peak RSS above the import baseline"
    lines = [
        f"Decoder {r['decoder']} {r['decoder_config']}, batch {r['batch']}, {r['size'][1]}x{r['size'][0]} input, "
        f"OHEM loss, SGD; {r['loader_workers']} loader workers. Step: median of {r['repeats']} repetitions (for the memory and "
        f"cache rows, each the mean of 8 consecutive steps). Memory: {mem_kind} (import baseline "
        f"{m['cache']['baseline_rss_MiB']:.0f} MiB RSS, reported apart).",
        "",
        "| run | step (s) | peak memory (MiB) | time vs (a) | memory vs (a) |",
        "|---|---|---|---|---|",
    ]
    names = {"memory": "features already in memory (the limit)", "cache": "(a) from the cache",
             "online": "(b) --online, frozen encoder every step", "finetune": "(c) full fine-tuning"}
    for key in ("memory", "cache", "online", "finetune"):
        row = m[key]
        ratio = r["ratios"].get(f"{key}/cache")
        lines.append(f"| {names[key]} | {row['step_s']:.3f} | {above_baseline(row):.0f} | "
                     + (f"**{ratio['time']:.2f}x** | **{ratio['memory']:.2f}x** |" if ratio else "| |"))
    lo = r["loader"]
    lines += [
        "",
        "| loader | figure | goal |",
        "|---|---|---|",
        f"| views/s delivered by the DataLoader alone | {lo['views_per_s']:.1f} | |",
        f"| views/s the step consumes (in memory) | {lo['consumed_views_per_s']:.1f} | |",
        f"| loader / consumption | **{lo['ratio']:.1f}x** | >= {lo['goal']}x |",
        f"| step from the cache / step in memory | **{r['cache_vs_memory_step']:.2f}x** | <= {r['cache_vs_memory_goal']}x |",
    ]
    if schedule:
        lines += ["", schedule_note, "",
                  "| epochs | (a) cache, extraction included | (b) online | (c) fine-tune | (b)/(a) | (c)/(a) |",
                  "|---|---|---|---|---|---|"]
        for s in schedule:
            lines.append(f"| {s['epochs']} | {hms(s['cache_s'])} | {hms(s['online_s'])} | {hms(s['finetune_s'])} | "
                         f"{s['online_s'] / s['cache_s']:.2f}x | {s['finetune_s'] / s['cache_s']:.2f}x |")
    return "\n".join(lines)


def hms(seconds: float) -> str:
    h, rem = divmod(int(round(seconds)), 3600)
    return f"{h}h{rem // 60:02d}m" if h else f"{rem // 60}m{rem % 60:02d}s"
