"""One plugin module in the 0.1.0 style: module-level hook implementations, as an entry point names them.

Every registration style the 0.1.0 docs showed:
- an encoder registered with a factory **function** ``build(config, context)``;
- a gate registered with a factory function (the 0.1.0 docs: "a factory takes (config, context) and returns
  the component"), and a gate registered as its class;
- a fusion class; an adaptation loss and a distillation loss imported from their 0.1.0 homes
  (``fusionkit.training.adaptation``, ``fusionkit.training.distill``), the distillation loss registered through a
  ``lambda``; a dataset class with ``Sample`` from ``fusionkit.data.store``.
"""

import attrs
import numpy as np
import torch
from torch import nn

import fusionkit
from fusionkit.config import option, positive
from fusionkit.data.store import Sample
from fusionkit.interfaces import Dataset, Encoder, Fusion, Gate, GateConfig
from fusionkit.training.adaptation import AdaptationConfig, AdaptationLoss
from fusionkit.training.distill import DistillBatch, DistillConfig, DistillLoss


@attrs.frozen(kw_only=True)
class OldEncoderConfig:
    """A linear map of stored features."""

    dim: int = option(doc="Input feature size.", validator=positive)
    out_dim: int = option(8, doc="Size of the encoded vector.", validator=positive)


class OldEncoder(Encoder):
    def __init__(self, config):
        super().__init__()
        self.out_dim = config.out_dim
        self.net = nn.Linear(config.dim, config.out_dim)

    def forward(self, x, lengths=None):
        return self.net(x)


def build(config, context):
    return OldEncoder(config)


@attrs.frozen(kw_only=True)
class NormGateConfig(GateConfig):
    """Scores each token by a learned projection of its norm."""

    scale: float = option(1.0, doc="Initial scale of the norm score.", validator=positive)


class NormGate(Gate):
    def __init__(self, config, context):
        super().__init__(config)
        self.scale = nn.Parameter(torch.tensor(config.scale))

    def score(self, tokens, mask):
        return self.scale * tokens.norm(dim=-1)


def make_norm_gate(config, context):
    return NormGate(config, context)


@attrs.frozen(kw_only=True)
class MaxFusionConfig:
    """Element-wise maximum over the kept slots (order-free)."""


class MaxFusion(Fusion):
    def __init__(self, config, context):
        super().__init__()
        self.out_dim = context.latent_dim

    def forward(self, slots, weights, slot_mask):
        return slots.masked_fill(~slot_mask.unsqueeze(-1), float("-inf")).amax(dim=1).nan_to_num(0.0)


@attrs.frozen(kw_only=True)
class MeanGapConfig(AdaptationConfig):
    """Squared distance between the source and target feature means."""


class MeanGap(AdaptationLoss):
    def __init__(self, config, context):
        super().__init__(config)

    def discrepancy(self, source, target, progress):
        return (source.mean(0) - target.mean(0)).pow(2).sum()


@attrs.frozen(kw_only=True)
class CosineConfig(DistillConfig):
    """One minus the cosine of student and teacher embeddings, per view."""


class Cosine(DistillLoss):
    needs = "views"

    def forward(self, batch: DistillBatch) -> torch.Tensor:
        return sum((1 - (s * t).sum(-1)).mean() for s, t in batch.views.values())


@attrs.frozen(kw_only=True)
class TwoClassConfig:
    """Two well-separated classes, one encoder."""

    samples: int = option(40, doc="Number of samples.", validator=positive)


class TwoClass(Dataset):
    def labels(self):
        return ("low", "high")

    def generate(self):
        n = self.config.samples
        samples = [Sample(id=f"x{i}", labels=[{"emotion": ("low", "high")[i % 2], "salience": 100.0}],
                          group=f"g{i % 4}", fold=i % 4) for i in range(n)]
        return samples, {"level": np.array([[float(i % 2)] * 3 for i in range(n)])}


@fusionkit.hookimpl
def register_encoders(register):
    register("old_encoder", build, config=OldEncoderConfig, description="A linear map (0.1.0 factory function).")


@fusionkit.hookimpl
def register_gates(register):
    register("old_norm_gate", make_norm_gate, config=NormGateConfig, description="A gate from a factory function.")
    register("old_class_gate", NormGate, config=NormGateConfig, description="A gate registered as its class.")


@fusionkit.hookimpl
def register_fusions(register):
    register("old_max_fusion", MaxFusion, config=MaxFusionConfig, description="Element-wise max of the kept slots.")


@fusionkit.hookimpl
def register_adaptation_losses(register):
    register("old_mean_gap", MeanGap, config=MeanGapConfig, description="Squared distance of feature means.")


@fusionkit.hookimpl
def register_distill_losses(register):
    register("old_cosine", lambda config, context: Cosine(config), config=CosineConfig,
             description="One minus the cosine of student and teacher embeddings.")


@fusionkit.hookimpl
def register_datasets(register):
    register("old-two-class", TwoClass, config=TwoClassConfig, description="Two separated classes.")
