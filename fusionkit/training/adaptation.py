"""Unsupervised domain adaptation at feature level, without pseudo-labels.

Every step draws a batch of unlabelled target samples beside the labelled source
batch, runs the model on it, and adds each adaptation loss of the spec. Target
labels are never read: target batches come from :meth:`FeatureStore.batch`, which
returns features only.

An adaptation loss plugin builds a :class:`fusionkit.interfaces.AdaptationLoss`; its config
derives from :class:`fusionkit.interfaces.AdaptationConfig` (weight, warm-up, where it applies).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from fusionkit.conditional.rows import RowShare
from fusionkit.data.store import FeatureStore, target_rows
from fusionkit.errors import DataError
from fusionkit.hardware.distributed import Dist
from fusionkit.interfaces import AdaptationLoss as _AdaptationLoss
from fusionkit.interfaces import BuildContext
from fusionkit.models.fusion import FusionModel, FusionOutput
from fusionkit.moved import moved_names
from fusionkit.plugins import get_registry
from fusionkit.spec import Spec
from fusionkit.training.objective import ObjectiveTerm


class AdaptationObjective(ObjectiveTerm):
    """Draws target batches and sums the spec's adaptation losses for the trainer.

    Under torchrun each step draws one global target batch, and each rank runs the model on its share of it, as
    source batches are shared out; a loss that declares ``global_batch`` sees every rank's source and target rows
    (:meth:`fusionkit.hardware.distributed.Dist.gather_fields`)."""

    forwards_model = True

    def __init__(self, model: FusionModel, losses: Sequence[tuple[str, _AdaptationLoss]], target: FeatureStore,
                 target_index: np.ndarray, batch_size: int, seed: int, dist: Dist | None = None) -> None:
        super().__init__()
        if len(target_index) == 0:
            raise DataError(f"{target.path}: the spec has adaptation losses but there are no target samples "
                            "(rows with domain 'target', or a --target store)")
        self.model = [model]  # not a submodule: its parameters are the trainer's already
        self.dist = dist or Dist()
        self.names = [name for name, _ in losses]
        self.losses = nn.ModuleList(loss for _, loss in losses)
        self.target = target
        self.target_index = target_index
        self.batch_size = batch_size
        self.seed = seed
        self.step = 0

    def shares(self, name: str) -> bool:
        return self.dist.enabled and self.losses[self.names.index(name[len("adapt_"):])].global_batch

    def target_batch(self, step: int) -> np.ndarray:
        """Target rows for a step (the global batch): a function of (seed, step) only, so a resumed run draws the
        same ones."""
        rng = np.random.default_rng([self.seed, step])
        size = min(self.batch_size, len(self.target_index))
        return self.target_index[rng.choice(len(self.target_index), size=size, replace=False)]

    def forward(self, source: FusionOutput, rows: np.ndarray, progress: float) -> dict[str, torch.Tensor]:
        model = self.model[0]
        drawn = self.target_batch(self.step)
        local = self.dist.shard(drawn)
        own = len(local)
        if own == 0:  # fewer target rows than ranks: a stand-in row, left out of every loss
            local = drawn[:1]
        model.set_domain("target")  # per-domain statistics (when the model keeps them) follow the batch
        if self.dist.enabled:  # per-row draws: the global target batch's
            model.row_share = RowShare.of(len(drawn), self.dist.rank, self.dist.world_size)
        try:
            target = model(*self.target.inputs_for(model, local))
        finally:
            model.set_domain("source")
        self.step += 1
        views: dict[bool, tuple[FusionOutput, FusionOutput]] = {}
        out = {}
        for name, loss in zip(self.names, self.losses):
            wide = self.dist.enabled and loss.global_batch
            if wide not in views:
                gather = self.dist.gather_fields if wide else Dist().gather_fields
                views[wide] = gather(source, len(rows)), gather(target, own)
            out[f"adapt_{name}"] = loss.scale(progress) * loss(*views[wide], progress)
        return out

    def get_extra_state(self) -> torch.Tensor:
        return torch.tensor(self.step)

    def set_extra_state(self, state: torch.Tensor) -> None:
        self.step = int(state)


def build_losses(spec: Spec, model: FusionModel) -> list[tuple[str, _AdaptationLoss]]:
    registry = get_registry()
    ctx = BuildContext(labels=spec.labels, neutral=spec.neutral, latent_dim=spec.latent_dim,
                       encoder_names=spec.encoder_names, in_dim=model.fusion.out_dim, head_roles=tuple(spec.heads))
    out, seen = [], {}
    for comp in spec.adaptation:
        seen[comp.type] = seen.get(comp.type, 0) + 1
        name = comp.type if seen[comp.type] == 1 else f"{comp.type}{seen[comp.type]}"
        out.append((name, registry.get("adaptation_loss", comp.type).factory(comp.config, ctx)))
    return out


def adaptation_loss_factory(spec: Spec, target_store: FeatureStore | None = None, dist: Dist | None = None):
    """The trainer's hook: builds the objective once the model and the source store exist (on the ranks of
    ``dist``)."""

    def make(model: FusionModel, store: FeatureStore) -> AdaptationObjective:
        target, index = target_rows(store, target_store)
        return AdaptationObjective(model, build_losses(spec, model), target, index, spec.train.batch_size,
                                   spec.train.seed + 1, dist)

    return make


__getattr__ = moved_names(__name__, {"AdaptationConfig": "fusionkit.interfaces", "AdaptationLoss": "fusionkit.interfaces",
                                     "GradientReversal": "fusionkit.components.adaptation",
                                     "grl_schedule": "fusionkit.components.adaptation"})
