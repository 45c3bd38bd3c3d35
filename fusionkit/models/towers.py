"""Two-tower contrastive models (CLIP-style): two trunks into one L2-normalised embedding space.

A spec with a ``towers`` block assigns each of its encoders to one of two towers. Each
tower is built by the same assembler as a fusion model (:class:`~fusionkit.models.fusion.Trunk`:
encoders, projectors, gate, top-n selection, fusion) and ends in a linear embedding that
is L2-normalised. Training minimises the CLIP loss, the symmetric cross-entropy over the
batch's similarity matrix scaled by a learnable logit scale that starts at
``ln(1 / temperature)`` and is clamped to at most ``ln(max_scale)`` after each step.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fusionkit.checkpoint import save_checkpoint
from fusionkit.errors import DataError
from fusionkit.hardware.devices import full_precision
from fusionkit.models.fusion import Trunk, count_parameters
from fusionkit.plugins import get_registry
from fusionkit.registry import Registry
from fusionkit.spec import Spec, TowerSpec

__all__ = ["local_clip_loss", "TwoTowerOutput", "Tower", "TwoTowerModel", "clip_loss", "retrieval_metrics"]


@dataclass
class TwoTowerOutput:
    """``embeddings``: tower name -> L2-normalised ``[B, embed_dim]``; ``kept``: tower -> kept encoders
    (indices into that tower's ``encoder_names``); ``scale``: the logit scale (exp of its log)."""

    embeddings: dict[str, torch.Tensor]
    kept: dict[str, torch.Tensor]
    scale: torch.Tensor
    aux_losses: dict[str, torch.Tensor]


class Tower(Trunk):
    """One tower: a trunk over its encoders, then a linear embedding, L2-normalised."""

    def __init__(self, spec: Spec, name: str, tower: TowerSpec, registry: Registry) -> None:
        index = {e.name: i for i, e in enumerate(spec.encoders)}
        super().__init__(spec, [(index[n], spec.encoders[index[n]]) for n in tower.encoders], tower.gate, tower.fusion,
                         registry, where=f"towers.{name}.")
        self.embed = nn.Linear(self.fusion.out_dim, tower.embed_dim)
        self.embed_dim = tower.embed_dim

    def forward(self, inputs: Mapping[str, torch.Tensor], lengths: Mapping[str, torch.Tensor] | None = None,
                mask: torch.Tensor | None = None) -> tuple[torch.Tensor, Any]:
        encoded = self.encode(inputs, lengths, mask)
        selection, fused = encoded.selection, encoded.fused
        return F.normalize(self.embed(fused), dim=-1), selection


class TwoTowerModel(nn.Module):
    """Two towers mapping two modalities into one embedding space, trained contrastively.

    ``forward(inputs, lengths=None, mask=None)`` takes the inputs of every encoder of the spec
    (as a fusion model does; ``mask`` ``[B, K]`` in the spec's encoder order) and returns a
    :class:`TwoTowerOutput`.
    """

    def __init__(self, spec: Spec, registry: Registry | None = None) -> None:
        super().__init__()
        if registry is None:
            registry = get_registry()
        if not spec.towers:
            raise DataError("a two-tower model needs a spec with a 'towers' block")
        self.spec = spec
        self.encoder_names: tuple[str, ...] = spec.encoder_names
        self.labels: tuple[str, ...] = spec.labels
        self.tower_names: tuple[str, ...] = tuple(spec.towers)
        self.towers = nn.ModuleDict({name: Tower(spec, name, t, registry) for name, t in spec.towers.items()})
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1.0 / spec.contrastive.temperature)),
                                        requires_grad=spec.contrastive.learn_scale)

    def _columns(self, tower: Tower) -> list[int]:
        return [self.encoder_names.index(n) for n in tower.encoder_names]

    def forward(self, inputs: Mapping[str, torch.Tensor], lengths: Mapping[str, torch.Tensor] | None = None,
                mask: torch.Tensor | None = None) -> TwoTowerOutput:
        if not isinstance(inputs, Mapping):
            raise DataError(f"model inputs must be a dict keyed by encoder name {list(self.encoder_names)}")
        embeddings, kept, aux = {}, {}, {}
        for name, tower in self.towers.items():
            sub = {n: inputs[n] for n in tower.encoder_names if n in inputs}
            tower._check_inputs(sub, lengths, None)
            sub_mask = None if mask is None else mask[:, self._columns(tower)]
            sub_lengths = None if lengths is None else {n: v for n, v in lengths.items() if n in tower.encoders}
            embeddings[name], selection = tower(sub, sub_lengths, sub_mask)
            kept[name] = selection.kept
            if selection.balance_loss is not None:
                aux[f"gate_balance_{name}"] = selection.balance_loss
        return TwoTowerOutput(embeddings, kept, self.logit_scale.exp(), aux)

    def clamp_scale(self) -> None:
        """Keep the logit scale at most ln(max_scale) (called after every optimiser step)."""
        with torch.no_grad():
            self.logit_scale.clamp_(max=math.log(self.spec.contrastive.max_scale))

    def set_epoch(self, epoch: int) -> None:
        for tower in self.towers.values():
            tower.set_epoch(epoch)

    @staticmethod
    def teacher_outputs(out: TwoTowerOutput) -> dict[str, torch.Tensor]:
        """What a distillation teacher's batch gives its student's losses: each tower's embedding (``tower.<name>``)."""
        return {f"tower.{k}": v for k, v in out.embeddings.items()}

    def teacher_constants(self) -> dict[str, torch.Tensor]:
        """What a distillation teacher gives once: its learned logit scale (``scale``)."""
        return {"scale": self.logit_scale.detach().exp()}

    def live_encoders(self) -> dict[str, Any]:
        """Encoder name -> every tower's encoders that read raw inputs."""
        return {k: v for tower in self.towers.values() for k, v in tower.live_encoders().items()}

    def precomputed_pooling(self) -> dict[str, str]:
        return {k: v for tower in self.towers.values() for k, v in tower.precomputed_pooling().items()}

    @torch.no_grad()
    def fit_standardization(self, inputs: Mapping[str, torch.Tensor], lengths: Mapping[str, torch.Tensor] | None = None,
                            mask: torch.Tensor | None = None, domain: str = "source") -> None:
        """Fit each tower's input standardisation (see :meth:`Trunk.fit_standardization`)."""
        for tower in self.towers.values():
            tower.fit_standardization({n: inputs[n] for n in tower.encoder_names},
                                      None if lengths is None else {n: v for n, v in lengths.items() if n in tower.encoders},
                                      None if mask is None else mask[:, self._columns(tower)], domain=domain)

    def parameter_counts(self) -> dict[str, int]:
        out = {}
        for name, tower in self.towers.items():
            out.update({f"{name}.{k}": v for k, v in tower.parameter_counts().items()})
            out[f"{name}.embed"] = count_parameters(tower.embed)
        out["logit_scale"] = count_parameters(self.logit_scale)
        return out

    def save_pretrained(self, directory: str) -> None:
        """Write spec, ``model.safetensors`` and metadata to ``directory`` atomically."""
        save_checkpoint(self, directory)


def clip_loss(a: torch.Tensor, b: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Symmetric cross-entropy over the similarity matrix ``scale · a bᵀ``; matching rows are the targets."""
    logits = full_precision(scale * a @ b.T)  # the softmax in float32 (at least) under any autocast
    target = torch.arange(len(a), device=a.device)
    return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target))


def local_clip_loss(a: torch.Tensor, b: torch.Tensor, all_a: torch.Tensor, all_b: torch.Tensor, offset: int,
                    scale: torch.Tensor) -> torch.Tensor:
    """:func:`clip_loss` of one rank's rows ``a``, ``b`` against every rank's columns ``all_b``, ``all_a`` (its rows
    start at ``offset`` in them): the rows' share of the global loss, averaged over the rank's rows."""
    target = torch.arange(offset, offset + len(a), device=a.device)
    return 0.5 * (F.cross_entropy(full_precision(scale * a @ all_b.T), target) +
                  F.cross_entropy(full_precision(scale * b @ all_a.T), target))


def retrieval_metrics(a: np.ndarray, b: np.ndarray, classes: np.ndarray | None = None,
                      names: tuple[str, str] = ("a", "b")) -> dict[str, float]:
    """Instance retrieval across two towers' normalised embeddings ``[N, e]`` (row i of each is one sample).

    Recall@k in both directions (is the sample's own partner among the k most similar), their
    means, and, with ``classes``, the share of samples whose nearest neighbour in the other
    tower has their class.
    """
    sim = a @ b.T
    own = np.diag(sim)
    # rank of the true partner: how many candidates score strictly higher (ties count in its favour)
    rank_ab = (sim > own[:, None]).sum(1)
    rank_ba = (sim > own[None, :]).sum(0)
    x, y = names
    out: dict[str, float] = {"n": float(len(a))}
    for k in (1, 5):
        out[f"r{k}_{x}_to_{y}"] = float((rank_ab < k).mean())
        out[f"r{k}_{y}_to_{x}"] = float((rank_ba < k).mean())
        out[f"r{k}"] = 0.5 * (out[f"r{k}_{x}_to_{y}"] + out[f"r{k}_{y}_to_{x}"])
    if classes is not None:
        nn_ab = classes[sim.argmax(1)] == classes
        nn_ba = classes[sim.argmax(0)] == classes
        out["nn_class_accuracy"] = float(0.5 * (nn_ab.mean() + nn_ba.mean()))
    out["score"] = out["r1"]
    return out
