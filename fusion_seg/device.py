"""Device placement and precision: CUDA with bf16 autocast, channels_last and pinned memory; fp32 on CPU.

``--precision`` (extract, train-decoder, evaluate, predict) is ``auto``, ``fp32`` or ``bf16``. ``auto`` is bf16
autocast on CUDA and fp32 elsewhere: on CPUs without AVX-512 BF16/AMX, bf16 is many times slower than fp32,
and where it is supported (this project's CPU) it was measured (BENCHMARKS.md, "Deploying") before being
offered, not made the default. ``bf16`` on the CPU is torch's CPU autocast (oneDNN's bf16 kernels).
"""
from __future__ import annotations

import contextlib

import torch

from fusion_seg.checks import PRECISIONS
from fusion_seg.errors import UserError


def resolve_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise UserError(f"--device {name!r} is not a device; use auto, cpu, cuda or cuda:N.") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {name} requested but CUDA is not available here; use --device cpu.")
    return device


def resolve_precision(device: torch.device, precision: str = "auto") -> str:
    """``fp32`` or ``bf16``: what ``precision`` means on ``device`` (auto: bf16 on CUDA, fp32 elsewhere)."""
    if precision not in PRECISIONS:
        raise UserError(f"--precision {precision!r}: choose one of {', '.join(PRECISIONS)}.")
    if precision == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    return precision


def autocast(device: torch.device, precision: str = "auto"):
    """bf16 autocast where ``precision`` resolves to bf16 on ``device`` (:func:`resolve_precision`), else a no-op."""
    if resolve_precision(device, precision) == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def memory_format(device: torch.device) -> torch.memory_format:
    return torch.channels_last if device.type == "cuda" else torch.contiguous_format


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Copy to ``device`` (non-blocking from pinned memory), channels_last for 4-D tensors on CUDA."""
    t = t.to(device, non_blocking=True)
    if t.dim() == 4:
        t = t.contiguous(memory_format=memory_format(device))
    return t
