"""Unsupervised domain adaptation at feature level, without pseudo-labels.

Every step draws a batch of unlabelled target samples beside the labelled source
batch, runs the model on it, and adds each adaptation loss of the spec. Target
labels are never read: target batches come from :meth:`FeatureStore.batch`, which
returns features only.

An adaptation loss plugin builds a :class:`AdaptationLoss`; its config derives
from :class:`AdaptationConfig` (weight, warm-up, where it applies).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import attrs
import numpy as np
import torch
from torch import nn

from fusionkit.config import non_negative, option, unit_interval
from fusionkit.errors import DataError
from fusionkit.model import FusionModel, FusionOutput
from fusionkit.spec import Spec
from fusionkit.data.store import FeatureStore, target_rows


@attrs.frozen(kw_only=True)
class AdaptationConfig:
    """Options every adaptation loss has."""

    weight: float = option(0.1, doc="Weight of the loss.", validator=non_negative)
    warmup: float = option(0.0, doc="Share of training over which the weight ramps up linearly from 0.",
                           validator=unit_interval)
    on: Literal["fused", "encoders"] = option(
        "fused", doc="Align the fused feature, or each encoder's projected feature (averaged over encoders)."
    )


class AdaptationLoss(nn.Module):
    """A loss between source and target features ``[B, d]`` (``discrepancy``), or on target outputs.

    Subclasses implement :meth:`discrepancy`; losses on predictions (entropy) override
    :meth:`forward` instead.
    """

    def __init__(self, config: AdaptationConfig) -> None:
        super().__init__()
        self.config = config

    def discrepancy(self, source: torch.Tensor, target: torch.Tensor, progress: float) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, source: FusionOutput, target: FusionOutput, progress: float) -> torch.Tensor:
        """The discrepancy on the fused features, or averaged over encoders; 0 where a side has < 2 samples
        (a batch of one has no covariance or spread to compare)."""
        if self.config.on == "fused":
            pairs = [(source.fused, target.fused)]
        else:
            pairs = [(_available(source, k), _available(target, k)) for k in range(source.tokens.shape[1])]
        losses = [self.discrepancy(s, t, progress) for s, t in pairs if len(s) > 1 and len(t) > 1]
        return torch.stack(losses).mean() if losses else source.fused.new_zeros(())

    def scale(self, progress: float) -> float:
        ramp = 1.0 if self.config.warmup <= 0 else min(1.0, progress / self.config.warmup)
        return self.config.weight * ramp


def _available(out: FusionOutput, k: int) -> torch.Tensor:
    tokens = out.tokens[:, k]
    return tokens if out.mask is None else tokens[out.mask[:, k]]


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


class AdaptationObjective(nn.Module):
    """Draws target batches and sums the spec's adaptation losses for the trainer."""

    def __init__(self, model: FusionModel, losses: Sequence[tuple[str, AdaptationLoss]], target: FeatureStore,
                 target_index: np.ndarray, batch_size: int, seed: int) -> None:
        super().__init__()
        if len(target_index) == 0:
            raise DataError(f"{target.path}: the spec has adaptation losses but there are no target samples "
                            "(rows with domain 'target', or a --target store)")
        self.model = [model]  # not a submodule: its parameters are the trainer's already
        self.names = [name for name, _ in losses]
        self.losses = nn.ModuleList(loss for _, loss in losses)
        self.target = target
        self.target_index = target_index
        self.batch_size = batch_size
        self.seed = seed
        self.step = 0

    def target_batch(self, step: int) -> np.ndarray:
        """Target rows for a step: a function of (seed, step) only, so a resumed run draws the same ones."""
        rng = np.random.default_rng([self.seed, step])
        size = min(self.batch_size, len(self.target_index))
        return self.target_index[rng.choice(len(self.target_index), size=size, replace=False)]

    def forward(self, source: FusionOutput, rows: np.ndarray, progress: float) -> dict[str, torch.Tensor]:
        model = self.model[0]
        model.set_domain("target")  # per-domain statistics (when the model keeps them) follow the batch
        try:
            target = model(*self.target.inputs_for(model, self.target_batch(self.step)))
        finally:
            model.set_domain("source")
        self.step += 1
        return {f"adapt_{name}": loss.scale(progress) * loss(source, target, progress)
                for name, loss in zip(self.names, self.losses)}

    def get_extra_state(self) -> torch.Tensor:
        return torch.tensor(self.step)

    def set_extra_state(self, state: torch.Tensor) -> None:
        self.step = int(state)


def build_losses(spec: Spec, model: FusionModel) -> list[tuple[str, AdaptationLoss]]:
    from fusionkit.interfaces import BuildContext
    from fusionkit.plugins import get_registry

    registry = get_registry()
    ctx = BuildContext(labels=spec.labels, neutral=spec.neutral, latent_dim=spec.latent_dim,
                       encoder_names=spec.encoder_names, in_dim=model.fusion.out_dim, head_roles=tuple(spec.heads))
    out, seen = [], {}
    for comp in spec.adaptation:
        seen[comp.type] = seen.get(comp.type, 0) + 1
        name = comp.type if seen[comp.type] == 1 else f"{comp.type}{seen[comp.type]}"
        out.append((name, registry.get("adaptation_loss", comp.type).factory(comp.config, ctx)))
    return out


def adaptation_loss_factory(spec: Spec, target_store: FeatureStore | None = None):
    """The trainer's hook: builds the objective once the model and the source store exist."""

    def make(model: FusionModel, store: FeatureStore) -> AdaptationObjective:
        target, index = target_rows(store, target_store)
        return AdaptationObjective(model, build_losses(spec, model), target, index, spec.train.batch_size,
                                   spec.train.seed + 1)

    return make
