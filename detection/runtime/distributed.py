"""The one torchrun context shared by predict, eval and train: who am I, wait for everyone,
agree on a flag, gather results on rank 0.

Without torchrun (WORLD_SIZE unset or 1) every method is a cheap single-process no-op.
"""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist


@dataclass
class DistContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    initialized_here: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def any_true(self, flag: bool) -> bool:
        """True on every rank if `flag` is True on any rank."""
        if not self.enabled:
            return flag
        value = torch.tensor([1 if flag else 0], dtype=torch.int64)
        if dist.get_backend() == "nccl":
            value = value.cuda()
        dist.all_reduce(value, op=dist.ReduceOp.MAX)
        return bool(value.item())

    def gather_objects(self, obj: Any) -> list[Any]:
        """Every rank's `obj`, in rank order, on every rank (picklable objects)."""
        if not self.enabled:
            return [obj]
        gathered: list[Any] = [None] * self.world_size
        dist.all_gather_object(gathered, obj)
        return gathered

    def close(self) -> None:
        """Destroy the process group if this context created it."""
        if self.initialized_here and dist.is_initialized():
            dist.destroy_process_group()


def init_distributed(backend: str = "gloo", timeout_hours: float = 24.0) -> DistContext:
    """Read RANK / WORLD_SIZE / LOCAL_RANK (torchrun) and join the process group if world > 1.

    backend: "gloo" (prediction and evaluation exchange only small objects, on CPU or GPU
    machines alike) or "nccl" (training on CUDA; the local CUDA device is selected first).
    The long timeout lets a rank with a light shard wait at the final barrier for the others.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return DistContext()
    rank = int(os.environ["RANK"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    initialized_here = False
    if not dist.is_initialized():
        if backend == "nccl":
            torch.cuda.set_device(local_rank)
        dist.init_process_group(backend=backend, rank=rank, world_size=world_size,
                                timeout=datetime.timedelta(hours=timeout_hours))
        initialized_here = True
    return DistContext(rank, world_size, local_rank, initialized_here)
