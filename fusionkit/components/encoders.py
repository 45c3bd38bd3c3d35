"""Built-in encoder ``features``: pre-extracted vectors or time series, with pooling."""

from __future__ import annotations

from typing import Literal

import attrs
import torch
from torch import nn

from fusionkit.config import option, positive
from fusionkit.errors import DataError
from fusionkit.interfaces import BuildContext, Encoder
from fusionkit.pooling import pool_frames, stats7, valid_frames  # noqa: F401 - stats7: its old home

Pooling = Literal["none", "mean", "stats7", "attention"]


@attrs.frozen(kw_only=True)
class FeaturesConfig:
    """Pre-extracted features: a vector per sample, or a time series pooled to one."""

    dim: int = option(doc="Feature size per sample (vectors) or per frame (sequences).", validator=positive)
    pooling: Pooling = option(
        "none",
        doc="none: inputs are [B, D] vectors; mean, stats7 (mean, std, 10/25/50/75/90th percentiles) "
        "or attention pool [B, T, D] sequences over their valid frames.",
    )


class FeaturesEncoder(Encoder):
    """Passes vectors through, or pools a sequence into one vector."""

    def __init__(self, config: FeaturesConfig, context: BuildContext) -> None:
        super().__init__()
        self.name = context.encoder_name
        self.dim = config.dim
        self.pooling = config.pooling
        self.out_dim = config.dim * 7 if config.pooling == "stats7" else config.dim
        # stats7 of fixed features can be computed once per sample, outside the model (see forward)
        self.precomputed_pooling = "stats7" if config.pooling == "stats7" else None
        self.attention = nn.Linear(config.dim, 1) if config.pooling == "attention" else None
        self.register_buffer("input_mean", torch.zeros(config.dim))
        self.register_buffer("input_std", torch.ones(config.dim))
        for domain in context.input_domains[1:]:  # further domains' statistics (per-domain standardisation)
            self.register_buffer(f"{domain}_input_mean", torch.zeros(config.dim))
            self.register_buffer(f"{domain}_input_std", torch.ones(config.dim))
        self.domains = context.input_domains
        self.domain = "source"

    def set_standardization(self, mean: torch.Tensor, std: torch.Tensor, domain: str = "source") -> None:
        """Standardise raw inputs (per dimension; frames for sequences) with training-set statistics, or
        with a further domain's own statistics (used while :attr:`domain` is that domain)."""
        prefix = "" if domain == "source" else f"{domain}_"
        getattr(self, f"{prefix}input_mean").copy_(mean)
        getattr(self, f"{prefix}input_std").copy_(std.clamp_min(1e-6))

    def _statistics(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.domain == "source" or self.domain not in self.domains:
            return self.input_mean, self.input_std
        return getattr(self, f"{self.domain}_input_mean"), getattr(self, f"{self.domain}_input_std")

    def forward(self, x: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
        pre_pooled = self.pooling == "stats7" and x.dim() == 2 and x.shape[-1] == 7 * self.dim
        if x.shape[-1] != self.dim and not pre_pooled:
            raise DataError(f"encoder {self.name!r}: expected feature size {self.dim}, found input of shape {tuple(x.shape)}")
        input_mean, input_std = self._statistics()
        inv_std = input_std.reciprocal()
        if pre_pooled:
            # Precomputed stats7 of the raw frames. Standardising is an increasing affine map per
            # dimension, so the statistics of standardised frames follow exactly: every block
            # maps as (v - mean) / std, except the standard deviation, which maps as v / std.
            blocks = x.view(x.shape[0], 7, self.dim)
            shift = (-input_mean * inv_std).expand(7, -1).clone()
            shift[1] = 0.0
            return torch.addcmul(shift, blocks, inv_std).flatten(1)
        x = torch.addcmul(-input_mean * inv_std, x, inv_std)  # (x - mean) / std in one pass
        if self.pooling == "none":
            if x.dim() != 2:
                raise DataError(
                    f"encoder {self.name!r}: pooling 'none' takes [B, {self.dim}] vectors, found shape {tuple(x.shape)}; "
                    "set pooling to mean, stats7 or attention for sequences"
                )
            return x
        if x.dim() != 3:
            raise DataError(f"encoder {self.name!r}: pooling {self.pooling!r} takes [B, T, {self.dim}] sequences, found shape {tuple(x.shape)}")
        if self.pooling in ("stats7", "mean"):
            return pool_frames(x, lengths, self.pooling)
        valid = valid_frames(x, lengths)
        logits = self.attention(x).squeeze(-1).masked_fill(~valid, float("-inf"))
        attn = torch.softmax(logits, dim=1).nan_to_num(0.0)
        return torch.einsum("bt,btd->bd", attn, x)
