"""Fold ensembles: the models of a cross-validation (or any runs of one task) averaged for a submission.

Challenge entries train one model per fold and average their probabilities on the test set. The decoder's
thresholds (the official α/β grid for the ``blemore`` decoder) are then chosen on the **pooled out-of-fold
validation predictions**: each fold model predicts its own validation fold, which it never trained on, and
those predictions together cover the training data once. Averaging sharpens nothing the thresholds were fitted
for, so the thresholds of the single models are not reused.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import attrs
import numpy as np

from fusionkit.blemore.answers import from_order
from fusionkit.checkpoint import SPEC_FILE
from fusionkit.conditional.budget import Budget
from fusionkit.data.store import FeatureStore
from fusionkit.errors import CheckpointError, DataError, FusionkitError, FusionkitWarning, SpecError
from fusionkit.evaluation.budgets import fit_run_budget
from fusionkit.inference import collect_outputs
from fusionkit.models.factory import load_model
from fusionkit.models.fusion import FusionModel
from fusionkit.spec import Spec, load_spec, spec_differences
from fusionkit.training.rundir import CV_FORMAT, RUN_FILE, check_trained_store, run_info
from fusionkit.training.tasks import evaluate_outputs
from fusionkit.training.train import make_split

__all__ = ["expand_runs", "check_same_specs", "FoldEnsemble"]

_FOLD_DIR = re.compile(r"fold(\d+)")


def _unfinished(run: Path) -> str | None:
    """Why the run ``run`` cannot join an ensemble, or None when it is finished with a best/ checkpoint."""
    if not run.is_dir():
        return "missing"
    try:
        status = run_info(run).get("status")
    except CheckpointError as exc:
        return str(exc)
    if status != "finished":
        return f"status {status}"
    if not (run / "best").is_dir():
        return "no best/ checkpoint"
    return None


def _cv_folds(run: Path, info: dict[str, Any], partial: bool) -> list[Path]:
    folds = info.get("folds")
    if not isinstance(folds, list) or not folds or not all(isinstance(k, int) and not isinstance(k, bool) for k in folds):
        raise CheckpointError(f"{run / RUN_FILE}: 'folds' must list the cross-validation's folds; the directory is "
                              "damaged")
    found = {int(m.group(1)) for p in run.iterdir() if p.is_dir() and (m := _FOLD_DIR.fullmatch(p.name))}
    stray = sorted(found - set(folds))
    if stray:
        warnings.warn(f"{run}: fold folder(s) {stray} are not among the cross-validation's folds {folds}; left out",
                      FusionkitWarning, stacklevel=3)
    why = {k: _unfinished(run / f"fold{k}") for k in folds}
    bad = {k: w for k, w in why.items() if w is not None}
    ready = [run / f"fold{k}" for k in folds if k not in bad]
    listed = ", ".join(f"fold{k} ({w})" for k, w in bad.items())
    if bad and not partial:
        raise CheckpointError(f"{run}: the cross-validation is incomplete: {listed}. Finish it with `fusionkit train "
                              "--cv --resume`, or ensemble the finished folds alone with --partial")
    if not ready:
        raise CheckpointError(f"{run}: no fold is finished ({listed})")
    if bad:
        warnings.warn(f"{run}: a partial ensemble of {len(ready)} of {len(folds)} folds; left out: {listed}",
                      FusionkitWarning, stacklevel=3)
    return ready


def expand_runs(runs: Sequence[str | Path], partial: bool = False) -> list[Path]:
    """Run directories: a cross-validation directory (``train --cv``) stands for its fold runs, in fold order.

    A cross-validation must be complete (every fold it lists finished, with a best/ checkpoint), unless ``partial``;
    a lone run needs a best/ checkpoint, and a run named among several must be finished."""
    out: list[Path] = []
    runs = [Path(r) for r in runs]
    for run in runs:
        info = run_info(run)
        if info.get("format") == CV_FORMAT:
            out += _cv_folds(run, info, partial)
        elif len(runs) > 1:
            why = _unfinished(run)
            if why is not None:
                raise CheckpointError(f"{run}: cannot join an ensemble ({why}); finish it first")
            out.append(run)
        else:
            if not (run / "best").is_dir():
                raise CheckpointError(f"{run}: has no best/ checkpoint yet (is it still training?)")
            out.append(run)
    if len({p.resolve() for p in out}) != len(out):
        raise CheckpointError(f"the runs {[str(p) for p in out]} name one run twice")
    return out


def _ensemble_view(spec: Spec) -> dict[str, Any]:
    """What the models of one ensemble must share: everything but the optimisation settings and the fitted
    thresholds (the ensemble fits its own)."""
    data = spec.to_dict()
    data.pop("train", None)
    if isinstance(data.get("decoder"), dict):
        data["decoder"] = {"type": data["decoder"].get("type")}
    return data


def _stored_spec(run: Path) -> Spec:
    try:
        return load_spec(run / "best" / SPEC_FILE)
    except SpecError as exc:
        raise CheckpointError(f"{run / 'best'}: the stored spec is unreadable or invalid: {exc}") from None


def check_same_specs(runs: Sequence[Path]) -> None:
    """Refuse runs whose specs differ beyond training settings, naming the differences (before any model loads)."""
    first = _ensemble_view(_stored_spec(runs[0]))
    for run in runs[1:]:
        diffs = spec_differences(first, _ensemble_view(_stored_spec(run)))
        if diffs:
            shown = "; ".join(diffs[:6]) + (f"; and {len(diffs) - 6} more" if len(diffs) > 6 else "")
            raise CheckpointError(f"{run}: its spec differs from {runs[0]}'s ({shown}); an ensemble averages models "
                                  "of one spec (only train settings may differ). Retrain it with the same spec, or "
                                  "leave it out")


class FoldEnsemble:
    """The models of several runs: their averaged probabilities, decoded with thresholds fitted out of fold."""

    def __init__(self, runs: Sequence[str | Path], device: Any = None, partial: bool = False) -> None:
        self.runs = expand_runs(runs, partial=partial)
        check_same_specs(self.runs)
        self.models: list[FusionModel] = [load_model(run / "best", device=device) for run in self.runs]
        first = self.models[0]
        if not isinstance(first, FusionModel):
            raise CheckpointError(f"{self.runs[0]}: a two-tower model embeds and retrieves; it predicts no answers")
        for run, model in zip(self.runs[1:], self.models[1:]):
            if not isinstance(model, FusionModel) or tuple(model.labels) != tuple(first.labels) \
                    or model.spec.decoder.type != first.spec.decoder.type:
                raise CheckpointError(f"{run}: its labels or decoder differ from {self.runs[0]}'s; an ensemble averages "
                                      "models of one task")
        self.decoder = first.decoder
        self._fitted: dict[str, list[Budget]] = {}

    @property
    def spec(self) -> Any:
        return self.models[0].spec

    def outputs(self, store: FeatureStore, index: np.ndarray, budget: Any = None) -> dict[str, np.ndarray]:
        """The models' probabilities (every decoder input) averaged over the models; with ``budget``, each model's
        on-demand encoders within it (the cost is then the models' summed cost). A mean budget is fitted per model
        first (:meth:`model_budgets`); a list gives each model its own budget."""
        budgets = self.model_budgets(store, budget)
        each = [collect_outputs(model, store, index, budget=b) for model, b in zip(self.models, budgets)]
        return {key: (np.sum if key == "cost" else np.mean)([o[key] for o in each], axis=0) for key in each[0]
                if key != "kept"}

    def model_budgets(self, store: FeatureStore, budget: Any) -> list[Budget | None]:
        """One budget per model. A cap applies to each model as it is. A mean budget is the ensemble's: each model
        meets its part (the share of its own full cost, or an equal part of the GFLOPs) with a threshold fitted on
        its own validation fold, which is out of fold as the decoder's thresholds are; ``store`` must then be the
        one the runs trained on. Fitted thresholds are kept, so predicting again with one budget refits nothing."""
        if isinstance(budget, (list, tuple)):
            if len(budget) != len(self.models):
                raise FusionkitError(f"{len(budget)} budgets for an ensemble of {len(self.models)} models; give one "
                                     "budget, or one per model")
            return [Budget.parse(b) for b in budget]
        parsed = Budget.parse(budget)
        if parsed is None or not parsed.mean or parsed.threshold is not None:
            return [parsed] * len(self.models)
        key = (parsed.describe(), parsed.seconds)
        if key not in self._fitted:
            self.check_store(store)
            part = parsed if parsed.gflops is None else attrs.evolve(parsed, gflops=parsed.gflops / len(self.models))
            self._fitted[key] = [fit_run_budget(run, model, store, part) for run, model in zip(self.runs, self.models)]
        return list(self._fitted[key])

    def check_store(self, store: FeatureStore) -> None:
        """Refuse a store other than the one the runs trained on: its folds decide which rows are out of fold."""
        for run in self.runs:
            check_trained_store(run, run_info(run), store, "out-of-fold thresholds would be fitted on rows the models "
                                "trained on")

    def fit_decoder(self, store: FeatureStore) -> dict[str, Any]:
        """Fit the decoder's thresholds on the pooled out-of-fold validation predictions; returns its config.
        ``store`` must be the one the runs trained on (:meth:`check_store`)."""
        self.check_store(store)
        pooled: dict[str, list[np.ndarray]] = {}
        truth, seen = [], set()
        for run, model in zip(self.runs, self.models):
            info = run_info(run)
            val = make_split(store, info.get("test_fold")).val
            if seen & set(val.tolist()):
                raise DataError(f"{run}: its validation fold overlaps another run's; out-of-fold validation needs the "
                                "runs of one cross-validation (distinct folds)")
            seen |= set(val.tolist())
            outputs = collect_outputs(model, store, val)
            for key, value in outputs.items():
                pooled.setdefault(key, []).append(value)
            truth.append(store.truth_matrix(val))
        config = self.decoder.fit({k: np.concatenate(v) for k, v in pooled.items()}, np.concatenate(truth))
        for model in self.models:
            model.set_decoder(config)
        self.decoder = self.models[0].decoder
        return config

    def predictions(self, store: FeatureStore, index: np.ndarray, budget: Any = None) -> dict[str, list[dict[str, Any]]]:
        """Sample id -> BlEmoRE prediction of the averaged probabilities."""
        order, sal = self.decoder.decode(self.outputs(store, index, budget))
        return {store.ids[i]: p for i, p in zip(index.tolist(), from_order(order, sal, self.models[0].labels))}

    def evaluate(self, store: FeatureStore, index: np.ndarray, budget: Any = None) -> dict[str, Any]:
        """BlEmoRE metrics of the ensemble on the labelled samples ``index``."""
        budgets = self.model_budgets(store, budget)
        metrics = evaluate_outputs(self.models[0], self.outputs(store, index, budgets), store.truth_matrix(index),
                                   budgets[0])
        if "compute" in metrics:  # every model runs its encoders: their costs add up (run rates are the mean)
            compute = metrics["compute"]
            for key in ("full_gflops", "mean_encoder_seconds", "full_encoder_seconds"):
                if key in compute:
                    compute[key] *= len(self.models)
        return metrics
