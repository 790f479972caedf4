"""Crash-safe training checkpoints that load with `torch.load(weights_only=True)`.

A checkpoint is a dict of tensors and plain values only (no pickled objects):
    model, optimizer, scheduler, scaler, ema: state dicts (ema/scaler may be None)
    epoch: epoch in progress; step_in_epoch: optimiser steps done in that epoch;
    step: total optimiser steps; best_metric: float or None
    rng: {"torch", "cuda", "numpy", "python"} generator states as tensors / ints
    config: the resolved training config (plain dict); model_config: DetrConfig.to_dict()
    code_version: {"package", "git_commit", "git_dirty"}
Writes go through `detection.io.atomic_path` (temp file in the same folder, fsync, rename),
so a crash leaves either the previous checkpoint or the new one, never a partial file.
"""
from __future__ import annotations

import os
import random
import subprocess
from importlib.metadata import version
from pathlib import Path
from typing import Any

import numpy as np
import torch

from detection.io import atomic_path

REPO_ROOT = Path(__file__).resolve().parents[2]


def save_checkpoint(path: str | os.PathLike, state: dict[str, Any]) -> Path:
    path = Path(path)
    with atomic_path(path) as tmp:
        torch.save(state, tmp)
    return path


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """The checkpoint dict; weights_only=True, so loading never executes code from the file."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: checkpoint does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # truncated, not a torch file, or contains pickled objects
        raise ValueError(f"{path}: not a loadable training checkpoint ({type(error).__name__}: {error})") from error
    if not isinstance(state, dict) or "model" not in state:
        raise ValueError(f"{path}: not a training checkpoint (no 'model' entry)")
    return state


# -- random number generators --------------------------------------------------------------
def rng_state() -> dict[str, Any]:
    """Every generator training draws from, as tensors and plain values."""
    np_state = np.random.get_state()
    py_version, py_internal, py_gauss = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
        "python": {"version": int(py_version), "state": torch.tensor(py_internal, dtype=torch.int64),
                   "gauss": py_gauss},
    }


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    numpy_state = state["numpy"]
    np.random.set_state(("MT19937", numpy_state["keys"].numpy().astype(np.uint32), numpy_state["pos"],
                         numpy_state["has_gauss"], numpy_state["cached_gaussian"]))
    python_state = state["python"]
    random.setstate((python_state["version"], tuple(int(v) for v in python_state["state"].tolist()),
                     python_state["gauss"]))


# -- provenance -----------------------------------------------------------------------------
def code_version() -> dict[str, Any]:
    """Package version and, when run from a git checkout, the commit and whether it is dirty."""
    try:
        package = version("detection")
    except Exception:
        package = "unknown"
    commit, dirty = None, None
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True,
                                timeout=10, check=True).stdout.strip()
        status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO_ROOT,
                                capture_output=True, text=True, timeout=10, check=True).stdout
        dirty = bool(status.strip())
    except (OSError, subprocess.SubprocessError):
        pass
    return {"package": package, "git_commit": commit, "git_dirty": dirty}
