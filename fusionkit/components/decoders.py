"""Built-in decoders: the official BlEmoRE α/β rule, and presence + salience."""

from __future__ import annotations

import attrs
import numpy as np

from fusionkit.answers import order_to_matrix
from fusionkit.config import option, unit_interval
from fusionkit.interfaces import BuildContext, Decoder
from fusionkit.metrics import scores_from_matrices

OFFICIAL_GRID = np.linspace(0.05, 0.95, 20)


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


def _pair(order: np.ndarray, first_larger: np.ndarray, even: np.ndarray, single: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Build (order, saliences) from the two candidates of each row."""
    n = order.shape[0]
    out_order = order[:, :2].copy()
    sal = np.where(even[:, None], 50.0, np.where(first_larger[:, None], [70.0, 30.0], [30.0, 70.0]))
    swap = ~even & ~first_larger & ~single  # write the larger share first
    out_order[swap] = out_order[swap][:, ::-1]
    sal[swap] = sal[swap][:, ::-1]
    out_order[single, 1] = -1
    sal[single] = [100.0, 0.0]
    return out_order.reshape(n, 2), sal


class BlemoreDecoder(Decoder):
    """Steps 1-5 of the official decoding (BLEMORE.md), vectorised."""

    def decode(self, outputs):
        probs = np.asarray(outputs["probs"], dtype=np.float64)
        return blemore_decode(probs, self.config.alpha, self.config.beta, self.context.neutral_index)

    def fit(self, outputs, truth):
        probs = np.asarray(outputs["probs"], dtype=np.float64)
        best, best_score = None, -1.0
        for alpha in OFFICIAL_GRID:
            for beta in OFFICIAL_GRID:
                order, sal = blemore_decode(probs, alpha, beta, self.context.neutral_index)
                s = scores_from_matrices(order_to_matrix(order, sal, probs.shape[1]), truth)["score"]
                if s > best_score:  # strict: ties keep the first pair in (alpha, beta) order
                    best, best_score = (float(alpha), float(beta)), s
        return BlemoreDecoderConfig(alpha=best[0], beta=best[1])


def blemore_decode(probs: np.ndarray, alpha: float, beta: float, neutral: int | None) -> tuple[np.ndarray, np.ndarray]:
    """The official rule on probability rows ``[N, L]`` -> (order [N, 2], saliences [N, 2])."""
    order = np.argsort(-probs, axis=1)  # NumPy's default sort, as the official code: ties by index
    rows = np.arange(len(probs))
    i1, i2 = order[:, 0], order[:, 1]
    p1, p2 = probs[rows, i1], probs[rows, i2]
    single = (p1 < alpha) | (p2 < alpha)
    chosen = order[:, :2].copy()
    if neutral is not None:
        has_neutral = ~single & ((i1 == neutral) | (i2 == neutral))
        other_is_2 = i1 == neutral
        other = np.where(other_is_2, i2, i1)
        p_other = np.where(other_is_2, p2, p1)
        p_neu = np.where(other_is_2, p1, p2)
        pick = np.where(p_other >= p_neu, other, neutral)
        chosen[has_neutral, 0] = pick[has_neutral]
        single = single | has_neutral
    even = np.abs(p1 - p2) <= beta
    first_larger = p1 >= p2
    return _pair(chosen, first_larger, even, single)


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
        best, best_score = None, -1.0
        for threshold in np.linspace(0.05, 0.95, 19):
            for beta in np.linspace(0.0, 1.0, 21):
                order, sal = presence_salience_decode(presence, salience, threshold, beta, self.context.neutral_index)
                s = scores_from_matrices(order_to_matrix(order, sal, presence.shape[1]), truth)["score"]
                if s > best_score:
                    best, best_score = (float(threshold), float(beta)), s
        return PresenceSalienceDecoderConfig(threshold=best[0], beta=best[1])


def presence_salience_decode(
    presence: np.ndarray, salience: np.ndarray, threshold: float, beta: float, neutral: int | None
) -> tuple[np.ndarray, np.ndarray]:
    order = np.argsort(-presence, axis=1, kind="stable")
    rows = np.arange(len(presence))
    i1, i2 = order[:, 0], order[:, 1]
    single = presence[rows, i2] < threshold  # the top emotion is always predicted
    if neutral is not None:
        single |= (i1 == neutral) | (i2 == neutral)
    s1, s2 = salience[rows, i1], salience[rows, i2]
    share_gap = np.abs(s1 - s2) / np.maximum(s1 + s2, 1e-12)
    even = share_gap <= beta
    return _pair(order, s1 >= s2, even, single)
