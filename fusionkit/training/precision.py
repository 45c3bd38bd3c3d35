"""The precision seam: float32, bfloat16 autocast, or float16 autocast with a gradient scaler.

The loop runs the forward and the losses inside :meth:`Precision.autocast` and steps through
:meth:`Precision.step`; with ``train.precision: 16`` the scaler's state is checkpointed with the
run (:meth:`state_dict`) and restored on resume. Reductions that need float32 (softmaxes and KLs of
the contrastive and distillation losses, the gate's scores, per-domain statistics) cast to float32
themselves, so they stay exact under any precision.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import torch

__all__ = ["Precision"]

_DTYPES = {"32": None, "bf16": torch.bfloat16, "16": torch.float16}


class Precision:
    """Autocast and gradient scaling for one ``train.precision`` on one device."""

    def __init__(self, mode: str, device: torch.device) -> None:
        self.mode = mode
        self.device = device
        self.dtype = _DTYPES[mode]
        self.scaler = torch.amp.GradScaler(device.type, enabled=mode == "16")

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    def step(self, loss: torch.Tensor, optimizer: torch.optim.Optimizer, params: list, clip: float,
             after_backward: Callable[[], None] | None = None) -> None:
        """Backward, ``after_backward`` (e.g. averaging gradients over ranks), clip (on unscaled gradients) and step;
        a float16 step whose gradients overflowed is skipped and the scale lowered, as the scaler does."""
        self.scaler.scale(loss).backward()
        if after_backward is not None:
            after_backward()
        if clip:
            self.scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(params, clip)
        self.scaler.step(optimizer)
        self.scaler.update()

    def state_dict(self) -> dict[str, Any]:
        return self.scaler.state_dict() if self.scaler.is_enabled() else {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.scaler.is_enabled() and state:
            self.scaler.load_state_dict(state)
