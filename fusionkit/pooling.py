"""Pooling a time series into one vector: the BlEmoRE baseline's seven statistics, and the mean.

Public, for plugins: a live encoder that embeds frames (video, audio) pools them with
:func:`pool_frames`; :func:`stats7_numpy` computes the same statistics of one ``[T, D]`` array,
for datasets that aggregate before storing. Both give the layout of the official
``timeseries2aggregate``: mean, std (population), then the 10th, 25th, 50th, 75th and 90th
percentiles (linear interpolation, NumPy's default), each block D wide.
"""

from __future__ import annotations

import numpy as np
import torch

__all__ = ["STATS7_QUANTILES", "pool_frames", "stats7", "stats7_numpy", "valid_frames"]

STATS7_QUANTILES = (0.10, 0.25, 0.50, 0.75, 0.90)


def stats7_numpy(x: np.ndarray) -> np.ndarray:
    """The seven statistics of one sequence ``[T, D]`` -> ``[7 * D]`` (NumPy, for data preparation)."""
    return np.concatenate([x.mean(0), x.std(0), *np.percentile(x, [100 * q for q in STATS7_QUANTILES], axis=0)])


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
    valid = valid_frames(x, lengths)
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
    valid = valid_frames(x, lengths)
    return (x * valid.unsqueeze(-1)).sum(1) / valid.sum(1, keepdim=True).clamp_min(1).to(x.dtype)


def _sort_time(x: torch.Tensor) -> torch.Tensor:
    """``x`` [B, T, D] sorted along T."""
    if x.requires_grad or x.device.type != "cpu" or torch.jit.is_tracing() or torch.onnx.is_in_onnx_export():
        return x.sort(dim=1).values  # on the CPU NumPy sorts faster, but an export must trace torch's own sort
    rows = x.transpose(1, 2).contiguous()  # [B, D, T]: each row one dimension's time series
    return torch.from_numpy(np.sort(rows.numpy(), axis=-1)).transpose(1, 2)


def valid_frames(x: torch.Tensor, lengths: torch.Tensor | None) -> torch.Tensor:
    steps = torch.arange(x.shape[1], device=x.device)
    if lengths is None:
        return torch.ones(x.shape[:2], dtype=torch.bool, device=x.device)
    return steps.unsqueeze(0) < lengths.to(x.device).unsqueeze(1)
