"""``fusion-seg bench``: the cache's costs and savings, measured side by side in one run.

Sections (each a module here): ``extraction``, ``format`` (cache_format), ``training``
(loader and the three training modes, with the whole-schedule projection), ``scaling``,
``inference`` and ``deploy`` (PyTorch fp32 against bf16, ONNX Runtime and torch.compile; needs the onnx extra,
so it runs only when asked for). Every comparison inside a run uses the same decoder, batch, crop and
input size, and quotes the median of several repetitions.
"""
from __future__ import annotations

import datetime
import shutil
import sys
import tempfile
import time
from pathlib import Path

from fusion_seg.files import write_json_atomic, write_text_atomic
from fusion_seg.reports.bench import cache_format, deploy, extraction, inference, scaling, training
from fusion_seg.reports.bench.common import BenchConfig, machine

__all__ = ["BenchConfig", "DEFAULT_SECTIONS", "SECTIONS", "render_markdown", "run_bench", "save_json", "update_benchmarks"]

SECTIONS = ("extraction", "format", "training", "scaling", "inference", "deploy")
DEFAULT_SECTIONS = SECTIONS[:-1]  # deploy needs the onnx extra: it runs when asked for
MARK_BEGIN = "<!-- fusion-seg bench: begin -->"
MARK_END = "<!-- fusion-seg bench: end -->"


def run_bench(cfg: BenchConfig, sections=DEFAULT_SECTIONS, echo=print) -> dict:
    """Run the chosen sections; returns plain JSON data (``render_markdown`` turns it into tables)."""
    unknown = set(sections) - set(SECTIONS)
    if unknown:
        from fusion_seg.errors import UserError

        raise UserError(f"unknown bench section(s) {', '.join(sorted(unknown))}; choose from {', '.join(SECTIONS)}.")
    workdir = Path(cfg.workdir) if cfg.workdir else Path(tempfile.mkdtemp(prefix="fusion-seg-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    store = workdir / "bench-store.zarr"
    results = {"config": cfg.to_json(), "machine": machine(), "date": datetime.date.today().isoformat(),
               "command": " ".join(["fusion-seg", *sys.argv[1:]]) if sys.argv else "fusion-seg bench", "sections": {}}
    t_all = time.perf_counter()
    try:
        needs_store = {"training", "inference", "deploy"} & set(sections)
        if "extraction" in sections or (needs_store and not store.exists()):
            echo("bench: extraction")
            results["sections"]["extraction"] = extraction.run(cfg, workdir, store)
        if "format" in sections:
            echo("bench: cache format")
            results["sections"]["format"] = cache_format.run(cfg, workdir)
        if "training" in sections:
            echo("bench: loader and training")
            t = training.run(cfg, store)
            ext = results["sections"].get("extraction")
            if ext:
                t["whole_schedule"] = training.whole_schedule(
                    {m: t["modes"][m]["step_s"] for m in t["modes"]}, ext["extract_views_per_s"],
                    images=367, views=2, batch=cfg.batch_size, bare_views_per_s=ext["bare_forward_views_per_s"],
                    load_s_per_view={m: t["modes"][m]["load_s"] / t["modes"][m]["resident_views"]
                                     for m in training.TIERS})
            results["sections"]["training"] = t
        if "scaling" in sections:
            echo("bench: scaling")
            results["sections"]["scaling"] = scaling.run(cfg, workdir)
        if "inference" in sections:
            echo("bench: inference")
            results["sections"]["inference"] = inference.run(cfg, store, workdir)
        if "deploy" in sections:
            echo("bench: deploy")
            results["sections"]["deploy"] = deploy.run(cfg, store, workdir)
    finally:
        if not cfg.workdir:
            shutil.rmtree(workdir, ignore_errors=True)
    results["seconds"] = time.perf_counter() - t_all
    return results


def render_markdown(results: dict) -> str:
    m = results["machine"]
    cfg = results["config"]
    enc = f"{cfg['encoder']} from {cfg['weights']}" if cfg["weights"] else f"{cfg['encoder']} random-init (seed {cfg['seed']})"
    out = [f"`{results['command']}` on {m['cpu']} ({m['cores']} cores"
           + (f", {m['gpu']}" if "gpu" in m else "") + f"), device `{cfg['device']}`, torch {m['torch']}, "
           f"{results['date']}; encoder {enc}; {results['seconds'] / 60:.1f} min in all."]
    s = results["sections"]
    if "extraction" in s:
        out += ["", "### 1. Extraction against the bare encoder forward", "", extraction.to_markdown(s["extraction"])]
    if "format" in s:
        out += ["", "### 2. Cache format", "", cache_format.to_markdown(s["format"])]
    if "training" in s:
        note = ("Whole schedule, projected from the rates above for CamVid (367 images, batch "
                f"{cfg['batch_size']}, K = 2 cached views per image, extraction (and for the resident tier its one-off "
                "load) included for (a)); an epoch is one pass over the images. The bound K·B + E·D is K passes of "
                "the bare encoder (B) plus E decoder epochs on features already in memory (D):")
        out += ["", "### 3-4. Loader and training: (a) cache, (b) online, (c) fine-tuning", "",
                training.to_markdown(s["training"], s["training"].get("whole_schedule"), note)]
    if "scaling" in s:
        out += ["", "### 5. Scaling with resolution and data", "", scaling.to_markdown(s["scaling"])]
    if "inference" in s:
        out += ["", "### 6. Inference", "", inference.to_markdown(s["inference"])]
    if "deploy" in s:
        out += ["", "### 7. Deploying: PyTorch fp32 and bf16, ONNX Runtime, torch.compile", "",
                deploy.to_markdown(s["deploy"])]
    return "\n".join(out) + "\n"


def update_benchmarks(path: Path, markdown: str, heading: str) -> None:
    """Replace the bench block of ``path`` (between the bench markers under ``heading``), or append one."""
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    tag = MARK_BEGIN.replace("begin", f"begin {heading}")
    block = f"{tag}\n{markdown}{MARK_END}"
    start = text.find(tag)
    if start >= 0:
        end = text.find(MARK_END, start) + len(MARK_END)
        text = text[:start] + block + text[end:]
    else:
        text = text.rstrip("\n") + f"\n\n## `fusion-seg bench` ({heading})\n\n{block}\n"
    write_text_atomic(path, text)


def save_json(results: dict, path: Path) -> None:
    write_json_atomic(path, results)
