"""Training-only DDP helpers: the sampler that makes data order a function of (seed, epoch) on
any number of ranks, and the buffer sync after each epoch (the process group: runtime.distributed)."""
from __future__ import annotations

from typing import Iterator

import torch
import torch.distributed as dist


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
    if not (dist.is_available() and dist.is_initialized()):
        return
    for buffer in module.buffers():
        dist.broadcast(buffer.data, src=0)
