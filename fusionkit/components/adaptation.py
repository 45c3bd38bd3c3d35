"""Built-in adaptation losses: mmd, coral, dann, entropy (no pseudo-labels anywhere)."""

from __future__ import annotations

import math
from typing import Literal

import attrs
import torch
import torch.nn.functional as F
from torch import nn

from fusionkit.config import non_negative, option, positive
from fusionkit.interfaces import AdaptationConfig, AdaptationLoss, BuildContext

__all__ = ["GradientReversal", "grl_schedule", "MMDConfig", "CoralConfig", "DannConfig", "EntropyConfig", "mmd",
           "coral", "MMDLoss", "CoralLoss", "DannLoss", "EntropyLoss"]


class GradientReversal(torch.autograd.Function):
    """Identity forward; multiplies the gradient by ``-factor`` backward."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, factor: float) -> torch.Tensor:
        ctx.factor = factor
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return -ctx.factor * grad, None


def grl_schedule(progress: float) -> float:
    """The DANN schedule λ(p) = 2 / (1 + exp(-10 p)) - 1 over training progress p in [0, 1]."""
    return 2.0 / (1.0 + math.exp(-10.0 * progress)) - 1.0


@attrs.frozen(kw_only=True)
class MMDConfig(AdaptationConfig):
    """Multi-kernel Gaussian maximum mean discrepancy; bandwidths from the median heuristic."""

    kernels: int = option(5, doc="Number of Gaussian kernels, bandwidths median * 2^(i - kernels // 2).", validator=positive)
    estimator: Literal["quadratic", "linear"] = option(
        "quadratic", doc="Unbiased quadratic-time estimator, or the linear-time one over sample pairs.")


@attrs.frozen(kw_only=True)
class CoralConfig(AdaptationConfig):
    """Distance between source and target feature covariances (and means)."""

    means: bool = option(True, doc="Also match the means.")


@attrs.frozen(kw_only=True)
class DannConfig(AdaptationConfig):
    """A domain discriminator behind gradient reversal, λ(p) = 2 / (1 + exp(-10 p)) - 1."""

    hidden: int = option(64, doc="Hidden size of the discriminator.", validator=positive)
    schedule: Literal["dann", "linear", "constant"] = option(
        "dann", doc="How the gradient-reversal factor grows over training: dann 2 / (1 + exp(-10 p)) - 1, linear p, "
        "or constant 1; always times grl_max.")
    grl_max: float = option(1.0, doc="Largest gradient-reversal factor: how hard the encoders are pushed to fool "
                                     "the discriminator (the discriminator itself always learns at full strength).",
                            validator=non_negative)


@attrs.frozen(kw_only=True)
class EntropyConfig(AdaptationConfig):
    """Entropy minimisation on target predictions, for both heads."""

    presence_weight: float = option(1.0, doc="Weight of the mean per-label binary entropy of presence.", validator=non_negative)
    salience_weight: float = option(1.0, doc="Weight of the softmax entropy of salience.", validator=non_negative)


def _bandwidths(dist: torch.Tensor, kernels: int) -> torch.Tensor:
    positive_d = dist[dist > 0]
    median = positive_d.median() if positive_d.numel() else dist.new_tensor(1.0)
    return median.detach() * (2.0 ** (torch.arange(kernels, device=dist.device, dtype=dist.dtype) - kernels // 2))


def mmd(source: torch.Tensor, target: torch.Tensor, kernels: int = 5, estimator: str = "quadratic") -> torch.Tensor:
    """Multi-kernel MMD² between two samples [n, d] and [m, d] (Gaussian kernels, summed)."""
    if estimator == "linear":
        n = min(len(source), len(target)) // 2 * 2
        if n < 2:
            return source.new_zeros(())
        x1, x2, y1, y2 = source[0:n:2], source[1:n:2], target[0:n:2], target[1:n:2]
        dist = torch.cat([(x1 - x2).pow(2).sum(1), (y1 - y2).pow(2).sum(1), (x1 - y2).pow(2).sum(1), (x2 - y1).pow(2).sum(1)])
        bw = _bandwidths(dist, kernels)

        def k(a, b):
            return torch.exp(-(a - b).pow(2).sum(1, keepdim=True) / bw).sum(1)

        return (k(x1, x2) + k(y1, y2) - k(x1, y2) - k(x2, y1)).mean()
    joint = torch.cat([source, target])
    dist = torch.cdist(joint, joint).pow(2)
    bw = _bandwidths(dist, kernels)
    kernel = torch.exp(-dist.unsqueeze(-1) / bw).sum(-1)
    n = len(source)
    kxx, kyy, kxy = kernel[:n, :n], kernel[n:, n:], kernel[:n, n:]
    off = lambda mat: (mat.sum() - mat.diagonal().sum()) / max(1, mat.shape[0] * (mat.shape[0] - 1))  # noqa: E731
    return off(kxx) + off(kyy) - 2 * kxy.mean()


def coral(source: torch.Tensor, target: torch.Tensor, means: bool = True) -> torch.Tensor:
    """Squared Frobenius distance of covariances / (4 d²), plus squared mean distance / d."""
    d = source.shape[1]
    cs, ct = torch.cov(source.T), torch.cov(target.T)
    loss = (cs - ct).pow(2).sum() / (4 * d * d)
    if means:
        loss = loss + (source.mean(0) - target.mean(0)).pow(2).sum() / d
    return loss


class MMDLoss(AdaptationLoss):
    def discrepancy(self, source, target, progress):
        return mmd(source, target, self.config.kernels, self.config.estimator)


class CoralLoss(AdaptationLoss):
    def discrepancy(self, source, target, progress):
        return coral(source, target, self.config.means)


class DannLoss(AdaptationLoss):
    def __init__(self, config: DannConfig, context: BuildContext) -> None:
        super().__init__(config)
        dim = context.in_dim if config.on == "fused" else context.latent_dim
        self.discriminator = nn.Sequential(nn.Linear(dim, config.hidden), nn.ReLU(), nn.Linear(config.hidden, 1))

    def discrepancy(self, source, target, progress):
        shape = {"dann": grl_schedule(progress), "linear": progress, "constant": 1.0}[self.config.schedule]
        lam = self.config.grl_max * shape
        feats = GradientReversal.apply(torch.cat([source, target]), lam)
        logits = self.discriminator(feats).squeeze(-1)
        domain = torch.cat([source.new_zeros(len(source)), source.new_ones(len(target))])
        return F.binary_cross_entropy_with_logits(logits, domain)


class EntropyLoss(AdaptationLoss):
    def forward(self, source, target, progress):
        loss = target.fused.new_zeros(())
        if "presence" in target.logits and self.config.presence_weight:
            p = torch.sigmoid(target.logits["presence"])
            binary = -(p * F.logsigmoid(target.logits["presence"]) + (1 - p) * F.logsigmoid(-target.logits["presence"]))
            loss = loss + self.config.presence_weight * binary.mean()
        if "salience" in target.logits and self.config.salience_weight:
            log_q = F.log_softmax(target.logits["salience"], dim=-1)
            loss = loss + self.config.salience_weight * -(log_q.exp() * log_q).sum(-1).mean()
        return loss
