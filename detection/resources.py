"""Where the shipped data lives: configs/ and weights/ of the repository checkout, or their copies
in an installed wheel (detection/_data/, written by setup.py's build step).
"""
from __future__ import annotations

from importlib import resources
from pathlib import Path

PACKAGED_DATA = "_data"


def data_root() -> Path:
    """The folder holding `configs/` and `weights/`.

    An installed wheel carries them in detection/_data/; a checkout or an editable install has
    none there and reads the repository's top-level folders (the source of truth) directly.
    """
    package = Path(str(resources.files("detection")))
    packaged = package / PACKAGED_DATA
    return packaged if packaged.is_dir() else package.parent


def data_path(*parts: str) -> Path:
    """A shipped file or folder, e.g. `data_path("weights", "demo")` (it may not exist)."""
    return data_root().joinpath(*parts)
