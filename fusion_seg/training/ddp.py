"""Several training processes, one decoder: torch.distributed set up from torchrun's environment.

``torchrun`` starts one process per GPU (or per CPU slot) and tells each its place
in ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK``. :func:`session` joins the process
group it describes (NCCL on CUDA, each process on ``cuda:LOCAL_RANK``; gloo on CPU)
and leaves it again, also on errors. Without that environment it yields a
single-process :class:`DistEnv` and touches nothing, so the same code runs either way.
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Iterator

import torch
import torch.distributed as dist

from fusion_seg.errors import UserError

# Rank 0 validates and writes checkpoints alone while the others wait at a barrier;
# NCCL's default timeout (10 min) could expire on a large validation set.
TIMEOUT = timedelta(minutes=60)


@dataclass(frozen=True)
class DistEnv:
    """Where this process stands: its rank among ``world`` processes and its device."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def is_main(self) -> bool:
        """Rank 0: the process that writes checkpoints, logs and the progress bar."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world > 1

    def local_batch(self, global_batch: int) -> int:
        """This process's share of the global batch (``--batch-size`` is the global batch)."""
        if global_batch % self.world:
            raise UserError(f"--batch-size {global_batch} is the global batch and must divide evenly among the "
                            f"{self.world} processes; use a multiple of {self.world}.")
        return global_batch // self.world

    def mean(self, value: torch.Tensor) -> float:
        """The mean of a scalar over all processes (the value itself in a single process)."""
        if not self.distributed:
            return float(value.detach())
        t = value.detach().float().reshape(1).to(self.device)
        dist.all_reduce(t)
        return float(t) / self.world

    def from_main(self, flag: bool) -> bool:
        """Rank 0's ``flag``, in every process (the flag itself in a single process)."""
        if not self.distributed:
            return flag
        t = torch.tensor([float(flag) if self.is_main else 0.0], device=self.device)
        dist.all_reduce(t)
        return bool(t.item())

    def barrier(self) -> None:
        """Wait for every process (nothing to wait for in a single process)."""
        if self.distributed:
            dist.barrier()


def launched_by_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def torchrun_world() -> int:
    """The number of processes torchrun started (1 when not launched by torchrun)."""
    return int(os.environ["WORLD_SIZE"]) if launched_by_torchrun() else 1


def is_main_process() -> bool:
    """Rank 0, or not launched by torchrun; for output a command prints once."""
    return int(os.environ.get("RANK", "0")) == 0


def init_from_env(device: torch.device) -> DistEnv:
    """Join the process group torchrun describes; a single-process env when there is none.

    On CUDA each process takes ``cuda:LOCAL_RANK`` and NCCL; on CPU, gloo.
    """
    if not launched_by_torchrun():
        return DistEnv(device=device)
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise UserError(f"LOCAL_RANK {local_rank} but this node has {torch.cuda.device_count()} GPU(s); "
                            "start at most one process per GPU (torchrun --nproc_per_node).")
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        if device.type == "cuda":
            dist.init_process_group("nccl", timeout=TIMEOUT, device_id=device)
        else:
            dist.init_process_group("gloo", timeout=TIMEOUT)
    return DistEnv(rank=rank, world=world, local_rank=local_rank, device=device)


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


@contextlib.contextmanager
def session(device: torch.device) -> Iterator[DistEnv]:
    """:func:`init_from_env` for the duration of a ``with`` block; the group is destroyed on
    exit (also on errors) unless it existed before (a caller's own process group)."""
    owned = not (dist.is_available() and dist.is_initialized())
    env = init_from_env(device)
    try:
        yield env
    finally:
        if owned:
            shutdown()


def check_sync_bn(sync_bn: bool, env: DistEnv) -> None:
    """torch's SyncBatchNorm refuses CPU tensors in training (``nn.SyncBatchNorm.forward``)."""
    if sync_bn and env.distributed and env.device.type == "cpu":
        raise UserError("--sync-bn needs CUDA: torch's SyncBatchNorm does not run on CPU. Drop --sync-bn "
                        "(each process then normalises over its own share of the batch) or train on GPUs.")
