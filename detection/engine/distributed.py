"""torchrun helpers for prediction: who am I, wait for everyone, agree on a flag.

Prediction needs no gradient sync: ranks only need to (1) agree that the output folder is
usable, and (2) wait for each other before rank 0 merges. A gloo process group does both on
CPU and GPU machines alike (no tensors ever go through NCCL here).
"""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

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
        dist.all_reduce(value, op=dist.ReduceOp.MAX)
        return bool(value.item())

    def close(self) -> None:
        if self.initialized_here and dist.is_initialized():
            dist.destroy_process_group()


def init_from_env(timeout_hours: float = 24.0) -> DistContext:
    """Read RANK / WORLD_SIZE / LOCAL_RANK (torchrun) and start a gloo group if world > 1.

    The long timeout lets a rank with a light shard wait at the final barrier for the others.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if world_size <= 1:
        return DistContext()
    initialized_here = False
    if not dist.is_initialized():
        dist.init_process_group(backend="gloo", timeout=datetime.timedelta(hours=timeout_hours))
        initialized_here = True
    return DistContext(rank, world_size, local_rank, initialized_here)
