"""Built-in fusions: weighted_sum (order-free), rank_concat and rank_attention (rank-aware)."""

from __future__ import annotations

import attrs
import torch
from torch import nn

from fusionkit.config import non_negative, option, positive, unit_interval
from fusionkit.interfaces import BuildContext, Fusion

__all__ = ["WeightedSumConfig", "RankConcatConfig", "RankAttentionConfig", "WeightedSumFusion", "RankConcatFusion",
           "RankAttentionFusion"]


@attrs.frozen(kw_only=True)
class WeightedSumConfig:
    """Sum of the kept slots weighted by the gate: ignores rank order."""


@attrs.frozen(kw_only=True)
class RankConcatConfig:
    """The n slots, each scaled by its weight and tagged with a rank embedding, concatenated."""

    out_dim: int = option(0, doc="Size of a linear layer after the concatenation; 0 keeps n * latent_dim.", validator=non_negative)
    dropout: float = option(0.0, doc="Dropout on the fused vector.", validator=unit_interval)


@attrs.frozen(kw_only=True)
class RankAttentionConfig:
    """A small transformer over the rank-ordered slots, pooled with the gate weights."""

    heads: int = option(4, doc="Attention heads (must divide latent_dim).", validator=positive)
    layers: int = option(1, doc="Transformer layers.", validator=positive)
    dropout: float = option(0.1, doc="Dropout inside the transformer.", validator=unit_interval)


def _scaled(slots: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Slots times their weight, rescaled by n so that uniform weights leave them unchanged."""
    return slots * (weights * weights.shape[1]).unsqueeze(-1)


class WeightedSumFusion(Fusion):
    def __init__(self, config: WeightedSumConfig, context: BuildContext) -> None:
        super().__init__()
        self.out_dim = context.latent_dim

    def forward(self, slots: torch.Tensor, weights: torch.Tensor, slot_mask: torch.Tensor) -> torch.Tensor:
        return torch.einsum("bn,bnd->bd", weights, slots)


class RankConcatFusion(Fusion):
    def __init__(self, config: RankConcatConfig, context: BuildContext) -> None:
        super().__init__()
        d, n = context.latent_dim, context.top_n
        self.rank_embedding = nn.Parameter(torch.randn(n, d) * 0.02)
        self.proj = nn.Linear(n * d, config.out_dim) if config.out_dim else None
        self.dropout = nn.Dropout(config.dropout)
        self.out_dim = config.out_dim or n * d

    def forward(self, slots: torch.Tensor, weights: torch.Tensor, slot_mask: torch.Tensor) -> torch.Tensor:
        tagged = (_scaled(slots, weights) + self.rank_embedding) * slot_mask.unsqueeze(-1).to(slots.dtype)
        fused = tagged.flatten(1)
        if self.proj is not None:
            fused = torch.nn.functional.gelu(self.proj(fused))
        return self.dropout(fused)


class RankAttentionFusion(Fusion):
    def __init__(self, config: RankAttentionConfig, context: BuildContext) -> None:
        super().__init__()
        d, n = context.latent_dim, context.top_n
        if d % config.heads:
            raise ValueError(f"fusion.heads={config.heads} must divide latent_dim={d}")
        self.rank_embedding = nn.Parameter(torch.randn(n, d) * 0.02)
        layer = nn.TransformerEncoderLayer(
            d, config.heads, dim_feedforward=2 * d, dropout=config.dropout, batch_first=True, norm_first=True
        )
        self.encoder = nn.TransformerEncoder(layer, config.layers, enable_nested_tensor=False)
        self.out_dim = d

    def forward(self, slots: torch.Tensor, weights: torch.Tensor, slot_mask: torch.Tensor) -> torch.Tensor:
        tokens = _scaled(slots, weights) + self.rank_embedding
        padding = ~slot_mask & slot_mask.any(dim=1, keepdim=True)
        hidden = self.encoder(tokens, src_key_padding_mask=padding)
        return torch.einsum("bn,bnd->bd", weights, hidden)
