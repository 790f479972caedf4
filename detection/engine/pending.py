"""The results of a predict run waiting for (or being written by) the writer threads, bounded by
count and by the bytes their arrays hold, so memory does not grow with image size or queue length.
"""
from __future__ import annotations

import dataclasses
from concurrent.futures import Future
from typing import Any

import numpy as np
import torch

#: Default bytes the pending results may hold (images and attention tensors): about 7 full
#: 12-MP images, or 40 results with 1600-px display images.
PENDING_WRITE_BYTES = 256 * 2**20


def held_arrays(value: Any, found: dict[int, int] | None = None) -> dict[int, int]:
    """{buffer address: bytes} of the numpy arrays, tensors and bytes reachable from `value` through
    dataclass fields, lists, tuples and dicts. A tensor counts its whole storage (a view of a batch
    holds the batch), and a buffer shared by several values is one entry."""
    found = {} if found is None else found
    if isinstance(value, torch.Tensor):
        storage = value.untyped_storage()
        found[storage.data_ptr()] = storage.nbytes()
    elif isinstance(value, np.ndarray):
        while isinstance(value.base, np.ndarray):  # a view holds the array it views
            value = value.base
        found[value.__array_interface__["data"][0]] = int(value.nbytes)
    elif isinstance(value, (bytes, bytearray)):
        found[id(value)] = len(value)
    elif dataclasses.is_dataclass(value) and not isinstance(value, type):
        for field in dataclasses.fields(value):
            held_arrays(getattr(value, field.name), found)
    elif isinstance(value, (list, tuple)):
        for item in value:
            held_arrays(item, found)
    elif isinstance(value, dict):
        for item in value.values():
            held_arrays(item, found)
    return found


class PendingWrites:
    """Futures of submitted writes, oldest first, with what each one's arguments hold.

    `wait_within()` waits for the oldest writes until at most `max_count` are pending and, beyond
    `min_count` (keep every writer thread busy), the distinct buffers they hold add up to at most
    `max_bytes`. A writer's exception is raised by the wait that collects its future.
    """

    def __init__(self, max_count: int, max_bytes: int = PENDING_WRITE_BYTES, min_count: int = 1) -> None:
        if max_count < 1 or min_count < 1:
            raise ValueError(f"max_count and min_count must be at least 1, got {max_count}, {min_count}")
        self.max_count, self.max_bytes, self.min_count = int(max_count), int(max_bytes), int(min_count)
        self._entries: list[tuple[Future, dict[int, int]]] = []

    def __len__(self) -> int:
        return len(self._entries)

    def add(self, future: Future, *held: Any) -> None:
        """Track `future`, whose write holds the arrays of `held` (e.g. the result it writes)."""
        self._entries.append((future, held_arrays(list(held))))

    @property
    def held_bytes(self) -> int:
        """Bytes of the distinct buffers the pending writes hold."""
        merged: dict[int, int] = {}
        for _, buffers in self._entries:
            merged.update(buffers)
        return sum(merged.values())

    def _over(self) -> bool:
        count = len(self._entries)
        return count > self.max_count or (count > self.min_count and self.held_bytes > self.max_bytes)

    def wait_within(self) -> None:
        while self._over():
            future, _ = self._entries.pop(0)
            future.result()

    def wait_all(self) -> None:
        while self._entries:
            future, _ = self._entries.pop(0)
            future.result()
