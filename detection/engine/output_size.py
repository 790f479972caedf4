"""How much a predict run writes: the run folder's size for the summary, and a projection of the
overlays' size from the first images, so that a run about to write gigabytes says so (and how to
write less) while there is still time to stop it."""
from __future__ import annotations

import logging
import threading
from pathlib import Path

from detection.attention.methods import DEFAULT_METHOD
from detection.engine.image_files import OutputOptions
from detection.runfolder.layout import LOCK_FILE
from detection.runfolder.run_folder import RunFolder
from detection.text import size

logger = logging.getLogger("detection.engine")

#: A run whose overlays are projected above this many bytes gets a warning.
OVERLAY_WARNING_BYTES = 1 << 30
#: The projection is made once this many images have been written (or all of them, if fewer).
SAMPLE_IMAGES = 8
#: The smaller overlay size the warning suggests.
SMALLER_OVERLAY_SIZE = 800


def folder_bytes(root: Path) -> int:
    """Bytes of every file under `root` (the run's lock excluded: it is not an output)."""
    return sum(path.stat().st_size for path in root.rglob("*") if path.is_file() and path.name != LOCK_FILE)


class OverlayProjection:
    """Watches the overlays of the first images a run writes (`add`, from any writer thread) and,
    once SAMPLE_IMAGES are written, warns when the run's `planned_images` would write more than
    `limit` bytes of overlays at that rate. Says nothing without --overlays."""

    def __init__(self, folder: RunFolder, planned_images: int, options: OutputOptions,
                 limit: int | None = None, sample: int = SAMPLE_IMAGES) -> None:
        self.folder, self.planned, self.options = folder, planned_images, options
        self.limit = OVERLAY_WARNING_BYTES if limit is None else limit
        self.sample = min(sample, planned_images)
        self.measured: list[int] = []
        self.warning: str | None = None
        self._lock = threading.Lock()

    def add(self, key: str) -> None:
        """Image `key`'s overlays are written: count them; warn when the sample is complete."""
        if not self.options.overlays or len(self.measured) >= self.sample:
            return
        written = self.folder.image_overlay_bytes(key, DEFAULT_METHOD, self.options.image_format)
        with self._lock:
            if len(self.measured) >= self.sample:
                return
            self.measured.append(written)
            if len(self.measured) < self.sample:
                return
        per_image = sum(self.measured) / len(self.measured)
        projected = per_image * self.planned
        if projected <= self.limit:
            return
        shown = self.options.overlay_size or "original"
        ways = [f"--overlay-size {SMALLER_OVERLAY_SIZE} (now {shown})"]
        if self.options.image_format == "png":
            ways.append("--format jpg")
        self.warning = (f"the first {len(self.measured)} images wrote {size(int(per_image))} of overlays each: "
                        f"the {self.planned} images of this run would write about {size(int(projected))}; "
                        f"to write less, rerun with {' or '.join(ways)} (and --overwrite)")
        logger.warning("%s", self.warning)
