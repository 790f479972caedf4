"""Graceful stop of a run on SIGTERM / SIGINT: finish the images in flight, journal them, take no new
work (a second SIGINT stops at once)."""
from __future__ import annotations

import logging
import signal
import threading
from typing import Any

logger = logging.getLogger(__name__)


class StopOnSignals:
    """While active (in the main thread), SIGTERM and SIGINT request a stop instead of killing:
    the run finishes the images in flight, journals them, and stops taking new work. A second
    SIGINT raises KeyboardInterrupt (stop now). Previous handlers are restored on exit."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self) -> None:
        self.signal_name: str | None = None
        self._previous: dict[int, Any] = {}

    @property
    def requested(self) -> bool:
        return self.signal_name is not None

    def __enter__(self) -> StopOnSignals:
        if threading.current_thread() is threading.main_thread():
            for signum in self.SIGNALS:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested:
            if signum == signal.SIGINT:
                raise KeyboardInterrupt
            return
        self.signal_name = signal.Signals(signum).name
        logger.warning("%s received: finishing the images in flight, then stopping (rerun to resume)",
                       self.signal_name)
