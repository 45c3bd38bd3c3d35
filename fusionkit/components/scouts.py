"""The built-in scouts (``conditional.scout``): ``gate``, the gate's own scores before the on-demand encoders run;
``value``, a small head that predicts each on-demand encoder's loss drop and decides in stages; and ``quality``,
which judges from each on-demand encoder's preview whether its input is good for the sample.

Both register in :mod:`fusionkit.components` through ``register_scouts``, the hook a third-party scout uses
(docs/writing-a-plugin.md#scouts).
"""

from __future__ import annotations

from collections.abc import Sequence

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

    hidden: int = option(32, doc="Hidden width of each on-demand encoder's judge (its predictor: twice).",
                         validator=positive)


class QualityScout(Scout):
    """Whether each on-demand encoder's input is good for this sample, judged before it runs from its preview
    (``preview_of``; without one, from the always-run tokens alone), and what running it would add given that.

    A good input agrees with the rest of the sample. Each on-demand encoder has a *predictor*, a small MLP from the
    always-run tokens to that encoder's token, and a *judge*, a small MLP from its preview's token and the mean
    always-run token to how far the predictor misses (the log of its squared error) on the sample. A corrupted
    input gives a token that the other encoders do not predict, whatever the label, so the judge learns to tell
    bad inputs from their previews without being told which are bad. Both learn in every training step
    (:meth:`loss`), from the tokens alone.

    Its *values* come from the validation rows (:attr:`values_from` ``"validation"``, :meth:`fit_values`): on the
    training rows the model has memorised the corrupted samples, and a corrupted input's drop there looks as good
    as a clean one's. Where an encoder's input is bad on some samples, its judge's verdicts fall in two groups; a
    two-component Gaussian mixture over the validation rows' verdicts gives each row the chance that its input is
    in the worse group, and each encoder's value is linear in that chance and in which encoders already ran,
    fitted to the measured drops' medians. A few parameters per encoder: a verdict that also rises on hard samples
    cannot bend the value the wrong way, as a flexible fit to noisy drops does, and the few rows whose loss any
    added token rescues cannot decide it, as they decide a mean.
    It decides in stages, as the value scout does."""

    needs_drops = False
    values_from = "validation"

    def __init__(self, config: QualityScoutConfig, context: BuildContext) -> None:
        super().__init__(config, context)
        d, m, h = context.latent_dim, len(context.on_demand), config.hidden
        self.looks = list(context.previews) or [-1] * m
        self.always = [k for k in range(context.num_encoders)
                       if k not in context.on_demand and k not in self.looks]
        self.predictors = nn.ModuleList(nn.Sequential(nn.Linear(len(self.always) * d, 2 * h), nn.GELU(),
                                                      nn.Linear(2 * h, d)) for _ in context.on_demand)
        self.judges = nn.ModuleList(nn.Sequential(nn.Linear(2 * d, h), nn.GELU(), nn.Linear(h, 1))
                                    for _ in context.on_demand)
        # per encoder, the mixture over its verdicts (the better group first): means, variances, weights
        self.register_buffer("mixture", torch.tensor([[0.0, 1.0], [1.0, 1.0], [0.5, 0.5]]).repeat(m, 1, 1))
        # per encoder, its value's coefficients on [1, P(worse group), ran...]; until fitted, every value is 0
        self.register_buffer("coefficients", torch.zeros(m, 2 + m))

    def _context(self, tokens: torch.Tensor, present: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The always-run tokens, zeros where missing: ``([B, A*d], [B, d])``, side by side and their mean."""
        weight = present[:, self.always].unsqueeze(-1).float()
        always = tokens[:, self.always].float() * weight
        return always.flatten(1), always.sum(1) / weight.sum(1).clamp_min(1.0)

    def judged(self, tokens: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
        """``[B, m]``: each judge's verdict, the predicted log squared error of the predictor on each on-demand
        encoder's token (higher: its input agrees less with the rest of the sample), from the preview's token and
        the mean always-run token."""
        tokens = tokens.detach().float()
        _, mean = self._context(tokens, present)
        looks = [tokens[:, k] * present[:, k].unsqueeze(-1).float() if k >= 0 else torch.zeros_like(mean)
                 for k in self.looks]
        return torch.cat([judge(torch.cat([look, mean], dim=1)) for judge, look in zip(self.judges, looks)], dim=1)

    def worse(self, judged: torch.Tensor) -> torch.Tensor:
        """``[B, m]``: the chance that each verdict belongs to its encoder's worse group (the mixture's)."""
        means, variances, weights = self.mixture.unbind(1)  # each [m, 2]
        log_density = (weights.log() - 0.5 * variances.log()
                       - 0.5 * (judged.unsqueeze(-1) - means) ** 2 / variances)  # [B, m, 2]
        return torch.softmax(log_density, dim=-1)[..., 1]

    def forward(self, tokens: torch.Tensor, present: torch.Tensor, ran: torch.Tensor) -> torch.Tensor:
        worse = self.worse(self.judged(tokens, present).detach())
        design = torch.cat([torch.ones_like(worse).unsqueeze(-1), worse.unsqueeze(-1),
                            ran.float().unsqueeze(1).expand(-1, worse.shape[1], -1)], dim=-1)  # [B, m, 2 + m]
        return (design * self.coefficients).sum(-1)

    def loss(self, example: ScoutExample) -> torch.Tensor:
        """Each predictor's squared error on the rows that computed its encoder, and each judge's squared error
        against the log of that error (the values come from validation rows, :meth:`fit_values`)."""
        tokens, present = example.tokens.detach().float(), example.present
        judged = self.judged(tokens, present)
        side_by_side, _ = self._context(tokens, present)
        total = 0.0 * (example.predicted.sum() + judged.sum())  # every parameter stays in the graph
        for j, k in enumerate(self.context.on_demand):
            rows = present[:, k]
            if not rows.any():
                continue
            missed = (self.predictors[j](side_by_side[rows]) - tokens[rows, k]).pow(2).mean(1)
            total = total + missed.mean() + (judged[rows, j] - torch.log(missed.detach() + 1e-6)).pow(2).mean()
        return total

    @torch.no_grad()
    def fit_values(self, examples: Sequence[ScoutExample]) -> None:
        """Per encoder: the mixture over the validation rows' verdicts (EM from the verdicts' 10th and 90th
        percentiles), then its value's coefficients by a median fit to the drops measured in every state."""
        examples = [e for e in examples if e.measured is not None]
        if not examples:
            return
        demand = list(self.context.on_demand)
        judged = self.judged(examples[0].tokens, examples[0].present)
        for j, k in enumerate(demand):
            rows = examples[0].present[:, k]
            if rows.sum() >= 4:
                self.mixture[j] = _two_groups(judged[rows, j].double()).to(self.mixture)
        worse = self.worse(judged)
        for j in range(len(demand)):
            design, drops = [], []
            for example in examples:
                rows = example.addable[:, j]
                design.append(torch.cat([torch.ones_like(worse[rows, j:j + 1]), worse[rows, j:j + 1],
                                         example.state[rows].to(worse.dtype)], dim=1))
                drops.append(example.measured[rows, j].to(worse.dtype))
            x, y = torch.cat(design).double(), torch.cat(drops).double()
            if len(y):
                self.coefficients[j] = _median_fit(x, y).to(self.coefficients)


def _median_fit(x: torch.Tensor, y: torch.Tensor, steps: int = 50) -> torch.Tensor:
    """Coefficients ``[p]`` of the least absolute deviations fit of ``y`` ``[N]`` on ``x`` ``[N, p]`` (iteratively
    reweighted least squares, a little ridge beside the intercept, column 0). A drop is heavy-tailed: adding any
    token now and then rescues a row whose fusion without it fails, whatever the token holds, and a mean chases
    those rows; the median follows the common row."""
    ridge = 1e-4 * len(y) * torch.eye(x.shape[1], dtype=x.dtype, device=x.device)
    ridge[0, 0] = 0.0
    weights = torch.ones_like(y)
    for _ in range(steps):
        weighted = x * weights[:, None]
        coefficients = torch.linalg.solve(x.T @ weighted + ridge, weighted.T @ y)
        weights = 1.0 / (y - x @ coefficients).abs().clamp_min(1e-4)
    return coefficients


def _two_groups(values: torch.Tensor, steps: int = 100) -> torch.Tensor:
    """A two-component Gaussian mixture with one variance over ``values`` ``[N]`` by EM, the lower-mean component first:
    ``[[mean, mean], [variance, variance], [weight, weight]]``."""
    means = torch.quantile(values, values.new_tensor([0.1, 0.9]))
    floor = values.var().clamp_min(1e-12) * 1e-3
    variances = values.var().clamp_min(1e-12).repeat(2)
    weights = values.new_tensor([0.5, 0.5])
    for _ in range(steps):
        log_density = weights.log() - 0.5 * variances.log() - 0.5 * (values[:, None] - means) ** 2 / variances
        share = torch.softmax(log_density, dim=1)  # [N, 2]
        mass = share.sum(0).clamp_min(1e-9)
        weights = (mass / len(values)).clamp_min(1e-6)
        means = (share * values[:, None]).sum(0) / mass
        # one variance for both: the chance of the worse group then rises with the verdict, never at both ends
        variances = ((share * (values[:, None] - means) ** 2).sum() / len(values)).clamp_min(floor).repeat(2)
    order = torch.argsort(means)
    return torch.stack([means[order], variances[order], weights[order]])
