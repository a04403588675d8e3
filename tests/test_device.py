"""fusion_seg.device: which device, and how tensors and models are placed on it."""
from __future__ import annotations

import pytest
import torch

from fusion_seg.device import autocast, memory_format, resolve_device, to_device
from fusion_seg.errors import UserError

CPU = torch.device("cpu")
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def test_cpu_is_the_cpu():
    assert resolve_device("cpu") == CPU
    assert resolve_device("cpu:0").type == "cpu"


def test_auto_is_cuda_when_there_is_one_else_cpu():
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_device() == resolve_device("auto")


def test_auto_without_cuda_is_cpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == CPU


@pytest.mark.parametrize("name", ["cuda", "cuda:0", "cuda:1"])
def test_cuda_without_cuda_is_a_user_error_that_says_what_to_use(monkeypatch, name):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(UserError, match=f"--device {name} requested but CUDA is not available here; use --device cpu"):
        resolve_device(name)


@pytest.mark.parametrize("name", ["gpu", "bad", "cuda:x"])
def test_an_unknown_device_name_is_a_user_error(name):
    with pytest.raises(UserError, match=name):
        resolve_device(name)


def test_autocast_is_a_no_op_on_cpu():
    a, b = torch.randn(4, 8), torch.randn(8, 3)
    with autocast(CPU):
        assert not torch.is_autocast_enabled("cpu")
        out = a @ b
    assert out.dtype == torch.float32
    assert torch.equal(out, a @ b)


@needs_cuda
def test_autocast_is_bf16_on_cuda():
    device = torch.device("cuda")
    a, b = torch.randn(4, 8, device=device), torch.randn(8, 3, device=device)
    with autocast(device):
        assert (a @ b).dtype == torch.bfloat16


def test_memory_format_is_contiguous_on_cpu_and_channels_last_on_cuda():
    assert memory_format(CPU) == torch.contiguous_format
    assert memory_format(torch.device("cuda")) == torch.channels_last  # decided by the type alone, no CUDA needed


@pytest.mark.parametrize("shape", [(5,), (3, 4), (2, 3, 4), (2, 3, 4, 5)])
def test_to_device_on_cpu_keeps_values_dtype_and_layout(shape):
    t = torch.arange(torch.Size(shape).numel(), dtype=torch.float32).reshape(shape)
    out = to_device(t, CPU)
    assert out.device == CPU and out.dtype == t.dtype and torch.equal(out, t)
    assert out.is_contiguous()


def test_to_device_on_cpu_makes_a_channels_last_batch_contiguous():
    t = torch.randn(2, 3, 4, 5).contiguous(memory_format=torch.channels_last)
    out = to_device(t, CPU)
    assert out.is_contiguous() and torch.equal(out, t)


@needs_cuda
def test_to_device_on_cuda_is_channels_last_for_batches_only():
    device = torch.device("cuda")
    batch = to_device(torch.randn(2, 3, 4, 5).pin_memory(), device)
    labels = to_device(torch.zeros(2, 4, 5, dtype=torch.int64), device)
    assert batch.device.type == "cuda" and batch.is_contiguous(memory_format=torch.channels_last)
    assert labels.device.type == "cuda" and labels.is_contiguous()
