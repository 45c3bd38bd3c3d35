"""The supervised training loss: presence BCE + salience KL (+ the model's auxiliary losses)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fusionkit.interfaces import ScoutExample
from fusionkit.models.fusion import FusionModel, FusionOutput
from fusionkit.spec import TrainConfig

__all__ = ["label_losses", "row_losses", "measured_drops", "value_loss", "rank_supervision", "supervised_loss",
           "training_loss"]


def rank_supervision(model: FusionModel, out: FusionOutput, target: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-encoder deep supervision, and a gate target ranking encoders by their per-sample loss.

    Each token k predicts the labels; its KL to the target is l[b, k]. The gate's softmax over
    scores is pulled towards softmax(-l / T) (l detached), so it learns to rank encoders by
    how reliable they are for this sample, including ones it does not currently keep.
    """
    log_q = F.log_softmax(out.token_logits, dim=-1)  # [B, K, L]
    per_token = (target.unsqueeze(1) * (target.unsqueeze(1).clamp_min(1e-12).log() - log_q)).sum(-1)  # [B, K]
    mask = out.mask if out.mask is not None else torch.ones_like(per_token, dtype=torch.bool)
    computed = out.computed if out.computed is not None else mask  # on-demand tokens computed for the scout count too
    weight = computed.to(per_token.dtype)
    token_loss = (per_token * weight).sum() / weight.sum().clamp_min(1)
    gate = model.gate
    goal = torch.softmax((-per_token.detach() / gate.supervision_temperature).masked_fill(~mask, float("-inf")), dim=1)
    scores = torch.log_softmax(out.scores.masked_fill(~mask, float("-inf")), dim=1)
    rank_loss = -(goal.nan_to_num(0.0) * scores.masked_fill(~mask, 0.0)).sum(1).mean()
    parts = {"token_kl": gate.supervision * token_loss, "gate_rank": gate.supervision * rank_loss}
    if out.scout_scores is not None and out.scout_rows is not None and out.scout_rows.any() \
            and out.value_predicted is None:
        # the scout learns, before the on-demand encoders run, how well each token predicts this sample
        rows, full = out.scout_rows, computed[out.scout_rows]
        ideal = torch.softmax((-per_token.detach()[rows] / gate.supervision_temperature).masked_fill(~full, float("-inf")),
                              dim=1)
        scout = torch.log_softmax(out.scout_scores[rows].float().masked_fill(~full, float("-inf")), dim=1)
        parts["scout"] = model.conditional.scout_weight * -(ideal.nan_to_num(0.0) * scout.masked_fill(~full, 0.0)).sum(1).mean()
    return parts


def label_losses(logits: dict[str, torch.Tensor], target: torch.Tensor, train: TrainConfig) -> dict[str, torch.Tensor]:
    """The heads' losses against ``target`` [B, L] (soft targets summing to 1), weighted: ``presence_bce``, binary
    cross-entropy of each label's presence (target > 0), and ``salience_kl``, KL(target || softmax)."""
    parts: dict[str, torch.Tensor] = {}
    if "presence" in logits:
        parts["presence_bce"] = train.presence_weight * F.binary_cross_entropy_with_logits(
            logits["presence"], (target > 0).to(target.dtype))
    if "salience" in logits:
        parts["salience_kl"] = train.salience_weight * F.kl_div(
            F.log_softmax(logits["salience"], dim=-1), target, reduction="batchmean")
    return parts


def row_losses(logits: dict[str, torch.Tensor], target: torch.Tensor, train: TrainConfig) -> torch.Tensor:
    """``[..., B]``: each row's weighted loss of :func:`label_losses` (its terms before the mean over rows), for
    logits ``[..., B, L]``."""
    total = torch.zeros(logits[next(iter(logits))].shape[:-1], device=target.device)
    if "presence" in logits:
        bce = F.binary_cross_entropy_with_logits(logits["presence"].float(), (target > 0).float().expand_as(
            logits["presence"]), reduction="none")
        total = total + train.presence_weight * bce.mean(-1)
    if "salience" in logits:
        log_q = F.log_softmax(logits["salience"].float(), dim=-1)
        total = total + train.salience_weight * (target * (target.clamp_min(1e-12).log() - log_q)).sum(-1)
    return total


def measured_drops(logits: dict[str, torch.Tensor], target: torch.Tensor, train: TrainConfig) -> torch.Tensor:
    """``[R, m]``: each row's loss in its state less its loss with each on-demand encoder added (positive: it
    helps the row), from :meth:`~fusionkit.models.fusion.FusionModel.value_logits` (``[m + 1, R, L]`` per head)."""
    losses = row_losses(logits, target, train)  # [m + 1, R]
    return (losses[:1] - losses[1:]).T


def value_loss(out: FusionOutput, target: torch.Tensor, train: TrainConfig, weight: float,
               model: FusionModel) -> torch.Tensor:
    """A staged scout's loss (:meth:`fusionkit.interfaces.Scout.loss`, by default the squared error of its predicted
    loss drops against the measured ones), on the rows where everything ran (``out.scout_rows``), for each on-demand
    encoder the row's state could add (``out.value_addable``). The measured drop is the row's loss in its state
    (what its sampled budget ran) less its loss with the encoder's token added, both fused as at inference
    (positive: it helps this sample)."""
    rows = out.scout_rows
    measured = None if out.value_logits is None else measured_drops(out.value_logits, target[rows].float(), train)
    demand = list(model.on_demand)
    example = ScoutExample(
        predicted=out.value_predicted, addable=out.value_addable, state=out.ran[rows][:, demand], measured=measured,
        tokens=(out.tokens[rows] - model.identity).detach(), present=out.computed[rows], target=target[rows].float())
    return weight * model.scout.loss(example)


def supervised_loss(out: FusionOutput, target: torch.Tensor, train: TrainConfig,
                    model: FusionModel | None = None) -> tuple[torch.Tensor, dict[str, float]]:
    """``target`` [B, L]: soft targets summing to 1 (salience / 100).

    presence: binary cross-entropy of each label's presence (target > 0);
    salience: KL(target || softmax) — for a ``classifier`` head too;
    plus every entry of ``out.aux_losses`` (e.g. the gate balance loss), the gate's rank
    supervision when it is switched on, and ``full_budget``: the same losses of the full-budget pass
    (``conditional.full_budget_weight`` w), when the model made one: then the budget-sampled pass's label losses
    weigh 1 / (1 + w) and the full pass's w / (1 + w).
    """
    parts = label_losses(out.logits, target, train)
    if out.full_logits is not None and model is not None:  # the full-budget pass of the scout's rows
        # the two passes' label losses are averaged (weights 1 and w, over 1 + w), so that the fusion and heads
        # take steps of keep-all's size: summed, they trained twice as fast and overfitted by epoch 7-12
        weight = model.spec.conditional.full_budget_weight
        parts = {key: value / (1 + weight) for key, value in parts.items()}
        parts["full_budget"] = weight / (1 + weight) * sum(
            label_losses(out.full_logits, target[out.scout_rows], train).values())
    parts.update(out.aux_losses)
    if out.value_predicted is not None and model is not None:
        parts["scout"] = value_loss(out, target, train, model.spec.conditional.scout_weight, model)
    if out.token_logits is not None and model is not None:
        parts.update(rank_supervision(model, out, target))
    total = sum(parts.values())
    return total, {k: float(v.detach()) for k, v in parts.items()}


def training_loss(model: FusionModel, out: FusionOutput, target: torch.Tensor,
                  train: TrainConfig | None = None) -> tuple[torch.Tensor, dict[str, float]]:
    """The whole loss ``fusionkit train`` optimises for one batch, for embedders' own loops.

    ``target`` [B, L] are soft targets summing to 1 (salience / 100, e.g. from
    :func:`fusionkit.blemore.answers.to_matrix` / 100). It adds the supervised terms, the model's
    auxiliary losses and rank supervision, weighted by ``train`` (default: the model's spec).
    Returns the loss tensor and its parts as floats.
    """
    return supervised_loss(out, target, train or model.spec.train, model)
