"""The parts of an extraction request that only extraction has (the dataset, encoder and view requests
are shared with online training: DatasetRef, EncoderSpec, Augment, Resize).

Frozen values, built once from option values (fusion_seg/requests.py) and checked by
:func:`fusion_seg.extract.local.check_extract_arguments` before any work.
"""
from __future__ import annotations

from dataclasses import dataclass

from fusion_seg.cache.codecs import DEFAULT_CODEC, DEFAULT_DTYPE
from fusion_seg.options import check_fields


@dataclass(frozen=True)
class StoreFormat:
    """How a store encodes its features: the storage ``dtype`` and the chunk ``codec`` (see cache/codecs.py).

    Part of the store's spec: re-running with another format is refused, never mixed into the store.
    """

    dtype: str = DEFAULT_DTYPE
    codec: str | dict = DEFAULT_CODEC

    def __post_init__(self):
        check_fields(self, "StoreFormat")


@dataclass(frozen=True)
class ExtractRun:
    """Where and how the extraction work runs.

    In this process, on ``device``: ``loader_workers`` DataLoader processes decode views, the encoder
    runs ``batch_size`` views per forward, and ``writers`` threads write them. Instead, ``scheduler``
    (``tcp://HOST:PORT``) runs it on an existing dask.distributed cluster, and ``dask_workers`` on a new
    local one of that many worker processes (see dask_cluster.py).
    """

    device: str = "auto"
    batch_size: int = 4
    loader_workers: int = 2
    writers: int = 2
    scheduler: str | None = None
    dask_workers: int | None = None

    def __post_init__(self):
        check_fields(self, "ExtractRun")

    @property
    def on_cluster(self) -> bool:
        return self.scheduler is not None or self.dask_workers is not None
