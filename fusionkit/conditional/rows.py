"""The rows an on-demand encoder runs on: gathered for it, its tokens scattered back, and the per-row random draws
of training shared out across torchrun's ranks (the mixture-of-experts pattern of gathering rows per expert)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import attrs
import torch

from fusionkit.errors import FusionkitError

__all__ = ["RowShare", "row_uniform", "gather_rows", "scatter_rows"]


@attrs.frozen
class RowShare:
    """Where a batch's rows sit in the global batch under torchrun: its ``size`` and this rank's ``positions``.

    The random draws per row in training (a sampled budget, the scout's rows) are made for the global batch and
    each rank takes its rows' draws, so that two processes draw what one process draws (docs/scaling.md)."""

    size: int
    positions: tuple[int, ...]

    @classmethod
    def of(cls, size: int, rank: int, world: int) -> RowShare:
        """A rank's rows of a global batch of ``size`` shared out every ``world``-th from ``rank``
        (:meth:`fusionkit.hardware.distributed.Dist.shard`); a rank left without rows holds a stand-in of row 0."""
        return cls(size, tuple(range(rank, size, world)) or (0,))


def row_uniform(share: RowShare | None, batch: int, device: torch.device,
                dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``[batch]`` uniform draws, one per row: the global batch's draws at this rank's positions when ``share``
    describes this batch, else the batch's own (in one process, exactly ``torch.rand(batch)``)."""
    if share is None or len(share.positions) != batch:
        return torch.rand(batch, dtype=dtype, device=device)
    return torch.rand(share.size, dtype=dtype, device=device)[torch.as_tensor(share.positions, device=device)]


def gather_rows(x: Any, rows: torch.Tensor) -> Any:
    """The rows ``rows`` of one encoder's batch input: a tensor, a mapping of tensors, or a sequence of items."""
    if x is None:
        return None
    if torch.is_tensor(x):
        return x.index_select(0, rows.to(x.device))
    if isinstance(x, Mapping):
        return {k: gather_rows(v, rows) for k, v in x.items()}
    if isinstance(x, Sequence) and not isinstance(x, str):
        return [x[i] for i in rows.tolist()]
    raise FusionkitError(f"an on-demand encoder's input must be a tensor, a mapping or a sequence with a row per "
                         f"sample, found {type(x).__name__}")


def scatter_rows(values: torch.Tensor, rows: torch.Tensor, batch: int) -> torch.Tensor:
    """``[batch, d]``: ``values`` at ``rows``, zeros elsewhere (differentiable in ``values``)."""
    out = values.new_zeros((batch, *values.shape[1:]))
    return out.index_copy(0, rows.to(values.device), values)
