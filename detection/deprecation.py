"""Old public names kept for one release: a module-level `__getattr__` that forwards a moved
or renamed name to its new home with a DeprecationWarning."""
from __future__ import annotations

import importlib
import warnings
from typing import Any, Callable


def forward_moved_names(old_module: str, moved: dict[str, str]) -> Callable[[str], Any]:
    """A module `__getattr__` for `old_module`: `moved` maps an old name to
    "new.module:new_name"; using the old name warns and returns the new object."""

    def __getattr__(name: str) -> Any:
        target = moved.get(name)
        if target is None:
            raise AttributeError(f"module {old_module!r} has no attribute {name!r}")
        module_name, _, new_name = target.partition(":")
        warnings.warn(f"{old_module}.{name} is deprecated; use {module_name}.{new_name}",
                      DeprecationWarning, stacklevel=2)
        return getattr(importlib.import_module(module_name), new_name)

    return __getattr__
