"""Accuracy-compute curves of one trained model: its score at each budget of a sweep (mean budgets fitted on
validation, by default, or caps), and the document ``fusionkit evaluate --budget-curve`` writes: the points, their
controls and the verdict (:mod:`fusionkit.evaluation.controls`)."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import attrs
import numpy as np

from fusionkit import inference
from fusionkit.conditional.budget import Budget
from fusionkit.data.store import FeatureStore
from fusionkit.errors import FusionkitError
from fusionkit.evaluation.controls import curve_controls
from fusionkit.models.fusion import FusionModel
from fusionkit.progress import progress_bar
from fusionkit.training.tasks import ClassificationTask

__all__ = ["CURVE_SHARES", "CURVE_KINDS", "CURVE_FORMAT", "budget_curve", "curve_document"]


#: The budgets of an accuracy-compute curve: shares of the full cost.
CURVE_SHARES = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)


#: The kinds of budget an accuracy-compute curve puts its points at.
CURVE_KINDS = ("mean", "cap")


def budget_curve(model: FusionModel, store: FeatureStore, index: np.ndarray,
                 shares: Sequence[float] = CURVE_SHARES, progress: bool = False,
                 seconds: dict[str, float] | None = None, val_index: np.ndarray | None = None,
                 kind: str = "mean") -> list[dict[str, Any]]:
    """Score against mean GFLOPs per sample and wall seconds on the labelled rows ``index``, one point per budget:
    the accuracy-compute curve of one trained model. ``kind`` "mean" (the default): each share is a mean budget, its
    threshold fitted on the validation rows ``val_index`` as ``--budget mean:S%`` is, so that a hard sample may spend
    more than an easy one; "cap": each share caps every sample (with unequal costs a cap leaves little to choose
    per sample). With ``seconds`` (:func:`measure_encoder_seconds`), the shares are of the measured encoder time
    instead of the FLOPs. Each point says its ``kind`` (and a mean point its ``threshold``)."""
    if kind not in CURVE_KINDS:
        raise FusionkitError(f"budget curve kind {kind!r}: expected one of {', '.join(CURVE_KINDS)}")
    if kind == "mean" and val_index is None:
        raise FusionkitError("a curve at mean budgets fits each budget's threshold on validation rows: give "
                             "val_index (or kind='cap')")
    points = []
    for share in progress_bar(shares, enabled=progress, desc=f"{kind} budgets", unit="budget", leave=False):
        budget = Budget(share=share, seconds=seconds)
        if kind == "mean":
            budget = inference.fit_mean_budget(model, store, val_index, attrs.evolve(budget, mean=True))
        started = time.perf_counter()
        metrics = ClassificationTask.evaluate_model(model, store, index, budget=budget)
        points.append({"kind": kind, "budget_share": share, "score": metrics["score"],
                       "mean_gflops": metrics["compute"]["mean_gflops"],
                       "seconds": time.perf_counter() - started, "run_rate": metrics["compute"]["run_rate"]}
                      | ({"threshold": budget.threshold} if kind == "mean" else {})
                      | ({"mean_encoder_seconds": metrics["compute"]["mean_encoder_seconds"]} if seconds else {}))
    return points




#: The format of a budget curve's JSON (``RUN/budget_curve_SPLIT.json``).
CURVE_FORMAT = "fusionkit-budget-curve"


def curve_document(model: FusionModel, store: FeatureStore, index: np.ndarray, val_index: np.ndarray,
                   kinds: Sequence[str] = ("mean",), split: str = "test", seconds: dict[str, float] | None = None,
                   progress: bool = False) -> dict[str, Any]:
    """An accuracy-compute curve as ``evaluate --budget-curve`` writes it: the scout's points on ``index`` at the
    first of ``kinds`` (mean budgets, each fitted on ``val_index``, by default), the controls and the verdict computed
    on them (:func:`curve_controls`), and the points at each other kind (``cap_points``), which ``report`` draws
    beside them."""
    first, *others = kinds
    points = budget_curve(model, store, index, progress=progress, seconds=seconds, val_index=val_index, kind=first)
    controls = curve_controls(model, store, index, val_index, points, seconds, progress=progress)
    document = {"format": CURVE_FORMAT, "split": split, "n": int(len(index)), "costs": "time" if seconds else "gflops",
                "kind": first, "points": points} | ({"encoder_seconds": seconds} if seconds else {}) | controls
    for kind in others:
        document[f"{kind}_points"] = budget_curve(model, store, index, progress=progress, seconds=seconds,
                                                  val_index=val_index, kind=kind)
    return document
