"""Sections 3 and 4: the loader against the step, and one decoder trained three ways.

The same decoder, batch and input size in every mode:

- ``memory``: the decoder step on one batch of features already on the device (the limit for the cache);
- ``device`` and ``ram``: the resident cache tiers of ``train-decoder --cache-mode`` (resident.py): the
  store decoded once into device memory or (pinned) host RAM, a batch cut from it every step;
- ``cache`` (a): the ``stream`` tier: features read from the store by the training DataLoader;
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

from fusion_seg.progress import format_duration
from fusion_seg.reports.bench.common import (BenchConfig, decoder_step, child_pids, decoder_for_store, build_frozen_encoder,
                     children_peak_rss_mib, images,
                     peak_memory, reset_peak_memory, rss_mib, run_isolated, synchronizer)
from fusion_seg.reports.timing import median_seconds

MODES = ("memory", "cache", "online", "finetune")
TIERS = ("device", "ram")  # the resident cache tiers, measured in the training section
COMPACT = ("uint8", "float8", "int4")  # resident formats other than the store's own (cache/formats.py)


def compact_modes(device: str) -> tuple[str, ...]:
    """The compact resident tiers the bench measures, ``TIER-FORMAT``: the device tier in each compact format, and
    on CUDA the ram tier too (on a CPU the two tiers are one memory)."""
    tiers = TIERS if str(device).startswith("cuda") else ("device",)
    return tuple(f"{t}-{f}" for t in tiers for f in COMPACT)


def resident_mode(mode: str) -> tuple[str, str | None] | None:
    """``("device", None)`` for ``device`` (the store's format), ``("device", "int4")`` for ``device-int4``,
    None for a mode that is not a resident tier."""
    tier, _, fmt = mode.partition("-")
    return (tier, fmt or None) if tier in TIERS and (not fmt or fmt in COMPACT) else None


def cache_loader(store: str, names, batch: int, workers: int, device, epoch_seed: int = 0):
    from fusion_seg.cache.reader import CachedViews, collate_views

    views = CachedViews(store, names)
    # A store of fewer views than a batch (plan's 8-image sample at --batch-size 16) repeats them: the step is
    # what is timed, and a loader that drops its one short batch would give none, for ever.
    sampler = torch.utils.data.RandomSampler(views, num_samples=max(len(views), batch),
                                             generator=torch.Generator().manual_seed(epoch_seed))
    return torch.utils.data.DataLoader(
        views, batch_size=batch, sampler=sampler, num_workers=workers, collate_fn=collate_views, drop_last=True,
        pin_memory=device.type == "cuda", persistent_workers=workers > 0, prefetch_factor=4 if workers else None,
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
    from fusion_seg.cache.reader import CachedViews, collate_views
    from fusion_seg.device import autocast, memory_format, to_device
    from fusion_seg.errors import Failed

    import importlib

    for module in ("timm", "zarr", "fusion_seg.decoders", "fusion_seg.encoder.build"):  # part of the import baseline
        importlib.import_module(module)
    cfg = BenchConfig(**cfg_json)
    device = torch.device(cfg.device)
    torch.manual_seed(cfg.seed)
    baseline = rss_mib()  # interpreter + imports, before any model or data
    decoder, names = decoder_for_store(cfg, store)
    sync = synchronizer(device)

    resident = None
    if resident_mode(mode):
        from fusion_seg.cache.resident import ResidentViews

        tier, fmt = resident_mode(mode)
        resident = ResidentViews(store, names, device, tier, seed=cfg.seed, progress=False, fmt=fmt)
        step = decoder_step(decoder, device)
        order = endless_positions(len(resident), batch, cfg.seed)
        assembly = {"cpu_s": 0.0, "views": 0}

        def one():
            c0 = time.process_time()
            features, labels = resident.batch(next(order))
            assembly["cpu_s"] += time.process_time() - c0
            assembly["views"] += batch
            step(features, labels)
    elif mode in ("memory", "checkpointed", "cache"):
        if mode == "checkpointed":  # --checkpoint-activations: activations recomputed in backward
            decoder.set_activation_checkpointing(True)
        step = decoder_step(decoder, device)
        if mode in ("memory", "checkpointed"):
            views = CachedViews(store, names)  # repeated when fewer than a batch (see cache_loader)
            features, labels = collate_views([views[j % len(views)] for j in range(batch)])
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
            step = decoder_step(decoder, device)
            encoder = encoder.to(device, memory_format=memory_format(device))

            def one():
                feats = encoder(x)  # in its own precision, as train-decoder --online runs it
                step({k: feats[k].float().clone() for k in names}, y)
        elif mode == "finetune":
            model = encoder.model.to(device, memory_format=memory_format(device))  # timm features_only, trained
            for p in model.parameters():
                p.requires_grad_(True)
            model.eval()  # BN in eval: running statistics frozen, as when fine-tuning at a small batch
            step = decoder_step(decoder, device, extra_params=model.parameters())

            def one():
                with autocast(device):
                    feats = dict(zip(encoder.names, model(x)))
                step({k: feats[k] for k in names}, y)
        else:
            raise ValueError(mode)
    reset_peak_memory(device)  # the peak of the steps, over what is live: not the setup's transients
    # The cheap modes run 8 steps per repetition: a loader that falls behind now and then shows in the mean.
    cheap = mode in ("memory", "checkpointed", "cache") or resident_mode(mode) is not None
    paired = None
    if resident is not None:
        # Against the step on one batch already in memory, timed in turn with it in this process
        # (A B A B): the ratio holds when the machine's speed drifts between processes.
        fixed = resident.batch(list(range(min(batch, len(resident)))))
        paired = paired_ratio(one, lambda: step(*fixed), cfg.repeats, cfg.warmup, sync)
        seconds = paired["a_s"]
    else:
        seconds = median_seconds(one, cfg.repeats, cfg.warmup, sync, calls_per_repeat=8 if cheap else 1)
    peak = peak_memory(device)
    out = {"mode": mode, "size": list(size), "batch": batch, "step_s": seconds, "baseline_rss_MiB": baseline,
           **peak, "loader_workers_peak_rss_MiB": children_peak_rss_mib() if mode == "cache" else None}
    if resident is not None:
        # Where the resident bytes are counted: in CUDA's allocations (device tier on a GPU), else in the RSS.
        counted = device.type == "cpu" or mode.startswith("device")
        out.update(format=resident.fmt, resident_MiB=resident.nbytes / 2**20, load_s=resident.load_seconds,
                   load_GB_per_s=resident.nbytes / 1e9 / max(resident.load_seconds, 1e-9),
                   resident_views=len(resident), resident_counted_in_peak=counted,
                   loader_cpu_ms_per_view=1e3 * assembly["cpu_s"] / max(1, assembly["views"]),
                   paired_vs_memory=paired["ratio"], paired_memory_step_s=paired["b_s"])
    return out


def paired_ratio(a, b, repeats: int, warmup: int, sync=None, calls: int = 8) -> dict:
    """Median over ``repeats`` pairs of the ratio (mean time of ``calls`` calls of ``a``) / (the same of
    ``b``), timed in turn; with each one's median time."""
    import statistics

    def timed(fn) -> float:
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        if sync:
            sync()
        return (time.perf_counter() - t0) / calls

    for _ in range(warmup):
        a(), b()
    ta, tb = [], []
    for _ in range(repeats):
        ta.append(timed(a))
        tb.append(timed(b))
    return {"ratio": statistics.median(x / y for x, y in zip(ta, tb)), "a_s": statistics.median(ta),
            "b_s": statistics.median(tb)}


def endless_positions(n: int, batch: int, seed: int):
    """Batches of positions in ``range(n)``, reshuffled every pass, as the resident source draws them."""
    g = torch.Generator().manual_seed(seed)
    while True:
        perm = torch.randperm(n, generator=g).tolist()
        while len(perm) < batch:  # fewer views than a batch: they repeat (see cache_loader)
            perm += torch.randperm(n, generator=g).tolist()
        for i in range(0, len(perm) - batch + 1, batch):
            yield perm[i:i + batch]


def step_memory_MiB(m: dict) -> float:
    """A mode's own training-step memory: its peak above the import baseline, less any resident store in it."""
    resident = m.get("resident_MiB", 0.0) if m.get("resident_counted_in_peak") else 0.0
    return above_baseline(m) - resident


def _cpu_seconds(pids) -> float:
    """User + system CPU seconds so far of the processes ``pids`` (Linux /proc)."""
    import os

    total = 0.0
    for pid in pids:
        try:
            fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total



def loader_throughput(cfg: BenchConfig, store: str, names, batch: int, seconds_budget: float = 20.0) -> dict:
    """Views/s the training DataLoader delivers alone (read, decompress, collate), after its first batch,
    and the CPU time it spends per view (its worker processes', or this process's without workers)."""
    device = torch.device(cfg.device)
    loader = cache_loader(store, names, batch, cfg.loader_workers, device)
    batches = endless(loader)
    next(batches)  # worker start-up is paid once per run, not per step
    workers = child_pids() if cfg.loader_workers else []
    cpu0, own0 = _cpu_seconds(workers), time.process_time()
    count, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds_budget and count < 400:
        features, _ = next(batches)
        count += next(iter(features.values())).shape[0]
    seconds = time.perf_counter() - t0
    cpu = _cpu_seconds(workers) - cpu0 if workers else time.process_time() - own0
    # Workers read ahead (prefetch) while the count stops: their CPU covers a few more views than counted.
    return {"views_per_s": count / seconds, "views": count, "cpu_ms_per_view": 1e3 * cpu / max(1, count)}


def run_modes(cfg: BenchConfig, size, batch: int, store: str | None, modes=MODES) -> dict:
    return {m: run_isolated(measure_mode, cfg.to_json(), m, tuple(size), batch, store) for m in modes}


def run(cfg: BenchConfig, store: Path) -> dict:
    modes = run_modes(cfg, cfg.size, cfg.batch_size, str(store),
                      modes=("memory", "checkpointed", *TIERS, *compact_modes(cfg.device), "cache", "online",
                             "finetune"))
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
        "checkpointing": checkpointing_row(modes),
        "tiers": tier_rows(modes, loader), "resident_vs_memory_goal": RESIDENT_GOAL,
    }


RESIDENT_GOAL = 1.05  # the resident tiers' step against the step on features already in memory
CHECKPOINT_GOAL = 3.0  # full fine-tuning's step memory over the checkpointed decoder step's (issue 21)


def checkpointing_row(modes: dict) -> dict:
    """The decoder step on features in memory with and without --checkpoint-activations: the time it costs, the
    step's own memory it saves, and full fine-tuning's step memory over the checkpointed step's."""
    plain, cp, finetune = modes["memory"], modes["checkpointed"], modes["finetune"]
    return {"step_s": cp["step_s"], "plain_step_s": plain["step_s"], "time": cp["step_s"] / plain["step_s"],
            "step_MiB": above_baseline(cp), "plain_step_MiB": above_baseline(plain),
            "memory": above_baseline(cp) / above_baseline(plain),
            "finetune_over_checkpointed": above_baseline(finetune) / above_baseline(cp), "goal": CHECKPOINT_GOAL}


def tier_rows(modes: dict, loader: dict) -> list[dict]:
    """One row per cache tier: its step against the in-memory step, the loader's CPU per view, the
    one-off load, and memory with the resident store and the step's own share given apart."""
    memory = modes["memory"]["step_s"]
    rows = []
    tiers = [(t, t) for t in TIERS] + [(k, k) for k in modes if resident_mode(k) and "-" in k] + [("stream", "cache")]
    for tier, key in tiers:
        m = modes[key]
        rows.append({"tier": tier, "format": m.get("format"), "step_s": m["step_s"], "vs_memory": m["step_s"] / memory,
                     "paired_vs_memory": m.get("paired_vs_memory"),
                     "loader_cpu_ms_per_view": m.get("loader_cpu_ms_per_view", loader.get("cpu_ms_per_view")),
                     "load_s": m.get("load_s", 0.0), "load_GB_per_s": m.get("load_GB_per_s"),
                     "resident_MiB": m.get("resident_MiB", 0.0), "step_MiB": step_memory_MiB(m),
                     "peak_MiB": above_baseline(m), "kind": m["kind"]})
    return rows


def above_baseline(m: dict) -> float:
    """A mode's peak memory: CUDA's max allocated, or the peak RSS above the import baseline on CPU."""
    if m["kind"] == "cuda_max_allocated":
        return m["peak_MiB"]
    return m["peak_MiB"] - m["baseline_rss_MiB"]


def whole_schedule(step_s: dict, extract_views_per_s: float, images: int, views: int, batch: int,
                   epochs=(10, 100, 200), bare_views_per_s: float | None = None,
                   load_s_per_view: dict | None = None) -> list[dict]:
    """Projected wall time of a whole schedule from the measured rates (an epoch = one pass over the images).

    cache: extract ``views`` views per image once (K views), load them into memory once (the resident
    tiers), then each epoch reads one view per image; online and finetune: each epoch runs the encoder
    on every image. The cache's bound is ``K·B + E·D``: K passes of the bare encoder over the images
    (B) and E decoder epochs on features already in memory (D).
    """
    steps = images // batch
    extract = images * views / extract_views_per_s
    load = {t: images * views * s for t, s in (load_s_per_view or {}).items()}
    rows = []
    for e in epochs:
        row = {"epochs": e, "extract_s": extract, "cache_s": extract + e * steps * step_s["cache"],
               "online_s": e * steps * step_s["online"], "finetune_s": e * steps * step_s["finetune"]}
        if "memory" in step_s and bare_views_per_s:
            row["bound_s"] = images * views / bare_views_per_s + e * steps * step_s["memory"]
        for tier in ("device", "ram"):
            if tier in step_s:
                row[f"{tier}_s"] = extract + load.get(tier, 0.0) + e * steps * step_s[tier]
        tiers = [t for t in ("device", "ram") if f"{t}_s" in row]
        if tiers:
            best = min(tiers, key=lambda t: row[f"{t}_s"])
            row["resident_tier"], row["resident_s"] = best, row[f"{best}_s"]
            if "bound_s" in row:
                row["resident_vs_bound"] = row["resident_s"] / row["bound_s"]
        rows.append(row)
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
    names = {"memory": "features already in memory (the limit)",
             "checkpointed": "features in memory, --checkpoint-activations", "device": "(a) cache, --cache-mode device",
             "ram": "(a) cache, --cache-mode ram", "cache": "(a) cache, --cache-mode stream",
             "online": "(b) --online, frozen encoder every step", "finetune": "(c) full fine-tuning"}
    for key in ("memory", "checkpointed", "device", "ram", "cache", "online", "finetune"):
        if key not in m:
            continue
        row = m[key]
        ratio = r["ratios"].get(f"{key}/cache")
        lines.append(f"| {names[key]} | {row['step_s']:.3f} | {above_baseline(row):.0f} | "
                     + (f"**{ratio['time']:.2f}x** | **{ratio['memory']:.2f}x** |" if ratio else "| |"))
    cp = r.get("checkpointing")
    if cp:
        lines += ["", "Activation checkpointing (`--checkpoint-activations`): the decoder step on features in memory, "
                  "its activations recomputed in the backward pass per HRNet module; memory is the step's own (above "
                  "the import baseline).", "",
                  "| step | with checkpointing | without | ratio | full fine-tuning / with | goal |", "|---|---|---|---|---|---|",
                  f"| time (s) | {cp['step_s']:.3f} | {cp['plain_step_s']:.3f} | {cp['time']:.2f}x | | |",
                  f"| memory (MiB) | {cp['step_MiB']:.0f} | {cp['plain_step_MiB']:.0f} | {cp['memory']:.2f}x | "
                  f"**{cp['finetune_over_checkpointed']:.2f}x** | >= {cp['goal']}x |"]
    lo = r["loader"]
    lines += [
        "",
        "| loader | figure | goal |",
        "|---|---|---|",
        f"| views/s delivered by the DataLoader alone | {lo['views_per_s']:.1f} | |",
        f"| views/s the step consumes (in memory) | {lo['consumed_views_per_s']:.1f} | |",
        f"| loader / consumption | **{lo['ratio']:.1f}x** | >= {lo['goal']}x |",
        f"| step from the cache (stream) / step in memory | **{r['cache_vs_memory_step']:.2f}x** | "
        f"<= {r['cache_vs_memory_goal']}x |",
    ]
    if r.get("tiers"):
        lines += tiers_markdown(r["tiers"], r["resident_vs_memory_goal"])
    if schedule:
        resident = "resident_s" in schedule[0]
        lines += ["", schedule_note, "",
                  "| epochs | (a) cache, stream | " + ("(a) cache, resident | bound K·B + E·D | resident / bound | "
                                                       if resident else "")
                  + "(b) online | (c) fine-tune | (b)/(a) | (c)/(a) |",
                  "|---|---|" + ("---|---|---|" if resident else "") + "---|---|---|---|"]
        for s in schedule:
            best = s["resident_s"] if resident else s["cache_s"]
            t = {k: format_duration(v) for k, v in s.items() if k.endswith("_s")}
            lines.append(f"| {s['epochs']} | {t['cache_s']} | "
                         + (f"{t['resident_s']} ({s['resident_tier']}) | {t['bound_s']} | "
                            f"**{s['resident_vs_bound']:.2f}x** | " if resident and "bound_s" in s else "")
                         + f"{t['online_s']} | {t['finetune_s']} | "
                         f"{s['online_s'] / best:.2f}x | {s['finetune_s'] / best:.2f}x |")
    return "\n".join(lines)


def tiers_markdown(rows: list[dict], goal: float) -> list[str]:
    lines = ["", "Cache tiers (`train-decoder --cache-mode`), the same decoder and batch; loader CPU is the time spent "
             "making batches per view (stream: the DataLoader workers' CPU; resident: cutting batches from memory); "
             "memory is the peak above the import baseline, with the resident store and the step's own share apart:",
             "The paired column times each resident tier's step in turn with the step on one batch already in memory, "
             "in one process (A B A B, median of the ratios), which holds when the machine's speed drifts; the "
             "column before it divides by the memory row above, measured in another process.",
             "A compact tier (`TIER-FORMAT`, `--resident-dtype`) holds the store's float16 views in that format, "
             "decoded per batch on the device.",
             "", "| tier | format | step (s) | vs in-memory step | paired (A B A B) | goal | loader CPU (ms/view) | "
             "one-off load (s) | load (GB/s) | resident (MiB) | step's own (MiB) | peak (MiB) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for t in rows:
        resident = t["tier"] != "stream"
        paired = f"**{t['paired_vs_memory']:.2f}x**" if t.get("paired_vs_memory") else ""
        lines.append(f"| {t['tier']} | {t.get('format') or 'as stored'} | {t['step_s']:.3f} | {t['vs_memory']:.2f}x | "
                     f"{paired} | "
                     f"{f'<= {goal}x' if resident else ''} | {t['loader_cpu_ms_per_view']:.2f} | "
                     f"{t['load_s']:.2f} | " + (f"{t['load_GB_per_s']:.2f}" if t["load_GB_per_s"] else "") + " | "
                     f"{t['resident_MiB']:.0f} | {t['step_MiB']:.0f} | {t['peak_MiB']:.0f} |")
    return lines

