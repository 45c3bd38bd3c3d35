"""Built-in combiners: probability-level fusion of the presence and salience heads."""

from __future__ import annotations

import attrs
import torch

from fusionkit.config import non_negative, option
from fusionkit.interfaces import BuildContext, Combiner

__all__ = ["ProductConfig", "MeanConfig", "SalienceOnlyConfig", "PresenceOnlyConfig", "ProductCombiner",
           "MeanCombiner", "SalienceOnlyCombiner", "PresenceOnlyCombiner"]


@attrs.frozen(kw_only=True)
class ProductConfig:
    """Normalised p_salience * p_presence ** gamma."""

    gamma: float = option(1.0, doc="Exponent on the presence probabilities.", validator=non_negative)


@attrs.frozen(kw_only=True)
class MeanConfig:
    """Mean of the salience distribution and the normalised presence probabilities."""


@attrs.frozen(kw_only=True)
class SalienceOnlyConfig:
    """The salience (or classifier) head alone."""


@attrs.frozen(kw_only=True)
class PresenceOnlyConfig:
    """The presence probabilities alone, normalised to sum to one."""


def _normalise(p: torch.Tensor) -> torch.Tensor:
    return p / p.sum(dim=-1, keepdim=True).clamp_min(1e-12)


def _require(context: BuildContext, name: str, roles: tuple[str, ...]) -> None:
    missing = [r for r in roles if r not in context.head_roles]
    if missing:
        raise ValueError(f"combiner {name!r} needs the head(s) {', '.join(missing)}; add them under heads:")


class ProductCombiner(Combiner):
    def __init__(self, config: ProductConfig, context: BuildContext) -> None:
        super().__init__()
        _require(context, "product", ("presence", "salience"))
        self.gamma = config.gamma

    def forward(self, presence, salience):
        return _normalise(salience * presence.clamp_min(1e-12) ** self.gamma)


class MeanCombiner(Combiner):
    def __init__(self, config: MeanConfig, context: BuildContext) -> None:
        super().__init__()
        _require(context, "mean", ("presence", "salience"))

    def forward(self, presence, salience):
        return 0.5 * (salience + _normalise(presence))


class SalienceOnlyCombiner(Combiner):
    def __init__(self, config: SalienceOnlyConfig, context: BuildContext) -> None:
        super().__init__()
        _require(context, "salience_only", ("salience",))

    def forward(self, presence, salience):
        return salience


class PresenceOnlyCombiner(Combiner):
    def __init__(self, config: PresenceOnlyConfig, context: BuildContext) -> None:
        super().__init__()
        _require(context, "presence_only", ("presence",))

    def forward(self, presence, salience):
        return _normalise(presence)
