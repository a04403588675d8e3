"""Resident feature caches: a store decoded once into memory, then batches cut by indexing.

Where a training step reads its features from (``--cache-mode``):

- ``stream``: DataLoader workers read, decompress and crop every view every epoch (reader.py).
  Costs 20-40 ms of CPU a view: on a GPU that outruns the encoder it would replace.
- ``ram``: every view the decoder reads is decompressed once into host memory (pinned on CUDA);
  a batch is cut there and copied to the device with ``non_blocking``.
- ``device``: the same, held in device memory (on CPU that is RAM): a batch is cut on the device.
- ``auto`` (the default): the fastest tier that fits. Only the arrays the decoder reads (its
  strides) and the labels are held.

How the views are held is their resident format (``--resident-dtype``, formats.py): float16 (the
store's own 16-bit values), uint8, float8 or int4, whatever the store's dtype; the codes are decoded
per batch, on the device, on the cells the batch's crop cut. int4's scales and offsets are one set a
channel for all the views held (under torchrun: this process's shard), found by a first read of them.
``auto`` takes the most precise format that fits, trying the tiers in order for each format before a
less precise one. Validation views are held as stored (they measure what the model does on the
encoder's own features).

A tier that does not fit is refused before anything is loaded, naming the sizes and the
alternatives. Crops are those of the stream tier (the same ``aligned_crop_box`` draws from
``rng([seed, epoch, view])``) and batches are drawn by the same seeded sampler, so with the
same seed every tier gives the same losses (tested); held in a lossy format (uint8 from a 16-bit
store, float8, int4), the device and ram tiers give the same batches as each other.

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

from fusion_seg.cache import formats
from fusion_seg.cache.store import VIEW_FIELDS, FeatureStore
from fusion_seg.cache.reader import aligned_crop_box
from fusion_seg.checks import CACHE_MODES, require_feature_crop
from fusion_seg.device import memory_format
from fusion_seg.errors import UserError

# What a resident cache may take of the free memory: the rest stays for the training step,
# the allocator's fragmentation and (host) the page cache and other processes.
MEMORY_FRACTION = 0.8
DEVICE_RESERVE = 2 * 2**30   # CUDA memory left for the decoder's step on top of the fraction
HOST_RESERVE = 1 * 2**30     # host memory left for the process itself



def gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB"


# --------------------------------------------------------------------------- sizes and the choice
def stored_format(spec) -> str:
    """The format that holds a store's views as stored: float16 (or bfloat16) stores as float16, uint8 as uint8."""
    return "uint8" if spec.dtype == "uint8" else "float16"


def resident_bytes(spec, names: list[str], views: int, fmt: str | None = None) -> int:
    """Bytes that ``views`` views of a store take in memory: the maps ``names`` in the resident format ``fmt``
    (None: as stored) with their scales and offsets (a view's, or int4's one set for all views), and the
    uint8 labels (arrays are sized for the store's largest view)."""
    fmt = fmt or stored_format(spec)
    shapes = [tuple(spec.feature_shapes[n]) for n in names]
    per_view = math.prod(spec.label_shape) + formats.view_bytes(fmt, spec.dtype, shapes)  # + uint8 labels
    return per_view * views + (formats.store_bytes(fmt, spec.dtype, shapes) if views else 0)


def format_bytes(spec, names: list[str], views: int, resident: str = "auto") -> dict[str, int]:
    """``{format: bytes}`` of ``views`` views in each format ``--resident-dtype resident`` allows (auto: every
    format the store can be held in, most precise first); refuses a format the store cannot be held in."""
    if resident != "auto":
        formats.check_format(resident, spec.dtype)
        return {resident: resident_bytes(spec, names, views, resident)}
    return {fmt: resident_bytes(spec, names, views, fmt) for fmt in formats.formats_for(spec.dtype)}


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
    """Where the training (and validation) views will be read from, in which resident format, and why."""

    requested: str
    mode: str                 # device, ram or stream
    train_bytes: int          # resident size of this process's training views, in ``format``
    val_bytes: int            # resident size of the validation views (0: none, or streamed)
    val_resident: bool
    budgets: dict             # {"device": bytes, "ram": bytes} usable by each tier
    where: str                # "cuda:0", "host RAM (pinned)", ...
    reason: str
    format: str | None = None       # the resident format (formats.py); None when streamed
    requested_format: str = "auto"  # --resident-dtype
    format_bytes: dict | None = None  # {format: training bytes} of every format considered

    def describe(self) -> str:
        sizes = f"train {gib(self.train_bytes)}" + (f" + val {gib(self.val_bytes)}" if self.val_bytes else "")
        held = ""
        if self.format:
            requested = "auto" if self.requested_format == "auto" else "requested"
            others = [f"{f} {gib(b)}" for f, b in (self.format_bytes or {}).items() if f != self.format]
            held = f", resident {self.format} ({requested}" + (f"; {', '.join(others)}" if others else "") + ")"
        return (f"cache mode {self.mode} ({'auto' if self.requested == 'auto' else 'requested'}){held}: {sizes}; "
                f"{self.reason}")


def _where(mode: str, device: torch.device) -> str:
    """Where a tier holds the views: the GPU, pinned host RAM, or (the device being the CPU) RAM."""
    if device.type != "cuda":
        return "RAM"
    return str(device) if mode == "device" else "pinned host RAM"


def choose_tier(requested: str, train_bytes: int | dict, val_bytes: int, device: torch.device,
                free: dict | None = None, local_processes: int = 1, resident: str = "auto") -> TierChoice:
    """The tier for ``--cache-mode requested`` and the resident format for ``--resident-dtype resident``:
    refused before loading when they do not fit.

    ``train_bytes`` is ``{format: bytes}`` of the training views in each format to consider, most precise
    first (:func:`format_bytes`), or one size (the store's own format). ``auto`` takes, for the most
    precise format first, the ``device`` tier, else ``ram``: the first whose budget holds the training
    views (and the validation views too, else those are streamed); when no format fits anywhere,
    ``stream``. ``local_processes`` processes of this node share its host RAM (torchrun), each holding
    its own shard.
    """
    if requested not in CACHE_MODES:
        raise UserError(f"--cache-mode {requested!r}: choose one of {', '.join(CACHE_MODES)}.")
    sizes = dict(train_bytes) if isinstance(train_bytes, dict) else {None: int(train_bytes)}
    free = free if free is not None else available_memory(device)
    share = {"device": free["device"] // (local_processes if device.type != "cuda" else 1),
             "ram": free["ram"] // local_processes}
    budgets = {m: budget(m, share[m], device) for m in ("device", "ram")}
    keep = dict(requested_format=resident, format_bytes=sizes if None not in sizes else None)
    if requested == "stream":
        if resident != "auto":
            raise UserError(f"--resident-dtype {resident} sets how the device and ram tiers hold the views; "
                            "--cache-mode stream reads them from the store as stored. Drop one of the two.")
        return TierChoice(requested, "stream", next(iter(sizes.values())), 0, False, budgets, "disk",
                          "views are read from the store and decompressed every epoch, by --workers loader processes",
                          **keep)
    candidates = [requested] if requested != "auto" else ["device", "ram"]
    if device.type != "cuda" and requested == "auto":
        candidates = ["device"]  # on CPU, ram and device are the same memory; device needs no copy
    for fmt, train in sizes.items():
        for mode in candidates:
            if train + val_bytes <= budgets[mode]:
                return TierChoice(requested, mode, train, val_bytes, val_bytes > 0, budgets, _where(mode, device),
                                  f"fits in {_where(mode, device)} ({gib(budgets[mode])} usable of "
                                  f"{gib(share[mode])} free){_less_precise(sizes, fmt, budgets, candidates)}",
                                  fmt, **keep)
        for mode in candidates:
            if train <= budgets[mode]:
                return TierChoice(requested, mode, train, 0, False, budgets, _where(mode, device),
                                  f"training views fit in {_where(mode, device)} ({gib(budgets[mode])} usable); "
                                  f"validation ({gib(val_bytes)}) is streamed"
                                  f"{_less_precise(sizes, fmt, budgets, candidates)}", fmt, **keep)
    smallest = min(sizes.values())
    if requested == "auto":
        return TierChoice(requested, "stream", smallest, 0, False, budgets, "disk",
                          f"{_sizes(sizes)} does not fit in memory (usable: device {gib(budgets['device'])}, "
                          f"host RAM {gib(budgets['ram'])}): streaming from the store. On a GPU the encoder may "
                          "then be faster than the cache: see `fusion-seg plan`.", **keep)
    others = [m for m in ("device", "ram") if m != requested and smallest <= budgets[m]]
    fixes = [f"--cache-mode {m} (fits)" for m in others] + ["--cache-mode stream", "fewer views (--views K)"]
    if resident != "int4":
        fixes.append("a more compact --resident-dtype (int4: a quarter of float16)")
    train = next(iter(sizes.values())) if len(sizes) == 1 else smallest
    raise UserError(
        f"--cache-mode {requested} needs {gib(train + val_bytes)} (train {_sizes(sizes)}"
        + (f", val {gib(val_bytes)}" if val_bytes else "") + f") in {_where(requested, device)}, but only "
        f"{gib(budgets[requested])} is usable ({gib(share[requested])} free, keeping "
        f"{int((1 - MEMORY_FRACTION) * 100)}% and "
        f"{gib(DEVICE_RESERVE if requested == 'device' and device.type == 'cuda' else HOST_RESERVE)} for the "
        f"training step). Use " + ", ".join(fixes) + "."
    )


def _sizes(sizes: dict) -> str:
    """``4.10 GiB`` (one format), or each: ``float16 16.40 GiB, uint8 8.20 GiB, ...``."""
    if len(sizes) == 1:
        return gib(next(iter(sizes.values())))
    return ", ".join(f"{fmt} {gib(b)}" for fmt, b in sizes.items())


def _less_precise(sizes: dict, chosen, budgets: dict, modes) -> str:
    """Why ``chosen`` and not a more precise format: those did not fit (an empty string when it is the first)."""
    before = [f for f in sizes if f is not None][: list(sizes).index(chosen)] if chosen is not None else []
    if not before:
        return ""
    usable = max(budgets[m] for m in modes)
    return f"; {', '.join(f'{f} ({gib(sizes[f])})' for f in before)} would not fit in {gib(usable)}"


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
                 rank: int = 0, world: int = 1, threads: int | None = None, progress: bool = True, echo=None,
                 fmt: str | None = None):
        if mode not in ("device", "ram"):
            raise ValueError(mode)
        store = FeatureStore.open(path)
        self.path, self.names, self.device, self.mode = str(path), list(names), device, mode
        self.spec = store.spec
        self.fmt = fmt or stored_format(self.spec)  # the resident format (formats.py)
        formats.check_format(self.fmt, self.spec.dtype, str(path))
        self.crop = tuple(crop) if crop else None
        require_feature_crop(self.crop)
        self.seed = seed
        self.all_views = store.usable_views(max_views_per_image)
        self.views = shard(self.all_views, rank, world)
        self.strides = {n: s.stride for n, s in self.spec.input_shapes().items()}
        self.home = device if mode == "device" else torch.device("cpu")
        self.pinned = mode == "ram" and device.type == "cuda"  # pinning needs CUDA
        self.staged = self.home != device  # batches are cut in host RAM, then copied to the device
        rows = store.rows()[self.views]
        self.valid = rows[:, [VIEW_FIELDS.index("valid_h"), VIEW_FIELDS.index("valid_w")]].astype(np.int64)
        self.nbytes = resident_bytes(self.spec, self.names, len(self.views), self.fmt)
        self.load_seconds = self._load(store, threads, progress)
        if echo is not None:
            echo(f"loaded {len(self.views)} views ({gib(self.nbytes)}, {self.fmt}) into {_where(mode, device)} in "
                 f"{self.load_seconds:.1f}s ({self.nbytes / 1e9 / max(self.load_seconds, 1e-9):.2f} GB/s)")

    def __len__(self) -> int:
        return len(self.views)

    def _empty(self, shape, dtype) -> torch.Tensor:
        return torch.empty(shape, dtype=dtype, device=self.home, pin_memory=self.pinned)

    def _load(self, store: FeatureStore, threads: int | None, progress: bool) -> float:
        """Read every view and hold it in the resident format, in parallel (zarr, its codecs and the
        quantisation's tensor ops release the GIL), showing progress; int4 reads the views twice, first for
        the store's channel ranges (:meth:`_store_ranges`)."""
        from fusion_seg.progress import Progress

        n, spec, fmt = len(self.views), self.spec, self.fmt
        t0 = time.perf_counter()
        workers = threads or min(16, 2 * (os.cpu_count() or 1))
        name = os.path.basename(self.path.rstrip('/'))
        self.per_store = formats.ranges_per_store(fmt)  # one scale and offset a channel for all views (int4)
        ranges = self._store_ranges(store, workers, progress, name) if self.per_store else {}
        self.features, self.scales, self.offsets = {}, {}, {}
        for k in self.names:
            c, h, w = spec.feature_shapes[k]
            self.features[k] = self._empty((n, formats.data_channels(fmt, c), h, w), formats.data_dtype(fmt, spec.dtype))
            if self.per_store:  # the store's, the same for every view: held once (no views: zeros, never read)
                lo_hi = ranges.get(k, (torch.zeros(c), torch.zeros(c)))
                self.scales[k], self.offsets[k] = (self._empty((c,), torch.float32).copy_(t)
                                                   for t in formats.scale_and_offset(fmt, *lo_hi))
                continue
            if formats.has_scale(fmt, spec.dtype):
                self.scales[k] = self._empty((n, c), torch.float32)
            if formats.has_offset(fmt, spec.dtype):
                self.offsets[k] = self._empty((n, c), torch.float32)
        self.labels = self._empty((n, *spec.label_shape), torch.uint8)

        def load(j: int) -> None:
            v = int(self.views[j])
            features, scales, labels = store.read_stored_view(v, self.names)
            vh, vw = (int(x) for x in self.valid[j])
            for i, k in enumerate(self.names):
                s = self.strides[k]
                codes, scale, offset = formats.encode(fmt, spec.dtype, features[k], scales.get(k),
                                                      (-(-vh // s), -(-vw // s)), (self.seed, v, i), ranges.get(k))
                self.features[k][j].copy_(codes)
                if not self.per_store:
                    for side, t in ((self.scales, scale), (self.offsets, offset)):
                        if t is not None:
                            side[k][j].copy_(t)
            self.labels[j].copy_(torch.from_numpy(np.asarray(labels, dtype=np.uint8)))

        with ThreadPoolExecutor(max_workers=workers) as pool, \
                Progress(n, f"load {name} -> {self.mode} ({fmt})", "view", enabled=progress) as bar:
            for _ in pool.map(load, range(n)):
                bar.update(1)
        if self.home.type == "cuda":
            torch.cuda.synchronize(self.home)
        return time.perf_counter() - t0

    def _store_ranges(self, store: FeatureStore, workers: int, progress: bool, name: str) -> dict[str, tuple]:
        """int4's ranges: each map's per-channel minimum and maximum over the valid cells of every view held, from a
        first read of the views (formats.channel_ranges), so that one scale and offset a channel serve all."""
        from fusion_seg.progress import Progress

        def scan(j: int) -> list:
            features, scales, _labels = store.read_stored_view(int(self.views[j]), self.names)
            vh, vw = (int(x) for x in self.valid[j])
            return [formats.channel_ranges(features[k], self.spec.dtype, scales.get(k),
                                           (-(-vh // self.strides[k]), -(-vw // self.strides[k]))) for k in self.names]

        lo, hi = {}, {}
        with ThreadPoolExecutor(max_workers=workers) as pool, \
                Progress(len(self.views), f"scan {name} for int4's channel ranges", "view", enabled=progress) as bar:
            for found in pool.map(scan, range(len(self.views))):
                for k, (a, b) in zip(self.names, found):
                    lo[k] = torch.minimum(lo[k], a) if k in lo else a
                    hi[k] = torch.maximum(hi[k], b) if k in hi else b
                bar.update(1)
        return {k: (lo[k], hi[k]) for k in lo}

    def _side(self, side: dict, k: str, index):
        """Map ``k``'s scales (or offsets) for the views at ``index`` (positions, or one position): held a view each,
        or (int4) one set for all views, expanded to the batch; None where the format has none."""
        if k not in side:
            return None
        if not self.per_store:
            return side[k][index]
        t = side[k]
        return t if isinstance(index, int) else t.expand(len(index), -1)

    # ----------------------------------------------------------------- batches
    def batch(self, positions, epoch: int = 0) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """Features (float32) and labels (int64) of the views at ``positions`` (indices into this
        shard), on the device; crops drawn as the stream tier draws them.

        Each item's cells are cut in the resident format, padded to the batch's size, into one compact
        batch (in pinned host RAM for the ram tier on CUDA, then copied to the device: a fraction of the
        float32 bytes); that batch is decoded on the device (:func:`fusion_seg.cache.formats.decode`), so
        both tiers give the same batches. Padding decodes to 0 in the features and the ignore index in
        the labels, as the stream tier pads.
        """
        boxes, (oh, ow) = self._boxes(positions, epoch)
        if not self.staged and self.device.type == "cpu":
            return self._batch_in_place(positions, boxes, (oh, ow))
        b = len(positions)
        where = dict(device=self.home, pin_memory=self.pinned)
        labels = torch.empty((b, oh, ow), dtype=torch.uint8, **where)
        compact, extents = {}, {k: [] for k in self.names}
        for k in self.names:
            s = self.strides[k]
            compact[k] = torch.empty((b, self.features[k].shape[1], -(-oh // s), -(-ow // s)),
                                     dtype=self.features[k].dtype, **where)
        for i, (p, (y0, x0)) in enumerate(zip(positions, boxes)):
            label_cells, codes = self._cells(p, y0, x0, (oh, ow))
            _copy_padded(labels[i], label_cells, self.spec.ignore_index)
            for k in self.names:
                _copy_padded(compact[k][i], codes[k], 0)
                extents[k].append(tuple(codes[k].shape[-2:]))
        index = torch.as_tensor(positions, device=self.home)
        fmt = memory_format(self.device)
        features = {}
        for k in self.names:
            side = [self._side(t, k, index) for t in (self.scales, self.offsets)]
            side = [None if t is None else self._on_device(t) for t in side]
            x = formats.decode(self.fmt, self._on_device(compact[k]), *side, self.spec.feature_shapes[k][0])
            for i, (fh, fw) in enumerate(extents[k]):  # an offset decodes the padding's zero codes to the offset
                if fh < x.shape[2] or fw < x.shape[3]:
                    x[i, :, fh:, :] = 0
                    x[i, :, :, fw:] = 0
            features[k] = x.contiguous(memory_format=fmt)
        return features, self._on_device(labels).long()

    def _batch_in_place(self, positions, boxes, size) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """:meth:`batch` on a CPU: each item's cells decoded straight into the float32 batch, in place
        (:func:`fusion_seg.cache.formats.decode_into`: the same operations as :func:`decode`, so the same
        values), without the compact batch and the batch-sized temporaries that a device's few large kernels
        want and a CPU's memory bandwidth pays for."""
        (oh, ow), b = size, len(positions)
        labels = torch.empty((b, oh, ow), dtype=torch.uint8)
        features = {k: torch.empty((b, self.spec.feature_shapes[k][0], -(-oh // self.strides[k]),
                                    -(-ow // self.strides[k])), dtype=torch.float32) for k in self.names}
        for i, (p, (y0, x0)) in enumerate(zip(positions, boxes)):
            label_cells, codes = self._cells(p, y0, x0, (oh, ow))
            _copy_padded(labels[i], label_cells, self.spec.ignore_index)
            for k in self.names:
                out, (fh, fw) = features[k][i], codes[k].shape[-2:]
                formats.decode_into(self.fmt, out[:, :fh, :fw], codes[k], self._side(self.scales, k, int(p)),
                                    self._side(self.offsets, k, int(p)))
                if fh < out.shape[1]:
                    out[:, fh:, :].zero_()
                if fw < out.shape[2]:
                    out[:, :fh, fw:].zero_()
        return features, labels.long()

    def _cells(self, p: int, y0: int, x0: int, size) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """View ``p``'s cells under a crop of ``size`` at ``(y0, x0)``: its labels, and each map's codes, cut as the
        stream tier cuts (a map first to the view's valid cells, ceil(valid / stride), then to the crop)."""
        (oh, ow), (vh, vw) = size, (int(x) for x in self.valid[p])
        codes = {}
        for k in self.names:
            s = self.strides[k]
            fh = min(-(-oh // s), -(-vh // s) - y0 // s)
            fw = min(-(-ow // s), -(-vw // s) - x0 // s)
            codes[k] = self.features[k][p, :, y0 // s: y0 // s + fh, x0 // s: x0 // s + fw]
        return self.labels[p, y0:y0 + min(oh, vh - y0), x0:x0 + min(ow, vw - x0)], codes

    def _on_device(self, t: torch.Tensor) -> torch.Tensor:
        """``t`` on the training device: copied (non-blocking from pinned memory) when it is held elsewhere."""
        return t.to(self.device, non_blocking=True) if self.staged else t

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

def _copy_padded(dst: torch.Tensor, src: torch.Tensor, fill) -> None:
    """``dst[..., :h, :w] = src`` (converting its dtype) and ``fill`` in the rest of ``dst``'s last two dims."""
    h, w = src.shape[-2:]
    dst[..., :h, :w].copy_(src)
    if h < dst.shape[-2]:
        dst[..., h:, :].fill_(fill)
    if w < dst.shape[-1]:
        dst[..., :h, w:].fill_(fill)
