"""The controls of an accuracy-compute curve: what per-sample selection must beat on the same model and cost.

A budget can be met without looking at the sample, so a scout's curve means something only beside:

- **static choices**: one subset of the on-demand encoders run on every row (every subset up to
  :data:`EXHAUSTIVE` on-demand encoders, beyond that a greedy sequence that adds, at each step, the encoder that
  scores best), and their **frontier**: the upper hull of those points, since mixing two static choices over the
  rows gives every point between them, made non-decreasing (a budget may be left unspent);
- **random rows**: each on-demand encoder run on random rows at the rate the scout ran it at that budget;
- **a confidence cascade**: on-demand encoders added in cost order to the rows whose current prediction is least
  confident (the highest combined probability below a threshold), the threshold fitted on validation rows so that
  the mean cost meets the budget, as a mean budget's is.

:func:`curve_controls` computes all three beside a scout's curve (random rows at each point's run rates, the cascade
at each point's mean cost) and a :func:`verdict`: the scout's margin over the frontier, random rows and the cascade
at each budget, and whether per-sample selection pays at the middle budgets.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Any

import numpy as np

from fusionkit.blemore.answers import order_to_matrix
from fusionkit.blemore.metrics import scores_from_matrices
from fusionkit.data.store import FeatureStore
from fusionkit.errors import FusionkitError
from fusionkit.inference import collect_outputs
from fusionkit.models.fusion import FusionModel
from fusionkit.progress import progress_bar
from fusionkit.training.tasks import compute_summary

__all__ = ["EXHAUSTIVE", "static_choices", "static_frontier", "frontier_at",
           "random_rows", "cascade", "known_corruption", "curve_controls", "verdict"]

#: Up to this many on-demand encoders, every subset is a static choice; beyond, a greedy sequence.
EXHAUSTIVE = 4


class _Scorer:
    """Scores of one model on fixed rows for a given choice of which on-demand encoders run (``[N, m]`` bool),
    each choice's outputs collected once."""

    def __init__(self, model: FusionModel, store: FeatureStore, index: np.ndarray,
                 seconds: dict[str, float] | None) -> None:
        self.model, self.store, self.index, self.seconds = model, store, np.asarray(index), seconds
        self.truth = store.truth_matrix(self.index)
        self.demand = list(model.on_demand)

    def outputs(self, runs: np.ndarray) -> dict[str, np.ndarray]:
        return collect_outputs(self.model, self.store, self.index, runs=runs)

    def point(self, outputs: dict[str, np.ndarray]) -> dict[str, Any]:
        order, sal = self.model.decoder.decode(outputs)
        score = scores_from_matrices(order_to_matrix(order, sal, len(self.model.labels)), self.truth)["score"]
        spent = compute_summary(self.model, outputs, self.seconds)
        names = [self.model.encoder_names[k] for k in self.demand]
        return {"score": float(score), "mean_gflops": spent["mean_gflops"],
                "run_rate": {name: spent["run_rate"][name] for name in names}} | (
            {"mean_encoder_seconds": spent["mean_encoder_seconds"]} if self.seconds else {})

    def available(self, name: str) -> np.ndarray:
        """``[N]``: the rows whose input of encoder ``name`` is there (a stored encoder's rows without NaN under
        ``nan_policy: mask``; a live encoder's rows all)."""
        features = self.store.encoders.get(name)
        return np.ones(len(self.index), dtype=bool) if features is None else np.asarray(features.available)[self.index]

    def every_row(self, chosen: Sequence[int]) -> np.ndarray:
        """``[N, m]``: the on-demand encoders at positions ``chosen`` (of ``on_demand``) run on every row."""
        runs = np.zeros((len(self.index), len(self.demand)), dtype=bool)
        runs[:, list(chosen)] = True
        return runs


def static_choices(model: FusionModel, store: FeatureStore, index: np.ndarray,
                   seconds: dict[str, float] | None = None, progress: bool = False) -> list[dict[str, Any]]:
    """One point per static choice (``encoders``: the on-demand encoders run on every row; ``score``,
    ``mean_gflops``, ``run_rate``), cheapest first: every subset up to :data:`EXHAUSTIVE` on-demand encoders, else
    the greedy sequence (nothing, then at each step the encoder whose addition scores best)."""
    scorer = _Scorer(model, store, index, seconds)
    m = len(scorer.demand)
    names = [model.encoder_names[k] for k in scorer.demand]

    def choice(chosen: Sequence[int]) -> dict[str, Any]:
        return {"encoders": [names[j] for j in sorted(chosen)]} | scorer.point(scorer.outputs(scorer.every_row(chosen)))

    if m <= EXHAUSTIVE:
        subsets = [c for r in range(m + 1) for c in itertools.combinations(range(m), r)]
        points = [choice(c) for c in progress_bar(subsets, enabled=progress, desc="static choices", unit="choice", leave=False)]
    else:
        chosen: list[int] = []
        points = [choice(chosen)]
        for _ in progress_bar(range(m), enabled=progress, desc="static choices (greedy)", unit="step", leave=False):
            best = max((choice([*chosen, j]) | {"_j": j} for j in range(m) if j not in chosen),
                       key=lambda p: p["score"])
            chosen.append(best.pop("_j"))
            points.append(best)
    return sorted(points, key=lambda p: (p["mean_gflops"], -p["score"]))


def static_frontier(points: Sequence[dict[str, Any]], axis: str = "mean_gflops") -> list[dict[str, float]]:
    """The upper hull of static choices on ``axis`` (mixing two choices over the rows gives the segment between
    them), kept non-decreasing: the vertices, each ``{axis: cost, "score": score}``, cheapest first."""
    best: dict[float, float] = {}
    for p in points:
        x = float(p[axis])
        best[x] = max(best.get(x, -np.inf), float(p["score"]))
    hull: list[tuple[float, float]] = []
    for x, y in sorted(best.items()):
        while len(hull) >= 2 and _cross(hull[-2], hull[-1], (x, y)) >= 0:
            hull.pop()
        hull.append((x, y))
    top = max(range(len(hull)), key=lambda i: (hull[i][1], -hull[i][0]))
    return [{axis: x, "score": y} for x, y in hull[: top + 1]]


def _cross(o: tuple[float, float], a: tuple[float, float], b: tuple[float, float]) -> float:
    """Positive when ``o -> a -> b`` turns left (``a`` lies below the segment ``o``-``b``)."""
    return (a[0] - o[0]) * (b[1] - o[1]) - (a[1] - o[1]) * (b[0] - o[0])


def frontier_at(frontier: Sequence[dict[str, float]], cost: float, axis: str = "mean_gflops") -> float:
    """The best score a mix of static choices reaches at a mean ``cost`` (NaN below the cheapest choice)."""
    xs = [p[axis] for p in frontier]
    ys = [p["score"] for p in frontier]
    if cost < xs[0] - 1e-12:
        return float("nan")
    if cost >= xs[-1]:
        return float(ys[-1])
    return float(np.interp(cost, xs, ys))


def random_rows(model: FusionModel, store: FeatureStore, index: np.ndarray, rates: dict[str, float],
                seed: int = 0, seconds: dict[str, float] | None = None) -> dict[str, Any]:
    """The model with each on-demand encoder run on random rows at ``rates`` (name -> share of the rows; each
    encoder on ``round(rate * N)`` rows drawn without replacement, independently of the others, among the rows that
    have the encoder: a row missing it cannot run it, so a draw there would spend less than the rate says)."""
    scorer = _Scorer(model, store, index, seconds)
    names = [model.encoder_names[k] for k in scorer.demand]
    unknown = sorted(set(rates) - set(names))
    if unknown or any(not 0.0 <= float(r) <= 1.0 for r in rates.values()):
        raise FusionkitError(f"random rows: rates must be shares in [0, 1] of the on-demand encoders {names}; "
                             f"found {rates}")
    rng = np.random.default_rng(seed)
    n = len(scorer.index)
    runs = np.zeros((n, len(names)), dtype=bool)
    for j, name in enumerate(names):
        has = np.flatnonzero(scorer.available(name))
        runs[rng.choice(has, size=min(int(round(float(rates.get(name, 0.0)) * n)), len(has)), replace=False), j] = True
    return scorer.point(scorer.outputs(runs))


def known_corruption(model: FusionModel, store: FeatureStore, index: np.ndarray,
                     seconds: dict[str, float] | None = None) -> list[dict[str, Any]]:
    """The rule that knows which inputs are bad: each on-demand encoder runs only on the rows whose input of it the
    store records as clean (a sample's ``corrupted``, written by a dataset that corrupts on purpose), and its variants
    at lower cost, on each row the ``k`` cheapest clean ones (``k`` = 1 .. m), cheapest first. The ceiling that a
    rule identifiable from the inputs reaches, which a scout is measured against (``k`` = 0, nothing on demand, starts
    its frontier). Empty when the store records no corruption of an on-demand encoder on these rows."""
    scorer = _Scorer(model, store, index, seconds)
    names = [model.encoder_names[k] for k in scorer.demand]
    corrupted = np.array([[name in store.samples[i].corrupted for name in names] for i in scorer.index], dtype=bool)
    if not corrupted.any():
        return []
    clean = ~corrupted & np.stack([scorer.available(name) for name in names], axis=1)
    costs = model.encoder_costs()
    order = sorted(range(len(names)), key=lambda j: costs[names[j]] or 0.0)
    taken = np.cumsum(clean[:, order], axis=1)  # clean views so far, in cost order
    points = []
    for k in range(len(names) + 1):  # k = 0: nothing on demand, where the control's frontier starts
        runs = np.zeros_like(clean)
        runs[:, order] = clean[:, order] & (taken <= k)
        points.append({"rule": "clean" if k == len(names) else f"clean, at most {k} cheapest" if k else "none",
                       "max_views": k} | scorer.point(scorer.outputs(runs)))
    return points


class _Cascade:
    """A model's outputs on rows with each prefix of its on-demand encoders in cost order (nothing, the cheapest,
    the two cheapest, ...), so that a cascade of any threshold is read off without running the model again."""

    def __init__(self, scorer: _Scorer) -> None:
        self.scorer = scorer
        costs, names = scorer.model.encoder_costs(), scorer.model.encoder_names
        self.order = sorted(range(len(scorer.demand)), key=lambda j: costs[names[scorer.demand[j]]] or 0.0)
        stages = [scorer.outputs(scorer.every_row(self.order[:s])) for s in range(len(self.order) + 1)]
        self.stages = {key: np.stack([stage[key] for stage in stages]) for key in stages[0]}  # [stages, N, ...]
        self.confidence = self.stages["probs"].max(axis=2)  # [stages, N]
        seconds = scorer.seconds
        per_encoder = None if not seconds else np.array([seconds.get(n, 0.0) for n in names])
        self.spent = {"mean_gflops": self.stages["cost"],  # what each row spends at each stage, on either axis
                      "mean_encoder_seconds": None if per_encoder is None else self.stages["ran"] @ per_encoder}

    def _stops(self, threshold: float) -> np.ndarray:
        """``[N]``: each row's first stage whose confidence reaches ``threshold`` (the last stage else)."""
        sure = self.confidence >= threshold
        sure[-1] = True
        return sure.argmax(axis=0)

    def outputs(self, threshold: float) -> dict[str, np.ndarray]:
        """Each row's outputs at the stage where it stops."""
        stop, rows = self._stops(threshold), np.arange(self.confidence.shape[1])
        return {key: value[stop, rows] for key, value in self.stages.items()}

    def fit(self, target: float, axis: str) -> float:
        """The highest threshold whose mean cost (on ``axis``) on these rows stays within ``target`` (a higher
        threshold sends more rows on to dearer stages)."""
        spent, rows = self.spent[axis], np.arange(self.confidence.shape[1])
        candidates = np.unique(np.concatenate([self.confidence.ravel(), [-np.inf, np.inf]]))
        low, high = 0, len(candidates) - 1
        while low < high:
            middle = (low + high + 1) // 2
            if float(spent[self._stops(float(candidates[middle])), rows].mean()) <= target + 1e-9:
                low = middle
            else:
                high = middle - 1
        return float(candidates[low])


def cascade(model: FusionModel, store: FeatureStore, index: np.ndarray, val_index: np.ndarray,
            targets: Sequence[float], seconds: dict[str, float] | None = None) -> list[dict[str, Any]]:
    """The confidence cascade at each mean cost of ``targets`` (GFLOPs per sample, or with ``seconds`` encoder
    seconds per sample), its threshold fitted on the validation rows ``val_index``, scored on ``index``."""
    axis = "mean_encoder_seconds" if seconds else "mean_gflops"
    test, val = _Cascade(_Scorer(model, store, index, seconds)), _Cascade(_Scorer(model, store, val_index, seconds))
    points = []
    for target in targets:
        threshold = val.fit(float(target), axis)
        points.append({"target": float(target), "threshold": threshold} | test.scorer.point(test.outputs(threshold)))
    return points


def curve_controls(model: FusionModel, store: FeatureStore, index: np.ndarray, val_index: np.ndarray,
                   points: Sequence[dict[str, Any]], seconds: dict[str, float] | None = None, seed: int = 0,
                   progress: bool = False) -> dict[str, Any]:
    """The controls of a scout's curve (``points`` from :func:`fusionkit.evaluation.curves.budget_curve` on ``index``):
    ``static`` (every static choice), ``frontier`` (their upper hull), ``random`` (random rows at each point's run
    rates), ``cascade`` (at each point's mean cost, fitted on ``val_index``) and ``verdict``."""
    if not model.on_demand:
        raise FusionkitError("the controls of a budget curve compare choices of on-demand encoders; this model has "
                             "none (run: on_demand)")
    axis = "mean_encoder_seconds" if seconds else "mean_gflops"
    static = static_choices(model, store, index, seconds, progress)
    frontier = static_frontier(static, axis)
    demand = {model.encoder_names[k] for k in model.on_demand}
    random = [{"budget_share": p["budget_share"]}
              | random_rows(model, store, index, {n: r for n, r in p["run_rate"].items() if n in demand}, seed,
                            seconds)
              for p in progress_bar(points, enabled=progress, desc="random rows", unit="budget", leave=False)]
    steps = cascade(model, store, index, val_index, [p[axis] for p in points], seconds)
    known = known_corruption(model, store, index, seconds)
    known_frontier = static_frontier(known, axis) if known else None
    return {"axis": axis, "static": static, "frontier": frontier, "random": random, "cascade": steps,
            **({"known": known, "known_frontier": known_frontier} if known else {}),
            "verdict": verdict(points, frontier, random, steps, axis, known_frontier)}


def verdict(points: Sequence[dict[str, Any]], frontier: Sequence[dict[str, float]],
            random: Sequence[dict[str, Any]], steps: Sequence[dict[str, Any]], axis: str,
            known: Sequence[dict[str, float]] | None = None) -> dict[str, Any]:
    """The scout's margin (points of Score) over the static frontier, random rows and the cascade at each budget
    (and, where the store records corruption, against the known-corruption control's frontier: ``under_known``, the
    scout minus the control at its cost), and a sentence on the middle budgets: those that spend from 20% to 60% of
    the on-demand cost."""
    low, high = points[0][axis], points[-1][axis]
    rows = []
    for p, r, c in zip(points, random, steps):
        spent = (p[axis] - low) / (high - low) if high > low else 1.0
        rows.append({"budget_share": p["budget_share"], "on_demand_spent": spent,
                     "over_static": p["score"] - frontier_at(frontier, p[axis], axis),
                     "over_random": p["score"] - r["score"], "over_cascade": p["score"] - c["score"]}
                    | ({"under_known": p["score"] - frontier_at(known, p[axis], axis)} if known else {}))
    middle = [r for r in rows if 0.2 <= r["on_demand_spent"] <= 0.6]
    if not middle:
        return {"margins": rows, "pays": None,
                "summary": "no budget of the curve spends 20-60% of the on-demand cost; no verdict"}
    static_wins = sum(r["over_static"] > 0 for r in middle)
    random_wins = sum(r["over_random"] > 0 for r in middle)
    pays = static_wins == len(middle) and random_wins == len(middle)
    summary = (f"at the {len(middle)} middle budget(s) (20-60% of the on-demand cost spent) the scout beats the "
               f"static frontier at {static_wins} and random rows at {random_wins} (mean margins "
               f"{np.mean([r['over_static'] for r in middle]):+.3f} and {np.mean([r['over_random'] for r in middle]):+.3f}"
               " Score): " + ("per-sample selection pays here" if pays else
                              "a static choice or random rows do as well here; per-sample selection does not pay"))
    if known:
        summary += (f"; the rule that knows which inputs are corrupted scores {-np.mean([r['under_known'] for r in middle]):+.3f}"
                    " over the scout at the same cost")
    return {"margins": rows, "pays": pays, "summary": summary}
