"""Selection in rank order, shared by every gate: hard top-n, or adaptive top-p."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["Selection", "select_top_n", "select_top_p", "top_k", "slot_count", "gather_slots", "in_encoder_order"]


@dataclass
class Selection:
    """What a gate decided for a batch.

    ``kept`` [B, n]: encoder indices in rank order, -1 for an empty slot (fewer
    than n encoders available). ``weights`` [B, n]: softmax over the kept scores
    (0 for empty slots). ``mix`` [B, K]: during soft warm-up, the weights with
    which the last slot mixes the encoders ranked n or below; otherwise None.
    """

    scores: torch.Tensor
    kept: torch.Tensor
    weights: torch.Tensor
    slot_mask: torch.Tensor
    mix: torch.Tensor | None
    balance_loss: torch.Tensor | None


def select_top_n(
    scores: torch.Tensor,
    mask: torch.Tensor | None,
    n: int,
    temperature: float = 1.0,
    soft_tail: bool = False,
    balance_weight: float = 0.0,
    first: torch.Tensor | None = None,
) -> Selection:
    """Keep, per sample, the ``n`` best-scored available encoders in rank order.

    ``mask`` [B, K] is False for missing encoders (None: all available). A
    masked encoder is never kept; ``n`` at or above the number
    available keeps all available ones. With ``soft_tail`` the last slot is a
    softmax-weighted mixture of every encoder not in the first ``n - 1`` slots,
    so that all encoders and the gate receive gradient early in training.
    ``first`` [B, K] (None: none): encoders kept before any other, whatever their scores (the on-demand encoders
    that ran for a sample: what runs is fused); the kept slots stay in the order of their scores.
    """
    batch, k = scores.shape
    take = min(n, k)
    if mask is None and first is None:  # every encoder available: no masking work on the hot path
        mask = torch.ones_like(scores, dtype=torch.bool)
        masked = scores
        top_scores, top_idx = top_k(scores, take)
        slot_mask = torch.ones_like(top_idx, dtype=torch.bool)
        weights = torch.softmax(top_scores / temperature, dim=1)
    else:
        if mask is None:
            mask = torch.ones_like(scores, dtype=torch.bool)
        masked = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
        if first is None:
            top_scores, top_idx = top_k(masked, take)
        else:
            top_idx = _first_then_best(masked, mask, first & mask, take)
            top_scores = masked.gather(1, top_idx)
        slot_mask = mask.gather(1, top_idx)
        logits = (top_scores / temperature).masked_fill(~slot_mask, float("-inf"))
        weights = torch.softmax(logits, dim=1).nan_to_num(0.0)
    mix = None
    if soft_tail:
        full = torch.softmax((masked / temperature).masked_fill(~mask, float("-inf")), dim=1).nan_to_num(0.0)
        tail = full.clone()
        if take > 1:
            tail.scatter_(1, top_idx[:, : take - 1], 0.0)
        tail_weight = tail.sum(dim=1, keepdim=True)
        mix = tail / tail_weight.clamp_min(1e-12)
        weights = torch.cat([full.gather(1, top_idx[:, : take - 1]), tail_weight], dim=1) * slot_mask
    kept = top_idx.masked_fill(~slot_mask, -1)
    if take < n:
        pad = n - take
        kept = torch.cat([kept, kept.new_full((batch, pad), -1)], dim=1)
        weights = torch.cat([weights, weights.new_zeros(batch, pad)], dim=1)
        slot_mask = torch.cat([slot_mask, slot_mask.new_zeros(batch, pad)], dim=1)
    balance = _balance_loss(masked, mask, kept, temperature) * balance_weight if balance_weight > 0 else None
    return Selection(scores, kept, weights, slot_mask, mix, balance)


def select_top_p(
    scores: torch.Tensor,
    mask: torch.Tensor | None,
    p: float,
    min_n: int,
    max_n: int,
    temperature: float = 1.0,
    soft_tail: bool = False,
    balance_weight: float = 0.0,
    first: torch.Tensor | None = None,
) -> Selection:
    """Keep, per sample, the smallest rank-ordered prefix of available encoders whose gate probability
    (softmax of the scores over the available encoders) reaches ``p``, at least ``min_n`` and at most
    ``max_n`` of them (fewer when fewer are available). Confident samples keep few encoders, uncertain
    ones more. The result has ``max_n`` slots; slots beyond a sample's prefix are empty (-1, masked).
    During the soft warm-up it is top-``max_n`` with the soft tail, so every encoder learns early.
    ``first``: as :func:`select_top_n`'s, and always kept.
    """
    ranked = select_top_n(scores, mask, max_n, temperature, soft_tail, 0.0, first)
    available = torch.ones_like(scores, dtype=torch.bool) if mask is None else mask
    masked = scores.masked_fill(~available, torch.finfo(scores.dtype).min)
    if not soft_tail:
        probs = torch.softmax((masked / temperature).masked_fill(~available, float("-inf")), dim=1).nan_to_num(0.0)
        in_rank = probs.detach().gather(1, ranked.kept.clamp_min(0)) * ranked.slot_mask
        before = in_rank.cumsum(1) - in_rank  # probability of the better-ranked slots
        position = torch.arange(ranked.kept.shape[1], device=scores.device)
        keep = ranked.slot_mask & ((before < p) | (position < min_n))
        if first is not None:
            keep = keep | (ranked.slot_mask & first.gather(1, ranked.kept.clamp_min(0)))
        logits = (scores.gather(1, ranked.kept.clamp_min(0)) / temperature).masked_fill(~keep, float("-inf"))
        ranked = Selection(scores, ranked.kept.masked_fill(~keep, -1), torch.softmax(logits, dim=1).nan_to_num(0.0),
                           keep, None, None)
    if balance_weight > 0:
        ranked.balance_loss = _balance_loss(masked, available, ranked.kept, temperature) * balance_weight
    return ranked


def top_k(scores: torch.Tensor, take: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``take`` best ``scores`` per row ``[B, K]`` and their indices, best first, and of equal scores the lower
    index first: ONNX's TopK rule, which ``torch.topk`` does not promise (a static gate's equal scores at
    initialisation were kept in another order by an export). Eagerly a stable sort; in an ONNX export, where a stable
    sort has no form, each encoder's rank is counted (the better scores, and the equal ones before it), which gives
    the same order; K is small."""
    if not torch.onnx.is_in_onnx_export():
        values, indices = torch.sort(scores, dim=1, descending=True, stable=True)
        return values[:, :take], indices[:, :take]
    k = scores.shape[1]
    index = torch.arange(k, device=scores.device)
    mine, other = scores.unsqueeze(2), scores.unsqueeze(1)  # [B, i, 1] against [B, 1, j]
    ahead = (other > mine) | ((other == mine) & (index.view(1, 1, k) < index.view(1, k, 1)))
    rank = ahead.sum(2)  # [B, K]: a permutation of 0..K-1 per row
    slots = torch.arange(take, device=scores.device)
    indices = (rank.unsqueeze(1) == slots.view(1, take, 1)).to(torch.int64).argmax(2)  # [B, take]
    return scores.gather(1, indices), indices


def _first_then_best(masked: torch.Tensor, mask: torch.Tensor, first: torch.Tensor, take: int) -> torch.Tensor:
    """``[B, take]`` indices: the encoders of ``first`` and then the best-scored others, in the order of their
    scores (``masked``: the scores, the lowest float where ``mask`` says unavailable). Top-k only, so it exports."""
    scores = masked.detach()
    span = (scores.max(dim=1).values - scores.masked_fill(~mask, float("inf")).min(dim=1).values).clamp_min(0) + 1
    chosen = top_k(scores + first.to(scores.dtype) * span.unsqueeze(1), take)[1]
    return chosen.gather(1, top_k(scores.gather(1, chosen), take)[1])


def _balance_loss(masked: torch.Tensor, mask: torch.Tensor, kept: torch.Tensor, temperature: float) -> torch.Tensor:
    """Switch-style load balance: K * sum_k (share of slots given to k) * (mean gate probability of k).

    It is 1 when selection and probabilities are uniform and grows as the gate collapses.
    """
    k = masked.shape[1]
    probs = torch.softmax((masked / temperature).masked_fill(~mask, float("-inf")), dim=1).nan_to_num(0.0)
    valid = kept >= 0
    counts = torch.zeros_like(probs).scatter_add_(1, kept.clamp_min(0), valid.to(probs.dtype))
    share = counts.sum(0) / valid.sum().clamp_min(1)
    return k * (share.detach() * probs.mean(0)).sum()


def in_encoder_order(selection: Selection) -> Selection:
    """The same encoders and weights, with the kept slots in the encoders' own (spec) order instead of rank
    order, empty slots last: the control that removes ranking and keeps selection. During the soft warm-up
    (a tail slot that mixes encoders) the selection stays in rank order."""
    if selection.mix is not None:
        return selection
    k = selection.scores.shape[1]
    position = torch.arange(selection.kept.shape[1], device=selection.kept.device)
    order = torch.where(selection.kept >= 0, selection.kept, k + position).argsort(dim=1)
    return Selection(selection.scores, selection.kept.gather(1, order), selection.weights.gather(1, order),
                     selection.slot_mask.gather(1, order), None, selection.balance_loss)


def slot_count(config: Any, encoders: int) -> int:
    """How many rank-ordered slots a gate config (a :class:`~fusionkit.interfaces.GateConfig`) fills: ``top_n``,
    or ``max_n`` (0: every encoder) for top-p."""
    if config.selection == "top_p":
        return min(config.max_n or encoders, encoders)
    return config.top_n


def gather_slots(tokens: torch.Tensor, selection: Selection) -> torch.Tensor:
    """The kept tokens ``[B, n, d]`` in rank order (zeros in empty slots; the soft tail mixed in)."""
    idx = selection.kept.clamp_min(0).unsqueeze(-1).expand(-1, -1, tokens.shape[-1])
    slots = tokens.gather(1, idx) * selection.slot_mask.unsqueeze(-1).to(tokens.dtype)
    if selection.mix is not None:
        take = min(selection.kept.shape[1], tokens.shape[1])
        tail = torch.einsum("bk,bkd->bd", selection.mix, tokens)
        slots = torch.cat([slots[:, : take - 1], tail.unsqueeze(1), slots[:, take:]], dim=1)
    return slots
