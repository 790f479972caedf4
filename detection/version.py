"""The package's version (also in pyproject.toml), importable from every layer."""
from __future__ import annotations

__version__ = "0.1.0"
