"""Import paths that moved: the old paths keep working, with a :class:`DeprecationWarning`, until 0.3.0.

Two kinds of move, both listed in ``CHANGELOG.md``:

- names that left a module that still exists: that module ends with
  ``__getattr__ = moved_names(__name__, {...})``, and reading an old name imports it from its new module;
- modules that are gone: :data:`MOVED_MODULES` maps each old module path to its new module (every name moved
  with it) or to a table of name -> new module. :func:`install` puts a finder on ``sys.meta_path`` that answers
  those paths, and only those, once nothing on disk does.

New modules are imported by name (``importlib``) only when an old path is used, so the layering that the code's
own imports follow is unchanged.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import sys
import types
import warnings
from collections.abc import Callable
from typing import Any

__all__ = ["REMOVED_IN", "MOVED_MODULES", "MOVED_NAMES", "moved_names", "install"]

#: The release that removes the old paths.
REMOVED_IN = "0.3.0"

#: Modules that are gone: old path -> the new module, or {name: new module} where the names went apart.
MOVED_MODULES: dict[str, str | dict[str, str]] = {
    "fusionkit.sweep": "fusionkit.training.sweep",
    "fusionkit.report": "fusionkit.evaluation.report",
    "fusionkit.demo": "fusionkit.cli.demo",
    "fusionkit.scaffold": "fusionkit.cli.scaffold",
    "fusionkit.model": {
        **dict.fromkeys(("FusionModel", "FusionOutput", "Trunk", "DomainNorm", "Projector", "count_parameters",
                         "decoder_inputs"), "fusionkit.models.fusion"),
        "build_model": "fusionkit.models.factory",
    },
    "fusionkit.towers": {
        **dict.fromkeys(("TwoTowerModel", "TwoTowerOutput", "Tower", "clip_loss", "retrieval_metrics"),
                        "fusionkit.models.towers"),
        **dict.fromkeys(("TowerEncoder", "TowerEncoderConfig"), "fusionkit.components.encoders"),
    },
    "fusionkit.training.distributed": dict.fromkeys(("Dist", "setup", "unused_parameters_possible", "wrap"),
                                                    "fusionkit.hardware.distributed"),
    # 0.3.0 layout (issue 43): BlEmoRE, conditional execution, export, evaluation and hardware get folders
    **{f"fusionkit.{m}": f"fusionkit.blemore.{m}" for m in ("answers", "metrics", "decoding", "submission")},
    **{f"fusionkit.{m}": f"fusionkit.conditional.{m}" for m in ("budget", "selection")},
    **{f"fusionkit.{m}": f"fusionkit.hardware.{m}" for m in ("devices", "distributed")},
    **{f"fusionkit.{m}": f"fusionkit.spec.{m}" for m in ("schema", "yaml_reader", "recipes")},
    "fusionkit.runtime.manifest": "fusionkit.export.manifest",
    "fusionkit.inference.export": "fusionkit.export.graphs",
    "fusionkit.models.conditional": {
        "Budget": "fusionkit.conditional.budget",
        **dict.fromkeys(("RowShare", "row_uniform", "gather_rows", "scatter_rows"), "fusionkit.conditional.rows"),
        **dict.fromkeys(("within_budget", "kept_by", "value_per_cost", "fit_threshold", "relative_costs",
                         "path_values", "scout_loss"), "fusionkit.conditional.rules"),
    },
    **{f"fusionkit.training.{m}": f"fusionkit.evaluation.{m}" for m in ("ensemble", "report")},
    "fusionkit.training.controls": {
        **dict.fromkeys(("EXHAUSTIVE", "static_choices", "static_frontier", "frontier_at", "random_rows", "cascade",
                         "known_corruption", "curve_controls", "verdict"), "fusionkit.evaluation.controls"),
        **dict.fromkeys(("CURVE_FORMAT", "curve_document"), "fusionkit.evaluation.curves"),
    },
}


#: Names that left a module that still exists: module -> {name: new module}, filled by :func:`moved_names` as each
#: such module is imported (the test of the old paths imports them all).
MOVED_NAMES: dict[str, dict[str, str]] = {}


def _warn(old: str, new: str) -> None:
    warnings.warn(f"{old} moved to {new}; the old path works until fusionkit {REMOVED_IN} (see CHANGELOG.md)",
                  DeprecationWarning, stacklevel=3)


def moved_names(module: str, moved: dict[str, str]) -> Callable[[str], Any]:
    """A module ``__getattr__`` for ``moved``: old name -> new module that defines it."""
    MOVED_NAMES.setdefault(module, {}).update(moved)

    def __getattr__(name: str) -> Any:
        if name not in moved:
            raise AttributeError(f"module {module!r} has no attribute {name!r}")
        _warn(f"{module}.{name}", f"{moved[name]}.{name}")
        return getattr(importlib.import_module(moved[name]), name)

    return __getattr__


def _forward(old: str, new: str) -> Callable[[str], Any]:
    """A module ``__getattr__`` that reads every name from ``new`` (warned once, when ``old`` is imported)."""

    def __getattr__(name: str) -> Any:
        try:
            return getattr(importlib.import_module(new), name)
        except AttributeError:
            raise AttributeError(f"module {old!r} (now {new!r}) has no attribute {name!r}") from None

    return __getattr__


class _MovedModules(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Answers the old paths of :data:`MOVED_MODULES` with a module that reads its names from their new homes."""

    def find_spec(self, fullname: str, path: Any, target: Any = None) -> importlib.machinery.ModuleSpec | None:
        return importlib.util.spec_from_loader(fullname, self) if fullname in MOVED_MODULES else None

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> types.ModuleType | None:
        return None  # an ordinary empty module

    def exec_module(self, module: types.ModuleType) -> None:
        target = MOVED_MODULES[module.__name__]
        if isinstance(target, str):
            _warn(module.__name__, target)
            module.__getattr__ = _forward(module.__name__, target)  # type: ignore[method-assign]
        else:
            module.__getattr__ = moved_names(module.__name__, target)  # type: ignore[method-assign]


_FINDER = _MovedModules()


def install() -> None:
    """Answer the moved modules' old paths (once; after every finder of real files, so a file always wins)."""
    if _FINDER not in sys.meta_path:
        sys.meta_path.append(_FINDER)
