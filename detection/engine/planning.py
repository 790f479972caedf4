"""Batch planning: which images run together, decided once from image headers before any
decoding, so that every number written is independent of resume, ranks and workers."""
from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import Literal, Sequence

from detection.data.images import DEFAULT_MAX_PIXELS, ImageLoadError, read_header
from detection.data.preprocess import resized_size
from detection.models.contract import PreprocessSpec
from detection.data.sources import SourceItem

BatchingMode = Literal["exact", "padded"]


@dataclass(frozen=True)
class PlannedBatch:
    """Items that run through the model together.

    index: position in the global plan (stable for the same inputs and settings).
    unit: work unit (see `plan_batches`).
    input_size: expected (h, w) model input of each item (exact mode: all equal).
    """

    index: int
    unit: int
    items: tuple[SourceItem, ...]
    input_sizes: tuple[tuple[int, int], ...]


def probe_sizes(items: Sequence[SourceItem], max_pixels: int | None = DEFAULT_MAX_PIXELS,
                threads: int = 8) -> list[SourceItem]:
    """Fill `expected_size` of still images from their headers (no decoding).

    Header-level failures (missing, zero-byte, not an image, decompression bomb) become the
    item's `error`, so they are reported without ever reaching a worker. Video frames keep the
    size their container reported.
    """

    def probe(item: SourceItem) -> SourceItem:
        if item.error is not None or item.is_video_frame:
            return item
        try:
            header = read_header(item.file, max_pixels=max_pixels)
        except ImageLoadError as err:
            return replace(item, error=err.reason)
        return replace(item, expected_size=header.original_size)

    if len(items) < 64 or threads <= 1:
        return [probe(it) for it in items]
    with ThreadPoolExecutor(max_workers=threads) as pool:  # header reads are I/O bound
        return list(pool.map(probe, items))


def plan_batches(items: Sequence[SourceItem], batch_size: int, preprocess: PreprocessSpec,
                 mode: BatchingMode = "exact") -> list[PlannedBatch]:
    """Group probed items (errors excluded) into batches; deterministic in the item order.

    preprocess: the detector's PreprocessSpec (its resize rule gives each item's input size).

    Why plan up front: a batch's composition can change float results in the last bits
    (kernels block differently for different batch sizes, and in padded mode the padding
    changes the CNN's border activations). Planning from the input list alone makes the
    batches -- and so every number written -- identical whether a run is interrupted and
    resumed, split across torchrun ranks, or uses any number of loader workers.

    mode "exact": only images whose model input has the same (h, w) share a batch; no padding,
    so each image gets exactly the detections and maps it gets alone. "padded": still images
    sorted by input aspect ratio (w / h), cut into batches of `batch_size` and padded to the
    largest member: faster on varied datasets, but a CNN run on a zero-padded image is not the
    image alone (DC5 models lose AP this way), so detections differ slightly near the
    bottom/right edges.

    Work units: a still-image batch is one unit; all batches of one video form one unit (its
    frames are decoded sequentially by one worker). Units are split round-robin across ranks
    (torchrun) and across DataLoader workers.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if mode not in ("exact", "padded"):
        raise ValueError(f"batching mode must be 'exact' or 'padded', got {mode!r}")

    def input_size(item: SourceItem) -> tuple[int, int]:
        if item.expected_size is None:
            return (0, 0)  # unknown (video without size properties): batched alone per shape
        return resized_size(item.expected_size[0], item.expected_size[1], preprocess)

    good = [it for it in items if it.error is None]
    groups: list[list[SourceItem]] = []
    # videos: consecutive frames of one video, one group per video
    videos: dict[str, list[SourceItem]] = {}
    stills: list[SourceItem] = []
    for item in good:
        (videos.setdefault(f"{item.unit}", []) if item.is_video_frame else stills).append(item)

    if mode == "exact":
        by_shape: dict[tuple[int, int], list[SourceItem]] = {}
        for item in stills:
            by_shape.setdefault(input_size(item), []).append(item)
        for members in by_shape.values():
            groups.extend(members[i:i + batch_size] for i in range(0, len(members), batch_size))
    else:
        def aspect(item: SourceItem) -> float:
            h, w = input_size(item)
            return math.log(w / h) if h and w else 0.0

        ordered = sorted(stills, key=lambda it: (aspect(it), it.image_id))
        groups.extend(ordered[i:i + batch_size] for i in range(0, len(ordered), batch_size))

    video_groups: list[list[list[SourceItem]]] = []
    for frames in videos.values():
        video_groups.append([frames[i:i + batch_size] for i in range(0, len(frames), batch_size)])

    # order: by first image id; a video's batches stay together as one unit
    keyed: list[tuple[int, list[list[SourceItem]]]] = [(g[0].image_id, [g]) for g in groups]
    keyed += [(vg[0][0].image_id, vg) for vg in video_groups]
    keyed.sort(key=lambda pair: pair[0])
    plan: list[PlannedBatch] = []
    for unit, (_, batches) in enumerate(keyed):
        for members in batches:
            plan.append(PlannedBatch(len(plan), unit, tuple(members), tuple(input_size(m) for m in members)))
    return plan


def shard_plan(plan: Sequence[PlannedBatch], rank: int, world_size: int) -> list[PlannedBatch]:
    """Batches of the units owned by `rank` (unit u -> rank u % world_size)."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} outside world size {world_size}")
    return [b for b in plan if b.unit % world_size == rank]
