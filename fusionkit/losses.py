"""The supervised training loss: presence BCE + salience KL (+ the model's auxiliary losses)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fusionkit.model import FusionOutput
from fusionkit.spec import TrainConfig


def supervised_loss(out: FusionOutput, target: torch.Tensor, train: TrainConfig) -> tuple[torch.Tensor, dict[str, float]]:
    """``target`` [B, L]: soft targets summing to 1 (salience / 100).

    presence: binary cross-entropy of each label's presence (target > 0);
    salience: KL(target || softmax) — for a ``classifier`` head too;
    plus every entry of ``out.aux_losses`` (e.g. the gate balance loss).
    """
    parts: dict[str, torch.Tensor] = {}
    if "presence" in out.logits:
        parts["presence_bce"] = train.presence_weight * F.binary_cross_entropy_with_logits(
            out.logits["presence"], (target > 0).to(target.dtype)
        )
    if "salience" in out.logits:
        parts["salience_kl"] = train.salience_weight * F.kl_div(
            F.log_softmax(out.logits["salience"], dim=-1), target, reduction="batchmean"
        )
    parts.update(out.aux_losses)
    total = sum(parts.values())
    return total, {k: float(v.detach()) for k, v in parts.items()}
