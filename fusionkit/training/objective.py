"""The trainer's objective terms: what the loop adds to the task's own loss, and when terms are asked.

A term is an :class:`ObjectiveTerm` built by a factory ``make(model, store)`` before training
starts (its parameters train with the model's, its state is checkpointed with it). The loop asks
every term the same two things and has no branch per feature:

- ``forward(out, rows, progress)``: named loss tensors to add for a training batch;
- ``on_best(model)``: the model just scored best on validation and is about to be saved.

The built-in terms: adaptation losses (:mod:`.adaptation`), distillation (:mod:`.distill`) and
per-domain statistics (:mod:`.statistics`); :func:`fusionkit.training.terms.objective_terms` picks
them from a spec.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import nn

__all__ = ["ObjectiveTerm", "TermFactory"]


class ObjectiveTerm(nn.Module):
    """A term of the training objective beside the task's own loss (see the module docstring).

    ``rows`` are this rank's own rows of the batch (``out`` may hold one more, a stand-in that weighs nothing).
    A term whose losses are computed over the gathered global batch (the same on every rank) sets ``shared``;
    otherwise its losses are means over this rank's rows."""

    shared: bool = False
    #: The term runs the model on batches of its own (outside the trainer's forward), so under torchrun the trainer
    #: averages the model's gradients itself instead of wrapping it in DDP, whose reducer expects one forward per step.
    forwards_model: bool = False

    def shares(self, name: str) -> bool:
        """Whether the loss ``name`` is over the gathered global batch, the same on every rank (by default: ``shared``)."""
        return self.shared

    def forward(self, out: Any, rows: np.ndarray, progress: float) -> dict[str, torch.Tensor]:
        return {}

    def on_best(self, model: nn.Module) -> None:
        """Called before the model that scored best so far is saved."""


#: A term's factory: ``make(model, store)`` -> the term, built once the model and the store exist.
TermFactory = Callable[[nn.Module, Any], ObjectiveTerm]
