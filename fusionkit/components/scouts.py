"""The built-in scouts (``conditional.scout``): ``gate``, the gate's own scores before the on-demand encoders run;
``value``, a small head that predicts each on-demand encoder's loss drop and decides in stages; and ``quality``,
which judges from each on-demand encoder's preview whether its input is good for the sample.

Both register in :mod:`fusionkit.components` through ``register_scouts``, the hook a third-party scout uses
(docs/writing-a-plugin.md#scouts).
"""

from __future__ import annotations

import attrs
import torch
from torch import nn
from torch.nn import functional as F

from fusionkit.config import option, positive
from fusionkit.interfaces import BuildContext, Scout, ScoutConfig, ScoutExample

__all__ = ["GateScout", "ValueScoutConfig", "ValueScout", "QualityScoutConfig", "QualityScout"]


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


@attrs.frozen(kw_only=True)
class QualityScoutConfig(ScoutConfig):
    """The quality scout's width."""

    hidden: int = option(32, doc="Hidden width of each on-demand encoder's judge.", validator=positive)


class QualityScout(Scout):
    """Whether each on-demand encoder's input is good for this sample, judged before it runs from its preview
    (``preview_of``; without one, from the always-run tokens alone), and what running it would add given that.

    Each on-demand encoder has a *probe*, a linear layer that predicts the labels from its token alone, and a
    *judge*, a small MLP from its preview's token and the mean of the always-run tokens to how much of the
    sample's label mass the probe's top label holds: a sample whose input of the encoder is corrupted, or simply
    uninformative, gets its probe wrong, so the judge learns to tell bad inputs from their previews without being
    told which are bad. A small value head then predicts each encoder's loss drop (as the value scout's target,
    measured on the rows where everything ran) from the judges' verdicts and what already ran: a few inputs that
    say much, where the value scout must find the same signal among every token. It decides in stages, as the
    value scout does."""

    def __init__(self, config: QualityScoutConfig, context: BuildContext) -> None:
        super().__init__(config, context)
        d, labels, m = context.latent_dim, context.num_labels, len(context.on_demand)
        self.looks = list(context.previews) or [-1] * m
        self.always = [k for k in range(context.num_encoders)
                       if k not in context.on_demand and k not in self.looks]
        self.probes = nn.ModuleList(nn.Linear(d, labels) for _ in context.on_demand)
        self.judges = nn.ModuleList(nn.Sequential(nn.Linear(2 * d, config.hidden), nn.GELU(),
                                                  nn.Linear(config.hidden, 1)) for _ in context.on_demand)
        self.value = nn.Sequential(nn.Linear(2 * m, config.hidden), nn.GELU(), nn.Linear(config.hidden, m))

    def judged(self, tokens: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
        """``[B, m]``: each judge's logit, from the preview's token and the mean always-run token."""
        tokens = tokens.detach().float()
        weight = present[:, self.always].unsqueeze(-1).float()
        context = (tokens[:, self.always] * weight).sum(1) / weight.sum(1).clamp_min(1.0)
        looks = [tokens[:, k] * present[:, k].unsqueeze(-1).float() if k >= 0 else torch.zeros_like(context)
                 for k in self.looks]
        return torch.cat([judge(torch.cat([look, context], dim=1)) for judge, look in zip(self.judges, looks)], dim=1)

    def forward(self, tokens: torch.Tensor, present: torch.Tensor, ran: torch.Tensor) -> torch.Tensor:
        return self.value(torch.cat([self.judged(tokens, present).detach(), ran.float()], dim=1))

    def loss(self, example: ScoutExample) -> torch.Tensor:
        """The value head's squared error on the measured drops (:meth:`Scout.loss`), each probe's cross-entropy on
        the rows that computed its encoder, and each judge's binary cross-entropy against the label mass its probe's
        top label holds on those rows."""
        target, present = example.target, example.present
        judged = self.judged(example.tokens, present)
        total = super().loss(example) + 0.0 * judged.sum()
        for j, k in enumerate(self.context.on_demand):
            rows = present[:, k]
            if not rows.any():
                continue
            logits = self.probes[j](example.tokens[rows, k].float())
            total = total - (target[rows] * torch.log_softmax(logits, dim=1)).sum(1).mean()
            agreement = target[rows].gather(1, logits.detach().argmax(1, keepdim=True)).squeeze(1)
            total = total + F.binary_cross_entropy_with_logits(judged[rows, j], agreement)
        return total
