"""Built-in encoder ``features``: pre-extracted vectors or time series, with pooling."""

from __future__ import annotations

from typing import Literal

import attrs
import torch
from torch import nn

from fusionkit.config import option, positive
from fusionkit.errors import DataError
from fusionkit.interfaces import BuildContext, Encoder

Pooling = Literal["none", "mean", "stats7", "attention"]
STATS7_QUANTILES = (0.10, 0.25, 0.50, 0.75, 0.90)


@attrs.frozen(kw_only=True)
class FeaturesConfig:
    """Pre-extracted features: a vector per sample, or a time series pooled to one."""

    dim: int = option(doc="Feature size per sample (vectors) or per frame (sequences).", validator=positive)
    pooling: Pooling = option(
        "none",
        doc="none: inputs are [B, D] vectors; mean, stats7 (mean, std, 10/25/50/75/90th percentiles) "
        "or attention pool [B, T, D] sequences over their valid frames.",
    )


def stats7(x: torch.Tensor, lengths: torch.Tensor | None) -> torch.Tensor:
    """The BlEmoRE baseline's seven statistics per dimension over the valid frames.

    ``x`` [B, T, D], ``lengths`` [B] -> [B, 7 * D], ordered mean, std (population),
    then the 10th, 25th, 50th, 75th and 90th percentiles (linear interpolation,
    as NumPy's default), each block D wide.
    """
    valid = _valid_frames(x, lengths)
    count = valid.sum(1, keepdim=True).clamp_min(1).to(x.dtype)
    xv = x * valid.unsqueeze(-1)
    mean = xv.sum(1) / count
    var = (((x - mean.unsqueeze(1)) * valid.unsqueeze(-1)) ** 2).sum(1) / count
    std = var.clamp_min(0).sqrt()
    padded = x.masked_fill(~valid.unsqueeze(-1), float("nan"))
    q = torch.tensor(STATS7_QUANTILES, dtype=x.dtype, device=x.device)
    quant = torch.nanquantile(padded, q, dim=1)  # [5, B, D]
    parts = [mean, std, *quant.unbind(0)]
    return torch.cat(parts, dim=1)


def _valid_frames(x: torch.Tensor, lengths: torch.Tensor | None) -> torch.Tensor:
    steps = torch.arange(x.shape[1], device=x.device)
    if lengths is None:
        return torch.ones(x.shape[:2], dtype=torch.bool, device=x.device)
    return steps.unsqueeze(0) < lengths.to(x.device).unsqueeze(1)


class FeaturesEncoder(Encoder):
    """Passes vectors through, or pools a sequence into one vector."""

    def __init__(self, config: FeaturesConfig, context: BuildContext) -> None:
        super().__init__()
        self.name = context.encoder_name
        self.dim = config.dim
        self.pooling = config.pooling
        self.out_dim = config.dim * 7 if config.pooling == "stats7" else config.dim
        self.attention = nn.Linear(config.dim, 1) if config.pooling == "attention" else None
        self.register_buffer("input_mean", torch.zeros(config.dim))
        self.register_buffer("input_std", torch.ones(config.dim))

    def set_standardization(self, mean: torch.Tensor, std: torch.Tensor) -> None:
        """Standardise raw inputs (per dimension; frames for sequences) with training-set statistics."""
        self.input_mean.copy_(mean)
        self.input_std.copy_(std.clamp_min(1e-6))

    def forward(self, x: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
        if x.shape[-1] != self.dim:
            raise DataError(f"encoder {self.name!r}: expected feature size {self.dim}, found input of shape {tuple(x.shape)}")
        inv_std = self.input_std.reciprocal()
        x = torch.addcmul(-self.input_mean * inv_std, x, inv_std)  # (x - mean) / std in one pass
        if self.pooling == "none":
            if x.dim() != 2:
                raise DataError(
                    f"encoder {self.name!r}: pooling 'none' takes [B, {self.dim}] vectors, found shape {tuple(x.shape)}; "
                    "set pooling to mean, stats7 or attention for sequences"
                )
            return x
        if x.dim() != 3:
            raise DataError(f"encoder {self.name!r}: pooling {self.pooling!r} takes [B, T, {self.dim}] sequences, found shape {tuple(x.shape)}")
        if self.pooling == "stats7":
            return stats7(x, lengths)
        valid = _valid_frames(x, lengths)
        if self.pooling == "mean":
            return (x * valid.unsqueeze(-1)).sum(1) / valid.sum(1, keepdim=True).clamp_min(1).to(x.dtype)
        logits = self.attention(x).squeeze(-1).masked_fill(~valid, float("-inf"))
        attn = torch.softmax(logits, dim=1).nan_to_num(0.0)
        return torch.einsum("bt,btd->bd", attn, x)
