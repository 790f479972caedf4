"""A training run's log.jsonl (append-only, one JSON object per line, rank 0 only) and the
machine description its start record carries."""
from __future__ import annotations

import json
import os
import platform
from pathlib import Path
from typing import Any

import torch


class JsonLog:
    """Append-only JSON-lines log (rank 0 only); each line flushed at once."""

    def __init__(self, path: Path, enabled: bool) -> None:
        self.path, self.enabled = path, enabled

    def write(self, record: dict[str, Any]) -> None:
        if self.enabled:
            with open(self.path, "a", encoding="utf-8") as handle:
                handle.write(json.dumps(record, sort_keys=True) + "\n")


def machine_info() -> dict[str, Any]:
    """Platform, CPU model and count, torch version and threads, GPU name when there is one."""
    info = {"platform": platform.platform(), "processor": platform.processor(), "cpus": os.cpu_count(),
            "torch": torch.__version__, "threads": torch.get_num_threads()}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu_model"] = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info
