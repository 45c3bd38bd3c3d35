"""The rules of conditional execution on numpy arrays: the twins of :mod:`fusionkit.conditional.rules`, which the
torch-free runtime calls, so that an exported model chooses exactly as the PyTorch model does.

Each function here has a torch twin of the same name in :mod:`.rules`; ``tests/test_rules_parity.py`` checks each
pair over random inputs. A rule changes in both places, or the parity test fails.
"""

from __future__ import annotations

import numpy as np

__all__ = ["within_budget", "value_per_cost", "relative_costs", "stage_pick"]


def within_budget(scores: np.ndarray, available: np.ndarray, costs: np.ndarray, limit: np.ndarray) -> np.ndarray:
    """``[B, m]`` which on-demand encoders run: per row, in the order of ``scores`` (best first; equal scores, lower
    index first), each whose cost still fits ``limit`` (``[B]``, what the row may still spend)."""
    masked = np.where(available, scores, -np.inf)
    order = np.argsort(-masked, axis=1, kind="stable")
    rows = np.arange(len(scores))
    run = np.zeros_like(available)
    spent = np.zeros(len(scores), dtype=np.float64)
    for j in range(scores.shape[1]):
        k = order[:, j]
        cost = costs[k]
        fits = available[rows, k] & (spent + cost <= limit + 1e-9)
        run[rows, k] = fits
        spent = spent + cost * fits
    return run


def relative_costs(costs: np.ndarray, demand: list[int]) -> np.ndarray:
    """``[m]`` float32: each on-demand encoder's cost relative to their mean cost."""
    cost = costs[demand].astype(np.float32)
    return np.maximum(cost / np.float32(max(float(cost.mean()), 1e-12)), np.float32(1e-12)).astype(np.float32)


def value_per_cost(scores: np.ndarray, present: np.ndarray, costs: np.ndarray, demand: list[int]) -> np.ndarray:
    """``[B, m]``: the scout's softmax share of each on-demand encoder per unit of its cost (relative to the mean
    on-demand cost), -inf where absent (float32)."""
    logits = np.where(present, scores.astype(np.float32), np.float32(-np.inf))
    top = np.max(logits, axis=1, keepdims=True)
    top = np.where(np.isfinite(top), top, np.float32(0.0))
    exp = np.exp(logits - top).astype(np.float32)
    total = exp.sum(axis=1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        share = np.nan_to_num(exp / total, nan=0.0).astype(np.float32)
    value = share[:, demand] / relative_costs(costs, demand)
    return np.where(present[:, demand], value, np.float32(-np.inf))


def stage_pick(values: np.ndarray, relative: np.ndarray, eligible: np.ndarray,
               threshold: np.ndarray | float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One stage of a staged scout: per row, the eligible on-demand encoder of most value per unit of cost.
    ``(pick [B], best [B], going [B])``: its position, its value per unit of cost (-inf when none is eligible) and
    whether it runs (its value reaches ``threshold``, per row or one for all)."""
    key = np.where(eligible, values.astype(np.float32) / relative, np.float32(-np.inf))
    pick, best = key.argmax(axis=1), key.max(axis=1)
    return pick, best, np.isfinite(best) & (best >= threshold)
