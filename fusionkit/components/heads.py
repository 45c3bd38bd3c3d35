"""Built-in heads: presence (sigmoid per label), salience and classifier (softmax over labels)."""

from __future__ import annotations

import attrs
from torch import nn

from fusionkit.config import non_negative, option, unit_interval
from fusionkit.interfaces import BuildContext, Head

__all__ = ["MLPHeadConfig", "PresenceHeadConfig", "SalienceHeadConfig", "ClassifierHeadConfig", "MLPHead",
           "presence_head", "salience_head"]


@attrs.frozen(kw_only=True)
class MLPHeadConfig:
    """A linear layer, or one hidden ReLU layer, from the fused vector to one output per label."""

    hidden: int = option(0, doc="Hidden layer size; 0 means a single linear layer.", validator=non_negative)
    dropout: float = option(0.1, doc="Dropout before the output layer.", validator=unit_interval)


#: The presence and salience heads' configs, by their 0.1 names (kept: they are the one config).
PresenceHeadConfig = SalienceHeadConfig = MLPHeadConfig


@attrs.frozen(kw_only=True)
class ClassifierHeadConfig:
    """The official BlEmoRE baseline head: one hidden ReLU layer, softmax over labels."""

    hidden: int = option(256, doc="Hidden layer size (the baseline uses 256 or 512); 0 means linear.", validator=non_negative)
    dropout: float = option(0.0, doc="Dropout before the output layer.", validator=unit_interval)


class MLPHead(Head):
    """Linear, or Linear-ReLU-Linear, from the fused vector to one logit per label."""

    def __init__(self, config, context: BuildContext, activation: str) -> None:
        super().__init__()
        self.activation = activation
        if config.hidden:
            self.net = nn.Sequential(
                nn.Linear(context.in_dim, config.hidden), nn.ReLU(), nn.Dropout(config.dropout),
                nn.Linear(config.hidden, context.num_labels),
            )
        else:
            self.net = nn.Sequential(nn.Dropout(config.dropout), nn.Linear(context.in_dim, context.num_labels))
        if not config.dropout:
            self.net = nn.Sequential(*(m for m in self.net if not isinstance(m, nn.Dropout)))

    def forward(self, fused):
        return self.net(fused)


def presence_head(config: MLPHeadConfig, context: BuildContext) -> MLPHead:
    return MLPHead(config, context, "sigmoid")


def salience_head(config: MLPHeadConfig | ClassifierHeadConfig, context: BuildContext) -> MLPHead:
    return MLPHead(config, context, "softmax")
