"""What every benchmark section shares: settings, memory, test images and the training step.

Timing is :func:`fusion_seg.reports.timing.median_seconds`, shared with ``compare``.
"""
from __future__ import annotations

import multiprocessing
from concurrent.futures import ProcessPoolExecutor
import os
import platform
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

DEFAULT_CAMVID = "../shared/data/camvid"


@dataclass
class BenchConfig:
    """One benchmark run: every comparison inside it uses these settings."""

    device: str = "cpu"
    encoder: str = "resnet50"
    seed: int = 0                      # the encoder is a seeded random-init one unless weights are given
    weights: str | None = None
    decoder: str = "reverse-hrnet"
    # The decoder's options (None: the reverse HRNet's small preset with 4 streams, another decoder's defaults).
    decoder_config: dict | None = None
    batch_size: int = 2
    size: tuple[int, int] = (360, 480)  # (H, W) of the images of the main comparisons (CamVid's)
    camvid: str | None = DEFAULT_CAMVID  # real images when this folder exists, synthetic otherwise
    views: int = 32                    # views extracted and read in the extraction/loader sections
    repeats: int = 5                   # timed repetitions; the median is quoted
    warmup: int = 2
    scaling_sizes: tuple[tuple[int, int], ...] = ((360, 480), (720, 960), (1024, 2048))
    forward_sizes: tuple[tuple[int, int], ...] = ((360, 480), (512, 1024))  # bare encoder forward sizes (H, W)
    loader_workers: int = 2            # the DataLoader default of train-decoder
    workdir: str | None = None         # scratch stores; a temporary folder by default

    def __post_init__(self):
        if self.decoder_config is None:
            self.decoder_config = {"preset": "small", "streams": 4} if self.decoder == "reverse-hrnet" else {}

    def to_json(self) -> dict:
        return asdict(self)


def synchronizer(device: torch.device):
    return (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else None


def rss_mib() -> float:
    """Current resident set size of this process."""
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def child_pids() -> list[str]:
    """The live child processes of this one, e.g. DataLoader workers (Linux /proc)."""
    return [pid for task in Path("/proc/self/task").glob("*/children") for pid in task.read_text().split()]


def children_peak_rss_mib() -> list[float]:
    """Peak RSS (VmHWM) of each live child process, e.g. DataLoader workers (pages shared with the parent count in both)."""
    peaks = []
    for pid in child_pids():
        try:
            status = Path(f"/proc/{pid}/status").read_text()
        except OSError:
            continue
        for line in status.splitlines():
            if line.startswith("VmHWM:"):
                peaks.append(int(line.split()[1]) / 1024)
    return peaks


def reset_peak_memory(device: torch.device) -> None:
    """Count the peak afresh from what is live now (a model, its data, a resident store), so that what a
    mode's setup touched and freed (building a model, reading a store) does not stand for its step's peak:
    CUDA's allocator peak, or on a CPU the kernel's VmHWM (``/proc/self/clear_refs``, Linux)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass  # the peak is then the process's since it started


def peak_memory(device: torch.device) -> dict:
    """Peak memory since :func:`reset_peak_memory` (or the start): CUDA's max allocated on GPU, the
    process's peak RSS (VmHWM) on CPU."""
    if device.type == "cuda":
        return {"kind": "cuda_max_allocated", "peak_MiB": torch.cuda.max_memory_allocated(device) / 2**20}
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return {"kind": "process_max_rss", "peak_MiB": int(line.split()[1]) / 1024}
    except OSError:
        pass
    from fusion_seg.training.hooks import peak_memory_mib

    return {"kind": "process_max_rss", "peak_MiB": peak_memory_mib(device)}


def run_isolated(fn, *args):
    """Run ``fn(*args)`` in a fresh spawned process, so its peak memory is its own; return its result."""
    # Not a multiprocessing.Pool: its daemonic workers could not start DataLoader workers.
    with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(fn, *args).result()


def machine() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {"cpu": cpu, "cores": os.cpu_count(), "torch": torch.__version__, "python": platform.python_version(),
            "torch_threads": torch.get_num_threads()}
    try:
        info["memory_GiB"] = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    except (ValueError, OSError):
        pass
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


# --------------------------------------------------------------------------- images
def dataset_args(cfg: BenchConfig, size: tuple[int, int], count: int) -> dict:
    """``extract()`` dataset arguments: CamVid train images resized to ``size``, or synthetic ones."""
    if cfg.camvid and Path(cfg.camvid).is_dir():
        return {"dataset": "camvid", "root": cfg.camvid, "split": "train", "size": tuple(size),
                "dataset_options": {"limit": count}}
    return {"dataset": "synthetic", "split": "train", "size": tuple(size),
            "dataset_options": {"num_images": count, "size": list(size)}}


def data_label(cfg: BenchConfig) -> str:
    return "CamVid train images" if cfg.camvid and Path(cfg.camvid).is_dir() else "synthetic images"


def images(cfg: BenchConfig, size: tuple[int, int], count: int, encoder) -> tuple[torch.Tensor, torch.Tensor]:
    """``count`` normalised images (N, 3, H, W) and label maps (N, H, W) at ``size``."""
    from fusion_seg.data.datasets import build_dataset
    from fusion_seg.data.transforms import resize_pair, to_tensor

    args = dataset_args(cfg, size, count)
    ds = build_dataset(args["dataset"], root=args.get("root"), split=args["split"], **args.get("dataset_options", {}))
    xs, ys = [], []
    for i in range(count):
        sample = ds[i % len(ds)]
        image, mask = resize_pair(sample.image, sample.mask, size=tuple(size))
        xs.append(to_tensor(image, encoder.identity.mean, encoder.identity.std))
        ys.append(torch.from_numpy(mask.astype(np.int64)))
    return torch.stack(xs), torch.stack(ys)


# --------------------------------------------------------------------------- models and the step
def build_frozen_encoder(cfg: BenchConfig):
    """The bench's encoder, running in the precision ``extract`` and ``--online`` use on its device (``auto``:
    bf16 autocast on CUDA, fp32 on a CPU)."""
    from fusion_seg.device import resolve_device, resolve_precision
    from fusion_seg.encoder.build import build_encoder

    if cfg.weights:
        encoder = build_encoder(cfg.encoder, weights_file=cfg.weights)
    else:
        encoder = build_encoder(cfg.encoder, random_init=True, seed=cfg.seed)
    return encoder.with_precision(resolve_precision(resolve_device(cfg.device)))


def decoder_for_store(cfg: BenchConfig, store: str):
    """The bench decoder, built from a store's feature shapes and classes as train-decoder builds it; and its inputs."""
    from fusion_seg.cache.store import FeatureStore
    from fusion_seg.decoders import build_decoder

    spec = FeatureStore.open(store).spec
    shapes = spec.input_shapes()
    torch.manual_seed(cfg.seed)
    decoder = build_decoder(cfg.decoder, shapes, len(spec.classes), **cfg.decoder_config)
    return decoder, decoder.in_features


def decoder_step(decoder, device: torch.device, extra_params=(), precision: str = "auto"):
    """The trainer's step (:class:`fusion_seg.training.step.TrainingStep`) with train-decoder's defaults (OHEM,
    SGD at lr 0.01, no decay over the few steps timed; ``--precision`` ``precision``), on ``decoder`` placed and
    in train mode as training places it (channels_last on CUDA)."""
    from fusion_seg.device import memory_format
    from fusion_seg.training.config import TrainConfig
    from fusion_seg.training.step import TrainingStep

    decoder = decoder.to(device).to(memory_format=memory_format(device)).train()
    return TrainingStep(decoder, TrainConfig(precision=precision), device, extra_params=extra_params)
