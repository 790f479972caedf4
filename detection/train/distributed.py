"""torchrun / DDP helpers: process-group set-up from torchrun's environment, rank queries,
and the sampler that makes data order a function of (seed, epoch) on any number of ranks."""
from __future__ import annotations

import os
from typing import Iterator

import torch
import torch.distributed as dist


def init_from_env(device_type: str) -> tuple[int, int, int]:
    """Join the process group torchrun describes (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_*).

    Backend: nccl for CUDA, gloo for CPU. Returns (rank, world_size, local_rank); (0, 1, 0)
    without torchrun.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return 0, 1, 0
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        backend = "nccl" if device_type == "cuda" else "gloo"
        if device_type == "cuda":
            torch.cuda.set_device(local_rank)
        dist.init_process_group(backend=backend, rank=rank, world_size=world_size)
    return rank, world_size, local_rank


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main() -> bool:
    return rank() == 0


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def cleanup() -> None:
    if is_distributed():
        dist.destroy_process_group()


class EpochSampler(torch.utils.data.Sampler[int]):
    """Shuffled indices for one epoch: permutation of range(n) drawn from (seed, epoch), padded
    by wrapping to a multiple of num_replicas, every num_replicas-th taken from `rank`
    (DistributedSampler's split), then the first `skip` of this rank's indices dropped
    (resume mid-epoch). With num_replicas=1 it is a plain seeded shuffle.
    """

    def __init__(self, length: int, seed: int, epoch: int = 0, rank: int = 0, num_replicas: int = 1,
                 shuffle: bool = True, skip: int = 0) -> None:
        if length <= 0:
            raise ValueError("cannot sample from an empty dataset")
        self.length, self.seed, self.epoch = length, int(seed), int(epoch)
        self.rank, self.num_replicas, self.shuffle, self.skip = rank, num_replicas, shuffle, int(skip)

    def indices(self) -> list[int]:
        if self.shuffle:
            generator = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
            order = torch.randperm(self.length, generator=generator).tolist()
        else:
            order = list(range(self.length))
        per_rank = -(-self.length // self.num_replicas)
        total = per_rank * self.num_replicas
        order = (order * (-(-total // self.length)))[:total]
        return order[self.rank:total:self.num_replicas]

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices()[self.skip:])

    def __len__(self) -> int:
        return max(0, -(-self.length // self.num_replicas) - self.skip)


def sync_buffers(module: torch.nn.Module) -> None:
    """Broadcast every buffer from rank 0 (e.g. batch-norm statistics, which each rank updates
    from its own batch after DDP's per-forward broadcast), so all ranks hold identical state."""
    if not is_distributed():
        return
    for buffer in module.buffers():
        dist.broadcast(buffer.data, src=0)
