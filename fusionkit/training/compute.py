"""The compute objective term: the expected cost per sample against a budget, as a hinge (DynMM's resource loss).

For a model with on-demand encoders, the gate's own rule (its top-n over the scout's scores) decides what runs when
no budget is given at inference. This term trains that rule to a mean cost: the probability that the scout keeps an
on-demand encoder is read softly, ``min(1, n * softmax(scores))`` over the available encoders, the expected cost of a
sample is the always-run encoders' cost plus the on-demand ones' weighted by it, and the loss is
``weight * mean(relu(expected - budget)) / full`` (the full cost makes it scale-free).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from fusionkit.conditional.selection import slot_count
from fusionkit.models.fusion import FusionModel
from fusionkit.training.objective import ObjectiveTerm

__all__ = ["ComputeTerm", "expected_cost"]


def expected_cost(model: FusionModel, scout_scores: torch.Tensor, available: torch.Tensor) -> torch.Tensor:
    """``[B]`` GFLOPs each sample is expected to spend under the gate's own rule (soft top-n of the scout's scores)."""
    costs = model.cost_vector(scout_scores.device).to(scout_scores.dtype if scout_scores.is_floating_point()
                                                       else torch.float32)
    n = slot_count(model.gate.config, scout_scores.shape[1])
    share = torch.softmax(scout_scores.float().masked_fill(~available, float("-inf")), dim=1).nan_to_num(0.0)
    keep = (n * share).clamp(max=1.0)
    demand = torch.zeros(scout_scores.shape[1], dtype=torch.bool, device=scout_scores.device)
    demand[list(model.on_demand)] = True
    probability = torch.where(demand, keep, available.to(keep.dtype))
    return (probability * available * costs.float()).sum(1)


class ComputeTerm(ObjectiveTerm):
    """``compute``: the hinge of the expected cost per sample over ``conditional.budget_gflops``."""

    def __init__(self, model: FusionModel) -> None:
        super().__init__()
        self.model = [model]  # not a submodule: its parameters are the model's
        self.budget = float(model.conditional.budget_gflops)
        self.weight = float(model.conditional.compute_weight)
        self.full = max(float(model.cost_vector(torch.device("cpu")).sum()), 1e-12)

    def forward(self, out: Any, rows: np.ndarray, progress: float) -> dict[str, torch.Tensor]:
        if out.scout_scores is None:
            return {}
        spent = expected_cost(self.model[0], out.scout_scores, out.available)
        return {"compute": self.weight * torch.relu(spent - self.budget).mean() / self.full}
