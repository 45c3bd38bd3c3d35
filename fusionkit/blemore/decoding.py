"""The built-in decoding rules on probabilities, in NumPy alone: the official BlEmoRE alpha/beta rule and presence +
salience. The decoders (:mod:`fusionkit.components.decoders`) apply them with their fitted thresholds, and so does
the runtime without torch (:mod:`fusionkit.runtime`), so a deployment decodes exactly as the model does."""

from __future__ import annotations

import numpy as np

__all__ = ["blemore_decode", "presence_salience_decode"]


def _pair(chosen: np.ndarray, first_larger: np.ndarray, even: np.ndarray, single: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(order [N, 2], saliences [N, 2]) from each row's two candidates and the rule's outcome."""
    order = chosen.copy()
    sal = np.where(even[:, None], 50.0, np.where(first_larger[:, None], [70.0, 30.0], [30.0, 70.0]))
    order[single, 1] = -1
    sal[single] = [100.0, 0.0]
    return order, sal


def blemore_decode(probs: np.ndarray, alpha: float, beta: float, neutral: int | None) -> tuple[np.ndarray, np.ndarray]:
    """The official rule on probability rows ``[N, L]`` -> (order [N, 2], saliences [N, 2]).

    Ties follow the official code: the two kept emotions are the first two of NumPy's
    default ``argsort`` of the negated row, and "the top emotion" is ``argmax`` over the
    row with all but those two zeroed (the lower label index among equals).
    """
    order = np.argsort(-probs, axis=1)
    rows = np.arange(len(probs))
    i1, i2 = order[:, 0], order[:, 1]
    p1, p2 = probs[rows, i1], probs[rows, i2]
    kept = np.zeros_like(probs)
    kept[rows, i1] = p1
    kept[rows, i2] = p2
    top = np.argmax(kept, axis=1)
    single = (p1 < alpha) | (p2 < alpha)
    chosen = np.stack([np.where(single, top, i1), i2], axis=1)
    if neutral is not None:
        has_neutral = ~single & ((i1 == neutral) | (i2 == neutral))
        other = np.where(i1 == neutral, i2, i1)
        pick = np.where(probs[rows, other] >= probs[:, neutral], other, neutral)
        chosen[has_neutral, 0] = pick[has_neutral]
        single = single | has_neutral
    even = np.abs(p1 - p2) <= beta
    return _pair(chosen, p1 >= p2, even, single)


def presence_salience_decode(
    presence: np.ndarray, salience: np.ndarray, threshold: float, beta: float, neutral: int | None
) -> tuple[np.ndarray, np.ndarray]:
    """Most present emotion always; the second when its presence >= threshold and neither is neutral."""
    order = np.argsort(-presence, axis=1, kind="stable")
    rows = np.arange(len(presence))
    i1, i2 = order[:, 0], order[:, 1]
    single = presence[rows, i2] < threshold
    if neutral is not None:
        single |= (i1 == neutral) | (i2 == neutral)
    s1, s2 = salience[rows, i1], salience[rows, i2]
    even = np.abs(s1 - s2) / np.maximum(s1 + s2, 1e-12) <= beta
    return _pair(order[:, :2], s1 >= s2, even, single)
