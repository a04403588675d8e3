"""Resident feature caches: a store decoded once into memory, then batches cut by indexing.

Where a training step reads its features from (``--cache-mode``):

- ``stream``: DataLoader workers read, decompress and crop every view every epoch (cached_views.py).
  Costs 20-40 ms of CPU a view: on a GPU that outruns the encoder it would replace.
- ``ram``: every view the decoder reads is decompressed once into host memory (pinned on CUDA);
  a batch is cut there and copied to the device with ``non_blocking``.
- ``device``: the same, held in device memory (on CPU that is RAM): a batch is cut on the device.
- ``auto`` (the default): the fastest tier that fits. Only the arrays the decoder reads (its
  strides) and the labels are held, in the storage dtype: uint8 stores stay uint8 and are
  dequantised per batch on the device, so they fit twice the views of a float16 store.

A tier that does not fit is refused before anything is loaded, naming the sizes and the
alternatives. Crops are those of the stream tier (the same ``aligned_crop_box`` draws from
``rng([seed, epoch, view])``) and batches are drawn by the same seeded sampler, so with the
same seed every tier gives the same losses (tested).

Under torchrun, each process holds only its shard of the views (rank ``r`` of ``w`` holds
every ``w``-th usable view from ``r``, ``floor(n/w)`` of them) and draws its batches from it;
an epoch still covers every view once and has ``floor(n/B)`` steps, but batches mix views
differently from the stream tier's global permutation, so DDP losses differ between tiers.
"""
from __future__ import annotations

import math
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch

from fusion_seg.cache import codecs as storage
from fusion_seg.cache.store import VIEW_FIELDS, FeatureStore
from fusion_seg.cache.reader import ALIGN, aligned_crop_box
from fusion_seg.checks import CACHE_MODES
from fusion_seg.device import memory_format
from fusion_seg.errors import UserError

# What a resident cache may take of the free memory: the rest stays for the training step,
# the allocator's fragmentation and (host) the page cache and other processes.
MEMORY_FRACTION = 0.8
DEVICE_RESERVE = 2 * 2**30   # CUDA memory left for the decoder's step on top of the fraction
HOST_RESERVE = 1 * 2**30     # host memory left for the process itself

_TORCH_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "uint8": torch.uint8}
_BYTES = {"float16": 2, "bfloat16": 2, "uint8": 1}


def gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB"


# --------------------------------------------------------------------------- sizes and the choice
def resident_bytes(spec, names: list[str], views: int) -> int:
    """Bytes that ``views`` views of a store take in memory: the maps ``names`` in the storage dtype,
    their uint8 scales, and the uint8 labels (arrays are sized for the store's largest view)."""
    per_view = math.prod(spec.label_shape)  # uint8 labels
    for name in names:
        c, h, w = spec.feature_shapes[name]
        per_view += c * h * w * _BYTES[spec.dtype]
        if storage.has_scales(spec.dtype):
            per_view += c * 4
    return per_view * views


def host_available_bytes() -> int:
    """MemAvailable of /proc/meminfo (what can be allocated without swapping), else total RAM."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def available_memory(device: torch.device) -> dict:
    """Free memory where each tier would hold the cache: ``device`` (CUDA free memory, or host RAM on
    CPU) and ``ram`` (host RAM), in bytes."""
    host = host_available_bytes()
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return {"device": int(free), "ram": host}
    return {"device": host, "ram": host}


def budget(mode: str, free: int, device: torch.device) -> int:
    """What a tier may use of ``free`` bytes, keeping a margin for everything else."""
    reserve = DEVICE_RESERVE if mode == "device" and device.type == "cuda" else HOST_RESERVE
    return max(0, int(free * MEMORY_FRACTION) - reserve)


@dataclass(frozen=True)
class TierChoice:
    """Where the training (and validation) views will be read from, and why."""

    requested: str
    mode: str                 # device, ram or stream
    train_bytes: int          # resident size of this process's training views
    val_bytes: int            # resident size of the validation views (0: none, or streamed)
    val_resident: bool
    budgets: dict             # {"device": bytes, "ram": bytes} usable by each tier
    where: str                # "cuda:0", "host RAM (pinned)", ...
    reason: str

    def describe(self) -> str:
        sizes = f"train {gib(self.train_bytes)}" + (f" + val {gib(self.val_bytes)}" if self.val_bytes else "")
        return (f"cache mode {self.mode} ({'auto' if self.requested == 'auto' else 'requested'}): {sizes}; "
                f"{self.reason}")


def _where(mode: str, device: torch.device) -> str:
    """Where a tier holds the views: the GPU, pinned host RAM, or (the device being the CPU) RAM."""
    if device.type != "cuda":
        return "RAM"
    return str(device) if mode == "device" else "pinned host RAM"


def choose_tier(requested: str, train_bytes: int, val_bytes: int, device: torch.device,
                free: dict | None = None, local_processes: int = 1) -> TierChoice:
    """The tier for ``--cache-mode requested``: refused before loading when it does not fit.

    ``auto`` takes ``device``, else ``ram``, else ``stream``: the first whose budget holds the
    training views (and the validation views too, else those are streamed). ``local_processes``
    processes of this node share its host RAM (torchrun), each holding its own shard.
    """
    if requested not in CACHE_MODES:
        raise UserError(f"--cache-mode {requested!r}: choose one of {', '.join(CACHE_MODES)}.")
    free = free if free is not None else available_memory(device)
    share = {"device": free["device"] // (local_processes if device.type != "cuda" else 1),
             "ram": free["ram"] // local_processes}
    budgets = {m: budget(m, share[m], device) for m in ("device", "ram")}
    if requested == "stream":
        return TierChoice(requested, "stream", train_bytes, 0, False, budgets, "disk",
                          "views are read from the store and decompressed every epoch, by --workers loader processes")
    candidates = [requested] if requested != "auto" else ["device", "ram"]
    if device.type != "cuda" and requested == "auto":
        candidates = ["device"]  # on CPU, ram and device are the same memory; device needs no copy
    for mode in candidates:
        if train_bytes + val_bytes <= budgets[mode]:
            return TierChoice(requested, mode, train_bytes, val_bytes, val_bytes > 0, budgets, _where(mode, device),
                              f"fits in {_where(mode, device)} ({gib(budgets[mode])} usable of "
                              f"{gib(share[mode])} free)")
        if train_bytes <= budgets[mode]:
            return TierChoice(requested, mode, train_bytes, 0, False, budgets, _where(mode, device),
                              f"training views fit in {_where(mode, device)} ({gib(budgets[mode])} usable); "
                              f"validation ({gib(val_bytes)}) is streamed")
    if requested == "auto":
        return TierChoice(requested, "stream", train_bytes, 0, False, budgets, "disk",
                          f"{gib(train_bytes)} does not fit in memory (usable: device {gib(budgets['device'])}, "
                          f"host RAM {gib(budgets['ram'])}): streaming from the store. On a GPU the encoder may "
                          "then be faster than the cache: see `fusion-seg plan`.")
    others = [m for m in ("device", "ram") if m != requested and train_bytes <= budgets[m]]
    fixes = [f"--cache-mode {m} (fits)" for m in others] + ["--cache-mode stream",
                                                           "fewer views (--views K)",
                                                           "a uint8 store (extract --dtype uint8: half the bytes)"]
    raise UserError(
        f"--cache-mode {requested} needs {gib(train_bytes + val_bytes)} (train {gib(train_bytes)}"
        + (f", val {gib(val_bytes)}" if val_bytes else "") + f") in {_where(requested, device)}, but only "
        f"{gib(budgets[requested])} is usable ({gib(share[requested])} free, keeping "
        f"{int((1 - MEMORY_FRACTION) * 100)}% and "
        f"{gib(DEVICE_RESERVE if requested == 'device' and device.type == 'cuda' else HOST_RESERVE)} for the "
        f"training step). Use " + ", ".join(fixes) + "."
    )


# --------------------------------------------------------------------------- the resident views
def shard(views: np.ndarray, rank: int, world: int) -> np.ndarray:
    """This process's views under torchrun: every ``world``-th from ``rank``, ``floor(n/world)`` of them."""
    if world <= 1:
        return views
    if len(views) < world:
        raise UserError(f"{len(views)} training views cannot be shared among {world} processes; "
                        "start fewer processes or use a larger training set.")
    return views[rank::world][: len(views) // world]


class ResidentViews:
    """Views of a store held decoded in memory: features in the storage dtype, labels uint8.

    ``home`` is where they live: the device (``device`` tier), or host RAM (``ram`` tier; pinned
    when the device is CUDA). :meth:`batch` cuts a batch there and returns float32 features and
    int64 labels on ``device``, exactly as the stream tier's ``CachedViews`` + collate would.
    """

    def __init__(self, path: str, names: list[str], device: torch.device, mode: str, *,
                 crop: tuple[int, int] | None = None, seed: int = 0, max_views_per_image: int | None = None,
                 rank: int = 0, world: int = 1, threads: int | None = None, progress: bool = True, echo=None):
        if mode not in ("device", "ram"):
            raise ValueError(mode)
        store = FeatureStore.open(path)
        self.path, self.names, self.device, self.mode = str(path), list(names), device, mode
        self.spec = store.spec
        self.crop = tuple(crop) if crop else None
        if self.crop and any(c % ALIGN for c in self.crop):
            raise UserError(f"--crop {self.crop[0]}x{self.crop[1]} must be a multiple of {ALIGN} for feature-space crops.")
        self.seed = seed
        self.all_views = store.usable_views(max_views_per_image)
        self.views = shard(self.all_views, rank, world)
        self.strides = {n: s.stride for n, s in self.spec.input_shapes().items()}
        self.home = device if mode == "device" else torch.device("cpu")
        self.pinned = mode == "ram" and device.type == "cuda"  # pinning needs CUDA
        self.staged = self.home != device  # batches are cut in host RAM, then copied to the device
        rows = store.rows()[self.views]
        self.valid = rows[:, [VIEW_FIELDS.index("valid_h"), VIEW_FIELDS.index("valid_w")]].astype(np.int64)
        self.nbytes = resident_bytes(self.spec, self.names, len(self.views))
        self.load_seconds = self._load(store, threads, progress)
        if echo is not None:
            echo(f"loaded {len(self.views)} views ({gib(self.nbytes)}) into {_where(mode, device)} in "
                 f"{self.load_seconds:.1f}s ({self.nbytes / 1e9 / max(self.load_seconds, 1e-9):.2f} GB/s)")

    def __len__(self) -> int:
        return len(self.views)

    def _empty(self, shape, dtype) -> torch.Tensor:
        return torch.empty(shape, dtype=dtype, device=self.home, pin_memory=self.pinned)

    def _load(self, store: FeatureStore, threads: int | None, progress: bool) -> float:
        """Decode every view once, in parallel (zarr and its codecs release the GIL), showing progress."""
        from fusion_seg.progress import Progress

        n, spec = len(self.views), self.spec
        t0 = time.perf_counter()
        self.features = {k: self._empty((n, *spec.feature_shapes[k]), _TORCH_DTYPES[spec.dtype]) for k in self.names}
        self.scales = ({k: self._empty((n, spec.feature_shapes[k][0]), torch.float32) for k in self.names}
                       if storage.has_scales(spec.dtype) else {})
        self.labels = self._empty((n, *spec.label_shape), torch.uint8)

        def load(j: int) -> None:
            features, scales, labels = store.read_stored_view(int(self.views[j]), self.names)
            for k, a in features.items():
                self.features[k][j].copy_(_as_tensor(a, spec.dtype))
            for k, a in scales.items():
                self.scales[k][j].copy_(torch.from_numpy(np.asarray(a, dtype=np.float32)))
            self.labels[j].copy_(torch.from_numpy(np.asarray(labels, dtype=np.uint8)))

        workers = threads or min(16, 2 * (os.cpu_count() or 1))
        with ThreadPoolExecutor(max_workers=workers) as pool, \
                Progress(n, f"load {os.path.basename(self.path.rstrip('/'))} -> {self.mode}", "view",
                         enabled=progress) as bar:
            for _ in pool.map(load, range(n)):
                bar.update(1)
        if self.home.type == "cuda":
            torch.cuda.synchronize(self.home)
        return time.perf_counter() - t0

    # ----------------------------------------------------------------- batches
    def batch(self, positions, epoch: int = 0) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """Features (float32) and labels (int64) of the views at ``positions`` (indices into this
        shard), on the device; crops drawn as the stream tier draws them.

        Held where the step runs (the device tier, or any tier on a CPU), a batch is written straight
        into float32: each item's region is copied once, converting as it goes, and only the padding
        is zeroed. From pinned host RAM (the ram tier on CUDA) it is cut in the storage dtype, half the
        bytes to copy, and decoded on the device.
        """
        boxes, (oh, ow) = self._boxes(positions, epoch)
        staged = self.staged
        b = len(positions)
        where = dict(device=self.home, pin_memory=self.pinned) if staged else dict(device=self.device)
        labels = torch.empty((b, oh, ow), dtype=torch.uint8 if staged else torch.int64, **where)
        features = {}
        for k in self.names:
            shape = (b, self.features[k].shape[1], -(-oh // self.strides[k]), -(-ow // self.strides[k]))
            if staged:
                features[k] = torch.empty(shape, dtype=self.features[k].dtype, **where)
            else:
                features[k] = torch.empty(shape, dtype=torch.float32, device=self.device,
                                          memory_format=memory_format(self.device))
        for i, (p, (y0, x0)) in enumerate(zip(positions, boxes)):
            vh, vw = (int(x) for x in self.valid[p])
            _copy_padded(labels[i], self.labels[p, y0:y0 + min(oh, vh - y0), x0:x0 + min(ow, vw - x0)],
                         self.spec.ignore_index)
            for k in self.names:
                s = self.strides[k]
                # The stream tier first cuts a map to the view's valid cells, ceil(valid / s), then crops.
                fh = min(features[k].shape[2], -(-vh // s) - y0 // s)
                fw = min(features[k].shape[3], -(-vw // s) - x0 // s)
                _copy_padded(features[k][i], self.features[k][p, :, y0 // s: y0 // s + fh, x0 // s: x0 // s + fw], 0)
        if staged:
            return self._to_device(features, labels, positions)
        if self.spec.dtype == "uint8":
            index = torch.as_tensor(positions, device=self.home)
            for k in self.names:
                features[k].mul_(self.scales[k][index][:, :, None, None])
        return features, labels

    def _boxes(self, positions, epoch: int):
        """Each item's crop corner and the batch's (H, W): the crop, or the (equal) valid size."""
        if self.crop:
            boxes = [aligned_crop_box(tuple(self.valid[p]), self.crop,
                                      np.random.default_rng([self.seed, epoch, int(self.views[p])]))
                     for p in positions]
            return boxes, self.crop
        sizes = {tuple(int(x) for x in self.valid[p]) for p in positions}
        if len(sizes) > 1:
            raise UserError(f"cached views have different sizes {sorted(sizes)} and cannot be batched; "
                            "pass --crop HxW (a multiple of 32) or --batch-size 1.")
        return [(0, 0)] * len(positions), sizes.pop()

    def _to_device(self, features, labels, positions):
        """Copy (non-blocking from pinned memory) and decode on the device: float32 maps, int64 labels."""
        fmt = memory_format(self.device)
        out = {}
        for k, t in features.items():
            t = t.to(self.device, non_blocking=True)
            if self.spec.dtype == "uint8":
                scale = self.scales[k][torch.as_tensor(positions)].to(self.device, non_blocking=True)
                t = t.float() * scale[:, :, None, None]
            else:
                t = t.float()
            out[k] = t.contiguous(memory_format=fmt)
        return out, labels.to(self.device, non_blocking=True).long()


def _copy_padded(dst: torch.Tensor, src: torch.Tensor, fill) -> None:
    """``dst[..., :h, :w] = src`` (converting its dtype) and ``fill`` in the rest of ``dst``'s last two dims."""
    h, w = src.shape[-2:]
    dst[..., :h, :w].copy_(src)
    if h < dst.shape[-2]:
        dst[..., h:, :].fill_(fill)
    if w < dst.shape[-1]:
        dst[..., :h, w:].fill_(fill)


def _as_tensor(stored: np.ndarray, dtype: str) -> torch.Tensor:
    """A stored map as a tensor of the resident dtype (bfloat16 is kept as its bit pattern)."""
    if dtype == "bfloat16":
        return torch.from_numpy(np.ascontiguousarray(stored).view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(np.ascontiguousarray(stored))
