"""BlEmoRE metrics, exactly as the challenge defines them, and analysis metrics.

- ACC_presence: the share of clips whose predicted *set* of emotions equals the true set.
- ACC_salience: over the clips whose truth is a blend, the share predicted with exactly
  two emotions whose rounded saliences equal the truth's (70/30 vs 30/70 matters).
- Score: their mean. ACC_salience is defined on blends only: where no clip of a split is a
  blend it is not applicable (None, ``null`` in metrics.json, "n/a" in tables) and Score is
  ACC_presence.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from fusionkit.blemore.answers import Prediction, align, to_matrix

__all__ = ["scores_from_matrices", "format_metric", "blemore_scores", "per_label_f1", "presence_map"]


def scores_from_matrices(pred: np.ndarray, truth: np.ndarray) -> dict[str, float | None]:
    """Metrics from salience matrices ``[N, L]`` (0-100 scale) of predictions and truths."""
    pred_set = pred > 0
    true_set = truth > 0
    acc_presence = float(np.mean(np.all(pred_set == true_set, axis=1))) if len(pred) else 0.0
    blend = true_set.sum(axis=1) == 2
    two = pred_set.sum(axis=1) == 2
    exact = np.all(np.round(pred) == np.round(truth), axis=1)
    if not blend.any():  # ACC_salience is defined over blends only
        return {"acc_presence": acc_presence, "acc_salience": None, "score": acc_presence}
    acc_salience = float(np.mean((two & exact)[blend]))
    return {"acc_presence": acc_presence, "acc_salience": acc_salience, "score": 0.5 * (acc_presence + acc_salience)}


def format_metric(value: float | None, spec: str = ".3f") -> str:
    """A metric for tables and terminals: ``n/a`` where it is not applicable (ACC_salience without blends)."""
    return "n/a" if value is None else format(value, spec)


def blemore_scores(
    predictions: Mapping[str, Prediction], truths: Mapping[str, Prediction], labels: Sequence[str] | None = None
) -> dict[str, float]:
    """ACC_presence, ACC_salience and Score over dicts of sample id -> prediction.

    Both dicts must hold the same ids. ``labels`` defaults to every emotion that
    appears in either. ACC_salience is None when no truth is a blend (Score is then ACC_presence).
    """
    _, preds, trues = align(predictions, truths)
    if labels is None:
        labels = sorted({e["emotion"] for p in (*preds, *trues) for e in p})
    return scores_from_matrices(to_matrix(preds, labels), to_matrix(trues, labels))


def per_label_f1(pred: np.ndarray, truth: np.ndarray, labels: Sequence[str]) -> dict[str, float]:
    """F1 of the presence of each label, from salience matrices."""
    p, t = pred > 0, truth > 0
    out = {}
    for j, label in enumerate(labels):
        tp = float(np.sum(p[:, j] & t[:, j]))
        denom = float(np.sum(p[:, j]) + np.sum(t[:, j]))
        out[label] = 2 * tp / denom if denom else 0.0
    return out


def presence_map(presence: np.ndarray, truth: np.ndarray) -> float:
    """Mean average precision of presence probabilities ``[N, L]`` against the true sets."""
    aps = []
    for j in range(presence.shape[1]):
        positives = truth[:, j] > 0
        if not positives.any():
            continue
        order = np.argsort(-presence[:, j], kind="stable")
        hits = positives[order]
        precision = np.cumsum(hits) / np.arange(1, len(hits) + 1)
        aps.append(float(np.sum(precision * hits) / hits.sum()))
    return float(np.mean(aps)) if aps else 0.0
