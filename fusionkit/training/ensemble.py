"""Fold ensembles: the models of a cross-validation (or any runs of one task) averaged for a submission.

Challenge entries train one model per fold and average their probabilities on the test set. The decoder's
thresholds (the official α/β grid for the ``blemore`` decoder) are then chosen on the **pooled out-of-fold
validation predictions**: each fold model predicts its own validation fold, which it never trained on, and
those predictions together cover the training data once. Averaging sharpens nothing the thresholds were fitted
for, so the thresholds of the single models are not reused.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from fusionkit.answers import from_order
from fusionkit.data.store import FeatureStore
from fusionkit.errors import CheckpointError, DataError
from fusionkit.models.factory import load_model
from fusionkit.models.fusion import FusionModel
from fusionkit.training.rundir import CV_FORMAT, RUN_FILE
from fusionkit.training.tasks import collect_outputs, evaluate_outputs
from fusionkit.training.train import make_split

__all__ = ["expand_runs", "FoldEnsemble"]


def expand_runs(runs: Sequence[str | Path]) -> list[Path]:
    """Run directories: a cross-validation directory (``train --cv``) stands for its fold runs, in fold order."""
    out: list[Path] = []
    for run in map(Path, runs):
        info_path = run / RUN_FILE
        if not info_path.is_file():
            raise CheckpointError(f"{run}: not a fusionkit run directory (no {RUN_FILE})")
        info = json.loads(info_path.read_text(encoding="utf-8"))
        if info.get("format") == CV_FORMAT:
            folds = sorted((p for p in run.glob("fold[0-9]*") if (p / "best").is_dir()), key=lambda p: int(p.name[4:]))
            if not folds:
                raise CheckpointError(f"{run}: a cross-validation directory without finished folds")
            out += folds
        else:
            if not (run / "best").is_dir():
                raise CheckpointError(f"{run}: has no best/ checkpoint yet (is it still training?)")
            out.append(run)
    if len({p.resolve() for p in out}) != len(out):
        raise CheckpointError(f"the runs {[str(p) for p in out]} name one run twice")
    return out


class FoldEnsemble:
    """The models of several runs: their averaged probabilities, decoded with thresholds fitted out of fold."""

    def __init__(self, runs: Sequence[str | Path], device: Any = None) -> None:
        self.runs = expand_runs(runs)
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

    @property
    def spec(self) -> Any:
        return self.models[0].spec

    def outputs(self, store: FeatureStore, index: np.ndarray) -> dict[str, np.ndarray]:
        """The models' probabilities (every decoder input) averaged over the models."""
        each = [collect_outputs(model, store, index) for model in self.models]
        return {key: np.mean([o[key] for o in each], axis=0) for key in each[0] if key != "kept"}

    def fit_decoder(self, store: FeatureStore) -> dict[str, Any]:
        """Fit the decoder's thresholds on the pooled out-of-fold validation predictions; returns its config."""
        pooled: dict[str, list[np.ndarray]] = {}
        truth, seen = [], set()
        for run, model in zip(self.runs, self.models):
            info = json.loads((run / RUN_FILE).read_text(encoding="utf-8"))
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

    def predictions(self, store: FeatureStore, index: np.ndarray) -> dict[str, list[dict[str, Any]]]:
        """Sample id -> BlEmoRE prediction of the averaged probabilities."""
        order, sal = self.decoder.decode(self.outputs(store, index))
        return {store.ids[i]: p for i, p in zip(index.tolist(), from_order(order, sal, self.models[0].labels))}

    def evaluate(self, store: FeatureStore, index: np.ndarray) -> dict[str, Any]:
        """BlEmoRE metrics of the ensemble on the labelled samples ``index``."""
        return evaluate_outputs(self.models[0], self.outputs(store, index), store.truth_matrix(index))
