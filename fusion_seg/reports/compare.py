"""``fusion-seg compare``: several decoders trained from one cache with one schedule, side by side.

This is what the cache buys: one encoder pass, then as many decoders as you like.
Each decoder trains with its defaults and the rest of the given ``TrainConfig`` (the schedule, the loss,
class weights, views, crop, seed, --init, the cache tier), handed whole to ``train_decoder`` in its own
spawned process (so its peak memory is its own), then is measured here on the same cached batch:

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
import multiprocessing
import sys
from dataclasses import asdict, replace
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from fusion_seg.cache.store import FeatureStore
from fusion_seg.cache.reader import CachedViews, collate_views
from fusion_seg.checkpoint import load_checkpoint
from fusion_seg.errors import Failed, UserError, write_error
from fusion_seg.decoders import DECODERS, decoder_from_record
from fusion_seg.files import write_json_atomic, write_text_atomic
from fusion_seg.files import check_out_folder
from fusion_seg.plots import plot_if_available
from fusion_seg.reports.timing import median_seconds
from fusion_seg.training.config import TrainConfig
from fusion_seg.training.step import TrainingStep

DEFAULT_DECODERS = tuple(name for name, cls in DECODERS.items() if not cls.end_to_end)  # those a cache can train


def _train_in_own_process(cache: str, val_cache: str | None, run_dir: Path, cfg: TrainConfig, progress: bool) -> None:
    """Train one decoder with :func:`~fusion_seg.training.train.train_decoder` in a fresh (spawned) process, so
    that its peak memory is its own; the whole ``cfg`` goes to it as data. The run folder is continued when it
    holds a run of these settings and data (finished: nothing trains), and kept aside otherwise
    (``resume="auto"``, as a recipe's train stage)."""
    context = multiprocessing.get_context("spawn")
    with context.Pool(1) as pool:
        error = pool.apply(_train_one, (cache, val_cache, str(run_dir), cfg, progress))
    if error:
        raise UserError(f"training {cfg.decoder} failed: {error}")


def _train_one(cache: str, val_cache: str | None, run_dir: str, cfg: TrainConfig, progress: bool) -> str | None:
    """The child's work: a user error comes back as its message (the parent raises it), a bug as its traceback."""
    from fusion_seg.training.train import train_decoder

    try:
        train_decoder(cache, run_dir, cfg, val_cache=val_cache, resume="auto", progress=progress)
    except UserError as exc:
        return str(exc)
    return None


def check_decoders(decoders, input_shapes: dict, num_classes: int, *, cache: str = "the cache") -> None:
    """Raise one UserError listing every decoder of ``decoders`` that cannot be trained from a cache
    with these feature shapes: unknown names, duplicates, and decoders that cannot be built from them
    (built on the ``meta`` device, with their defaults, as training builds them: no memory, no weights)."""
    from fusion_seg.decoders import DECODERS
    from fusion_seg.pipeline.stage_checks import build_check

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


def measure_decoder(record: dict, features: dict, labels: torch.Tensor, cfg: TrainConfig, *, ignore_index: int,
                    repeats: int = 5) -> dict:
    """Parameters, GFLOPs per view, train step time and inference images/s of a decoder on one batch; the step
    is the trainer's (training/step.py) with ``cfg``'s loss and optimiser, on the CPU."""
    decoder = decoder_from_record(record)
    train_step = TrainingStep(decoder, cfg, torch.device("cpu"), ignore_index=ignore_index)
    batch = labels.shape[0]

    decoder.train()
    step = median_seconds(lambda: train_step(features, labels), repeats)
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
        _train_in_own_process(cache, val_cache, run_dir, replace(cfg, decoder=name, decoder_config={}), progress)
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
        row.update(measure_decoder(best["decoder"], features, labels, cfg, ignore_index=store.spec.ignore_index,
                                   repeats=repeats))
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
