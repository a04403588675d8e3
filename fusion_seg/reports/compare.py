"""``fusion-seg compare``: several decoders trained from one cache with one schedule, side by side.

This is what the cache buys: one encoder pass, then as many decoders as you like.
Each decoder trains in its own process (so its peak memory is its own), then is
measured here on the same cached batch:

- mIoU and pixel accuracy on the validation cache (the best epoch's);
- parameters, and decoder GFLOPs for one view at the cache's view size
  (``torch.utils.flop_counter``: multiply-adds counted as 2 FLOPs);
- train step time (forward, loss, backward, SGD step) and decoder inference
  images/s, medians over repetitions;
- peak memory of the training process (max RSS on CPU, max allocated on CUDA).

Results go to ``OUT/compare.json``, ``OUT/compare.md`` and, with matplotlib,
``OUT/compare.png`` (mIoU against step time).
"""
from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import asdict, replace
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from fusion_seg.cache.store import FeatureStore
from fusion_seg.cache.reader import CachedViews, collate_views
from fusion_seg.checkpoint import load_checkpoint
from fusion_seg.errors import Failed, UserError, write_error
from fusion_seg.training.losses import build_loss
from fusion_seg.decoders import DECODERS, decoder_from_record
from fusion_seg.files import write_json_atomic, write_text_atomic
from fusion_seg.inference.predict import check_out_folder
from fusion_seg.plots import plot_if_available
from fusion_seg.reports.timing import median_seconds
from fusion_seg.training.config import TrainConfig

DEFAULT_DECODERS = tuple(name for name, cls in DECODERS.items() if not cls.end_to_end)  # those a cache can train


def _train_in_subprocess(cache: str, val_cache: str | None, run_dir: Path, cfg: TrainConfig) -> None:
    args = [sys.executable, "-m", "fusion_seg", "train-decoder", "--cache", cache, "--decoder", cfg.decoder,
            "--epochs", cfg.epochs, "--batch-size", cfg.batch_size, "--lr", cfg.lr, "--loss", cfg.loss,
            "--seed", cfg.seed, "--workers", cfg.workers, "--cache-mode", cfg.cache_mode, "--resident-dtype",
            cfg.resident_dtype, "--device", cfg.device, "--out", run_dir]
    if cfg.checkpoint_activations:
        args.append("--checkpoint-activations")
    if val_cache:
        args += ["--val-cache", val_cache]
    if cfg.crop:
        args += ["--crop", f"{cfg.crop[0]}x{cfg.crop[1]}"]
    for key, value in cfg.decoder_config.items():
        args += ["--decoder-opt", f"{key}={json.dumps(value)}"]
    if (run_dir / "last.pt").exists():
        args.append("--resume")  # finishes an interrupted comparison, or no-ops on a finished one
    result = subprocess.run([str(a) for a in args], capture_output=True, text=True)
    if result.returncode != 0:
        raise UserError(f"training {cfg.decoder} failed:\n{result.stderr.strip()[-2000:]}")


def check_decoders(decoders, input_shapes: dict, num_classes: int, *, cache: str = "the cache") -> None:
    """Raise one UserError listing every decoder of ``decoders`` that cannot be trained from a cache
    with these feature shapes: unknown names, duplicates, and decoders that cannot be built from them
    (built on the ``meta`` device, with their defaults, as training builds them: no memory, no weights)."""
    from fusion_seg.decoders import DECODERS
    from fusion_seg.pipeline.stages import build_check

    decoders = list(decoders)
    errors = [] if decoders else ["no decoder to compare; pass --decoders NAME,NAME,..."]
    seen = set()
    for name in decoders:
        if name not in DECODERS:
            errors.append(f"unknown decoder {name!r}; known decoders: {', '.join(sorted(DECODERS))}.")
        elif name in seen:
            errors.append(f"{name!r} is listed twice; list each decoder once.")
        else:
            problem = build_check(name, {}, input_shapes, num_classes)
            if problem:
                errors.append(f"{name!r} cannot be trained from {cache}: {problem}")
        seen.add(name)
    if len(errors) == 1:
        raise UserError(f"compare --decoders: {errors[0]} Nothing was trained.")
    if errors:
        raise UserError(f"compare --decoders has {len(errors)} problems (nothing was trained):\n"
                        + "\n".join(f"compare --decoders: {e}" for e in errors))


def measure_decoder(record: dict, features: dict, labels: torch.Tensor, *, loss: str, ignore_index: int,
                    repeats: int = 5) -> dict:
    """Parameters, GFLOPs per view, train step time and inference images/s of a decoder on one batch."""
    decoder = decoder_from_record(record)
    criterion = build_loss(loss, ignore_index)
    optimizer = torch.optim.SGD(decoder.parameters(), lr=1e-6, momentum=0.9)
    batch = labels.shape[0]

    def train_step():
        value = sum(decoder.losses(decoder(features), labels, criterion).values())
        optimizer.zero_grad(set_to_none=True)
        value.backward()
        optimizer.step()

    decoder.train()
    step = median_seconds(train_step, repeats)
    decoder.eval()
    one = {k: v[:1] for k, v in features.items()}
    with torch.inference_mode():
        infer = median_seconds(lambda: decoder(one), repeats)
        with FlopCounterMode(display=False) as counter:
            decoder(one)
    return {"params_M": sum(p.numel() for p in decoder.parameters()) / 1e6,
            "gflops": counter.get_total_flops() / 1e9, "step_ms": 1000 * step, "batch_size": batch,
            "infer_images_per_s": 1.0 / infer}


def compare(cache: str, out: str | Path, cfg: TrainConfig, *, val_cache: str | None = None,
            decoders: tuple[str, ...] = DEFAULT_DECODERS, repeats: int = 5, progress: bool = True) -> list[dict]:
    """Train and measure ``decoders`` on one cache with the schedule ``cfg``; write the table.

    The whole list is checked first (:func:`check_decoders`): nothing is trained, and no folder
    is made, unless every decoder can be built from the cache's features.
    """
    out = Path(out)
    check_out_folder(out, {out / name: "the table" for name in ("compare.json", "compare.md", "compare.png")})
    store = FeatureStore.open(cache)
    store.check_complete()
    check_decoders(decoders, store.spec.input_shapes(), len(store.spec.classes), cache=str(cache))
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise write_error(out, exc, what="the comparison's folder") from None
    rows = []
    for name in decoders:
        run_dir = out / name
        if progress:
            print(f"compare: training {name} -> {run_dir}", file=sys.stderr, flush=True)
        _train_in_subprocess(cache, val_cache, run_dir, replace(cfg, decoder=name, decoder_config={}))
        best = load_checkpoint(run_dir / "best.pt")
        summary = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()
                   if '"summary"' in line][-1]
        names = decoder_from_record(best["decoder"]).in_features
        views = CachedViews(cache, names, crop=tuple(cfg.crop) if cfg.crop else None, seed=cfg.seed)
        features, labels = Failed.check(collate_views([views[i] for i in range(min(cfg.batch_size, len(views)))]))
        features = {k: v.float() for k, v in features.items()}
        row = {"decoder": name, "config": best["decoder"]["config"],
               "miou": (best.get("val") or {}).get("miou"), "pixel_acc": (best.get("val") or {}).get("pixel_acc"),
               "peak_memory_MiB": summary["peak_memory_MiB"], "peak_memory_kind": summary["peak_memory_kind"],
               "train_seconds": summary["seconds"], "view_hw": list(labels.shape[-2:])}
        row.update(measure_decoder(best["decoder"], features, labels, loss=cfg.loss,
                                   ignore_index=store.spec.ignore_index, repeats=repeats))
        rows.append(row)
    table = out / "compare.json"
    try:
        write_json_atomic(table, {"cache": str(cache), "val_cache": val_cache, "schedule": asdict(cfg), "rows": rows})
        table = out / "compare.md"
        write_text_atomic(table, markdown_table(rows))
        table = out / "compare.png"
        plot_if_available("plot_compare", rows, table)
    except OSError as exc:
        raise write_error(table, exc, then="The decoders' runs are kept: re-run the same command to write the "
                                           "tables without training again.") from None
    return rows


def markdown_table(rows: list[dict]) -> str:
    def f(v, spec):
        return "n/a" if v is None else format(v, spec)

    lines = ["| decoder | mIoU | pixel acc | params (M) | GFLOPs/view | train step (ms) | peak memory (MiB) | "
             "inference (img/s) |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['decoder']} | {f(r['miou'], '.4f')} | {f(r['pixel_acc'], '.4f')} | "
                     f"{r['params_M']:.2f} | {r['gflops']:.2f} | {r['step_ms']:.0f} | {r['peak_memory_MiB']:.0f} | "
                     f"{r['infer_images_per_s']:.1f} |")
    return "\n".join(lines) + "\n"
