"""Stage one: run the frozen encoder once per view and store the features.

In-process, the loop overlaps its three costs: a DataLoader with workers decodes and
augments the next views while the encoder runs, and a pool of writer threads compresses
and writes finished views (Blosc releases the GIL) while the encoder runs the next batch.
With ``ExtractRun.scheduler`` or ``dask_workers`` the same per-batch work (:func:`encode_batch`)
runs on a dask.distributed cluster instead (dask_cluster.py).

:func:`extract` takes typed requests: what to read (:class:`~fusion_seg.data.datasets.DatasetRef`),
which encoder (:class:`~fusion_seg.encoder.build.EncoderSpec`), how views are made
(:class:`~fusion_seg.data.views.Augment`, :class:`~fusion_seg.data.views.Resize`), how the store
encodes them (:class:`~fusion_seg.requests.StoreFormat`) and how the work runs
(:class:`~fusion_seg.requests.ExtractRun`). The command line and
recipes build them from their option values in one place (fusion_seg/requests.py).

Everything a request can get wrong is refused before the store or its lock file is made: the
arguments' ranges, an ``--out`` that cannot become a store (locations.check_out), an empty
dataset, and sizes that cannot fit in this machine's memory (encode.check_view_count,
check_view_size). A store is extended only with the settings and from the input files it was
made with (FeatureStore.create_or_resume, check_inputs). A failed write of the store (a full or
read-only disk) is one line that says what was kept (encode.store_writes).
"""
from __future__ import annotations

import contextlib
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from fusion_seg import faults
from fusion_seg.cache import locations
from fusion_seg.cache.codecs import check_dtype, codec_spec
from fusion_seg.cache.store import FeatureStore
from fusion_seg.requests import Augment, DatasetRef, EncoderSpec, ExtractRun, Resize, StoreFormat
from fusion_seg.data.datasets.base import SegDataset
from fusion_seg.data.views import ViewSource, collate_list
from fusion_seg.device import memory_format, resolve_device
from fusion_seg.encoder.build import FrozenEncoder
from fusion_seg.errors import UserError, require_path, require_type
from fusion_seg.extract.encode import (build_spec, check_view_count, check_view_size, encode_batch, handle_failed,
                                       label_shape_for, store_writes)
from fusion_seg.files import file_listing
from fusion_seg.progress import Progress




@dataclass
class ExtractResult:
    store: str
    views_total: int
    views_written: int  # made, or skipped as bad input, by this run
    seconds: float
    skipped: list = field(default_factory=list)  # [{"view", "image_id", "error", ...}] with --skip-bad
    views_skipped: int = 0  # views of the store skipped as bad input, after this run (FeatureStore.skipped_views)

    @property
    def views_per_second(self) -> float:
        return self.views_written / self.seconds if self.seconds > 0 else 0.0


def check_view_requests(augment: Augment, resize: Resize, encoder: EncoderSpec) -> None:
    """The ranges of how views are made and encoded, as the command line checks them (a UserError naming the
    option): extraction's, and online training's, which makes the same views every epoch."""
    from fusion_seg.checks import (bounded_problem, int_problem, require, scale_range_problem, seed_problem,
                                   size_problem, strides_problem)

    if augment.enabled:
        require("--crop", augment.crop, size_problem(augment.crop), sep="x")
    require("--scale-range", augment.scale_range, scale_range_problem(augment.scale_range), sep=" ")
    photometric = augment.photometric
    if photometric is not None:  # mmseg's ranges are the defaults; these are what keeps an image an image
        require("--brightness", photometric.brightness, bounded_problem(photometric.brightness, 0, 255))
        for name in ("contrast", "saturation"):  # factor ranges, as the scale range
            value = getattr(photometric, name)
            require(f"--{name}", value, scale_range_problem(value), sep=" ")
        require("--hue", photometric.hue, bounded_problem(photometric.hue, 0, 180))
        require("--blur", photometric.blur, bounded_problem(photometric.blur, 0, 1))
    if resize.short_side is not None and resize.size is not None:
        raise UserError("--short-side and --size are mutually exclusive.")
    if resize.short_side is not None:
        require("--short-side", resize.short_side, int_problem(resize.short_side, 1))
    if resize.size is not None:
        require("--size", resize.size, size_problem(resize.size), sep="x")
    for seed in (encoder.seed, augment.seed):  # one --seed on the command line; two fields here
        require("--seed", seed, seed_problem(seed))
    require("--strides", encoder.strides, strides_problem(encoder.strides))


def check_extract_arguments(**arguments) -> None:
    """Refuse out-of-range or conflicting :func:`extract` arguments (UserError naming the option), before any work.

    Takes ``extract``'s arguments by name (those left out take its defaults); recipes check a stage with it.
    """
    import inspect

    from fusion_seg.checks import PRECISIONS, int_problem, require

    bound = inspect.signature(extract).bind_partial(**arguments)
    bound.apply_defaults()
    a = bound.arguments
    if "out" in a:
        require_path("out", a["out"], "the feature store's folder or URL, e.g. cache/train.zarr")
    for name, kind in (("dataset", DatasetRef), ("encoder", EncoderSpec), ("augment", Augment), ("resize", Resize),
                       ("storage", StoreFormat), ("run", ExtractRun)):
        if name in a:  # (a recipe's check passes no dataset)
            require_type(f"extract's {name}", a[name], kind)  # a str or dict from a caller: say what to pass
    views, augment, resize, encoder = a["views"], a["augment"], a["resize"], a["encoder"]
    storage, run = a["storage"], a["run"]
    require("--views", views, int_problem(views, 1))
    if not augment.enabled and views != 1:
        raise UserError("--no-augment stores the whole image once; use it with --views 1.")
    check_view_requests(augment, resize, encoder)
    require("--batch-size", run.batch_size, int_problem(run.batch_size, 1))
    require("--loader-workers", run.loader_workers, int_problem(run.loader_workers, 0))
    require("writers", run.writers, int_problem(run.writers, 1))
    if run.precision not in PRECISIONS:
        require("--precision", run.precision, f"choose one of {', '.join(PRECISIONS)}")
    if run.scheduler is not None and run.dask_workers is not None:
        raise UserError("--scheduler and --dask-workers are mutually exclusive: --dask-workers N starts a local "
                        "dask cluster, --scheduler uses a running one.")
    if run.dask_workers is not None and int_problem(run.dask_workers, 1):
        raise UserError(f"--dask-workers {run.dask_workers} (workers={run.dask_workers!r}): it starts N local dask "
                        "worker processes (N >= 1); leave it out to extract in this process. DataLoader processes "
                        "are set with --loader-workers.")
    check_dtype(storage.dtype)
    codec_spec(storage.codec)


def extract(
    out: str | Path,
    dataset: DatasetRef,
    encoder: EncoderSpec = EncoderSpec(),
    *,
    views: int = 1,
    augment: Augment = Augment(),
    resize: Resize = Resize(),
    storage: StoreFormat = StoreFormat(),
    run: ExtractRun = ExtractRun(),
    repair: bool = False,
    skip_bad: bool = False,
    progress: bool = True,
) -> ExtractResult:
    """Extract the features of ``views`` views per image of ``dataset`` by ``encoder`` into the store ``out``.

    Re-running the same call resumes: only views without a completion record are made.
    A store made with other settings is refused, never mixed; a store being written by
    another process is refused. ``repair`` first verifies every chunk and re-extracts the
    views that are corrupt (or were skipped). ``skip_bad`` records unreadable samples as
    skipped, lists them (with the reason) in the store's attributes, and goes on.

    ``run`` says where the work runs (:class:`~fusion_seg.requests.ExtractRun`): in this process,
    or on a dask.distributed cluster, which makes the same store, bit for bit when the encoder runs with
    the same torch thread count in every process (see dask_cluster.py).

    Whatever can be refused is refused before the store or its lock file is made (see the module docstring).
    """
    arguments = dict(locals())
    check_extract_arguments(**arguments)
    locations.check_out(out)
    ds = dataset.build()
    if len(ds) == 0:
        raise UserError(f"dataset {dataset.name!r} split {dataset.split!r} has no images; nothing to extract.")
    check_view_count(len(ds), views)  # before anything sized by the views: the image ids, the records
    label_shape = label_shape_for(ds, augment, resize, skip_bad)
    enc = encoder.build().with_precision(run.forward_precision())  # the store's identity records it
    check_view_size(enc.output_shape(), label_shape, augment, resize, batch_size=run.batch_size,
                    num_views=len(ds) * views, dtype=storage.dtype)  # before the probe forward of build_spec
    with locations.writer_lock(out):
        return _extract_locked(out, ds, enc, label_shape, encoder, views=views, augment=augment, resize=resize,
                               storage=storage, run=run, repair=repair, skip_bad=skip_bad, progress=progress)


def _extract_locked(out, ds: SegDataset, enc: FrozenEncoder, label_shape: tuple[int, int], encoder: EncoderSpec, *,
                    views: int, augment: Augment, resize: Resize, storage: StoreFormat, run: ExtractRun, repair: bool,
                    skip_bad: bool, progress: bool) -> ExtractResult:
    dev = None if run.on_cluster else resolve_device(run.device)  # dask workers resolve their own
    spec = build_spec(ds, enc, views, augment, resize, label_shape, dtype=storage.dtype, codec=storage.codec)
    inputs = file_listing(ds.input_files())
    with store_writes(out):
        store = FeatureStore.create_or_resume(out, spec, inputs=inputs, repair=repair)
        store.check_inputs(inputs, may_change=_repairable_files(store, ds) if repair else ())
        if repair:
            report = store.verify(progress=progress)
            store.invalidate(sorted({b["view"] for b in report["bad"]} | set(report["skipped"])))
        todo = np.flatnonzero(~store.completed()).tolist()
    skipped: list[dict] = []
    start = time.perf_counter()
    if todo:
        source = ViewSource(ds, views, augment, resize, enc.identity.mean, enc.identity.std)
        try:
            with Progress(len(todo), f"extract {Path(str(out)).name}", "view", enabled=progress) as bar:
                if run.on_cluster:
                    from fusion_seg.extract.dask_cluster import extract_on_cluster

                    extract_on_cluster(store, source, todo, encoder, run, skip_bad=skip_bad, skipped=skipped, bar=bar)
                else:
                    _extract_here(store, source, todo, enc, dev, batch_size=run.batch_size,
                                  loader_workers=run.loader_workers, writers=run.writers, skip_bad=skip_bad,
                                  skipped=skipped, bar=bar)
        except BaseException:
            if skipped:  # stopped half-way: these views are marked done, so say why, if the store still takes it;
                with contextlib.suppress(Exception):  # a failure here must not replace the error that stopped the run
                    store.record_skipped(skipped)
            raise
    with store_writes(out):
        if skipped:
            store.record_skipped(skipped)
        views_skipped = len(store.skipped_views())
    return ExtractResult(str(out), spec.num_views, len(todo), time.perf_counter() - start, skipped, views_skipped)


def _repairable_files(store: FeatureStore, ds: SegDataset) -> list[str]:
    """The files of the images whose views were skipped as bad input: ``--repair`` makes those views again,
    so these files may have been fixed (changed) since without making any of the store's views stale."""
    return [str(path) for entry in store.skipped_report() for path in ds.sample_files(entry["image_index"])]


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
            with store_writes(store.path):
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
    with store_writes(out):
        future.result()
    faults.checkpoint_reached("view")  # a test's pause point (faults.py); nothing when no test set one
