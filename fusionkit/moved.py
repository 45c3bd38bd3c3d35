"""Names that moved in the layout step (issue 17): the old import paths keep working for one release.

A module whose names moved ends with ``__getattr__ = moved_names(__name__, {...})``: reading
an old name imports it from its new module, with a :class:`DeprecationWarning` naming both
paths. The new module is imported by name (``importlib``) only when an old path is used, so
the layering that the code's own imports follow is unchanged.
"""

from __future__ import annotations

import importlib
import warnings
from collections.abc import Callable
from typing import Any

__all__ = ["moved_names"]


def moved_names(module: str, moved: dict[str, str]) -> Callable[[str], Any]:
    """A module ``__getattr__`` for ``moved``: old name -> new module that defines it."""

    def __getattr__(name: str) -> Any:
        if name not in moved:
            raise AttributeError(f"module {module!r} has no attribute {name!r}")
        warnings.warn(f"{module}.{name} moved to {moved[name]}.{name}; the old path works until the next release "
                      "(see docs/concepts.md#the-layers)", DeprecationWarning, stacklevel=2)
        return getattr(importlib.import_module(moved[name]), name)

    return __getattr__
