"""Device placement: CUDA with bf16 autocast, channels_last and pinned memory; plain fp32 on CPU.

On CPUs without AVX-512/AMX, bf16 autocast is many times slower than fp32, so AMP is
enabled on CUDA only.
"""
from __future__ import annotations

import contextlib

import torch

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


def autocast(device: torch.device):
    """bf16 autocast on CUDA, a no-op elsewhere."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def memory_format(device: torch.device) -> torch.memory_format:
    return torch.channels_last if device.type == "cuda" else torch.contiguous_format


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Copy to ``device`` (non-blocking from pinned memory), channels_last for 4-D tensors on CUDA."""
    t = t.to(device, non_blocking=True)
    if t.dim() == 4:
        t = t.contiguous(memory_format=memory_format(device))
    return t
