"""Stage one: run the frozen encoder once per view and store the features.

In-process, the loop overlaps its three costs: a DataLoader with workers decodes and
augments the next views while the encoder runs, and a pool of writer threads compresses
and writes finished views (Blosc releases the GIL) while the encoder runs the next batch.
With ``scheduler`` or ``workers`` the same per-batch work (:func:`encode_batch`) runs on
a dask.distributed cluster instead (dask_extract.py).
"""
from __future__ import annotations

import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from fusion_seg.cache.store import FeatureStore, writer_lock
from fusion_seg.data.datasets import build_dataset
from fusion_seg.device import memory_format, resolve_device
from fusion_seg.encoder.build import FrozenEncoder, build_encoder
from fusion_seg.encoder.identity import DEFAULT_ENCODER, DEFAULT_STRIDES
from fusion_seg.errors import CacheError, UserError
from fusion_seg.progress import Progress
from fusion_seg.cache.codecs import DEFAULT_CODEC, DEFAULT_DTYPE, check_dtype, codec_spec
from fusion_seg.data.views import Augment, Resize, ViewSource, collate_list
from fusion_seg.extract.encode import build_spec, encode_batch, handle_failed




@dataclass
class ExtractResult:
    store: str
    views_total: int
    views_written: int
    seconds: float
    skipped: list = field(default_factory=list)  # [{"view", "image_id", "error", ...}] with --skip-bad

    @property
    def views_per_second(self) -> float:
        return self.views_written / self.seconds if self.seconds > 0 else 0.0












def check_extract_arguments(**arguments) -> None:
    """Refuse out-of-range or conflicting :func:`extract` arguments (UserError naming the option), before any work.

    Takes ``extract``'s keyword arguments (those left out take its defaults); recipes check a stage with it.
    """
    import inspect

    from fusion_seg.checks import int_problem, require, scale_range_problem, size_problem, strides_problem

    defaults = {k: p.default for k, p in inspect.signature(extract).parameters.items()
                if p.default is not inspect.Parameter.empty}
    a = {**defaults, **arguments}
    require("--views", a["views"], int_problem(a["views"], 1))
    if not a["augment"] and a["views"] != 1:
        raise UserError("--no-augment stores the whole image once; use it with --views 1.")
    if a["augment"]:
        require("--crop", a["crop"], size_problem(a["crop"]), sep="x")
    require("--scale-range", a["scale_range"], scale_range_problem(a["scale_range"]), sep=" ")
    if a["short_side"] is not None and a["size"] is not None:
        raise UserError("--short-side and --size are mutually exclusive.")
    if a["short_side"] is not None:
        require("--short-side", a["short_side"], int_problem(a["short_side"], 1))
    if a["size"] is not None:
        require("--size", a["size"], size_problem(a["size"]), sep="x")
    require("--seed", a["seed"], int_problem(a["seed"], 0))
    require("--strides", a["strides"], strides_problem(a["strides"]))
    require("--batch-size", a["batch_size"], int_problem(a["batch_size"], 1))
    require("--loader-workers", a["loader_workers"], int_problem(a["loader_workers"], 0))
    require("writers", a["writers"], int_problem(a["writers"], 1))
    if a["scheduler"] is not None and a["workers"] is not None:
        raise UserError("--scheduler and --dask-workers are mutually exclusive: --dask-workers N starts a local "
                        "dask cluster, --scheduler uses a running one.")
    if a["workers"] is not None and int_problem(a["workers"], 1):
        raise UserError(f"--dask-workers {a['workers']} (workers={a['workers']!r}): it starts N local dask worker "
                        "processes (N >= 1); leave it out to extract in this process. DataLoader processes are set "
                        "with --loader-workers.")
    check_dtype(a["dtype"])
    codec_spec(a["codec"])


def extract(
    *,
    dataset: str,
    split: str,
    out: str | Path,
    root: str | Path | None = None,
    views: int = 1,
    augment: bool = True,
    crop: tuple[int, int] = (512, 512),
    scale_range: tuple[float, float] = (0.5, 2.0),
    flip: bool = True,
    short_side: int | None = None,
    size: tuple[int, int] | None = None,
    encoder: str = DEFAULT_ENCODER,
    weights: str | Path | None = None,
    random_init: bool = False,
    seed: int = 0,
    strides: tuple[int, ...] = DEFAULT_STRIDES,
    dtype: str = DEFAULT_DTYPE,
    codec: str | dict = DEFAULT_CODEC,
    batch_size: int = 4,
    loader_workers: int = 2,
    writers: int = 2,
    scheduler: str | None = None,
    workers: int | None = None,
    device: str = "auto",
    dataset_options: dict | None = None,
    repair: bool = False,
    skip_bad: bool = False,
    progress: bool = True,
) -> ExtractResult:
    """Extract features of ``views`` views per image of ``dataset``/``split`` into the store ``out``.

    Re-running the same call resumes: only views without a completion record are made.
    A store made with other settings is refused, never mixed; a store being written by
    another process is refused. ``repair`` first verifies every chunk and re-extracts the
    views that are corrupt (or were skipped). ``skip_bad`` records unreadable samples as
    skipped, lists them (with the reason) in the store's attributes, and goes on.

    ``loader_workers`` DataLoader processes decode views and ``writers`` threads write them,
    in this process. Instead, ``scheduler`` (``tcp://HOST:PORT``) runs the extraction on an
    existing dask.distributed cluster, and ``workers`` on a new local one of that many worker
    processes: the same store, bit for bit when the encoder runs with the same torch thread
    count in every process (see dask_extract.py).
    """
    arguments = dict(locals())
    check_extract_arguments(**arguments)  # before the store (or its lock) is made
    with writer_lock(out):
        return _extract_locked(**arguments)


def _extract_locked(*, dataset, split, out, root, views, augment, crop, scale_range, flip, short_side, size,
                    encoder, weights, random_init, seed, strides, dtype, codec, batch_size, loader_workers, writers,
                    scheduler, workers, device, dataset_options, repair, skip_bad, progress) -> ExtractResult:
    ds = build_dataset(dataset, root=root, split=split, **(dataset_options or {}))
    if len(ds) == 0:
        raise UserError(f"dataset {dataset!r} split {split!r} has no images; nothing to extract.")
    on_cluster = scheduler is not None or workers is not None
    dev = None if on_cluster else resolve_device(device)  # dask workers resolve their own
    enc = build_encoder(encoder, weights_file=weights, random_init=random_init, seed=seed, strides=strides)
    aug = Augment(enabled=augment, crop=tuple(crop) if augment else None, scale_range=tuple(scale_range),
                  flip=flip if augment else False, seed=seed)
    rsz = Resize(short_side=short_side, size=tuple(size) if size else None)
    spec = build_spec(ds, enc, views, aug, rsz, skip_bad, dtype=dtype, codec=codec)
    store = FeatureStore.create_or_resume(out, spec)
    if repair:
        report = store.verify(progress=progress)
        store.invalidate(sorted({b["view"] for b in report["bad"]} | set(report["skipped"])))
    todo = np.flatnonzero(~store.completed()).tolist()
    result = ExtractResult(str(out), spec.num_views, 0, 0.0)
    if not todo:
        return result
    source = ViewSource(ds, views, aug, rsz, enc.identity.mean, enc.identity.std)
    skipped: list[dict] = []
    start = time.perf_counter()
    try:
        with Progress(len(todo), f"extract {Path(str(out)).name}", "view", enabled=progress) as bar:
            if on_cluster:
                from fusion_seg.extract.dask_cluster import extract_on_cluster

                built_with = dict(tag=encoder, weights_file=weights, random_init=random_init, seed=seed,
                                  strides=strides)
                extract_on_cluster(store, source, todo, built_with, scheduler=scheduler, workers=workers,
                                   batch_size=batch_size, device=device, skip_bad=skip_bad, skipped=skipped, bar=bar)
            else:
                _extract_here(store, source, todo, enc, dev, batch_size=batch_size, loader_workers=loader_workers,
                              writers=writers, skip_bad=skip_bad, skipped=skipped, bar=bar)
    finally:
        if skipped:  # also when stopped half-way: these views are marked done, so say why
            store.record_skipped(skipped)
    result.views_written = len(todo)
    result.seconds = time.perf_counter() - start
    result.skipped = skipped
    return result


def _extract_here(store: FeatureStore, source: ViewSource, todo: list[int], enc: FrozenEncoder, dev: torch.device, *,
                  batch_size: int, loader_workers: int, writers: int, skip_bad: bool, skipped: list[dict], bar) -> None:
    """The in-process loop: DataLoader prefetch, encoder, and writer threads, overlapped."""
    enc = enc.to(dev, memory_format=memory_format(dev))  # channels_last on CUDA, as the input batch
    loader = torch.utils.data.DataLoader(
        torch.utils.data.Subset(source, todo), batch_size=batch_size, num_workers=loader_workers,
        collate_fn=collate_list, pin_memory=dev.type == "cuda", prefetch_factor=4 if loader_workers else None,
    )
    pending: list[Future] = []
    with ThreadPoolExecutor(max_workers=max(1, writers), thread_name_prefix="zarr-writer") as pool:
        def write(*view):
            pending.append(pool.submit(store.write_view, *view))

        for items in loader:
            failed = encode_batch(enc, dev, items, store.spec.dtype, write, batch_size=batch_size)
            handle_failed(store, failed, skip_bad, skipped)
            bar.update(len(failed))
            # Bound the memory held by views waiting to be written, and surface write errors early.
            while len(pending) > 4 * max(1, writers):
                _finish(pending.pop(0), store.path)
                bar.update(1)
        while pending:
            _finish(pending.pop(0), store.path)
            bar.update(1)


def _finish(future: Future, out) -> None:
    try:
        future.result()
    except OSError as exc:
        raise CacheError(
            f"writing to {out} failed: {exc}. Free space or fix permissions, then re-run the same command: "
            "the views already written are kept and only the missing ones are extracted."
        ) from exc
