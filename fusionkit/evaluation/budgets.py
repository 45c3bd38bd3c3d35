"""A mean budget fitted for a trained run: its threshold on the run's own validation fold (the one front door that
``fusionkit evaluate --budget mean:S%``, ``fusionkit export --budget`` and fold ensembles share)."""

from __future__ import annotations

import os
from pathlib import Path

from fusionkit.conditional.budget import Budget
from fusionkit.data.store import FeatureStore
from fusionkit.inference import fit_mean_budget
from fusionkit.models.fusion import FusionModel
from fusionkit.training.rundir import check_trained_store, run_info
from fusionkit.training.train import make_split

__all__ = ["fit_run_budget"]

#: Why a mean budget needs the store its run trained on.
WHY = ("a mean budget's threshold is fitted on the run's validation fold, which another store's folds would fill "
       "with rows it trained on")


def fit_run_budget(run: str | os.PathLike, model: FusionModel, store: FeatureStore, budget: Budget) -> Budget:
    """``budget`` (a mean budget) with its threshold fitted on the validation fold of the run in ``run`` (its
    ``run.json`` says which fold it tested on) of ``store``, which must be the store it trained on (refused,
    named, otherwise); ``model`` is the run's model."""
    run = Path(run)
    info = run_info(run)
    check_trained_store(run, info, store, WHY)
    return fit_mean_budget(model, store, make_split(store, info.get("test_fold")).val, budget)
