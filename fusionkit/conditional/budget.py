"""Compute budgets per sample (a cap or a mean over the data), as a value: what ``--budget`` parses into.

Torch-free, so that the runtime (:mod:`fusionkit.runtime`) parses and checks budgets exactly as a model does; the
rules that choose rows within a budget are :mod:`fusionkit.conditional.rules` (torch) and the runtime's (NumPy).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import attrs
import numpy as np

from fusionkit.errors import FusionkitError

__all__ = ["Budget", "RowBudgets", "parse_budget"]


def _seconds(value: Mapping[str, float] | Sequence[tuple[str, float]] | None) -> tuple[tuple[str, float], ...] | None:
    """Seconds per encoder as sorted ``(name, seconds)`` pairs (hashable, so a budget stays a value)."""
    if value is None:
        return None
    pairs = sorted(dict(value).items())
    bad = [name for name, v in pairs if not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0]
    if bad or not pairs:
        raise FusionkitError(f"a budget's seconds must be finite and >= 0 per encoder ({bad or 'none given'})")
    return tuple((str(name), float(v)) for name, v in pairs)


@attrs.frozen
class Budget:
    """A compute budget per sample: ``gflops`` (GFLOPs per sample, every encoder counted) or ``share`` (of the full
    cost, every encoder run); the always-run encoders are always paid.

    A **cap** (the default): no sample spends more. A **mean** (``mean=True``): the mean over the data meets it, and a
    hard sample may spend more than an easy one; it needs ``threshold``, fitted on validation rows
    (:func:`fit_threshold`): an on-demand encoder runs where the scout's share of it per unit of its cost reaches it.

    ``seconds``: a share counted in measured seconds per sample of each on-demand encoder (name -> seconds,
    e.g. from :func:`fusionkit.inference.measure_encoder_seconds`) instead of FLOPs: what the rows chosen cost
    where FLOPs do not follow time (a small CNN whose cost is reading its image). The always-run encoders count
    nothing then; the cost reported per sample stays in GFLOPs.
    """

    gflops: float | None = None
    share: float | None = None
    mean: bool = False
    threshold: float | None = None
    seconds: tuple[tuple[str, float], ...] | None = attrs.field(default=None, converter=_seconds)

    def __attrs_post_init__(self) -> None:
        for key in ("gflops", "share", "threshold"):
            value = getattr(self, key)
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
                raise FusionkitError(f"budget {key}={value!r}: expected a number, found {type(value).__name__}")
        if not isinstance(self.mean, bool):
            raise FusionkitError(f"budget mean={self.mean!r}: expected True or False")
        if self.threshold is not None and (math.isnan(self.threshold) or not self.mean):
            raise FusionkitError(f"budget threshold={self.threshold!r}: a threshold is a mean budget's (mean=True), "
                                 "a number or +inf (nothing on demand runs), never NaN; fit it with fit_threshold")
        if (self.gflops is None) == (self.share is None):
            raise FusionkitError("a budget is either GFLOPs per sample or a share of the full cost, not both or neither")
        value = self.gflops if self.gflops is not None else self.share
        if not math.isfinite(value) or value < 0 or (self.share is not None and value > 1):
            raise FusionkitError(f"budget {self.describe()}: expected GFLOPs >= 0, or a share from 0% to 100%")
        if self.seconds is not None and self.gflops is not None:
            raise FusionkitError(f"budget {self.describe()}: GFLOPs count FLOPs; a budget over measured seconds is a "
                                 "share of the full time (e.g. 40% or mean:40%)")

    def timed(self, seconds: Mapping[str, float]) -> Budget:
        """This share counted in ``seconds`` per sample of each on-demand encoder (its threshold refitted)."""
        return attrs.evolve(self, seconds=seconds, threshold=None)

    @classmethod
    def parse(cls, value: Budget | str | float | None) -> Budget | None:
        """``"40%"`` (a share of the full cost), ``"2.5"`` or ``2.5`` (GFLOPs per sample), each a cap; ``"mean:40%"``
        or ``"mean:2.5"`` a mean over the data; a Budget, or None."""
        if value is None or isinstance(value, Budget):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            try:
                return cls(gflops=float(value))
            except OverflowError:
                raise FusionkitError(f"budget {str(value)[:20]}...: too large for GFLOPs per sample; expected a finite number "
                                     "of GFLOPs >= 0, or a share such as '40%'") from None
        text = str(value).strip()
        mean = text.lower().startswith("mean:")
        number = text[5:].strip() if mean else text
        try:
            if number.endswith("%"):
                return cls(share=float(number[:-1]) / 100.0, mean=mean)
            return cls(gflops=float(number), mean=mean)
        except (ValueError, OverflowError):
            raise FusionkitError(f"--budget {value!r}: expected GFLOPs per sample (e.g. 2.5) or a share of the full "
                                 "cost (e.g. 40%), each a cap per sample; mean:2.5 or mean:40% for a mean over the "
                                 "data") from None

    def limit(self, full_cost: float) -> float:
        """GFLOPs per sample this budget allows, for a model whose every encoder costs ``full_cost`` together."""
        return float(self.gflops) if self.gflops is not None else float(self.share) * full_cost

    def describe(self) -> str:
        amount = f"{self.gflops:g} GFLOPs" if self.gflops is not None else f"{100 * self.share:g}%"
        if self.seconds is not None:
            amount += " of the measured time"
        return f"mean:{amount}" if self.mean else amount


#: What each row of :meth:`RowBudgets.rules` follows.
GATE_RULE, CAP, MEAN = 0, 1, 2


@attrs.frozen
class RowBudgets:
    """One budget per row of a batch (None: the gate's own rule), each row decided exactly as if it were alone: what
    lets a server batch requests that asked for different budgets. Caps and mean budgets (with their fitted
    thresholds) mix freely; budgets over measured seconds do not (each would choose by other costs)."""

    budgets: tuple[Budget | None, ...] = attrs.field(converter=tuple)

    def __attrs_post_init__(self) -> None:
        for n, budget in enumerate(self.budgets):
            if budget is not None and not isinstance(budget, Budget):
                raise FusionkitError(f"budget of row {n}: expected a Budget or None, found {type(budget).__name__}")
            if budget is not None and budget.seconds is not None:
                raise FusionkitError(f"budget of row {n} ({budget.describe()}): budgets per row count GFLOPs; a "
                                     "budget over measured time applies to a whole batch")
            if budget is not None and budget.mean and budget.threshold is None:
                raise FusionkitError(f"budget of row {n} ({budget.describe()}): a mean budget needs its fitted "
                                     "threshold (fusionkit.inference.fit_mean_budget, or one an export stores)")

    def __len__(self) -> int:
        return len(self.budgets)

    def rules(self, full_cost: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Per row: which rule decides (:data:`GATE_RULE`, :data:`CAP` or :data:`MEAN`), a cap's GFLOPs (+inf
        elsewhere) and a mean budget's threshold (NaN elsewhere), for a model whose encoders cost ``full_cost``."""
        kind = np.array([GATE_RULE if b is None else MEAN if b.mean else CAP for b in self.budgets], dtype=np.int64)
        cap = np.array([b.limit(full_cost) if b is not None and not b.mean else np.inf for b in self.budgets])
        threshold = np.array([b.threshold if b is not None and b.mean else np.nan for b in self.budgets])
        return kind, cap, threshold.astype(np.float64)


def parse_budget(value: Budget | RowBudgets | str | float | list | tuple | None) -> Budget | RowBudgets | None:
    """``value`` as :meth:`Budget.parse` reads it, or, given a list or tuple, one budget per row
    (:class:`RowBudgets`)."""
    if isinstance(value, RowBudgets):
        return value
    if isinstance(value, (list, tuple)):
        return RowBudgets([Budget.parse(v) for v in value])
    return Budget.parse(value)
