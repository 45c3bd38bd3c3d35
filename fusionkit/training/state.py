"""The training loop's progress: where a run stands, saved in every ``last/`` checkpoint and restored on resume."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import attrs

from fusionkit.errors import CheckpointError

__all__ = ["LoopState"]


@attrs.define
class LoopState:
    """Epochs done, optimiser steps taken, and the early-stopping record.

    ``best_score`` starts below any Score (which lies in [0, 1]), so that the first validation is always a best.
    """

    epoch: int = attrs.field(default=0, converter=int)
    step: int = attrs.field(default=0, converter=int)
    best_score: float = attrs.field(default=-1.0, converter=float)
    best_epoch: int = attrs.field(default=-1, converter=int)
    since_best: int = attrs.field(default=0, converter=int)

    def state_dict(self) -> dict[str, Any]:
        """The fields, as JSON a checkpoint's metadata holds."""
        return attrs.asdict(self)

    @classmethod
    def from_state_dict(cls, saved: Mapping[str, Any], where: str = "the checkpoint") -> LoopState:
        """The state a checkpoint saved; a missing or extra field is a :class:`CheckpointError` naming ``where``."""
        names = {f.name for f in attrs.fields(cls)}
        if not isinstance(saved, Mapping) or set(saved) != names:
            got = sorted(saved) if isinstance(saved, Mapping) else type(saved).__name__
            raise CheckpointError(f"{where}: the trainer state holds {got}, expected {sorted(names)}; the checkpoint "
                                  "was not written by this trainer")
        return cls(**saved)

    def load_state_dict(self, saved: Mapping[str, Any], where: str = "the checkpoint") -> None:
        """Take the fields of ``saved`` (what :meth:`state_dict` returned)."""
        restored = self.from_state_dict(saved, where)
        for field in attrs.fields(type(self)):
            setattr(self, field.name, getattr(restored, field.name))
