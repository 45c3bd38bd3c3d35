"""The one front door for models: :func:`build_model` from a spec, :func:`load_model` from a checkpoint.

It is the only place that knows the model kinds: a spec with a ``towers`` block builds a
:class:`~fusionkit.models.towers.TwoTowerModel`, any other a
:class:`~fusionkit.models.fusion.FusionModel`. Loading reads and checks the files with
:func:`fusionkit.checkpoint.read_checkpoint` (never unpickling), builds the stored spec and puts the
weights in.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from fusionkit.checkpoint import read_checkpoint
from fusionkit.errors import CheckpointError, FusionkitError
from fusionkit.interfaces import restoring
from fusionkit.models.fusion import FusionModel
from fusionkit.models.towers import TwoTowerModel
from fusionkit.registry import Registry
from fusionkit.spec import Spec, load_spec

__all__ = ["build_model", "load_checkpoint", "load_model"]


def build_model(spec: Spec | Mapping[str, Any] | str, registry: Registry | None = None) -> FusionModel | TwoTowerModel:
    """Build the model a spec describes: a :class:`FusionModel`, or with a ``towers`` block a
    :class:`TwoTowerModel`. Takes a spec, a spec dict, or a spec file path."""
    spec = load_spec(spec, registry=registry)
    kind = TwoTowerModel if spec.towers else FusionModel
    return kind(spec, registry=registry)


def load_checkpoint(directory: str | os.PathLike, registry: Registry | None = None,
                    device: str | torch.device | None = None) -> tuple[nn.Module, dict[str, Any], dict]:
    """A checkpoint's model (in eval mode, on ``device``: default the CPU), its extra tensors and its metadata."""
    files = read_checkpoint(directory, registry)
    with restoring():  # initial weights files are not read: the checkpoint's weights follow
        try:
            model = build_model(files.spec, registry=registry)
        except FusionkitError as exc:
            raise CheckpointError(f"{files.root}: cannot build the stored model: {exc}") from exc
    try:
        result = model.load_state_dict(files.state, strict=False)
    except RuntimeError as exc:  # tensors of other shapes than the spec builds
        first = str(exc).splitlines()[1].strip() if len(str(exc).splitlines()) > 1 else str(exc)
        raise CheckpointError(f"{files.weights}: weights do not fit the stored spec ({first}); the spec or the weights "
                              "were modified") from None
    if result.missing_keys or result.unexpected_keys:
        raise CheckpointError(f"{files.weights}: weights do not fit the spec: missing {result.missing_keys[:5]}, "
                              f"unexpected {result.unexpected_keys[:5]}")
    if device is not None:
        model.to(device)
    return model.eval(), files.extra, files.metadata


def load_model(directory: str | os.PathLike, device: str | torch.device | None = None) -> FusionModel | TwoTowerModel:
    """Load a model saved with ``save_pretrained`` (in eval mode): a fusion or a two-tower model."""
    return load_checkpoint(directory, device=device)[0]
