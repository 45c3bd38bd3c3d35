"""Built-in distillation losses: kd, fd, crd, icl, rkd (CLIP-KD and RKD), vrd and xrd (CLIP-RD).

Notation (docs/distillation.md): s and t are student and teacher embeddings, L2-normalised,
the student projected into the teacher's width; A and B are two modalities (the towers of a
two-tower model, or two encoders of a fusion model); softmax is row-wise and KL(P ‖ Q) is
averaged over rows.

The published forms (``form: published`` for fd and icl, the default ``mode: published`` of
vrd and xrd) compute the losses as the CLIP-RD authors' ``KDClipLoss`` does
(Rosieyang01/CLIP-RD, ``src/open_clip/loss.py``): in each KL the first distribution is a
fixed target (its gradient stopped), and the learned scales α_I, α_T and β multiply the
similarities as they are, without exponentiation. A plays I (image) and B plays T (text):
VRD pulls A's teacher-student distribution towards B's.
"""

from __future__ import annotations

import math
from typing import Literal

import attrs
import torch
import torch.nn.functional as F
from torch import nn

from fusionkit.config import non_negative, option, positive
from fusionkit.hardware.devices import full_precision
from fusionkit.interfaces import DistillBatch, DistillConfig, DistillLoss

__all__ = ["row_kl", "scaled", "Mode", "softmax_relation_loss", "LOG_CLIP_SCALE", "KDConfig", "FDConfig",
           "CRDConfig", "ICLConfig", "RKDConfig", "RelationConfig", "KD", "FD", "CRD", "ICL", "RKD", "diagonal_ce",
           "target_kl", "RelationLoss", "VRD", "XRD", "DISTILL_PRESETS", "PRESET_DESCRIPTIONS"]

#: ``distill.preset``: the published loss sets, each term in its published form with the papers' weights, as
#: a spec writes them under ``distill.losses``. The task's own CLIP loss comes from the two-tower model; a preset
#: adds the distillation terms. Registered through ``register_distill_presets``, with :data:`PRESET_DESCRIPTIONS`.
DISTILL_PRESETS: dict[str, tuple[dict[str, object], ...]] = {
    "clip-kd": ({"type": "crd"}, {"type": "icl", "form": "published"},
                {"type": "fd", "form": "published", "weight": 2000.0}),
    "clip-rd": ({"type": "crd"}, {"type": "icl", "form": "published"},
                {"type": "fd", "form": "published", "weight": 2000.0},
                {"type": "vrd", "mode": "published"}, {"type": "xrd", "mode": "published"}),
}
PRESET_DESCRIPTIONS: dict[str, str] = {
    "clip-kd": "CLIP-KD: CRD, ICL and FD (weight 2000), each in its published form.",
    "clip-rd": "CLIP-RD: CLIP-KD's terms, then the vertical and cross relational terms VRD and XRD, as published.",
}


def row_kl(p_logits: torch.Tensor, q_logits: torch.Tensor) -> torch.Tensor:
    """KL(softmax(p) ‖ softmax(q)) of each row, averaged over rows."""
    p_log = F.log_softmax(full_precision(p_logits), dim=-1)
    return (p_log.exp() * (p_log - F.log_softmax(full_precision(q_logits), dim=-1))).sum(-1).mean()


def scaled(sim_scale: float | None, batch_scale: torch.Tensor | None) -> torch.Tensor | float:
    """A fixed 1/temperature when given, else the model's logit scale, else CLIP's 1/0.07."""
    if sim_scale is not None:
        return sim_scale
    return batch_scale if batch_scale is not None else 1.0 / 0.07


Mode = Literal["published", "symmetric", "teacher"]


def softmax_relation_loss(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """½ [KL(softmax p ‖ softmax q) + KL(softmax q ‖ softmax p)], row-wise, averaged."""
    return 0.5 * (row_kl(p, q) + row_kl(q, p))


LOG_CLIP_SCALE = math.log(1.0 / 0.07)


@attrs.frozen(kw_only=True)
class KDConfig(DistillConfig):
    """Temperature-scaled KL between teacher and student label probabilities (fusion models)."""

    temperature: float = option(2.0, doc="Softening temperature T; the loss is multiplied by T² (Hinton et al.).",
                                validator=positive)


@attrs.frozen(kw_only=True)
class FDConfig(DistillConfig):
    """Feature distillation: squared distance between student and teacher embeddings."""

    form: Literal["sum", "published"] = option(
        "sum", doc="sum: the squared distance summed over dimensions, averaged over rows; published: averaged "
        "over every element, as CLIP-KD and CLIP-RD compute it (they weigh it 2000).")


@attrs.frozen(kw_only=True)
class CRDConfig(DistillConfig):
    """CLIP-KD's contrastive relational distillation: match the cross-modal similarity distributions."""

    temperature: float | None = option(None, doc="Fixed temperature of both similarity matrices; null: each "
                                       "model's own logit scale (two-tower), or 0.07.", validator=positive)


@attrs.frozen(kw_only=True)
class ICLConfig(DistillConfig):
    """CLIP-KD's interactive contrastive learning: the student's side against the teacher's other side."""

    learn_scale: bool = option(True, doc="Learn the logit scale.")
    form: Literal["exp", "published"] = option(
        "exp", doc="exp: the scale is exp(a learned log), starting at 1/0.07 and clamped to at most 100; published: "
        "a learned β multiplies the logits as it is, starting at ln(1/0.07), as CLIP-KD and CLIP-RD compute it.")


@attrs.frozen(kw_only=True)
class RKDConfig(DistillConfig):
    """RKD's distance and angle losses on each embedding (Park et al., 2019)."""

    distance_weight: float = option(1.0, doc="Weight of the distance term.", validator=non_negative)
    angle_weight: float = option(2.0, doc="Weight of the angle term (RKD's 1:2 ratio).", validator=non_negative)
    angle_samples: int = option(64, doc="Samples of the batch used by the angle term (its cost grows as n³).",
                                validator=positive)


@attrs.frozen(kw_only=True)
class RelationConfig(DistillConfig):
    """Options of the relational losses vrd and xrd."""

    temperature: float = option(0.1, doc="τ of the similarity distributions softmax(s tᵀ / τ) (symmetric and "
                                "teacher modes; the published form learns its scales).", validator=positive)
    mode: Mode = option("published", doc="published: the CLIP-RD authors' loss, with learned scales; symmetric and "
                        "teacher: fusionkit's own earlier readings (see docs/distillation.md).")


class KD(DistillLoss):
    needs = "logits"

    def forward(self, batch: DistillBatch) -> torch.Tensor:
        T = self.config.temperature
        losses = []
        for s, t, activation in batch.logits.values():
            if activation == "sigmoid":  # each label's presence: a Bernoulli KL per label
                p, q = torch.sigmoid(t / T), torch.sigmoid(s / T)
                kl = p * (torch.log(p.clamp_min(1e-12)) - torch.log(q.clamp_min(1e-12))) + (1 - p) * (
                    torch.log((1 - p).clamp_min(1e-12)) - torch.log((1 - q).clamp_min(1e-12)))
                losses.append(kl.sum(-1).mean())
            else:
                losses.append(row_kl(t / T, s / T))
        return torch.stack(losses).mean() * T * T


class FD(DistillLoss):
    def forward(self, batch: DistillBatch) -> torch.Tensor:
        if self.config.form == "published":
            return sum((s - t).pow(2).mean() for s, t in batch.views.values())
        return sum((s - t).pow(2).sum(-1).mean() for s, t in batch.views.values())


class CRD(DistillLoss):
    needs = "pairs"

    def forward(self, batch: DistillBatch) -> torch.Tensor:
        fixed = None if self.config.temperature is None else 1.0 / self.config.temperature
        scale_s, scale_t = scaled(fixed, batch.scale_s), scaled(fixed, batch.scale_t)

        def crd(a, b):
            (s_a, t_a), (s_b, t_b) = a, b
            teacher, student = scale_t * t_a @ t_b.T, scale_s * s_a @ s_b.T
            return 0.5 * (row_kl(teacher, student) + row_kl(teacher.T, student.T))

        return self.mean_over_pairs(batch, crd)


class ICL(DistillLoss):
    needs = "pairs"

    def __init__(self, config: ICLConfig) -> None:
        super().__init__(config)
        # published: β itself (a plain multiplier); exp: the log of the scale
        self.log_scale = nn.Parameter(torch.tensor(LOG_CLIP_SCALE), requires_grad=config.learn_scale)

    def scale(self) -> torch.Tensor:
        if self.config.form == "published":
            return self.log_scale
        return self.log_scale.clamp(max=math.log(100.0)).exp()

    def forward(self, batch: DistillBatch) -> torch.Tensor:
        scale = self.scale()

        def icl(a, b):
            (s_a, t_a), (s_b, t_b) = a, b
            return 0.5 * (diagonal_ce(scale * s_a @ t_b.T) + diagonal_ce(scale * s_b @ t_a.T))

        return self.mean_over_pairs(batch, icl)


def _rkd_distance(s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    def normalised(x):
        # exact distances (the matrix-product shortcut leaves rounding noise on the diagonal), divided by the mean
        # distance between different samples; a batch of one sample has none, and no relation to keep
        d = torch.cdist(x, x, compute_mode="donot_use_mm_for_euclid_dist")
        off = ~torch.eye(len(x), dtype=torch.bool, device=x.device)
        return d / d[off].mean().clamp_min(1e-12) if off.any() else d

    return F.smooth_l1_loss(normalised(s), normalised(t))


def _rkd_angle(s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    def angles(x):
        diff = F.normalize(x.unsqueeze(0) - x.unsqueeze(1), dim=-1)  # [n, n, e]: e_ij = (x_j - x_i) / |.|
        return torch.bmm(diff, diff.transpose(1, 2)).flatten()        # cos of the angle at i between j and k

    return F.smooth_l1_loss(angles(s), angles(t))


class RKD(DistillLoss):
    def forward(self, batch: DistillBatch) -> torch.Tensor:
        c = self.config
        total = 0.0
        for s, t in batch.views.values():
            total = total + c.distance_weight * _rkd_distance(s, t)
            if c.angle_weight:
                total = total + c.angle_weight * _rkd_angle(s[: c.angle_samples], t[: c.angle_samples])
        return total


def diagonal_ce(logits: torch.Tensor) -> torch.Tensor:
    """CE(M): the cross-entropy of the rows of ``logits`` with the diagonal as targets."""
    return F.cross_entropy(full_precision(logits), torch.arange(len(logits), device=logits.device))


def target_kl(p_logits: torch.Tensor, q_logits: torch.Tensor) -> torch.Tensor:
    """KL(P ‖ Q) with P = softmax(p_logits) a fixed target (its gradient stopped), row-wise, averaged over rows."""
    return row_kl(p_logits.detach(), q_logits)


class RelationLoss(DistillLoss):
    """CLIP-RD's relational losses over a pair of modalities (A plays I, B plays T).

    ``mode: published`` (the default) computes the authors' form with the loss's own learned
    scales (:meth:`published`); ``symmetric`` is a symmetric KL between the two distributions
    that :meth:`pair` names, at a fixed τ; ``teacher`` pulls each of them towards the same
    distribution computed from the teacher alone. The two are fusionkit's earlier readings.
    """

    needs = "pairs"

    @staticmethod
    def pair(s_a: torch.Tensor, t_a: torch.Tensor, s_b: torch.Tensor, t_b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def terms(self, batch: DistillBatch) -> dict[str, torch.Tensor]:
        """The published loss's parts, each averaged over the pairs of modalities."""
        parts = [self.published(s_a, t_a, s_b, t_b) for (s_a, t_a), (s_b, t_b) in batch.pairs()]
        return {key: torch.stack([p[key] for p in parts]).mean() for key in parts[0]}

    def published(self, s_i, t_i, s_t, t_t) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def forward(self, batch: DistillBatch) -> torch.Tensor:
        if self.config.mode == "published":
            return sum(self.terms(batch).values())
        tau = self.config.temperature

        def one(a, b):
            (s_a, t_a), (s_b, t_b) = a, b
            first, second = (m / tau for m in self.pair(s_a, t_a, s_b, t_b))
            if self.config.mode == "teacher":
                own_first, own_second = (m / tau for m in self.pair(t_a, t_a, t_b, t_b))
                return 0.5 * (row_kl(own_first, first) + row_kl(own_second, second))
            return softmax_relation_loss(first, second)

        return self.mean_over_pairs(batch, one)


class VRD(RelationLoss):
    """Published: ½[KL(α_T t_T s_Tᵀ ‖ α_I t_I s_Iᵀ) + KL(α_T s_T t_Tᵀ ‖ α_I s_I t_Iᵀ)] + ½[CE(α_I t_I s_Iᵀ) +
    CE(α_I s_I t_Iᵀ)] + ½[CE(α_T t_T s_Tᵀ) + CE(α_T s_T t_Tᵀ)], α_I and α_T learned (starting at ln(1/0.07)).
    Symmetric: P_A = softmax(s_A t_Aᵀ / τ), P_B = softmax(s_B t_Bᵀ / τ), ½[KL(P_A ‖ P_B) + KL(P_B ‖ P_A)]."""

    def __init__(self, config: RelationConfig) -> None:
        super().__init__(config)
        self.alpha_img = nn.Parameter(torch.tensor(LOG_CLIP_SCALE))
        self.alpha_txt = nn.Parameter(torch.tensor(LOG_CLIP_SCALE))

    @staticmethod
    def pair(s_a, t_a, s_b, t_b):
        return s_a @ t_a.T, s_b @ t_b.T

    def published(self, s_i, t_i, s_t, t_t):
        a_i, a_t = self.alpha_img, self.alpha_txt
        return {"kl": 0.5 * (target_kl(a_t * t_t @ s_t.T, a_i * t_i @ s_i.T) + target_kl(a_t * s_t @ t_t.T, a_i * s_i @ t_i.T)),
                "ce_img": 0.5 * (diagonal_ce(a_i * t_i @ s_i.T) + diagonal_ce(a_i * s_i @ t_i.T)),
                "ce_txt": 0.5 * (diagonal_ce(a_t * t_t @ s_t.T) + diagonal_ce(a_t * s_t @ t_t.T))}


class XRD(RelationLoss):
    """Published: ¼[KL(β t_T s_Iᵀ ‖ β t_I s_Tᵀ) + KL(β t_I s_Tᵀ ‖ β t_T s_Iᵀ) + KL(β s_T t_Iᵀ ‖ β s_I t_Tᵀ) +
    KL(β s_I t_Tᵀ ‖ β s_T t_Iᵀ)], β learned (starting at ln(1/0.07); the authors share it with icl).
    Symmetric: Q_AB = softmax(s_A t_Bᵀ / τ), Q_BA = softmax(s_B t_Aᵀ / τ), ½[KL(Q_AB ‖ Q_BA) + KL(Q_BA ‖ Q_AB)]."""

    def __init__(self, config: RelationConfig) -> None:
        super().__init__(config)
        self.beta = nn.Parameter(torch.tensor(LOG_CLIP_SCALE))

    @staticmethod
    def pair(s_a, t_a, s_b, t_b):
        return s_a @ t_b.T, s_b @ t_a.T

    def published(self, s_i, t_i, s_t, t_t):
        b = self.beta
        return {"kl": 0.25 * (target_kl(b * t_t @ s_i.T, b * t_i @ s_t.T) + target_kl(b * t_i @ s_t.T, b * t_t @ s_i.T)
                              + target_kl(b * s_t @ t_i.T, b * s_i @ t_t.T) + target_kl(b * s_i @ t_t.T, b * s_t @ t_i.T))}
