"""Scale-out on torchrun + DistributedDataParallel: the pieces, for the trainer and for your own loop.

fusionkit launches nothing itself: ``torchrun`` starts the processes and sets ``RANK``,
``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT``; :func:`setup` reads
them. The helpers never own the loop:

- :func:`setup` joins the process group (gloo on CPU, NCCL on GPU) and returns a
  :class:`Dist` (``world_size`` 1 and no process group when not launched by torchrun);
- :func:`wrap` wraps a model in DDP with ``find_unused_parameters`` derived from its spec;
- :meth:`Dist.shard` gives this rank's rows of a global batch, :meth:`Dist.loss_scale` the
  factor that makes DDP's gradient average equal the single-process gradient;
- :meth:`Dist.gather` reassembles per-rank outputs in the original row order.
"""

from __future__ import annotations

import dataclasses
import datetime
import itertools
import os
import sys
import typing
from collections.abc import Mapping
from typing import Any

import attrs
import numpy as np
import torch
from torch import nn

from fusionkit.conditional.selection import slot_count
from fusionkit.plugins import get_registry

__all__ = ["Dist", "setup", "unused_parameters_possible", "wrap", "end_rank"]


@attrs.frozen
class Dist:
    """Where this process stands: its rank among ``world_size`` processes, and its device."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: str = "cpu"
    #: whether the :func:`setup` that made it joined the process group (so its :meth:`close` leaves it); False
    #: where the group was joined already, by the caller's own loop or by an outer fusionkit call
    joined: bool = attrs.field(default=False, kw_only=True)

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the one process that writes checkpoints, logs and metrics."""
        return self.rank == 0

    def shard(self, rows: np.ndarray) -> np.ndarray:
        """This rank's rows of a global batch (every ``world_size``-th, from ``rank``)."""
        return rows[self.rank :: self.world_size]

    def loss_scale(self, local: int, total: int) -> float:
        """Multiply the local mean loss by this so that DDP's average over ranks is the mean over all ``total``
        rows, also when ranks hold unequal shares (the last batch of an epoch)."""
        return local * self.world_size / total if self.enabled else 1.0

    def gather(self, arrays: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Every rank's ``arrays`` (rows from :meth:`shard`) reassembled in the original row order, on every rank."""
        if not self.enabled:
            return dict(arrays)
        parts = self.all_gather_object(dict(arrays))
        out = {}
        for key in arrays:
            pieces = [p[key] for p in parts]
            total = sum(len(p) for p in pieces)
            merged = np.empty((total, *pieces[0].shape[1:]), dtype=pieces[0].dtype)
            for r, piece in enumerate(pieces):
                merged[r :: self.world_size] = piece
            out[key] = merged
        return out

    def all_gather_object(self, value: Any) -> list[Any]:
        """Every rank's ``value`` (a picklable object), in rank order, on every rank."""
        if not self.enabled:
            return [value]
        import torch.distributed as dist

        parts: list[Any] = [None] * self.world_size
        dist.all_gather_object(parts, value)
        return parts

    def gather_rows(self, x: torch.Tensor) -> tuple[torch.Tensor, int]:
        """Every rank's rows of ``x`` (ranks may hold different numbers), concatenated in rank order on every rank,
        and where this rank's rows start in it. Gradients flow back to each rank's own rows: a loss computed on the
        gathered rows by every rank gives each rank the gradient of its rows summed over ranks, so the global batch
        trains as in one process (open_clip's ``gather_with_grad``). Without torchrun: ``(x, 0)``."""
        if not self.enabled:
            return x, 0
        import torch.distributed as dist

        count = torch.tensor([len(x)], device=x.device)
        counts = [torch.zeros_like(count) for _ in range(self.world_size)]
        dist.all_gather(counts, count)
        sizes = [int(c) for c in counts]
        top = max(sizes)
        padded = torch.cat([x, x.new_zeros(top - len(x), *x.shape[1:])]) if len(x) < top else x
        gathered = _GatherRows.apply(padded, self.rank, self.world_size)
        keep = torch.cat([torch.arange(r * top, r * top + n, device=x.device) for r, n in enumerate(sizes)])
        return gathered.index_select(0, keep), sum(sizes[: self.rank])

    def gather_batch(self, x: torch.Tensor) -> torch.Tensor:
        """Every rank's rows of ``x`` (this rank's :meth:`shard` of a global batch) in the global batch's own order,
        with gradients as :meth:`gather_rows`: what a loss over the batch would see in one process."""
        if not self.enabled:
            return x
        gathered, offset = self.gather_rows(x)
        import torch.distributed as dist

        counts = [torch.zeros(1, dtype=torch.long, device=x.device) for _ in range(self.world_size)]
        dist.all_gather(counts, torch.tensor([len(x)], device=x.device))
        starts = np.cumsum([0] + [int(c) for c in counts])[:-1]
        order = [int(starts[p % self.world_size]) + p // self.world_size for p in range(len(gathered))]
        return gathered.index_select(0, torch.as_tensor(order, device=x.device))

    def gather_fields(self, value: Any, rows: int) -> Any:
        """The global batch of every per-row tensor in ``value`` (a tensor, a mapping or a dataclass such as
        :class:`~fusionkit.models.fusion.FusionOutput`, whose first ``rows`` rows are this rank's real ones), as
        :meth:`gather_batch` gathers one tensor; scalars and other values pass through. This is how a loss that
        declares ``global_batch`` gets its inputs: it never calls a collective itself. Without torchrun: ``value``
        cut to its first ``rows`` rows."""
        if isinstance(value, torch.Tensor):
            if value.dim() == 0:
                return value
            if not self.enabled:
                return value[:rows]
            if value.is_floating_point():
                return self.gather_batch(value[:rows])
            return self.gather_batch(value[:rows].long()).to(value.dtype)  # masks and indices carry no gradient
        if isinstance(value, Mapping):
            return {k: self.gather_fields(v, rows) for k, v in value.items()}
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            return dataclasses.replace(value, **{f.name: self.gather_fields(getattr(value, f.name), rows)
                                                 for f in dataclasses.fields(value) if f.init})
        return value

    def average_gradients(self, params: list[torch.nn.Parameter]) -> None:
        """Average the gradients of ``params`` over ranks (parameters outside DDP: an objective term's, or a model's
        that trains without DDP), in one collective. A parameter no rank gave a gradient keeps none, as in one
        process (the optimizer then leaves it alone); one that only some ranks reached counts zero on the others."""
        if not self.enabled or not params:
            return
        import torch.distributed as dist

        has = torch.tensor([p.grad is not None for p in params], dtype=torch.float32, device=params[0].device)
        dist.all_reduce(has)
        flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1).float() for p in params])
        dist.all_reduce(flat)
        flat /= self.world_size
        start = 0
        for p, reached in zip(params, has.tolist()):
            n = p.numel()
            if reached:
                p.grad = flat[start : start + n].view_as(p).to(p.dtype)
            start += n

    def broadcast_parameters(self, model: nn.Module) -> None:
        """Rank 0's parameters and buffers on every rank, as DDP does when it wraps a model (for a model that
        trains without DDP, its gradients averaged by :meth:`average_gradients`)."""
        if not self.enabled:
            return
        import torch.distributed as dist

        with torch.no_grad():
            for tensor in model.state_dict().values():
                dist.broadcast(tensor, 0)

    def sum(self, values: Mapping[str, float]) -> dict[str, float]:
        """``values`` summed over ranks, over the union of their keys (a key one rank lacks counts 0 there: a loss
        term that only some ranks' rows produced in an epoch, such as the scout's on a small share of rows)."""
        if not self.enabled:
            return dict(values)
        import torch.distributed as dist

        keys = sorted({key for keys in self.all_gather_object(sorted(values)) for key in keys})
        total = torch.tensor([values.get(k, 0.0) for k in keys], dtype=torch.float64)
        dist.all_reduce(total)
        return dict(zip(keys, total.tolist()))

    def barrier(self) -> None:
        if self.enabled:
            import torch.distributed as dist

            dist.barrier()

    def close(self) -> None:
        """Leave the process group once every rank is done, if :func:`setup` joined it here (before the process
        exits: a process group still open at exit can abort the interpreter while the other ranks shut down)."""
        if not self.enabled or not self.joined:
            return
        import torch.distributed as dist

        if dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()

    def broadcast(self, value: Any) -> Any:
        """Rank 0's ``value`` on every rank (a picklable object)."""
        if not self.enabled:
            return value
        import torch.distributed as dist

        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]


class _GatherRows(torch.autograd.Function):
    """All-gather of equal-sized row blocks whose backward sums every rank's gradient and returns this rank's block
    (all_reduce, which gloo supports, where NCCL would reduce-scatter)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, rank: int, world: int) -> torch.Tensor:
        import torch.distributed as dist

        parts = [torch.empty_like(x) for _ in range(world)]
        dist.all_gather(parts, x.contiguous())
        ctx.rank, ctx.rows = rank, len(x)
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        import torch.distributed as dist

        total = grad.contiguous().clone()
        dist.all_reduce(total)
        return total[ctx.rank * ctx.rows : (ctx.rank + 1) * ctx.rows], None, None


#: How many times this process has joined a process group (each join names its keys in the store afresh).
_joins = itertools.count()


def setup(backend: str | None = None, timeout_s: float = 1800) -> Dist:
    """Join the process group that torchrun describes in the environment, unless this process is in it already.

    Without torchrun (no ``WORLD_SIZE`` above 1) it returns a single-process :class:`Dist`.
    The backend is NCCL when CUDA is available, else gloo. A process may join, leave (:meth:`Dist.close`) and
    join again, as a loop that trains several runs does: every rank must then make the same calls in the same order.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    import torch.distributed as dist

    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.cuda.is_available()
    joined = not dist.is_initialized()
    if joined:
        timeout = datetime.timedelta(seconds=timeout_s)
        # torchrun's store outlives a group that was left, and torch names a group's keys by a count that starts
        # again from 0 once the last group is left: a second join under the first one's names could read the first
        # group's stale addresses and wait forever. So every join has keys of its own.
        store, _, _ = next(dist.rendezvous("env://", timeout=timeout))
        dist.init_process_group(backend or ("nccl" if cuda else "gloo"), timeout=timeout, rank=rank, world_size=world,
                                store=dist.PrefixStore(f"fusionkit-join-{next(_joins)}", store))
    device = "cpu"
    if cuda:
        torch.cuda.set_device(local)
        device = f"cuda:{local}"
    return Dist(rank, world, local, device, joined=joined)


def end_rank(code: int) -> typing.NoReturn:
    """End a torchrun rank's process with ``code`` once its work is written, without the interpreter's finalization.

    PyTorch's DistributedDataParallel keeps a reference to the process group from C++ that outlives
    ``destroy_process_group`` (and the model), so gloo's worker threads are still running when the interpreter
    finalizes. A worker that is still releasing a finished collective (the last barrier holds the collectives before
    it, and their tensors) must take the GIL to drop a tensor's Python object; a finalizing interpreter ends such a
    thread instead, and the unwinding through C++ ends in ``std::terminate``: "terminate called without an active
    exception", SIGABRT (seen on a rank in about 1 run of 30 under load; the backtrace is in docs/scaling.md). So a
    rank ends here: standard streams flushed, and ``os._exit``, which runs no finalization. Call it only when every
    file is written and closed (fusionkit's writers close their files before they return).
    """
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed or broken stream: nothing more can be written to it anyway
            pass
    os._exit(code)


def unused_parameters_possible(spec: Any, missing_encoders: bool = False) -> bool:
    """Can a training step leave some parameters without gradient? (DDP's ``find_unused_parameters``)

    Hard top-n routing keeps ``top_n`` of K encoders per sample; an encoder no sample of a
    batch keeps gets no gradient through the fusion. Only a gate whose class says it reaches
    every encoder (:attr:`~fusionkit.interfaces.Gate.reaches_every_encoder`: attention, whose
    scores of kept encoders depend on every token) or rank supervision (every token predicts
    the labels) reaches every projector anyway. A missing encoder (masked) is never used. ``static_graph``
    is wrong here for the same reason: which parameters are used changes from step to step.
    """
    if spec.on_demand:  # a step may give an on-demand encoder no rows at all
        return True
    gates = [spec.gate] if not spec.towers else [t.gate for t in spec.towers.values()]
    counts = [len(spec.encoders)] if not spec.towers else [len(t.encoders) for t in spec.towers.values()]
    for gate, k in zip(gates, counts):
        selective = slot_count(gate.config, k) < k or gate.config.selection == "top_p"
        reaches_every_encoder = get_registry().get("gate", gate.type).factory.reaches_every_encoder
        if selective and not reaches_every_encoder and not gate.config.supervision:
            return True
    return missing_encoders


def wrap(model: nn.Module, dist: Dist, missing_encoders: bool = False) -> nn.Module:
    """``model`` in DistributedDataParallel with the right flags (unchanged when not distributed)."""
    if not dist.enabled:
        return model
    from torch.nn.parallel import DistributedDataParallel

    model.to(dist.device)
    return DistributedDataParallel(model, device_ids=[dist.local_rank] if dist.device.startswith("cuda") else None,
                                   find_unused_parameters=unused_parameters_possible(model.spec, missing_encoders))
