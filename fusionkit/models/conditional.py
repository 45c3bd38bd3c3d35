"""Conditional execution: which on-demand encoders run for which rows, and running them on those rows only.

A model with ``run: on_demand`` encoders encodes a batch in two steps. The always-run encoders run on every row;
the gate then scores every encoder from those tokens, an on-demand encoder's token being its identity embedding
alone (the gate is a *scout*, :attr:`fusionkit.interfaces.Gate.scouts`). Per row, the on-demand encoders to run are
chosen by the gate's own rule (top-n or top-p over the scout's scores) or by a compute :class:`Budget`: in the
scout's order while the row's cost stays within it. Each on-demand encoder then runs once, on the rows gathered
for it, and its tokens are scattered back; a row that did not run it holds no token for it, exactly as a missing
encoder (the mixture-of-experts pattern of gathering rows per expert).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import attrs
import torch
from torch import nn

from fusionkit.budget import Budget
from fusionkit.errors import FusionkitError
from fusionkit.selection import top_k

__all__ = ["Budget", "RowShare", "row_uniform", "gather_rows", "scatter_rows", "within_budget", "kept_by", "scout_loss", "value_per_cost",
           "fit_threshold", "ValueHead", "relative_costs", "path_values"]


@attrs.frozen
class RowShare:
    """Where a batch's rows sit in the global batch under torchrun: its ``size`` and this rank's ``positions``.

    The random draws per row in training (a sampled budget, the scout's rows) are made for the global batch and
    each rank takes its rows' draws, so that two processes draw what one process draws (docs/scaling.md)."""

    size: int
    positions: tuple[int, ...]

    @classmethod
    def of(cls, size: int, rank: int, world: int) -> RowShare:
        """A rank's rows of a global batch of ``size`` shared out every ``world``-th from ``rank``
        (:meth:`fusionkit.distributed.Dist.shard`); a rank left without rows holds a stand-in of row 0."""
        return cls(size, tuple(range(rank, size, world)) or (0,))


def row_uniform(share: RowShare | None, batch: int, device: torch.device,
                dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``[batch]`` uniform draws, one per row: the global batch's draws at this rank's positions when ``share``
    describes this batch, else the batch's own (in one process, exactly ``torch.rand(batch)``)."""
    if share is None or len(share.positions) != batch:
        return torch.rand(batch, dtype=dtype, device=device)
    return torch.rand(share.size, dtype=dtype, device=device)[torch.as_tensor(share.positions, device=device)]


def value_per_cost(scout_scores: torch.Tensor, available: torch.Tensor, costs: torch.Tensor,
                   demand: Sequence[int]) -> torch.Tensor:
    """``[B, m]``: the scout's softmax share of each on-demand encoder per unit of its cost (relative to the mean
    on-demand cost), -inf where it is absent: what a mean budget's threshold compares."""
    share = torch.softmax(scout_scores.float().masked_fill(~available, float("-inf")), dim=1).nan_to_num(0.0)
    value = share[:, list(demand)] / relative_costs(costs, demand)
    return value.masked_fill(~available[:, list(demand)], float("-inf"))


def fit_threshold(values: torch.Tensor, costs: torch.Tensor, paid: torch.Tensor, target: float) -> float:
    """The lowest threshold on ``values`` (``[N, m]``, rows of validation data) whose runs (``values >= threshold``)
    keep the mean cost (``paid`` ``[N]`` for the always-run encoders, plus ``costs`` ``[m]``, or ``[N, m]`` per row,
    where run) within ``target``, placed halfway to the next lower value (the same runs on these rows, none of
    them on the threshold itself); +inf when even the always-run encoders exceed it."""
    finite = values[torch.isfinite(values)].unique(sorted=True)
    candidates = torch.cat([finite, finite.new_tensor([float("inf")])])

    def mean_cost(threshold: float) -> float:
        return float((paid + ((values >= threshold).double() * costs.double()).sum(1)).mean())

    low, high = 0, len(candidates) - 1  # mean cost falls as the threshold rises: the first candidate that fits
    while low < high:
        middle = (low + high) // 2
        if mean_cost(float(candidates[middle])) <= target + 1e-9:
            high = middle
        else:
            low = middle + 1
    if not torch.isfinite(candidates[low]):
        return float(candidates[low])
    # halfway down to the next lower value, so that no row sits on the threshold itself, where a graph in another
    # runtime, a float32 rounding away, would decide the other way; on these rows the runs are the same
    below = candidates[low - 1] if low > 0 else candidates[low] - (candidates[low].abs() + 1)
    return float((candidates[low] + below) / 2)


def gather_rows(x: Any, rows: torch.Tensor) -> Any:
    """The rows ``rows`` of one encoder's batch input: a tensor, a mapping of tensors, or a sequence of items."""
    if x is None:
        return None
    if torch.is_tensor(x):
        return x.index_select(0, rows.to(x.device))
    if isinstance(x, Mapping):
        return {k: gather_rows(v, rows) for k, v in x.items()}
    if isinstance(x, Sequence) and not isinstance(x, str):
        return [x[i] for i in rows.tolist()]
    raise FusionkitError(f"an on-demand encoder's input must be a tensor, a mapping or a sequence with a row per "
                         f"sample, found {type(x).__name__}")


def scatter_rows(values: torch.Tensor, rows: torch.Tensor, batch: int) -> torch.Tensor:
    """``[batch, d]``: ``values`` at ``rows``, zeros elsewhere (differentiable in ``values``)."""
    out = values.new_zeros((batch, *values.shape[1:]))
    return out.index_copy(0, rows.to(values.device), values)


def within_budget(scores: torch.Tensor, available: torch.Tensor, costs: torch.Tensor, limit: torch.Tensor) -> torch.Tensor:
    """``[B, m]`` which of ``m`` on-demand encoders run: per row, in the order of ``scores`` (best first), each one
    whose cost still fits ``limit`` (``[B]``, GFLOPs left after the always-run encoders). ``available`` ``[B, m]``:
    present for the row. A cheaper encoder further down may still fit after a dear one did not."""
    order = top_k(scores.masked_fill(~available, float("-inf")), scores.shape[1])[1]  # equal scores: lower index first
    run = torch.zeros_like(available)
    spent = torch.zeros(scores.shape[0], dtype=costs.dtype, device=scores.device)
    for j in range(scores.shape[1]):
        k = order[:, j]
        cost = costs[k]
        fits = available.gather(1, k[:, None]).squeeze(1) & (spent + cost <= limit + 1e-9)
        run.scatter_(1, k[:, None], fits[:, None])
        spent = spent + cost * fits
    return run


def kept_by(kept: torch.Tensor, index: Sequence[int]) -> torch.Tensor:
    """``[B, m]``: whether each row's kept encoders (``[B, n]`` indices, -1 empty) include each of ``index``."""
    wanted = torch.as_tensor(list(index), device=kept.device)
    return (kept.unsqueeze(2) == wanted.view(1, 1, -1)).any(dim=1)


def scout_loss(scout: torch.Tensor, full: torch.Tensor, available: torch.Tensor) -> torch.Tensor:
    """KL(softmax(full) || softmax(scout)) over the available encoders of each row, averaged over rows: the scout's
    scores (before the on-demand encoders ran) learn the gate's scores with every token (a fixed target)."""
    scout = scout.float().masked_fill(~available, float("-inf"))
    target = torch.softmax(full.detach().float().masked_fill(~available, float("-inf")), dim=1)
    log_scout = torch.log_softmax(scout, dim=1)
    terms = torch.where(available, target * (torch.log(target.clamp_min(1e-12)) - log_scout), torch.zeros_like(target))
    return terms.sum(1).mean()


class ValueHead(nn.Module):
    """The value scout (``conditional.scout: value``): from the tokens a sample has computed so far, how much its
    loss would drop if each on-demand encoder's token joined the fusion (``[B, m]``).

    It reads every token (zeros where not computed or missing), which encoders are present and which on-demand ones already
    ran, so that after a stage it re-scores the rest knowing what they would add to what is there. Its inputs are
    detached: it learns to predict the fusion, never to shape the tokens."""

    def __init__(self, encoders: int, demand: int, dim: int, hidden: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(encoders * dim)
        self.net = nn.Sequential(nn.Linear(encoders * dim + encoders + demand, hidden), nn.GELU(),
                                 nn.Linear(hidden, demand))

    def forward(self, tokens: torch.Tensor, present: torch.Tensor, ran: torch.Tensor) -> torch.Tensor:
        # a missing encoder's token is not read: its value would depend on how its reader filled the gap
        x = self.norm((tokens.detach().float() * present.unsqueeze(-1).float()).flatten(1))
        return self.net(torch.cat([x, present.float(), ran.float()], dim=1))


def relative_costs(costs: torch.Tensor, demand: Sequence[int]) -> torch.Tensor:
    """``[m]``: each on-demand encoder's cost relative to their mean cost (what a value per unit of cost divides by)."""
    cost = costs[list(demand)].float()
    return (cost / cost.mean().clamp_min(1e-12)).clamp_min(1e-12)


def path_values(keys: torch.Tensor) -> torch.Tensor:
    """``[N, m]``: the value scout's keys along each row's path of stages (``keys``, -inf past its end) as the
    thresholds under which each stage still runs: a row stops at its first stage whose key falls below the
    threshold, so a stage runs when the lowest key up to it reaches it (what :func:`fit_threshold` compares)."""
    keys = keys.float().nan_to_num(float("-inf"), float("-inf"), float("-inf"))
    return torch.cummin(keys, dim=1).values
