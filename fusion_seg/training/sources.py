"""Where a training batch comes from: the feature cache (streamed or held in memory) or, online, images
run through the frozen encoder each step.

Every source gives ``batches(epoch)`` of ``(features, labels)`` on the training device, and all of them
order an epoch's items by one rule (:func:`_sampler`): that is why the cache tiers give the same batches
in a single process, and why a resume repeats the batches of an uninterrupted run. With the same seed
and no random crop, online and cached training give the same losses up to fp16 rounding of the cached
features (tested).
"""
from __future__ import annotations

import os
from typing import Callable, Iterator

import torch

from fusion_seg.cache.reader import CachedViews, collate_views
from fusion_seg.cache.resident import ResidentViews, TierChoice, choose_tier, format_bytes, resident_bytes
from fusion_seg.cache.store import FeatureStore
from fusion_seg.data.views import ViewSource
from fusion_seg.device import memory_format, to_device
from fusion_seg.errors import Failed, UserError
from fusion_seg.training.config import TrainConfig
from fusion_seg.training.ddp import DistEnv


class CacheSource:
    """Batches of cached features, read from the store by a DataLoader (the ``stream`` tier)."""

    online = False

    def __init__(self, path: str, names: list[str], cfg: TrainConfig, device: torch.device,
                 dist: DistEnv | None = None):
        self.views = CachedViews(path, names, crop=cfg.crop, seed=cfg.seed, max_views_per_image=cfg.views)
        self.spec = self.views.spec
        self.device = device
        self.cfg = cfg
        self.dist = dist or DistEnv(device=device)

    def __len__(self) -> int:
        return len(self.views)

    def batches(self, epoch: int) -> Iterator[tuple[dict, torch.Tensor]]:
        self.views.set_epoch(epoch)
        for batch in _loader(self.views, self.cfg, epoch, collate_views, self.device, self.dist):
            features, labels = Failed.check(batch)
            yield ({k: to_device(v, self.device).float() for k, v in features.items()},
                   to_device(labels, self.device))


class ResidentSource:
    """Batches cut from views held in memory (``--cache-mode device`` or ``ram``, see resident.py).

    The same seeded sampler and batch rule as :func:`_loader`, so a single process draws exactly
    the stream tier's batches; under torchrun each process samples its own shard of the views.
    """

    online = False

    def __init__(self, views: ResidentViews, cfg: TrainConfig, dist: DistEnv):
        self.views, self.cfg, self.dist = views, cfg, dist
        self.spec = views.spec

    def __len__(self) -> int:
        return len(self.views.all_views)  # all processes' views, as CacheSource counts them

    def batches(self, epoch: int) -> Iterator[tuple[dict, torch.Tensor]]:
        sampler = _sampler(range(len(self.views)), self.cfg, epoch, DistEnv(device=self.dist.device))  # its shard
        batches = torch.utils.data.BatchSampler(sampler, self.dist.local_batch(self.cfg.batch_size),
                                                drop_last=len(self) >= self.cfg.batch_size)
        for positions in batches:
            yield self.views.batch(positions, epoch)


class OnlineSource:
    """Batches made from images each step: augmentation, then the frozen encoder."""

    online = True

    def __init__(self, views: ViewSource, encoder, cfg: TrainConfig, device: torch.device):
        self.views = views
        self.encoder = encoder.to(device, memory_format=memory_format(device))
        self.device = device
        self.cfg = cfg

    def __len__(self) -> int:
        return len(self.views)

    def batches(self, epoch: int) -> Iterator[tuple[dict, torch.Tensor]]:
        self.views.view_offset = epoch  # a fresh augmentation every epoch
        for batch in _loader(self.views, self.cfg, epoch, _collate_images, self.device):
            images, labels = Failed.check(batch)
            features = self.encoder(to_device(images, self.device))  # in its own precision (FrozenEncoder)
            # Inference tensors cannot be saved for backward: clone them into normal tensors.
            yield ({k: v.float().clone() for k, v in features.items()}, to_device(labels, self.device))


def choose_cache_tier(cfg: TrainConfig, store: FeatureStore | None, names: list[str], val_store: FeatureStore | None,
                      dist: DistEnv) -> TierChoice:
    """The cache tier for this process: its shard of the training views (``store``; None online, where only
    the validation views are held, with nothing competing for the memory), plus the validation views on rank 0.
    Both training entries choose it here."""
    if store is None:
        train_bytes = 0
    else:
        usable = len(store.usable_views(cfg.views))
        per_process = usable // dist.world if dist.distributed else usable
        train_bytes = format_bytes(store.spec, names, per_process, cfg.resident_dtype)
    val_bytes = (resident_bytes(val_store.spec, names, len(val_store.usable_views()))
                 if val_store and dist.is_main else 0)
    local = int(os.environ.get("LOCAL_WORLD_SIZE", "1")) if dist.distributed else 1
    return choose_tier(cfg.cache_mode, train_bytes, val_bytes, dist.device, local_processes=local,
                       resident=cfg.resident_dtype)


def cached_source(path: str, names: list[str], cfg: TrainConfig, tier: TierChoice, dist: DistEnv, *,
                  progress: bool, echo: Callable[[str], None] | None) -> tuple[CacheSource | ResidentSource, dict]:
    """The source of the tier ``tier`` (its views loaded now, for a resident tier, with progress on rank 0
    and the load time told to ``echo``), and what the run's summary records about it: the tier, why, its
    resident bytes and load time."""
    cache_info = {"mode": tier.mode, "requested": tier.requested, "format": tier.format,
                  "requested_format": tier.requested_format, "resident_bytes": 0,
                  "val_resident": tier.val_resident, "load_seconds": 0.0, "reason": tier.reason}
    if tier.mode == "stream":
        return CacheSource(path, names, cfg, dist.device, dist), cache_info
    views = ResidentViews(path, names, dist.device, tier.mode, crop=cfg.crop, seed=cfg.seed,
                          max_views_per_image=cfg.views, rank=dist.rank, world=dist.world,
                          progress=progress and dist.is_main, echo=echo, fmt=tier.format)
    cache_info.update(resident_bytes=views.nbytes, load_seconds=views.load_seconds)
    return ResidentSource(views, cfg, dist), cache_info


def _collate_images(items):
    bad = Failed.first(items)
    if bad is not None:
        return bad  # raised by the consumer, in the main process (collate runs in the worker)
    shapes = {tuple(it["image"].shape) for it in items}
    if len(shapes) > 1:
        raise UserError(f"images have different sizes {sorted(shapes)}; pass --crop or --size, or --batch-size 1.")
    return torch.stack([it["image"] for it in items]), torch.stack([it["labels"].long() for it in items])


def _loader(dataset, cfg: TrainConfig, epoch: int, collate, device, dist: DistEnv | None = None):
    """This process's batches of epoch ``epoch``: its ``batch_size / world`` share of each global batch.

    Every process shuffles all items with the same seeded permutation and takes every
    ``world``-th item of it, so the k-th batches of all processes together are items
    ``[k*B, (k+1)*B)`` of the permutation, the k-th batch of one process at the global batch
    ``B``. Steps per epoch are ``floor(floor(n/world)/b) == floor(n/B)`` for any ``world``.
    A dataset smaller than ``B`` gives one smaller batch per epoch (of ``floor(n/world)`` items).
    """
    dist = dist or DistEnv(device=device)
    if len(dataset) < dist.world:
        raise UserError(f"{len(dataset)} training views cannot be shared among {dist.world} processes; "
                        "start fewer processes or use a larger training set.")
    sampler = _sampler(dataset, cfg, epoch, dist)
    return torch.utils.data.DataLoader(
        dataset, batch_size=dist.local_batch(cfg.batch_size), sampler=sampler, num_workers=cfg.workers,
        collate_fn=collate, drop_last=len(dataset) >= cfg.batch_size, pin_memory=device.type == "cuda",
    )


def _sampler(dataset, cfg: TrainConfig, epoch: int, dist: DistEnv) -> torch.utils.data.DistributedSampler:
    """The order of epoch ``epoch``'s items for this process, the one rule of every cache tier.

    DistributedSampler shuffles with randperm seeded by seed + epoch: seed * 100003 keeps seeds 0 and 1
    from sharing permutations one epoch apart, and keeps one process's order what it was before DDP.
    """
    sampler = torch.utils.data.DistributedSampler(dataset, num_replicas=dist.world, rank=dist.rank, shuffle=True,
                                                  seed=cfg.seed * 100003, drop_last=True)
    sampler.set_epoch(epoch)
    return sampler
