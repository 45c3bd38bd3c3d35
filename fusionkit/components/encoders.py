"""Built-in encoder ``features``: pre-extracted vectors or time series, with pooling."""

from __future__ import annotations

from typing import Literal

import attrs
import numpy as np
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

    The percentiles come from one sort along time (padding sorted last as +inf) and a
    gather at each sample's own positions ``q · (n - 1)``: no per-quantile pass, no NaN
    arithmetic. Frozen inputs (no gradient) on the CPU are sorted by NumPy, which sorts many
    short rows tens of times faster than torch does.
    """
    valid = _valid_frames(x, lengths)
    count = valid.sum(1, keepdim=True).clamp_min(1)
    xv = x * valid.unsqueeze(-1)
    mean = xv.sum(1) / count.to(x.dtype)
    var = (((x - mean.unsqueeze(1)) * valid.unsqueeze(-1)) ** 2).sum(1) / count.to(x.dtype)
    std = var.clamp_min(0).sqrt()
    ordered = _sort_time(x.masked_fill(~valid.unsqueeze(-1), float("inf")))  # [B, T, D], padding last
    last = (count - 1).to(x.dtype)  # [B, 1]
    parts = [mean, std]
    for q in STATS7_QUANTILES:
        pos = q * last
        lo = pos.floor()
        frac = (pos - lo).unsqueeze(-1)
        lo_i = lo.long().unsqueeze(-1).expand(-1, 1, x.shape[2])
        hi_i = (lo_i + 1).clamp(max=(count - 1).unsqueeze(-1).expand(-1, 1, x.shape[2]))
        below, above = ordered.gather(1, lo_i), ordered.gather(1, hi_i)
        parts.append((below + (above - below) * frac).squeeze(1))
    out = torch.cat(parts, dim=1)
    return out.masked_fill((valid.sum(1) == 0).unsqueeze(-1), 0.0)  # an empty sequence has no statistics


def pool_frames(x: torch.Tensor, lengths: torch.Tensor | None, kind: str) -> torch.Tensor:
    """``[B, T, D]`` frames -> ``[B, D]`` (``mean``) or ``[B, 7 * D]`` (``stats7``) over each sample's valid frames."""
    if kind == "stats7":
        return stats7(x, lengths)
    valid = _valid_frames(x, lengths)
    return (x * valid.unsqueeze(-1)).sum(1) / valid.sum(1, keepdim=True).clamp_min(1).to(x.dtype)


def _sort_time(x: torch.Tensor) -> torch.Tensor:
    """``x`` [B, T, D] sorted along T."""
    if x.requires_grad or x.device.type != "cpu":
        return x.sort(dim=1).values
    rows = x.transpose(1, 2).contiguous()  # [B, D, T]: each row one dimension's time series
    return torch.from_numpy(np.sort(rows.numpy(), axis=-1)).transpose(1, 2)


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
        valid = _valid_frames(x, lengths)
        logits = self.attention(x).squeeze(-1).masked_fill(~valid, float("-inf"))
        attn = torch.softmax(logits, dim=1).nan_to_num(0.0)
        return torch.einsum("bt,btd->bd", attn, x)
