"""Built-in decoders: the official BlEmoRE α/β rule, and presence + salience."""

from __future__ import annotations

import attrs
import numpy as np

from fusionkit.answers import order_to_matrix
from fusionkit.config import option, unit_interval
from fusionkit.interfaces import BuildContext, Decoder
from fusionkit.metrics import scores_from_matrices

__all__ = ["OFFICIAL_GRID", "THRESHOLD_GRID", "SHARE_GAP_GRID", "BlemoreDecoderConfig",
           "PresenceSalienceDecoderConfig", "blemore_decode", "presence_salience_decode", "BlemoreDecoder",
           "PresenceSalienceDecoder"]

OFFICIAL_GRID = np.linspace(0.05, 0.95, 20)
THRESHOLD_GRID = np.linspace(0.05, 0.95, 19)
SHARE_GAP_GRID = np.linspace(0.0, 1.0, 21)


@attrs.frozen(kw_only=True)
class BlemoreDecoderConfig:
    """The official baseline's rule on the combined distribution; α and β are searched on validation."""

    alpha: float = option(0.5, doc="Minimum probability for an emotion to be predicted.", validator=unit_interval)
    beta: float = option(0.1, doc="Maximum |p1 - p2| for a 50/50 blend.", validator=unit_interval)


@attrs.frozen(kw_only=True)
class PresenceSalienceDecoderConfig:
    """Present set from the presence head (at most two), ratio from the salience head."""

    threshold: float = option(0.5, doc="Presence probability at or above which an emotion is present.", validator=unit_interval)
    beta: float = option(0.2, doc="Maximum |s1 - s2| / (s1 + s2) of the salience shares for a 50/50 blend.", validator=unit_interval)


def _pair(chosen: np.ndarray, first_larger: np.ndarray, even: np.ndarray, single: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(order [N, 2], saliences [N, 2]) from each row's two candidates and the rule's outcome."""
    order = chosen.copy()
    sal = np.where(even[:, None], 50.0, np.where(first_larger[:, None], [70.0, 30.0], [30.0, 70.0]))
    order[single, 1] = -1
    sal[single] = [100.0, 0.0]
    return order, sal


def _grid_search(decode, grid_a: np.ndarray, grid_b: np.ndarray, truth: np.ndarray, num_labels: int) -> tuple[float, float]:
    """The (a, b) pair with the best Score; ties keep the first pair in (a, b) order."""
    best, best_score = (float(grid_a[0]), float(grid_b[0])), -1.0
    for a in grid_a:
        for b in grid_b:
            order, sal = decode(a, b)
            score = scores_from_matrices(order_to_matrix(order, sal, num_labels), truth)["score"]
            if score > best_score:
                best, best_score = (float(a), float(b)), score
    return best


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


class BlemoreDecoder(Decoder):
    """Steps 1-5 of the official decoding (BLEMORE.md), vectorised."""

    def decode(self, outputs):
        probs = np.asarray(outputs["probs"], dtype=np.float64)
        return blemore_decode(probs, self.config.alpha, self.config.beta, self.context.neutral_index)

    def fit(self, outputs, truth):
        probs = np.asarray(outputs["probs"], dtype=np.float64)
        alpha, beta = _grid_search(
            lambda a, b: blemore_decode(probs, a, b, self.context.neutral_index),
            OFFICIAL_GRID, OFFICIAL_GRID, truth, probs.shape[1],
        )
        return BlemoreDecoderConfig(alpha=alpha, beta=beta)


class PresenceSalienceDecoder(Decoder):
    """Emotions with presence >= threshold (the two most present; neutral never blends);
    the 50/50, 70/30 or 30/70 ratio from the salience shares within that pair."""

    def __init__(self, config, context: BuildContext) -> None:
        super().__init__(config, context)
        missing = [r for r in ("presence", "salience") if r not in context.head_roles]
        if missing:
            raise ValueError(f"decoder 'presence_salience' needs the head(s) {', '.join(missing)}; add them under heads:")

    def decode(self, outputs):
        return presence_salience_decode(
            np.asarray(outputs["presence"], dtype=np.float64), np.asarray(outputs["salience"], dtype=np.float64),
            self.config.threshold, self.config.beta, self.context.neutral_index,
        )

    def fit(self, outputs, truth):
        presence = np.asarray(outputs["presence"], dtype=np.float64)
        salience = np.asarray(outputs["salience"], dtype=np.float64)
        threshold, beta = _grid_search(
            lambda t, b: presence_salience_decode(presence, salience, t, b, self.context.neutral_index),
            THRESHOLD_GRID, SHARE_GAP_GRID, truth, presence.shape[1],
        )
        return PresenceSalienceDecoderConfig(threshold=threshold, beta=beta)
