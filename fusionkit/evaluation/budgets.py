"""A mean budget fitted for a trained run: its threshold on the run's own validation fold (the one front door that
``fusionkit evaluate --budget mean:S%``, ``fusionkit export --budget`` and fold ensembles share)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from fusionkit.conditional.budget import Budget
from fusionkit.data.store import FeatureStore
from fusionkit.inference import fit_mean_budget
from fusionkit.models.fusion import FusionModel
from fusionkit.training.rundir import check_trained_store, run_info
from fusionkit.training.train import make_split

__all__ = ["run_validation_rows", "fit_run_budget"]

#: Why a mean budget needs the store its run trained on.
WHY = ("a mean budget's threshold is fitted on the run's validation fold, which another store's folds would fill "
       "with rows it trained on")


def run_validation_rows(run: str | os.PathLike, store: FeatureStore, why: str = WHY) -> np.ndarray:
    """The rows of ``store`` in the validation fold of the run in ``run`` (its ``run.json`` says which fold it
    tested on); ``store`` must be the store it trained on (refused, named, otherwise; ``why`` says what another
    store's folds would spoil)."""
    run = Path(run)
    info = run_info(run)
    check_trained_store(run, info, store, why)
    return make_split(store, info.get("test_fold")).val


def fit_run_budget(run: str | os.PathLike, model: FusionModel, store: FeatureStore, budget: Budget) -> Budget:
    """``budget`` (a mean budget) with its threshold fitted on the validation fold of the run in ``run``
    (:func:`run_validation_rows`); ``model`` is the run's model."""
    return fit_mean_budget(model, store, run_validation_rows(run, store), budget)
