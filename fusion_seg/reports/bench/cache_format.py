"""Section 2: every storage dtype x codec on real features: size, write and read speed, error.

Each option writes the same views' feature maps as the store does (one view per chunk,
the option's codec followed by crc32c) and reads them back, single-threaded per view as a
DataLoader worker or writer thread does. Speeds are in MB/s of *raw fp16* feature bytes, so
options compare on the data they carry, and they include the dtype's encode or decode.
"""
from __future__ import annotations

import shutil
import time
from pathlib import Path

import numpy as np
import torch
import zarr

from fusion_seg.cache import codecs
from fusion_seg.reports.bench.common import BenchConfig, build_frozen_encoder, data_label, images

CODEC_ORDER = ("none", "zstd", "blosc-zstd", "blosc-lz4", "lz4")


def feature_views(cfg: BenchConfig, count: int = 4) -> list[dict[str, np.ndarray]]:
    """fp32 features of ``count`` whole images at ``cfg.size`` (CamVid when available)."""
    encoder = build_frozen_encoder(cfg)
    x, _ = images(cfg, cfg.size, count, encoder)
    out = []
    for i in range(count):
        feats = encoder(x[i:i + 1])
        out.append({k: t[0].float().numpy() for k, t in feats.items()})
    return out


def measure(views: list[dict[str, np.ndarray]], dtype: str, codec: str, workdir: Path, repeats: int = 3) -> dict:
    root = workdir / f"format-{dtype}-{codec}.zarr"
    shutil.rmtree(root, ignore_errors=True)
    group = zarr.open_group(str(root), mode="w")
    compressors = codecs.compressors(codecs.codec_spec(codec))
    n = len(views)
    arrays = {name: group.create_array(name, shape=(n, *a.shape), chunks=(1, *a.shape),
                                       dtype=codecs.array_dtype(dtype), compressors=compressors, fill_value=0)
              for name, a in views[0].items()}
    raw_fp16 = sum(a.size * 2 for a in views[0].values()) * n
    write, read = [], []
    max_err, max_rel = 0.0, 0.0
    scales: dict = {}
    for _ in range(repeats):
        t0 = time.perf_counter()
        for v, feats in enumerate(views):
            for name, a in feats.items():
                stored, scale = codecs.encode(a, dtype)
                arrays[name][v] = stored
                scales[(v, name)] = scale
        write.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        decoded = [{name: codecs.decode(arrays[name][v], dtype, scales[(v, name)]) for name in feats}
                   for v, feats in enumerate(views)]
        read.append(time.perf_counter() - t0)
    for v, feats in enumerate(views):
        for name, a in feats.items():
            err = float(np.abs(decoded[v][name].astype(np.float32) - a).max())
            max_err = max(max_err, err)
            max_rel = max(max_rel, err / max(float(np.abs(a).max()), 1e-12))
    on_disk = sum(p.stat().st_size for p in root.rglob("*") if p.is_file() and p.name != "zarr.json")
    shutil.rmtree(root, ignore_errors=True)
    return {"dtype": dtype, "codec": codec, "codec_label": codecs.codec_label(codecs.codec_spec(codec)),
            "bytes_per_view": on_disk / n, "ratio_to_raw_fp16": raw_fp16 / on_disk,
            "write_MB_per_s": raw_fp16 / np.median(write) / 1e6, "read_MB_per_s": raw_fp16 / np.median(read) / 1e6,
            "read_ms_per_view": np.median(read) / n * 1e3, "write_ms_per_view": np.median(write) / n * 1e3,
            "max_abs_error": max_err, "max_rel_error": max_rel}


def run(cfg: BenchConfig, workdir: Path) -> dict:
    torch.set_grad_enabled(False)
    views = feature_views(cfg)
    zeros = {name: float(np.mean([(v[name] == 0).mean() for v in views])) for name in views[0]}
    raw = sum(a.size * 2 for a in views[0].values())
    rows = [measure(views, dtype, codec, workdir) for dtype in codecs.DTYPES for codec in CODEC_ORDER]
    torch.set_grad_enabled(True)
    return {"size": list(cfg.size), "data": data_label(cfg), "views": len(views), "raw_fp16_bytes_per_view": raw,
            "zero_fraction": zeros, "rows": rows}


def to_markdown(r: dict) -> str:
    zeros = ", ".join(f"{k} {v:.0%}" for k, v in r["zero_fraction"].items())
    lines = [
        f"{r['views']} whole {r['data']} at {r['size'][1]}x{r['size'][0]}; raw fp16 is "
        f"{r['raw_fp16_bytes_per_view'] / 2**20:.1f} MiB per view; zeros: {zeros}. Speeds in MB/s of raw fp16 "
        "bytes, one thread, encode/decode included; error against the fp32 features.",
        "",
        "| dtype | codec | MiB/view | x smaller than raw fp16 | write MB/s | read MB/s | read ms/view | max abs error | max rel error |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in r["rows"]:
        lines.append(f"| {row['dtype']} | {row['codec_label']} | {row['bytes_per_view'] / 2**20:.2f} | "
                     f"{row['ratio_to_raw_fp16']:.2f} | {row['write_MB_per_s']:.0f} | {row['read_MB_per_s']:.0f} | "
                     f"{row['read_ms_per_view']:.1f} | {row['max_abs_error']:.3g} | {row['max_rel_error']:.2g} |")
    return "\n".join(lines)
