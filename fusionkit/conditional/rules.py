"""The rules of conditional execution on tensors: which on-demand encoders a row runs under a cap (in the scout's
order while the cost fits), a mean budget's threshold and how it is fitted, a scout's value per unit of cost, and
one stage of a staged scout.

Each rule the runtime also applies has a numpy twin of the same name in :mod:`.numpy_rules`
(``tests/test_rules_parity.py`` checks each pair over random inputs).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from fusionkit.conditional.selection import top_k

__all__ = ["within_budget", "kept_by", "value_per_cost", "fit_threshold", "relative_costs", "path_values",
           "stage_pick", "scout_loss"]


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


def stage_pick(values: torch.Tensor, relative: torch.Tensor, eligible: torch.Tensor,
               threshold: torch.Tensor | float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One stage of a staged scout: per row, the eligible on-demand encoder of most value per unit of cost.
    ``(pick [B], best [B], going [B])``: its position, its value per unit of cost (-inf when none is eligible) and
    whether it runs (its value reaches ``threshold``, per row or one for all)."""
    key = (values.detach().float() / relative).masked_fill(~eligible, float("-inf"))
    best, pick = key.max(dim=1)
    return pick, best, torch.isfinite(best) & (best >= threshold)


def scout_loss(scout: torch.Tensor, full: torch.Tensor, available: torch.Tensor) -> torch.Tensor:
    """KL(softmax(full) || softmax(scout)) over the available encoders of each row, averaged over rows: the scout's
    scores (before the on-demand encoders ran) learn the gate's scores with every token (a fixed target)."""
    scout = scout.float().masked_fill(~available, float("-inf"))
    target = torch.softmax(full.detach().float().masked_fill(~available, float("-inf")), dim=1)
    log_scout = torch.log_softmax(scout, dim=1)
    terms = torch.where(available, target * (torch.log(target.clamp_min(1e-12)) - log_scout), torch.zeros_like(target))
    return terms.sum(1).mean()
