"""The BlEmoRE answer format: predictions as lists of ``{"emotion", "salience"}``.

A prediction names one emotion (salience 100) or two (50/50, 70/30 or 30/70).
Internally a batch of predictions is a salience matrix ``[N, L]`` on the 0-100
scale, which makes the metrics vectorised; these functions convert both ways.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from fusionkit.errors import DataError

__all__ = ["BLEMORE_LABELS", "RATIOS", "Prediction", "parse_blemore_name", "to_matrix", "from_order", "order_to_matrix", "align"]

#: The BlEmoRE labels, in the official order (a spec's default ``labels``).
BLEMORE_LABELS = ("ang", "disg", "fea", "hap", "sad", "neu")
#: The salience pairs a blend of two emotions takes.
RATIOS = ((50, 50), (70, 30), (30, 70))

Prediction = list[dict[str, Any]]

_SINGLE = re.compile(r"^(?P<actor>[^_]+)_(?P<emotion>[a-z]+)_(?:int|sit)\d+_ver\d+$")
_BLEND = re.compile(r"^(?P<actor>[^_]+)_mix_(?P<e1>[a-z]+)_(?P<e2>[a-z]+)_(?P<s1>\d+)_(?P<s2>\d+)_ver\d+$")


def parse_blemore_name(name: str) -> Prediction:
    """The truth encoded in an official BlEmoRE file name (extension ignored).

    ``A102_ang_int1_ver1`` -> ang 100; ``A438_mix_disg_hap_30_70_ver1`` -> disg 30, hap 70.
    """
    stem = re.sub(r"\.[A-Za-z0-9]+$", "", name.rsplit("/", 1)[-1])
    if m := _BLEND.match(stem):
        return [
            {"emotion": m["e1"], "salience": float(m["s1"])},
            {"emotion": m["e2"], "salience": float(m["s2"])},
        ]
    if m := _SINGLE.match(stem):
        return [{"emotion": m["emotion"], "salience": 100.0}]
    raise DataError(f"{name!r} is not a BlEmoRE file name (expected e.g. A102_ang_int1_ver1 or A438_mix_disg_hap_30_70_ver1)")


def to_matrix(predictions: Sequence[Prediction], labels: Sequence[str]) -> np.ndarray:
    """Predictions (or truths) -> salience matrix ``[N, L]``."""
    index = {label: i for i, label in enumerate(labels)}
    out = np.zeros((len(predictions), len(labels)), dtype=np.float64)
    for row, pred in enumerate(predictions):
        if not isinstance(pred, Sequence) or isinstance(pred, (str, bytes)) or not pred:
            raise DataError(f"prediction #{row} must be a non-empty list of {{emotion, salience}}, found {pred!r}")
        for entry in pred:
            try:
                emotion, salience = entry["emotion"], float(entry["salience"])
            except (TypeError, KeyError, ValueError):
                raise DataError(f"prediction #{row}: each entry needs 'emotion' and a numeric 'salience', found {entry!r}") from None
            if emotion not in index:
                raise DataError(f"prediction #{row}: unknown emotion {emotion!r}; labels are {list(labels)}")
            out[row, index[emotion]] += salience
    return out


def from_order(order: np.ndarray, saliences: np.ndarray, labels: Sequence[str]) -> list[Prediction]:
    """Decoder output (``order`` [N, 2] with -1 for none, ``saliences`` [N, 2]) -> predictions.

    Entries are listed in label order, as the official baseline writes them.
    """
    preds: list[Prediction] = []
    for idx, sal in zip(order.tolist(), saliences.tolist()):
        pairs = sorted((i, s) for i, s in zip(idx, sal) if i >= 0)
        preds.append([{"emotion": labels[i], "salience": float(s)} for i, s in pairs])
    return preds


def order_to_matrix(order: np.ndarray, saliences: np.ndarray, num_labels: int) -> np.ndarray:
    """Decoder output -> salience matrix ``[N, L]`` without building Python lists."""
    out = np.zeros((order.shape[0], num_labels), dtype=np.float64)
    rows = np.arange(order.shape[0])
    for j in range(order.shape[1]):
        ok = order[:, j] >= 0
        out[rows[ok], order[ok, j]] += saliences[ok, j]
    return out


def align(predictions: Mapping[str, Prediction], truths: Mapping[str, Prediction]) -> tuple[list[str], list, list]:
    """Sample ids present in both mappings, in the truths' order; mismatches are an error."""
    missing = [k for k in truths if k not in predictions]
    extra = [k for k in predictions if k not in truths]
    if missing or extra:
        raise DataError(
            "predictions and truths must cover the same sample ids: "
            f"{len(missing)} without a prediction (e.g. {missing[:3]}), {len(extra)} without a truth (e.g. {extra[:3]})"
        )
    ids = list(truths)
    return ids, [predictions[k] for k in ids], [truths[k] for k in ids]
