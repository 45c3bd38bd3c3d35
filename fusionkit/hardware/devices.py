"""Where tensors live: the device a command runs on, and moving batches there.

``auto`` (the default of ``train.device`` and ``--device``) is CUDA when a GPU is present, else
the CPU; ``cpu``, ``cuda`` and ``cuda:K`` are explicit, and under torchrun each rank takes its
local GPU. Batches are assembled on the CPU, pinned when they go to a GPU, and copied without
blocking, so that the copy overlaps the step. Metrics, decoding and files are always computed
on the CPU.
"""

from __future__ import annotations

import itertools
import platform
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from fusionkit.errors import FusionkitError

__all__ = ["device_name", "device_of", "full_precision", "resolve_device", "synchronize", "to_device"]


def resolve_device(name: str, option: str = "--device", local_rank: int | None = None) -> torch.device:
    """The device ``name`` asks for (``auto``, ``cpu``, ``cuda``, ``cuda:K``); ``option`` names the setting in errors.
    Under torchrun (``local_rank`` given) ``auto`` and ``cuda`` mean this rank's own GPU."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise FusionkitError(f"{option} {name!r}: not a device ({exc}); use auto, cpu, cuda or cuda:K") from None
    if device.type not in ("cpu", "cuda"):
        raise FusionkitError(f"{option} {name!r}: fusionkit runs on cpu or cuda; use auto, cpu, cuda or cuda:K")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise FusionkitError(f"{option} {name!r}: this machine has no CUDA device (torch {torch.__version__}); "
                                 f"set {option} to cpu or auto")
        index = device.index if device.index is not None else (local_rank or 0)
        if index >= torch.cuda.device_count():
            raise FusionkitError(f"{option} {name!r}: there are {torch.cuda.device_count()} CUDA device(s) here")
        device = torch.device("cuda", index)
    return device


def device_of(module: nn.Module) -> torch.device:
    """The device of a module's first parameter or buffer (the CPU for one that has neither)."""
    first = next(itertools.chain(module.parameters(), module.buffers()), None)  # lazily: the first one only
    return torch.device("cpu") if first is None else first.device


def synchronize(device: torch.device) -> None:
    """Wait for ``device``'s queued work (a GPU runs asynchronously), so that a clock read after it counts it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def device_name(device: torch.device) -> str:
    """A readable name of the hardware, for run records."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return platform.processor() or platform.machine() or "cpu"


def full_precision(x: torch.Tensor) -> torch.Tensor:
    """``x`` in float32 when autocast made it float16 or bfloat16 (softmaxes and KLs need the range); float32
    and float64 stay as they are."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def to_device(value: Any, device: torch.device) -> Any:
    """``value`` (tensors in dicts, tuples and lists) on ``device``: pinned and copied without blocking for a GPU."""
    if torch.is_tensor(value):
        if value.device == device:
            return value
        if device.type == "cuda" and value.device.type == "cpu":
            return value.pin_memory().to(device, non_blocking=True)
        return value.to(device)
    if isinstance(value, Mapping):
        return {k: to_device(v, device) for k, v in value.items()}
    if isinstance(value, (tuple, list)):
        return type(value)(to_device(v, device) for v in value)
    return value
