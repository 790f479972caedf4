"""Decode + resize in DataLoader worker processes, one planned batch at a time: safe decoding
(or OpenCV video frames) and the one resize rule; a file that fails becomes a sample with `error`."""
from __future__ import annotations

import multiprocessing
from dataclasses import dataclass, field
from typing import Iterator, Sequence

import cv2
import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from detection.data.images import DEFAULT_MAX_PIXELS, ImageLoadError, load_image
from detection.data.preprocess import image_to_input
from detection.models.contract import PreprocessSpec
from detection.engine.display import DisplayImages, DisplaySpec, make_display_images
from detection.engine.planning import PlannedBatch
from detection.data.sources import SourceItem
from detection.data.image_codec import swap_red_blue


@dataclass
class Sample:
    """One decoded image of a batch.

    image: float32 (3, h, w) in [0, 1], resized model input (None if `error`).
    original_size: (H, W) of the decoded image (EXIF applied) -- the frame of all boxes/maps.
    rgb: uint8 (H, W, 3) original pixels when the caller needs them, else None.
    display: the images the writers draw on (`engine.display`), made here, in the decoding
        worker, when the caller asked for them.
    """

    item: SourceItem
    image: torch.Tensor | None = None
    original_size: tuple[int, int] | None = None
    rgb: np.ndarray | None = None
    display: DisplayImages | None = None
    error: str | None = None


@dataclass
class LoadedBatch:
    batch: PlannedBatch
    samples: list[Sample] = field(default_factory=list)


class BatchLoadingDataset(IterableDataset):
    """Yields LoadedBatch for each planned batch of this worker's units, in plan order.

    keep_rgb: ship each decoded image (uint8 (H, W, 3): 36 MB for 12 MP) in `Sample.rgb`;
    display: make `Sample.display` from it (a few MB), so a caller that needs only those never
    holds full-resolution pixels.
    """

    def __init__(self, plan: Sequence[PlannedBatch], preprocess: PreprocessSpec,
                 keep_rgb: bool = False, max_pixels: int | None = DEFAULT_MAX_PIXELS,
                 display: DisplaySpec | None = None) -> None:
        super().__init__()
        self.plan = list(plan)
        self.preprocess = preprocess
        self.keep_rgb = keep_rgb
        self.max_pixels = max_pixels
        self.display = display

    # -- per item -----------------------------------------------------------------------
    def _sample_from_rgb(self, item: SourceItem, rgb: np.ndarray) -> Sample:
        image = image_to_input(rgb, self.preprocess)
        display = None if self.display is None else make_display_images(rgb, self.display)
        return Sample(item, image=image, original_size=(int(rgb.shape[0]), int(rgb.shape[1])),
                      rgb=rgb if self.keep_rgb else None, display=display)

    def _still(self, item: SourceItem) -> Sample:
        try:
            loaded = load_image(item.file, max_pixels=self.max_pixels)
        except ImageLoadError as err:
            return Sample(item, error=err.reason)
        except MemoryError:
            return Sample(item, error="out of memory while decoding")
        return self._sample_from_rgb(item, loaded.rgb)

    def _video_unit(self, batches: list[PlannedBatch]) -> Iterator[LoadedBatch]:
        """Decode one video sequentially (grab() to skip, retrieve() only sampled frames)."""
        path = batches[0].items[0].file
        capture = cv2.VideoCapture(path)
        position = 0  # index of the next frame grab() would return
        failure: str | None = None if capture.isOpened() else "cannot open video"
        try:
            for batch in batches:
                samples = []
                for item in batch.items:
                    target = int(item.frame_index)
                    while failure is None and position < target:
                        if not capture.grab():
                            failure = f"video ended after {position} frames"
                        position += 1
                    if failure is None:
                        ok, frame = capture.read()
                        position += 1
                        if not ok or frame is None:
                            failure = f"video ended after {target} frames"
                    if failure is not None:
                        samples.append(Sample(item, error=f"frame {target} not decoded: {failure}"))
                        continue
                    rgb = swap_red_blue(frame) if frame.ndim == 3 else np.ascontiguousarray(
                        np.repeat(frame[..., None], 3, axis=2))
                    samples.append(self._sample_from_rgb(item, rgb))
                yield LoadedBatch(batch, samples)
        finally:
            capture.release()

    # -- iteration ----------------------------------------------------------------------
    def units(self) -> list[list[PlannedBatch]]:
        grouped: dict[int, list[PlannedBatch]] = {}
        for batch in self.plan:
            grouped.setdefault(batch.unit, []).append(batch)
        return [grouped[u] for u in sorted(grouped)]

    def __iter__(self) -> Iterator[LoadedBatch]:
        info = get_worker_info()
        worker, workers = (0, 1) if info is None else (info.id, info.num_workers)
        for position, unit in enumerate(self.units()):
            if position % workers != worker:
                continue
            if unit[0].items[0].is_video_frame:
                yield from self._video_unit(unit)
            else:
                for batch in unit:
                    yield LoadedBatch(batch, [self._still(item) for item in batch.items])


def _worker_init(_: int) -> None:
    # Each worker decodes one image at a time; extra threads would only fight the model.
    cv2.setNumThreads(1)
    torch.set_num_threads(1)


def _identity(batch: LoadedBatch) -> LoadedBatch:
    return batch


def make_loader(dataset: BatchLoadingDataset, num_workers: int, prefetch: int = 2) -> DataLoader:
    """A DataLoader yielding LoadedBatch objects (batching is already planned)."""
    kwargs = {}
    if num_workers > 0:
        # Not "fork": a child forked while OpenCV's / OpenMP's thread pools hold locks in the
        # parent can deadlock in its first cv2 call (seen under pytest-xdist). forkserver starts
        # workers from a clean process.
        context = "forkserver" if "forkserver" in multiprocessing.get_all_start_methods() else "spawn"
        kwargs = dict(worker_init_fn=_worker_init, prefetch_factor=prefetch, persistent_workers=False,
                      multiprocessing_context=context)
    return DataLoader(dataset, batch_size=None, num_workers=num_workers, collate_fn=_identity, **kwargs)
