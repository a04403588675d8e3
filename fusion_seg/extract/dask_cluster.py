"""Extraction on a dask.distributed cluster: the same store, made by many processes or machines.

The store is bit-identical to an in-process extraction whose encoder runs with as many
torch threads as each worker's (CPU convolutions sum in an order that depends on the
thread count: with other counts ~0.5% of the fp16 features differ by one ulp).

The client (the process that runs ``extract``) creates or resumes the store, holds its
writer lock, and submits only the views without a completion record, ``batch_size``
views per task, as the in-process loop batches them. Each worker builds the encoder
once per extraction (:class:`ExtractPlugin`), checks that it is the one recorded in the
store, opens the store itself and writes its views straight into it. Every view is its
own chunk in every array, so workers never write the same chunk, and a view's row in
``views`` (its completion record) goes last: a task retried after its worker died
rewrites the same bytes. The client only shows progress and records skipped samples.

Paths (``--root``, ``--weights``, ``--out``) must name the same files on every worker:
a shared filesystem mounted at the same place, or a remote store URL.
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
import sys
import threading
import uuid
from pathlib import Path

import dask
import torch
from dask.system import CPU_COUNT

from fusion_seg.cache.store import FeatureStore
from fusion_seg.device import memory_format, resolve_device
from fusion_seg.requests import EncoderSpec, ExtractRun
from fusion_seg.encoder.identity import EncoderIdentity
from fusion_seg.errors import CacheError, DataError, UserError
from fusion_seg.extract.encode import encode_batch, handle_failed, store_write_error, store_writes
from fusion_seg.data.views import ViewSource

try:
    from distributed import Client, LocalCluster, WorkerPlugin, as_completed, get_worker
    from distributed.scheduler import KilledWorker
except ImportError:  # the optional extra; the CLI only imports this module for --scheduler/--dask-workers
    Client = None
    WorkerPlugin = object

# Nannies start workers with MALLOC_TRIM_THRESHOLD_=65536, which makes glibc hand large tensors
# back to the kernel after every forward (51% slower ResNet-50 forwards here); leave glibc's default.
TRIM_THRESHOLD = "distributed.nanny.pre-spawn-environ.MALLOC_TRIM_THRESHOLD_"


class ExtractPlugin(WorkerPlugin):
    """One extraction's state on a worker: the encoder (built once, on first use), the views and the store."""

    def __init__(self, encoder: EncoderSpec, identity: EncoderIdentity, device: str, source: ViewSource,
                 store_path: str, batch_size: int):
        self.encoder = encoder          # the encoder to build, as the client asked for it
        self.identity = identity        # the store's: what the encoder must turn out to be
        self.device = device
        self.source = source            # picklable: the dataset (file lists), augmentation and normalisation
        self.store_path = store_path
        self.batch_size = batch_size    # as in-process: decides whether a lone image is padded (encode_batch)

    def setup(self, worker) -> None:
        self.address, self.nthreads = worker.address, worker.state.nthreads
        self._ready = None
        self._build_lock, self._forward_lock = threading.Lock(), threading.Lock()

    def teardown(self, worker) -> None:
        self._ready = None  # frees the encoder

    def _get_ready(self):
        with self._build_lock:
            if self._ready is None:
                root = self.source.dataset.root
                if root is not None and not Path(root).is_dir():  # else every view would fail (or be skipped)
                    raise DataError(f"dask worker {self.address} cannot see the dataset root {root} (working "
                                    f"directory {os.getcwd()}). Give every worker the same data at the same "
                                    "absolute path (e.g. a shared filesystem) and pass that path to --root.")
                device = resolve_device(self.device)
                encoder = self.encoder.build().with_precision(self.identity.precision)  # the store's, as the client's
                diffs = self.identity.differences(encoder.identity)
                if diffs:
                    raise CacheError(
                        f"dask worker {self.address} built a different encoder from the one the store "
                        f"{self.store_path} was made with: {'; '.join(diffs)}. Give every worker the same "
                        "weights file and the same timm/torch versions as the client."
                    )
                encoder = encoder.to(device, memory_format=memory_format(device))  # channels_last on CUDA
                self._ready = encoder, device, FeatureStore.open(self.store_path, mode="r+")
            return self._ready

    def run(self, views: list[int]) -> list:
        """Make, encode and write ``views``; return the samples that could not be read (Failed)."""
        try:
            encoder, device, store = self._get_ready()
        except UserError as exc:
            if self.address in str(exc):
                raise
            raise type(exc)(f"dask worker {self.address}: {exc}") from None
        # One torch pool per worker, sized to its threads; tasks share it through the forward lock.
        torch.set_num_threads(self.nthreads)
        items = [self.source[v] for v in views]
        try:
            return encode_batch(encoder, device, items, store.spec.dtype, store.write_view, lock=self._forward_lock,
                                batch_size=self.batch_size)
        except OSError as exc:
            raise CacheError(f"dask worker {self.address}: {store_write_error(self.store_path, exc)}") from None


def _run_views(plugin_name: str, views: list[int]) -> list:
    """The task: one batch of views on whichever worker dask picks."""
    worker = get_worker()
    plugin = worker.plugins.get(plugin_name)
    if plugin is None:
        raise CacheError(f"dask worker {worker.address} did not receive this extraction's {plugin_name} plugin. "
                         "Re-run the same command to resume.")
    return plugin.run(views)


@contextlib.contextmanager
def cluster_client(scheduler: str | None, workers: int | None):
    """A client of the cluster at ``scheduler``, or of a new local one with ``workers`` processes."""
    if Client is None:
        raise UserError("--scheduler/--dask-workers need dask.distributed: pip install 'fusion-seg[distributed]'.")
    if scheduler is not None:
        try:
            client = Client(scheduler, timeout=dask.config.get("distributed.comm.timeouts.connect"))
        except (OSError, TimeoutError) as exc:
            raise UserError(f"cannot reach the dask scheduler at {scheduler}: {exc}. Start one with `dask scheduler` "
                            "and workers with `dask worker ADDRESS` (see docs/scaling-out.md), or use --dask-workers N.") from None
        with client:
            try:
                client.wait_for_workers(1, timeout=60)
            except TimeoutError:
                raise UserError(f"no dask worker joined the scheduler at {scheduler} within 60 s. Start workers "
                                f"with `dask worker {scheduler}` (see docs/scaling-out.md).") from None
            yield client
        return
    with local_cluster(workers) as cluster, Client(cluster) as client:
        yield client


@contextlib.contextmanager
def local_cluster(workers: int):
    """``workers`` worker processes on this machine, their threads sharing its cores, with glibc's malloc defaults."""
    environ = dict(os.environ)  # nannies export their pre-spawn variables into this process; put them back after
    try:
        # No dashboard; the scheduler's HTTP endpoint on a free port rather than 8787.
        with dask.config.set({TRIM_THRESHOLD: None}), \
                LocalCluster(n_workers=workers, threads_per_worker=max(1, CPU_COUNT // workers), processes=True,
                             dashboard_address=None, scheduler_kwargs={"dashboard_address": ":0"}) as cluster:
            yield cluster
    finally:
        os.environ.clear()
        os.environ.update(environ)


def extract_on_cluster(store: FeatureStore, source: ViewSource, todo: list[int], encoder: EncoderSpec,
                       run: ExtractRun, *, skip_bad: bool, skipped: list[dict], bar) -> None:
    """Extract the views ``todo`` into ``store`` on the dask cluster ``run`` names (``scheduler`` or
    ``dask_workers``), ``run.batch_size`` views per task; the client marks skipped samples."""
    batch_size = run.batch_size
    with cluster_client(run.scheduler, run.dask_workers) as client:
        _warn_trim_threshold(client)
        name = f"fusion-seg-extract-{uuid.uuid4().hex[:12]}"
        if encoder.weights_file:  # workers may run elsewhere: absolute local paths
            encoder = dataclasses.replace(encoder, weights_file=os.path.abspath(encoder.weights_file))
        path = store.path if "://" in store.path else os.path.abspath(store.path)
        plugin = ExtractPlugin(encoder, store.spec.encoder_identity, run.device, source, path, batch_size)
        client.register_plugin(plugin, name=name)
        try:
            batches = {f"{name}-{views[0]}": views
                       for views in (todo[i:i + batch_size] for i in range(0, len(todo), batch_size))}
            futures = [client.submit(_run_views, name, views, key=key, pure=False) for key, views in batches.items()]
            try:
                for future in as_completed(futures):
                    failed = _result(future, batches[future.key], store.path)
                    with store_writes(store.path):
                        handle_failed(store, failed, skip_bad, skipped)
                    bar.update(len(batches[future.key]))
            finally:
                client.cancel(futures)
        finally:
            client.unregister_worker_plugin(name)


def _result(future, views: list[int], path: str) -> list:
    try:
        return future.result()
    except UserError:
        raise  # names the worker and the fix already
    except KilledWorker as exc:
        raise CacheError(f"the dask workers running views {views[0]}-{views[-1]} of {path} died too often "
                         f"({exc}); check the workers' logs (memory?). Re-running the same command resumes: "
                         "written views are kept.") from None
    except Exception as exc:
        raise CacheError(f"extracting views {views[0]}-{views[-1]} of {path} failed on the dask cluster: "
                         f"{type(exc).__name__}: {exc}. Re-running the same command resumes: written views "
                         "are kept.") from exc


def _warn_trim_threshold(client) -> None:
    """Workers started by a nanny with dask's default MALLOC_TRIM_THRESHOLD_ run the encoder much slower."""
    settings = client.run(lambda: os.environ.get("MALLOC_TRIM_THRESHOLD_"))
    slowed = sorted(address for address, value in settings.items() if value is not None)
    if slowed:
        print(f"warning: dask worker(s) {', '.join(slowed)} run with MALLOC_TRIM_THRESHOLD_ set, which slows the "
              "encoder by up to 1.5x; start them with `MALLOC_TRIM_THRESHOLD_: null` in the dask config "
              "(docs/scaling-out.md: Extraction on a dask cluster).", file=sys.stderr, flush=True)
