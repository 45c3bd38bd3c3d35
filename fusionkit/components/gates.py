"""Built-in gates: attention (the seed method), mlp, static, uniform."""

from __future__ import annotations

import attrs
import torch
from torch import nn

from fusionkit.config import option, positive, unit_interval
from fusionkit.interfaces import BuildContext, Gate, GateConfig

__all__ = ["AttentionGateConfig", "MLPGateConfig", "StaticGateConfig", "UniformGateConfig", "AttentionGate",
           "MLPGate", "StaticGate", "UniformGate"]


@attrs.frozen(kw_only=True)
class AttentionGateConfig(GateConfig):
    """Self-attention across the K encoder tokens, then one score per token."""

    heads: int = option(4, doc="Attention heads (must divide latent_dim).", validator=positive)
    layers: int = option(1, doc="Self-attention layers before scoring.", validator=positive)
    dropout: float = option(0.0, doc="Dropout inside the attention layers.", validator=unit_interval)


@attrs.frozen(kw_only=True)
class MLPGateConfig(GateConfig):
    """Each encoder token scored alone by a small MLP."""

    hidden: int = option(64, doc="Hidden size of the scoring MLP.", validator=positive)


@attrs.frozen(kw_only=True)
class StaticGateConfig(GateConfig):
    """One learned score per encoder, the same for every sample."""


@attrs.frozen(kw_only=True)
class UniformGateConfig(GateConfig):
    """Equal scores: with top_n = K it is naive fusion."""


class AttentionGate(Gate):
    scouts = True  # an on-demand encoder's identity token attends to the tokens that have run
    reaches_every_encoder = True  # every kept score attends to every token

    def __init__(self, config: AttentionGateConfig, context: BuildContext) -> None:
        super().__init__(config)
        d = context.latent_dim
        if d % config.heads:
            raise ValueError(f"gate.heads={config.heads} must divide latent_dim={d}")
        layer = nn.TransformerEncoderLayer(
            d, config.heads, dim_feedforward=2 * d, dropout=config.dropout, batch_first=True, norm_first=True
        )
        self.encoder = nn.TransformerEncoder(layer, config.layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(d)
        self.scorer = nn.Linear(d, 1)

    def score(self, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        # A sample with no encoder at all would make attention NaN; let it attend anyway (nothing is kept).
        padding = None if mask is None else ~mask & mask.any(dim=1, keepdim=True)
        hidden = self.encoder(tokens, src_key_padding_mask=padding)
        return self.scorer(self.norm(hidden)).squeeze(-1)


class MLPGate(Gate):
    def __init__(self, config: MLPGateConfig, context: BuildContext) -> None:
        super().__init__(config)
        d = context.latent_dim
        self.mlp = nn.Sequential(nn.LayerNorm(d), nn.Linear(d, config.hidden), nn.GELU(), nn.Linear(config.hidden, 1))

    def score(self, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.mlp(tokens).squeeze(-1)


class StaticGate(Gate):
    scouts = True  # one learned score per encoder: the same choice for every sample

    def __init__(self, config: StaticGateConfig, context: BuildContext) -> None:
        super().__init__(config)
        self.logits = nn.Parameter(torch.zeros(context.num_encoders))

    def score(self, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.logits.unsqueeze(0).expand(tokens.shape[0], -1)


class UniformGate(Gate):
    def __init__(self, config: UniformGateConfig, context: BuildContext) -> None:
        super().__init__(config)

    def score(self, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        # Offsets of 1e-6 break ties by encoder order, so the kept set is deterministic
        # while the weights stay uniform to within 1e-6.
        k = tokens.shape[1]
        order = torch.arange(k, 0, -1, device=tokens.device, dtype=tokens.dtype) * 1e-6
        return order.unsqueeze(0).expand(tokens.shape[0], -1)
