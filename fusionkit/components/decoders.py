"""Built-in decoders: the official BlEmoRE α/β rule, and presence + salience."""

from __future__ import annotations

import attrs
import numpy as np

from fusionkit.blemore.answers import order_to_matrix
from fusionkit.blemore.decoding import blemore_decode, presence_salience_decode
from fusionkit.blemore.metrics import scores_from_matrices
from fusionkit.config import option, unit_interval
from fusionkit.interfaces import BuildContext, Decoder

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
