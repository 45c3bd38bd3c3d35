"""fusionkit: plugin-based rank-aware top-n encoder fusion for PyTorch.

The public API::

    import fusionkit
    spec = fusionkit.load_spec("spec.yaml")          # or a dict
    model = fusionkit.build_model(spec)              # a torch.nn.Module
    model.save_pretrained("run/model")
    model = fusionkit.load_model("run/model")

Plugin authors use :data:`fusionkit.hookimpl`. Names are imported lazily so that
``import fusionkit`` (and ``fusionkit --help``) does not import torch.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

from fusionkit import moved
from fusionkit.errors import NO_TORCH
from fusionkit.hookspecs import hookimpl

__version__ = "0.2.0"

moved.install()  # the old import paths of CHANGELOG.md

_LAZY = {
    "load_spec": "fusionkit.spec",
    "dump_spec": "fusionkit.spec",
    "Spec": "fusionkit.spec",
    "build_model": "fusionkit.models.factory",
    "FusionModel": "fusionkit.models.fusion",
    "FusionOutput": "fusionkit.models.fusion",
    "load_model": "fusionkit.models.factory",
    "TwoTowerModel": "fusionkit.models.towers",
    "get_registry": "fusionkit.plugins",
    "register_plugin": "fusionkit.plugins",
    "training_loss": "fusionkit.training.losses",
    "option": "fusionkit.config",
    "blemore_scores": "fusionkit.blemore.metrics",
}

__all__ = ["hookimpl", "__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        try:
            module = import_module(_LAZY[name])
        except ModuleNotFoundError as exc:
            if (exc.name or "").split(".")[0] != "torch":
                raise
            raise ModuleNotFoundError(f"fusionkit.{name}: {NO_TORCH}", name=exc.name) from exc
        return getattr(module, name)
    raise AttributeError(f"module 'fusionkit' has no attribute {name!r}")
