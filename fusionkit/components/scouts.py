"""The built-in scouts (``conditional.scout``): ``gate``, the gate's own scores before the on-demand encoders run,
and ``value``, a small head that predicts each on-demand encoder's loss drop and decides in stages.

Both register in :mod:`fusionkit.components` through ``register_scouts``, the hook a third-party scout uses
(docs/writing-a-plugin.md#scouts).
"""

from __future__ import annotations

import attrs
import torch
from torch import nn

from fusionkit.config import option, positive
from fusionkit.interfaces import BuildContext, Scout, ScoutConfig

__all__ = ["GateScout", "ValueScoutConfig", "ValueScout"]


class GateScout(Scout):
    """The gate as its own scout: its scores before the on-demand encoders run (an on-demand encoder's token is its
    identity embedding alone), taught the gate's scores with every token (or, with rank supervision, each token's
    own fit to the sample). It decides once, in the scores' order; the model applies its rule (:attr:`rule`), so it
    has no :meth:`forward` and no parameters."""

    rule = "gate"

    def forward(self, tokens: torch.Tensor, present: torch.Tensor, ran: torch.Tensor) -> torch.Tensor:
        raise TypeError("the gate scout has no forward of its own: the gate's scores decide (rule 'gate')")


@attrs.frozen(kw_only=True)
class ValueScoutConfig(ScoutConfig):
    """The value scout's width."""

    hidden: int | None = option(None, doc="Hidden width of its MLP (null: conditional.value_hidden, 64 by default).",
                                validator=positive)


class ValueScout(Scout):
    """From the tokens a sample has computed so far, how much its loss would drop if each on-demand encoder's token
    joined the fusion (``[B, m]``): a layer norm over every token (zeros where not computed or missing), then an
    MLP that also reads which encoders are present and which on-demand ones ran, so that after a stage it re-scores
    the rest knowing what they would add to what is there."""

    def __init__(self, config: ValueScoutConfig, context: BuildContext) -> None:
        super().__init__(config, context)
        encoders, demand, dim = context.num_encoders, len(context.on_demand), context.latent_dim
        hidden = config.hidden or getattr(context.conditional, "value_hidden", 64)
        self.norm = nn.LayerNorm(encoders * dim)
        self.net = nn.Sequential(nn.Linear(encoders * dim + encoders + demand, hidden), nn.GELU(),
                                 nn.Linear(hidden, demand))

    def forward(self, tokens: torch.Tensor, present: torch.Tensor, ran: torch.Tensor) -> torch.Tensor:
        # a missing encoder's token is not read: its value would depend on how its reader filled the gap
        x = self.norm((tokens.detach().float() * present.unsqueeze(-1).float()).flatten(1))
        return self.net(torch.cat([x, present.float(), ran.float()], dim=1))
