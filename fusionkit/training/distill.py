"""Relational distillation: a frozen teacher checkpoint pulls a lighter student towards its geometry.

A spec's ``distill`` block names the teacher (a checkpoint directory) and a list of
distillation-loss plugins. :class:`DistillationObjective` is the trainer's objective term:

- the teacher is loaded, checked against the student (same kind of model, same towers or
  labels, its encoders present in the store), frozen and put in eval mode;
- its outputs are computed **once per sample** when training starts and cached;
- each step it gathers a :class:`DistillBatch` — student and teacher embeddings, paired —
  and adds every loss, times its weight.

Where a student embedding is narrower or wider than the teacher's, a learned linear map
(no bias) takes it into the teacher's space, as CLIP-KD does; these maps belong to the
objective, are trained with the student, and are not part of the saved student.

What is paired (see docs/distillation.md):

- two-tower models: ``views`` and ``modalities`` are the two towers' embeddings;
- fusion models: ``views`` is the fused vector; ``modalities`` are the per-encoder latent
  tokens of the encoders both models have (so pair losses average over pairs of encoders);
  ``logits`` are the heads' logits, for ``kd``.

Every embedding in a batch is L2-normalised (after the projection).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fusionkit.data.open import spec_store
from fusionkit.data.raw import is_manifest, live_encoder_names
from fusionkit.data.store import FeatureStore
from fusionkit.errors import CheckpointError, DataError, FusionkitError
from fusionkit.hardware.devices import device_of
from fusionkit.hardware.distributed import Dist
from fusionkit.interfaces import DistillBatch as _DistillBatch
from fusionkit.interfaces import DistillLoss as _DistillLoss
from fusionkit.models.factory import load_model
from fusionkit.models.towers import TwoTowerModel
from fusionkit.moved import moved_names
from fusionkit.plugins import get_registry
from fusionkit.spec import Spec
from fusionkit.training.objective import ObjectiveTerm

# --- the trainer's term --------------------------------------------------------------------------


class DistillationObjective(ObjectiveTerm):
    """Adds the spec's distillation losses against a frozen, cached teacher (a trainer term)."""

    def __init__(self, model: nn.Module, store: FeatureStore, spec: Spec, dist: Dist | None = None) -> None:
        super().__init__()
        self.dist = dist or Dist()
        assert spec.distill is not None
        self.model = [model]  # not a submodule: its parameters are the trainer's already
        self.teacher = [load_teacher(spec.distill.teacher).to(device_of(model))]  # with its cache, on the model's device
        teacher = self.teacher[0]
        self.two_tower = check_fits(teacher, model, spec.distill.teacher)
        self.shared_encoders = () if self.two_tower else tuple(n for n in model.encoder_names if n in teacher.encoder_names)
        registry = get_registry()
        self.names: list[str] = []
        losses = []
        for i, comp in enumerate(spec.distill.losses):
            loss = registry.get("distill_loss", comp.type).factory(comp.config, None)
            self._check_needs(loss, f"distill.losses[{i}]", comp.type)
            self.names.append(comp.type if comp.type not in self.names else f"{comp.type}{i}")
            losses.append(loss)
        self.losses = nn.ModuleList(losses)
        self.cache = teacher_outputs(teacher, store, spec.distill.teacher)
        self.projections = nn.ModuleDict(self._projections(model, teacher))

    def _check_needs(self, loss: _DistillLoss, path: str, name: str) -> None:
        if loss.needs == "logits" and self.two_tower:
            raise FusionkitError(f"{path}: {name!r} distils label probabilities; a two-tower model has none. "
                                 "Use it with fusion models, or choose fd, crd, icl, rkd, vrd or xrd.")
        if loss.needs == "pairs" and not self.two_tower and len(self.shared_encoders) < 2:
            raise FusionkitError(
                f"{path}: {name!r} compares pairs of modalities, here the encoders both teacher and student have, "
                f"but they share {list(self.shared_encoders)}; give the student two or more of the teacher's encoders."
            )

    def _projections(self, model: nn.Module, teacher: nn.Module) -> dict[str, nn.Linear]:
        out = {}
        if self.two_tower:
            for name, tower in model.towers.items():
                t_dim = teacher.towers[name].embed_dim
                if tower.embed_dim != t_dim:
                    out[f"view_{name}"] = nn.Linear(tower.embed_dim, t_dim, bias=False)
            return out
        if model.fusion.out_dim != teacher.fusion.out_dim:
            out["view_fused"] = nn.Linear(model.fusion.out_dim, teacher.fusion.out_dim, bias=False)
        if self.shared_encoders and model.spec.latent_dim != teacher.spec.latent_dim:
            out["tokens"] = nn.Linear(model.spec.latent_dim, teacher.spec.latent_dim, bias=False)
        return out

    def _project(self, key: str, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.projections[key](x) if key in self.projections else x, dim=-1)

    def shares(self, name: str) -> bool:
        return self.dist.enabled and self.losses[self.names.index(name[len("distill_"):])].global_batch

    def batch(self, out: Any, rows: np.ndarray, global_batch: bool = True) -> _DistillBatch:
        """The paired student / teacher embeddings of one training batch: this rank's ``rows``, and under torchrun
        (with ``global_batch``) every rank's, gathered in the global batch's order (gradients through this rank's
        own rows), so that the relational losses see the batch one process would."""
        idx = torch.as_tensor(rows, dtype=torch.long)
        n, cache = len(rows), self.cache
        gather = self.dist.gather_batch if global_batch else (lambda x: x)
        if self.two_tower:
            views = {name: (gather(self._project(f"view_{name}", emb[:n])), gather(cache[f"tower.{name}"][idx]))
                     for name, emb in out.embeddings.items()}
            return _DistillBatch(views, views, scale_s=out.scale, scale_t=cache["scale"])
        model, teacher = self.model[0], self.teacher[0]
        views = {"fused": (gather(self._project("view_fused", out.fused[:n])),
                           gather(F.normalize(cache["fused"][idx], dim=-1)))}
        modalities = {name: (gather(self._project("tokens", out.tokens[:n, model.encoder_names.index(name)])),
                             gather(F.normalize(cache["tokens"][idx, teacher.encoder_names.index(name)], dim=-1)))
                      for name in self.shared_encoders}
        logits = {role: (gather(out.logits[role][:n]), gather(cache[f"logits.{role}"][idx]), model.heads[role].activation)
                  for role in out.logits if f"logits.{role}" in cache}
        return _DistillBatch(views, modalities, logits)

    def forward(self, out: Any, rows: np.ndarray, progress: float) -> dict[str, torch.Tensor]:
        batches: dict[bool, _DistillBatch] = {}
        values = {}
        for name, loss in zip(self.names, self.losses):
            wide = self.dist.enabled and loss.global_batch
            if wide not in batches:
                batches[wide] = self.batch(out, rows, wide)
            values[f"distill_{name}"] = loss.config.weight * loss(batches[wide])
        return values


def load_teacher(path: str) -> nn.Module:
    """The teacher checkpoint, frozen and in eval mode; a clear error when it is missing or broken."""
    try:
        teacher = load_model(path)
    except CheckpointError as exc:
        raise CheckpointError(f"distill.teacher: cannot load the teacher: {exc}") from exc
    teacher.requires_grad_(False)
    return teacher.eval()


def check_fits(teacher: nn.Module, student: nn.Module, where: str) -> bool:
    """Raise unless the teacher fits the student; returns whether both are two-tower models."""
    t_two, s_two = isinstance(teacher, TwoTowerModel), isinstance(student, TwoTowerModel)
    kind = {True: "a two-tower model", False: "a fusion model"}
    if t_two != s_two:
        raise CheckpointError(f"distill.teacher: {where} is {kind[t_two]}, but the student is {kind[s_two]}; "
                              "distil like into like")
    if t_two and set(teacher.towers) != set(student.towers):
        raise CheckpointError(f"distill.teacher: {where} has towers {sorted(teacher.towers)}, the student "
                              f"{sorted(student.towers)}; name the student's towers as the teacher's")
    if tuple(teacher.labels) != tuple(student.labels):
        raise CheckpointError(f"distill.teacher: {where} predicts labels {list(teacher.labels)}, the student "
                              f"{list(student.labels)}; they must be the same, in the same order")
    return t_two


@torch.no_grad()
def teacher_outputs(teacher: nn.Module, store: FeatureStore, where: str, batch_size: int = 256) -> dict[str, torch.Tensor]:
    """The teacher's outputs for every sample of the store, computed once (the cache).

    Two-tower: ``tower.<name>`` embeddings and ``scale``; fusion: ``fused``, ``tokens``
    ``[N, K, d]`` and ``logits.<role>``.
    """
    raw = None  # a live teacher reads the raw inputs of the student's manifest
    if live_encoder_names(teacher.spec) and store.raw is not None and not is_manifest(store.path):
        raw = store.raw.path
    try:
        tstore = spec_store(teacher.spec, store.path, raw)
    except DataError as exc:
        raise DataError(f"distill.teacher: {where} does not fit the store: {exc}") from exc
    teacher.eval()
    parts: dict[str, list[torch.Tensor]] = {}
    index = np.arange(len(tstore))
    for start in range(0, len(index), batch_size):
        out = teacher(*tstore.inputs_for(teacher, index[start : start + batch_size]))
        for key, value in teacher.teacher_outputs(out).items():
            parts.setdefault(key, []).append(value.detach())
    return {**{k: torch.cat(v) for k, v in parts.items()}, **teacher.teacher_constants()}


def distillation_term(spec: Spec, dist: Dist | None = None):
    """The trainer's term factory for a spec with a ``distill`` block."""

    def make(model: nn.Module, store: FeatureStore) -> DistillationObjective:
        return DistillationObjective(model, store, spec, dist)

    return make


__getattr__ = moved_names(__name__, {name: "fusionkit.interfaces" for name in ("DistillBatch", "DistillConfig", "DistillLoss")})
