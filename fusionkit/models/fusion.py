"""The fusion model: encoders -> projectors -> gate -> top-n selection -> fusion -> heads -> combiner.

:func:`build_model` assembles a :class:`FusionModel` from a spec; every component
is looked up by name in the plugin registry and built by its factory.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import attrs
import numpy as np
import torch
import torch.distributed as torch_dist
import torch.nn.functional as F
from torch import nn

from fusionkit.blemore.answers import Prediction, from_order
from fusionkit.checkpoint import save_checkpoint
from fusionkit.conditional.budget import CAP, MEAN, Budget, RowBudgets, parse_budget
from fusionkit.conditional.rows import RowShare, gather_rows, row_uniform, scatter_rows
from fusionkit.conditional.rules import kept_by, relative_costs, scout_loss, stage_pick, value_per_cost, within_budget
from fusionkit.conditional.selection import Selection, gather_slots, select_top_n, slot_count
from fusionkit.errors import DataError, FusionkitError
from fusionkit.interfaces import (
    DOMAINS,
    BuildContext,
    Decoder,
    DeferredInput,
    Encoder,
    Gate,
    LiveEncoder,
    Scout,
)
from fusionkit.plugins import get_registry
from fusionkit.registry import Registry
from fusionkit.spec import Component, EncoderSpec, ProjectorConfig, Spec

__all__ = ["FusionOutput", "Encoded", "ValueTarget", "measure_gflops", "has_batch_norm", "synchronizes", "as_at_inference", "DOMAINS", "GlobalBatchNorm", "DomainNorm", "Projector", "Trunk",
           "FusionModel", "count_parameters", "decoder_inputs"]


@dataclass
class FusionOutput:
    """Everything one forward pass computed, for training, analysis and plots.

    ``kept`` holds encoder indices (into ``model.encoder_names``) in rank order,
    -1 for an empty slot. ``presence``/``salience`` are None when the spec has no
    such head. ``aux_losses`` holds regularisers to add to the training loss.
    """

    fused: torch.Tensor
    scores: torch.Tensor
    kept: torch.Tensor
    weights: torch.Tensor
    probs: torch.Tensor
    presence: torch.Tensor | None
    salience: torch.Tensor | None
    logits: dict[str, torch.Tensor]
    tokens: torch.Tensor
    aux_losses: dict[str, torch.Tensor] = field(default_factory=dict)
    mask: torch.Tensor | None = None
    token_logits: torch.Tensor | None = None
    #: With on-demand encoders: ``[B, K]`` which encoders ran for each sample, and ``[B]`` its cost in GFLOPs.
    ran: torch.Tensor | None = None
    cost: torch.Tensor | None = None
    #: In training with on-demand encoders (see :class:`Encoded`): the tokens computed, the scout's scores, its rows.
    computed: torch.Tensor | None = None
    scout_scores: torch.Tensor | None = None
    scout_rows: torch.Tensor | None = None
    available: torch.Tensor | None = None
    #: In training with ``conditional.full_budget_weight``: each head's logits of the scout's rows (``scout_rows``)
    #: at the full budget, every token they computed fused.
    full_logits: dict[str, torch.Tensor] | None = None
    #: In training with the value scout (see :class:`ValueTarget`): its predictions on the scout's rows, the
    #: encoders each row's state could add, and each head's logits ``[m + 1, R, L]`` (no gradient; eval mode) in the
    #: state and with each on-demand encoder added.
    value_predicted: torch.Tensor | None = None
    value_addable: torch.Tensor | None = None
    value_logits: dict[str, torch.Tensor] | None = None

    @property
    def used(self) -> torch.Tensor:
        """``[B]``: how many encoders each sample kept (top-p varies it per sample)."""
        return (self.kept >= 0).sum(1)



class GlobalBatchNorm(nn.BatchNorm1d):
    """BatchNorm1d whose training statistics are the global batch's under torchrun: every rank's rows count, as in
    one process (SyncBatchNorm needs a GPU; this works on any device, gloo included). Its state is BatchNorm1d's.
    ``local`` turns the synchronisation off, for a pass that one rank makes alone."""

    local: bool = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.local or not (self.training and torch_dist.is_available() and torch_dist.is_initialized()
                              and torch_dist.get_world_size() > 1):
            return super().forward(x)
        from torch.distributed.nn.functional import all_reduce

        x32 = x.float()
        count = all_reduce(x32.new_tensor([float(len(x32))]))
        if float(count) == 0:  # no rank had a row (every rank calls it, see synchronizes): nothing to learn from
            return x
        mean = all_reduce(x32.sum(0)) / count
        var = all_reduce((x32 - mean).pow(2).sum(0)) / count
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked += 1
                momentum = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
                unbiased = var * (count / (count - 1).clamp(min=1))
                self.running_mean.mul_(1 - momentum).add_(momentum * mean.to(self.running_mean.dtype))
                self.running_var.mul_(1 - momentum).add_(momentum * unbiased.to(self.running_var.dtype))
        y = (x32 - mean) / torch.sqrt(var + self.eps)
        if self.affine:
            y = y * self.weight + self.bias
        return y.to(x.dtype)


class DomainNorm(nn.Module):
    """AdaBN-style normalisation: batch statistics kept per domain, one shared affine map.

    In training a batch is normalised with its own statistics and updates the running
    statistics of the current :attr:`domain`; in evaluation each domain's running statistics
    are used. The target's are estimated from its unlabelled rows (:func:`estimate_domain_statistics`).
    """

    def __init__(self, dim: int, domains: tuple[str, ...] = DOMAINS) -> None:
        super().__init__()
        self.norms = nn.ModuleDict({d: GlobalBatchNorm(dim, affine=False) for d in domains})
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim))
        self.domain = "source"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        norm = self.norms[self.domain if self.domain in self.norms else "source"]
        return norm(x) * self.weight + self.bias


class Projector(nn.Module):
    """One encoder's map into the shared latent space: linear or a two-layer MLP."""

    def __init__(self, in_dim: int, latent_dim: int, config: ProjectorConfig) -> None:
        super().__init__()
        # before a DomainNorm a bias is cancelled by the normalisation: its gradient would be rounding noise that
        # Adam turns into full-size steps, so it has none (DomainNorm's own bias follows the normalisation)
        bias = not config.domain_norm
        if config.hidden:
            layers: list[nn.Module] = [nn.Linear(in_dim, config.hidden), nn.GELU(),
                                       nn.Linear(config.hidden, latent_dim, bias=bias)]
        else:
            layers = [nn.Linear(in_dim, latent_dim, bias=bias)]
        if config.domain_norm:
            layers.append(DomainNorm(latent_dim))
            self._register_load_state_dict_pre_hook(self._fold_redundant_bias)
        if config.norm:
            layers.append(nn.LayerNorm(latent_dim))
        if config.dropout:
            layers.append(nn.Dropout(config.dropout))
        self.net = nn.Sequential(*layers)

    def _fold_redundant_bias(self, state_dict: dict, prefix: str, *args: Any) -> None:
        """A checkpoint written while the layer before DomainNorm had a bias: the bias moves into every domain's
        running mean, which gives the same outputs (in training the batch mean cancels it)."""
        linear = len(self.net) - 1 - next(i for i, m in enumerate(reversed(self.net)) if isinstance(m, nn.Linear))
        bias = state_dict.pop(f"{prefix}net.{linear}.bias", None)
        if bias is None:
            return
        for key in list(state_dict):
            if key.startswith(f"{prefix}net.{linear + 1}.norms.") and key.endswith(".running_mean"):
                state_dict[key] = state_dict[key] - bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


@dataclass
class Encoded:
    """What :meth:`Trunk.encode` computed: the tokens ``[B, K, d]``, the gate's selection, the fused vector, the
    availability mask the gate saw (None: every encoder), and, for a model with on-demand encoders, which encoders
    ran per row (``ran`` ``[B, K]``), each row's cost in GFLOPs (``cost`` ``[B]``) and the scout's loss."""

    tokens: torch.Tensor
    selection: Selection
    fused: torch.Tensor
    mask: torch.Tensor | None
    ran: torch.Tensor | None
    cost: torch.Tensor | None
    aux: dict[str, torch.Tensor]
    #: In training with on-demand encoders: which tokens were computed (``[B, K]``; the rows that ran every encoder
    #: for the scout's target have all), the gate's scores before the on-demand encoders ran, and those rows (``[B]``).
    computed: torch.Tensor | None = None
    scout_scores: torch.Tensor | None = None
    scout_rows: torch.Tensor | None = None
    #: With on-demand encoders: ``[B, K]`` the encoders present in the input, which the scout chose among.
    available: torch.Tensor | None = None
    #: In training with ``conditional.full_budget_weight``: the scout's rows fused with every token they computed.
    full: Encoded | None = None
    #: In training with the value scout: its example on the scout's rows (:class:`ValueTarget`).
    value: ValueTarget | None = None


@dataclass
class ValueTarget:
    """The value scout's training example on the rows where every on-demand encoder ran (``R`` of them): its
    ``predicted`` loss drop of each on-demand encoder (``[R, m]``) in the state the row's sampled budget ran, which
    encoders could be added to that state (``addable``, ``[R, m]``: present, not in it), the rows' tokens, and the
    state's mask (``[R, K]``)."""

    predicted: torch.Tensor
    addable: torch.Tensor
    tokens: torch.Tensor
    state: torch.Tensor


@contextlib.contextmanager
def as_at_inference(*modules: nn.Module | None) -> Iterator[None]:
    """``modules`` (None skipped) in eval mode for the block, each back in its own mode after: a pass inside a
    training step made as inference makes it (no dropout, no gate noise)."""
    parts = [m for m in modules if m is not None]
    modes = [m.training for m in parts]
    try:
        for m in parts:
            m.eval()
        yield
    finally:
        for m, mode in zip(parts, modes):
            m.train(mode)


def synchronizes(module: nn.Module) -> bool:
    """Whether ``module`` holds a :class:`GlobalBatchNorm` that gathers every rank's rows in this step (training,
    under torchrun): then every rank must call it in every step, with no rows if it has none for it, or the ranks'
    collectives no longer match."""
    return (torch_dist.is_available() and torch_dist.is_initialized() and torch_dist.get_world_size() > 1
            and any(isinstance(m, GlobalBatchNorm) and m.training and not m.local for m in module.modules()))


def has_batch_norm(module: nn.Module) -> bool:
    """Whether ``module`` holds a batch-norm layer in training mode (one that cannot normalise a single row)."""
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training for m in module.modules())


def measure_gflops(encoder: LiveEncoder) -> float | None:
    """GFLOPs per sample of a live encoder's forward pass on its example input (None without one)."""
    example = encoder.example_input()
    if example is None:
        return None
    from torch.utils.flop_counter import FlopCounterMode

    x, lengths = example
    was_training = encoder.training
    encoder.eval()
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            encoder(x, lengths)
    finally:
        encoder.train(was_training)
    rows = x.shape[0] if torch.is_tensor(x) else len(x)
    return counter.get_total_flops() / max(rows, 1) / 1e9


class Trunk(nn.Module):
    """The shared assembler: encoders -> projectors (+ identity) -> gate -> top-n selection -> fusion.

    A fusion model is a trunk with heads; each tower of a two-tower model is a trunk with an
    embedding. ``encoders`` are the spec's encoder blocks this trunk owns, with their index in
    the spec (for error paths); ``where`` prefixes the gate's and fusion's paths.
    """

    def __init__(self, spec: Spec, encoders: Sequence[tuple[int, EncoderSpec]], gate: Component, fusion: Component,
                 registry: Registry, where: str = "") -> None:
        super().__init__()
        self.encoder_names: tuple[str, ...] = tuple(enc.name for _, enc in encoders)
        ctx = BuildContext(
            labels=spec.labels, neutral=spec.neutral, latent_dim=spec.latent_dim,
            encoder_names=self.encoder_names, head_roles=tuple(spec.heads),
            input_domains=DOMAINS if spec.data.standardize_per_domain else ("source",),
        )
        #: The domains whose statistics the model keeps; :meth:`set_domain` chooses one.
        self.domains: tuple[str, ...] = DOMAINS if spec.data.standardize_per_domain or spec.projector.domain_norm \
            else ("source",)
        self.encoders = nn.ModuleDict()
        self.projectors = nn.ModuleDict()
        for i, enc in encoders:
            module = _build(registry, "encoder", Component(enc.type, enc.config), f"encoders[{i}]",
                            attrs.evolve(ctx, encoder_name=enc.name))
            self.encoders[enc.name] = module
            self.projectors[enc.name] = Projector(module.out_dim, spec.latent_dim, spec.projector)
        self.identity = nn.Parameter(torch.randn(len(encoders), spec.latent_dim) * 0.02)
        self.gate = _build(registry, "gate", gate, f"{where}gate", ctx)
        # Rank supervision: each encoder token predicts the labels on its own (see fusionkit.training.losses).
        self.token_head = nn.Linear(spec.latent_dim, len(spec.labels)) if self.gate.supervision else None
        self.top_n: int = slot_count(gate.config, len(encoders))
        self.fusion = _build(registry, "fusion", fusion, f"{where}fusion", attrs.evolve(ctx, top_n=self.top_n))
        # The residual mean path: every available token's mean, beside the ranked slots (gate.residual_mean).
        self.residual = nn.Linear(spec.latent_dim, self.fusion.out_dim) if gate.config.residual_mean else None
        self._context = ctx
        #: Positions (into ``encoder_names``) of the encoders that run on demand (docs/conditional.md).
        self.on_demand: tuple[int, ...] = tuple(k for k, (_, enc) in enumerate(encoders) if enc.on_demand)
        #: ``[K]``: which encoders the fusion may keep; a preview with ``fused: false`` informs the scout only.
        self.register_buffer("fusable", torch.tensor([enc.fused for _, enc in encoders], dtype=torch.bool),
                             persistent=False)
        self._all_fusable = all(enc.fused for _, enc in encoders)
        #: Set by the trainer under torchrun: where this rank's rows sit in the global batch (the per-row draws
        #: of training are the global batch's).
        self.row_share: RowShare | None = None
        self.conditional = spec.conditional
        #: The scout (``conditional.scout``, a registered :class:`~fusionkit.interfaces.Scout`): what decides which
        #: on-demand encoders run for a sample; None without on-demand encoders.
        self.scout: Scout | None = None if not self.on_demand else _build(
            registry, "scout", spec.conditional.scout, "conditional.scout",
            attrs.evolve(ctx, on_demand=self.on_demand, conditional=spec.conditional, previews=self._previews(encoders)))
        #: Whether the scout decides in stages (its :meth:`~fusionkit.interfaces.Scout.forward` asked at each).
        self.staged = self.scout is not None and self.scout.rule == "staged"
        self._register_load_state_dict_pre_hook(_renamed_keys)
        self._declared_costs = {enc.name: enc.cost_gflops for _, enc in encoders}
        self._costs: dict[str, float | None] | None = None

    def _previews(self, encoders: list[tuple[int, EncoderSpec]]) -> tuple[int, ...]:
        """Per on-demand encoder, the position of its preview (``preview_of``), or -1."""
        names = [enc.name for _, enc in encoders]
        looks = {enc.preview_of: k for k, (_, enc) in enumerate(encoders) if enc.preview_of}
        return tuple(looks.get(names[k], -1) for k in self.on_demand)

    def set_domain(self, domain: str) -> None:
        """Use ``domain``'s input and normalisation statistics from now on ("source" for a domain the
        model keeps no statistics of). Evaluation and predict set it from each sample's domain."""
        if len(self.domains) == 1:
            return  # every domain reads the source statistics: nothing to switch
        for module in self.modules():
            if isinstance(module, DomainNorm) or (isinstance(module, Encoder) and module.standardizes_inputs):
                module.domain = domain if domain in self.domains else "source"

    def set_epoch(self, epoch: int) -> None:
        """Tell epoch-dependent parts (the gate's soft warm-up) where training is; call it each epoch."""
        self.gate.epoch = epoch

    def precomputed_pooling(self) -> dict[str, str]:
        """Encoder name -> pooling that a data source may compute once per sample (fixed inputs)."""
        return {name: enc.precomputed_pooling for name, enc in self.encoders.items() if enc.precomputed_pooling}

    def live_encoders(self) -> dict[str, Any]:
        """Encoder name -> the encoders that read raw inputs (:class:`~fusionkit.interfaces.LiveEncoder`)."""
        return {name: enc for name, enc in self.encoders.items() if isinstance(enc, LiveEncoder)}

    def deferrable_inputs(self) -> tuple[str, ...]:
        """The on-demand live encoders: what a data source may hand over as a
        :class:`~fusionkit.interfaces.DeferredInput`, read only for the rows that run them."""
        live = self.live_encoders()
        return tuple(self.encoder_names[k] for k in self.on_demand if self.encoder_names[k] in live)

    def encoder_costs(self) -> dict[str, float | None]:
        """GFLOPs per sample of each encoder: its declared ``cost_gflops``; else, for a live encoder, measured by
        ``torch.utils.flop_counter`` on its example input (None where it has none); else 0 (stored features)."""
        if self._costs is None:
            costs: dict[str, float | None] = {}
            for name in self.encoder_names:
                declared, encoder = self._declared_costs[name], self.encoders[name]
                costs[name] = declared if declared is not None else (
                    measure_gflops(encoder) if isinstance(encoder, LiveEncoder) else 0.0)
            self._costs = costs
        return dict(self._costs)

    def over_cap(self, budget: Budget | None) -> tuple[float, float] | None:
        """``(limit, always)`` in GFLOPs per sample when ``budget`` is a cap below what the always-run encoders cost
        (they run whatever the budget, so the cap cannot hold); None otherwise."""
        if budget is None or budget.mean or budget.seconds is not None:
            return None
        costs = self.encoder_costs()
        always = float(sum(costs[n] or 0.0 for k, n in enumerate(self.encoder_names) if k not in self.on_demand))
        limit = budget.limit(float(sum(c or 0.0 for c in costs.values())))
        return (limit, always) if always > limit + 1e-9 else None

    def cost_vector(self, device: torch.device) -> torch.Tensor:
        """``[K]`` float64: each encoder's GFLOPs per sample, in ``encoder_names`` order (an on-demand encoder's must
        be known)."""
        costs = self.encoder_costs()
        unknown = [self.encoder_names[k] for k in self.on_demand if costs[self.encoder_names[k]] is None]
        if unknown:
            raise FusionkitError(f"encoder(s) {unknown} run on demand but their cost is unknown (their plugin gives no "
                                 "example input to measure): declare cost_gflops in their encoder blocks")
        vector = torch.tensor([costs[n] or 0.0 for n in self.encoder_names], dtype=torch.float64, device=device)
        if not torch.isfinite(vector.sum()):
            raise FusionkitError(f"the encoders' costs per sample add up to more than a float holds ({costs}); a "
                                 "budget is a share of their total: declare cost_gflops in GFLOPs per sample")
        return vector

    def choice_costs(self, budget: Budget | None, device: torch.device) -> torch.Tensor:
        """``[K]`` float64: the costs ``budget`` chooses by, in ``encoder_names`` order: GFLOPs per sample
        (:meth:`cost_vector`), or the budget's measured seconds per sample of each on-demand encoder (the always-run
        encoders count 0: they run whatever the budget)."""
        if budget is None or budget.seconds is None:
            return self.cost_vector(device)
        seconds = dict(budget.seconds)
        demand = [self.encoder_names[k] for k in self.on_demand]
        missing, unknown = [n for n in demand if n not in seconds], [n for n in seconds if n not in demand]
        if missing or unknown:
            raise FusionkitError(f"budget {budget.describe()}: its seconds must name each on-demand encoder "
                                 f"({demand}); missing {missing}, not on demand {unknown}")
        return torch.tensor([seconds.get(n, 0.0) for n in self.encoder_names], dtype=torch.float64, device=device)

    def encode(self, inputs: Mapping[str, torch.Tensor], lengths: Mapping[str, torch.Tensor] | None,
               mask: torch.Tensor | None, budget: Budget | None = None, everything: bool = False,
               runs: torch.Tensor | None = None) -> Encoded:
        """The tokens, the gate's selection and the fused vector of a batch. On-demand encoders run on the rows
        that keep them (within ``budget`` when given); ``everything`` runs them on every row instead; ``runs``
        (``[B, m]`` bool, one column per on-demand encoder in ``on_demand`` order) says instead which run for which
        row, whatever the scout scores (the controls of an accuracy-compute curve: static choices, random rows)."""
        if runs is not None and (budget is not None or everything or not self.on_demand):
            raise FusionkitError("runs chooses which on-demand encoders run: give it to a model with on-demand "
                                 "encoders, without a budget or everything")
        lengths = lengths or {}
        if everything and any(isinstance(v, DeferredInput) for v in inputs.values()):
            batch = len(next(v for v in inputs.values() if torch.is_tensor(v)))
            whole = {n: _input_rows(inputs[n], lengths.get(n), None, batch) for n in self.encoder_names}
            inputs = {n: x for n, (x, _) in whole.items()}
            lengths = {n: v for n, (_, v) in whole.items() if v is not None}
        if not self.on_demand or everything:
            tokens = torch.stack(
                [self.projectors[name](self.encoders[name](inputs[name], lengths.get(name))) for name in self.encoder_names],
                dim=1,
            ) + self.identity
            if mask is not None:
                mask = mask.to(device=tokens.device, dtype=torch.bool)
            if not self.on_demand:
                return self.fuse(tokens, mask, None, None, {})
            ran = torch.ones(tokens.shape[:2], dtype=torch.bool, device=tokens.device) if mask is None else mask
            return self.fuse(tokens, mask, ran, self.cost_vector(tokens.device), {}, first=self.demanded(ran))
        return self._encode_on_demand(inputs, lengths, mask, budget, runs)

    def _encode_on_demand(self, inputs: Mapping[str, torch.Tensor], lengths: Mapping[str, torch.Tensor],
                          mask: torch.Tensor | None, budget: Budget | None, runs: torch.Tensor | None) -> Encoded:
        names, demand = self.encoder_names, self.on_demand
        always = [k for k in range(len(names)) if k not in demand]
        columns: dict[int, torch.Tensor] = {
            k: self.projectors[names[k]](self.encoders[names[k]](inputs[names[k]], lengths.get(names[k]))) for k in always}
        first = columns[always[0]]
        batch, device = first.shape[0], first.device
        present = (torch.ones(batch, len(names), dtype=torch.bool, device=device) if mask is None
                   else mask.to(device=device, dtype=torch.bool))
        empty = first.new_zeros(batch, first.shape[1])
        for k in demand:
            columns[k] = empty
        scout_scores = None if self.staged else self.gate.score(  # the gate's scout: before they run
            torch.stack([columns[k] for k in range(len(names))], dim=1) + self.identity, present)
        available = present[:, list(demand)]
        if isinstance(budget, RowBudgets):  # a budget per row, each decided as if alone
            return self._encode_rows(columns, present, available, budget, inputs, lengths, batch, first, empty)
        costs, choice = self.cost_vector(device), self.choice_costs(budget, device)  # reported; chosen by
        limit = None if runs is not None else self._limit(budget, present, available, choice)
        if budget is not None and budget.mean and budget.threshold is None:
            raise FusionkitError(f"budget {budget.describe()}: a mean budget needs its threshold, fitted on "
                                 "validation rows (fusionkit.inference.fit_mean_budget; the command line "
                                 "fits it on the run's validation fold)")
        run_rows = self._run_rows_of(inputs, lengths, batch, first, empty)
        run = self._choose_runs(runs, budget, limit, columns, present, available, choice, scout_scores, run_rows)
        every = torch.zeros(batch, dtype=torch.bool, device=device)
        if self.training and self.conditional.scout_weight > 0:  # rows that run everything: the scout's target
            every = row_uniform(self.row_share, batch, device) < self.conditional.scout_rows
        computed = self._run_chosen(columns, run, every, present, run_rows, self.staged and runs is None)
        raw = torch.stack([columns[k] for k in range(len(names))], dim=1)
        tokens = raw + self.identity
        ran = present.clone()
        ran[:, list(demand)] = run
        aux = self._gate_scout_loss(tokens, computed, present, scout_scores, every)
        encoded = self.fuse(tokens, ran, ran, costs, aux, first=self.demanded(ran))
        encoded.computed, encoded.scout_scores, encoded.scout_rows = computed, scout_scores, every
        encoded.available = present
        if self.training:
            self._training_passes(encoded, raw, costs)
        return encoded

    def _run_chosen(self, columns: dict[int, torch.Tensor], run: torch.Tensor, every: torch.Tensor,
                    present: torch.Tensor, run_rows: Callable[[int, torch.Tensor], torch.Tensor],
                    staged: bool) -> torch.Tensor:
        """Run each on-demand encoder on the rows that chose it (``run`` ``[B, m]``) and on the scout's target rows
        (``every``), its tokens scattered into ``columns``; ``[B, K]``: what was computed. The stages of a staged
        scout ran their rows already: what is left then is the target rows."""
        computed = present.clone()
        for j, k in enumerate(self.on_demand):
            computed[:, k] = (run[:, j] | every) & present[:, k]
            need = computed[:, k] & ~run[:, j] if staged else computed[:, k]
            columns[k] = columns[k] + run_rows(k, need.nonzero().squeeze(1))
        return computed

    def _gate_scout_loss(self, tokens: torch.Tensor, computed: torch.Tensor, present: torch.Tensor,
                         scout_scores: torch.Tensor | None, every: torch.Tensor) -> dict[str, torch.Tensor]:
        """The gate scout's loss on its target rows: its scores before the on-demand encoders ran against the
        gate's with every token (with rank supervision, its target teaches the scout instead)."""
        if not every.any() or self.gate.supervision or self.staged:
            return {}
        full_scores = self.gate.score(tokens[every], computed[every])
        return {"scout": self.conditional.scout_weight * scout_loss(scout_scores[every], full_scores, present[every])}

    def _training_passes(self, encoded: Encoded, raw: torch.Tensor, costs: torch.Tensor) -> None:
        """Training's extra passes over the scout's target rows: every token they computed fused and supervised
        (``conditional.full_budget_weight``), and a staged scout's example (:class:`ValueTarget`)."""
        every, computed = encoded.scout_rows, encoded.computed
        if self.conditional.full_budget_weight > 0 and every.any():
            encoded.full = self.fuse(encoded.tokens[every], computed[every], computed[every], costs, {},
                                      first=self.demanded(computed[every]))
        if self.staged and self.conditional.scout_weight > 0:
            encoded.value = self._value_target(raw[every], encoded.tokens[every], encoded.available[every],
                                               encoded.ran[every])

    def _limit(self, budget: Budget | None, present: torch.Tensor, available: torch.Tensor,
               choice: torch.Tensor) -> torch.Tensor | None:
        """``[B]``: what each row may still spend on its on-demand encoders (GFLOPs, or seconds) under a cap, or, in
        training with ``budget_sampling``, under a budget drawn per row; None where no limit applies (a mean
        budget, or the gate's own rule)."""
        if (budget is not None and budget.mean) or (budget is None and not (self.training
                                                                           and self.conditional.budget_sampling)):
            return None
        batch, device = present.shape[0], present.device
        full = (choice * present).sum(1)
        paid = full - (choice[list(self.on_demand)] * available).sum(1)  # the always-run encoders
        if budget is not None:
            return torch.full_like(full, budget.limit(float(choice.sum()))) - paid
        limit = row_uniform(self.row_share, batch, device, full.dtype) * (full - paid)  # every budget seen in training
        if self.conditional.full_budget_rows > 0:  # and the full budget on a share of the rows
            whole = row_uniform(self.row_share, batch, device) < self.conditional.full_budget_rows
            limit = torch.where(whole, full - paid, limit)
        return limit

    def _choose_runs(self, runs: torch.Tensor | None, budget: Budget | None, limit: torch.Tensor | None,
                     columns: dict[int, torch.Tensor], present: torch.Tensor, available: torch.Tensor,
                     choice: torch.Tensor, scout_scores: torch.Tensor | None,
                     run_rows: Callable[[int, torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """``[B, m]``: which on-demand encoders run on each row: as ``runs`` says; the value scout's stages; a mean
        budget's threshold, a limit (a cap or a sampled budget) or the gate's own rule over the scout's scores."""
        demand, batch = list(self.on_demand), present.shape[0]
        if runs is not None:
            if tuple(runs.shape) != (batch, len(demand)):
                raise FusionkitError(f"runs: expected [{batch}, {len(demand)}] (a row per sample, a column per "
                                     f"on-demand encoder), found {list(runs.shape)}")
            return runs.to(device=present.device, dtype=torch.bool) & available
        if self.staged:  # under a cap any value goes while the cost fits; a mean budget has its
            # threshold; the gate's own rule runs while a gain is expected
            threshold = -math.inf if limit is not None else budget.threshold if budget is not None else 0.0
            return self._stages(columns, present, available, choice, limit, threshold, run_rows)[0]
        if budget is not None and budget.mean:
            return self.mean_budget_values(scout_scores.detach(), present, choice) >= budget.threshold
        if limit is not None:
            candidates = available & self.candidates(scout_scores.detach(), present)
            return within_budget(scout_scores.detach()[:, demand], candidates, choice[demand], limit)
        return kept_by(self.gate.select(scout_scores, self.fusable_of(present)).kept, demand) & available

    def _encode_rows(self, columns: dict[int, torch.Tensor], present: torch.Tensor, available: torch.Tensor,
                     budgets: RowBudgets, inputs: Mapping[str, Any], lengths: Mapping[str, torch.Tensor], batch: int,
                     first: torch.Tensor, empty: torch.Tensor) -> Encoded:
        """:meth:`_encode_on_demand` with one budget per row (:class:`~fusionkit.conditional.budget.RowBudgets`): each row's cap,
        mean threshold or the gate's own rule applied to it alone, then the chosen rows run and are fused."""
        if len(budgets) != batch:
            raise FusionkitError(f"budgets: {len(budgets)} for a batch of {batch} rows (one per row)")
        if self.training:
            raise FusionkitError("budgets per row decide at inference; in training the budget is sampled per row")
        demand, device = list(self.on_demand), present.device
        costs = self.cost_vector(device)
        kind, cap, threshold = (torch.as_tensor(a, device=device) for a in budgets.rules(float(costs.sum())))
        threshold = threshold.float()  # compared with float32 values, as a single budget's threshold is
        paid = (costs * present).sum(1) - (costs[demand] * available).sum(1)  # the always-run encoders
        limit = torch.where(kind == CAP, cap - paid, torch.full_like(cap, math.inf))
        run_rows = self._run_rows_of(inputs, lengths, batch, first, empty)
        if self.staged:  # under a cap any value goes while the cost fits; the gate's rule: a gain
            floor = torch.where(kind == CAP, -math.inf, torch.where(kind == MEAN, threshold, 0.0)).float()
            run = self._stages(columns, present, available, costs, limit, floor, run_rows)[0]
        else:
            scores = self.gate.score(torch.stack([columns[k] for k in range(len(self.encoder_names))], dim=1)
                                     + self.identity, present)
            candidates = available & self.candidates(scores, present)
            by_cap = within_budget(scores[:, demand], candidates, costs[demand], limit)
            by_mean = self.mean_budget_values(scores, present, costs) >= threshold.unsqueeze(1)
            by_gate = kept_by(self.gate.select(scores, self.fusable_of(present)).kept, demand) & available
            rule = kind.unsqueeze(1)
            run = torch.where(rule == CAP, by_cap, torch.where(rule == MEAN, by_mean, by_gate))
            for j, k in enumerate(demand):
                columns[k] = columns[k] + run_rows(k, run[:, j].nonzero().squeeze(1))
        tokens = torch.stack([columns[k] for k in range(len(self.encoder_names))], dim=1) + self.identity
        ran = present.clone()
        ran[:, demand] = run
        encoded = self.fuse(tokens, ran, ran, costs, {}, first=self.demanded(ran))
        encoded.computed, encoded.available = ran, present
        return encoded

    def fusable_of(self, present: torch.Tensor | None, tokens: torch.Tensor | None = None) -> torch.Tensor | None:
        """``[B, K]``: the encoders of ``present`` that the fusion may keep (a preview with ``fused: false`` is
        seen by the scout only); ``present`` as it is when every encoder is fusable."""
        if self._all_fusable:
            return present
        if present is None:
            return self.fusable.unsqueeze(0).expand(tokens.shape[0], -1)
        return present & self.fusable

    def demanded(self, ran: torch.Tensor) -> torch.Tensor:
        """``[B, K]``: the on-demand encoders among ``ran``, which the gate keeps first (what runs is fused)."""
        first = torch.zeros_like(ran)
        first[:, list(self.on_demand)] = ran[:, list(self.on_demand)]
        return first

    def candidates(self, scout_scores: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
        """``[B, m]``: the on-demand encoders that could enter a row's top-n (the gate's slots) by the scout's scores:
        the only ones a budget may run, so that every encoder run is fused. Every one when the slots hold every
        encoder."""
        if self.top_n >= len(self.encoder_names):  # shaped from the batch's tensor, so that a traced graph keeps B
            return torch.ones_like(present[:, list(self.on_demand)])
        return kept_by(select_top_n(scout_scores, self.fusable_of(present), self.top_n).kept, self.on_demand)

    def mean_budget_values(self, scout_scores: torch.Tensor, present: torch.Tensor, choice: torch.Tensor) -> torch.Tensor:
        """``[B, m]``: what a mean budget's threshold compares for the gate's scout: the scout's value per unit of
        cost (:func:`~fusionkit.conditional.rules.value_per_cost`), -inf for an encoder that could not enter the
        row's top-n."""
        values = value_per_cost(scout_scores, present, choice, self.on_demand)
        return values.masked_fill(~self.candidates(scout_scores, present), float("-inf"))

    def _run_rows_of(self, inputs: Mapping[str, Any], lengths: Mapping[str, torch.Tensor], batch: int,
                     first: torch.Tensor, empty: torch.Tensor) -> Callable[[int, torch.Tensor], torch.Tensor]:
        """``run(k, rows)``: encoder ``k``'s tokens ``[batch, d]`` computed on ``rows`` alone, zeros elsewhere."""
        names = self.encoder_names

        def run(k: int, rows: torch.Tensor) -> torch.Tensor:
            name = names[k]
            if len(rows) == 0:
                if synchronizes(self.projectors[name]):  # the other ranks' rows may need it: join with none, in
                    # the forward pass and (through a zero term) in the backward pass, whose collectives match theirs
                    joined = self.projectors[name](first.new_zeros(0, self.encoders[name].out_dim))
                    return empty + 0.0 * joined.sum()
                return empty
            if len(rows) == batch:  # every row: nothing to gather or scatter
                return self.projectors[name](self.encoders[name](*_input_rows(inputs[name], lengths.get(name), None,
                                                                              batch)))
            if len(rows) == 1 and batch > 1 and (has_batch_norm(self.encoders[name])
                                                 or has_batch_norm(self.projectors[name])):
                # batch norm (in the encoder, or the projector's domain_norm) cannot normalise one row in training:
                # a second row runs beside it, unused (not `ran`)
                value = self.projectors[name](self.encoders[name](*_input_rows(
                    inputs[name], lengths.get(name), torch.stack([rows[0], (rows[0] + 1) % batch]), batch)))
                return scatter_rows(value[:1], rows, batch)
            value = self.projectors[name](self.encoders[name](*_input_rows(inputs[name], lengths.get(name), rows,
                                                                           batch)))
            return scatter_rows(value, rows, batch)

        return run

    def _stages(self, columns: dict[int, torch.Tensor], present: torch.Tensor, available: torch.Tensor,
                choice: torch.Tensor, limit: torch.Tensor | None, threshold: float,
                run_rows: Callable[[int, torch.Tensor], torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The value scout's decisions (``[B, m]``), in stages: at each, every row still going scores the on-demand
        encoders it has not run from the tokens it holds and picks the one of most predicted value per unit of
        cost; it runs it when that value reaches ``threshold`` (and its cost fits ``limit``), else stops. Each
        stage gathers each encoder's rows (``run_rows``) and scatters their tokens into ``columns``; a row runs at
        most as many on-demand encoders as the gate has slots. Also, by stage (``[B, m]``), the value per unit of
        cost of the encoder each row picked (-inf once it stopped) and which it picked (its position in
        ``on_demand``, -1 once it stopped)."""
        demand, names = list(self.on_demand), self.encoder_names
        batch, m = available.shape
        relative = relative_costs(choice, demand)
        run = torch.zeros_like(available)
        keys = torch.full((batch, m), float("-inf"), device=available.device)
        picks = torch.full((batch, m), -1, dtype=torch.long, device=available.device)
        going = available.any(1)
        for stage in range(m):
            values = self.scout(torch.stack([columns[k] for k in range(len(names))], dim=1), present, run)
            eligible = available & ~run & (going & (run.sum(1) < self.top_n)).unsqueeze(1)
            if limit is not None:
                eligible = eligible & (choice[demand].unsqueeze(0) <= limit.unsqueeze(1) + 1e-9)
            pick, best, going = stage_pick(values, relative, eligible, threshold)
            keys[:, stage] = torch.where(going, best, keys[:, stage])
            picks[:, stage] = torch.where(going, pick, picks[:, stage])
            for j, k in enumerate(demand):  # every encoder is called at every stage (with no rows if none picked
                # it), so that ranks under torchrun make the same calls
                columns[k] = columns[k] + run_rows(k, (going & (pick == j)).nonzero().squeeze(1))
            run = run | (F.one_hot(pick, m).bool() & going.unsqueeze(1))
            if limit is not None:
                limit = limit - torch.where(going, choice[demand][pick], torch.zeros_like(limit))
        return run, keys, picks

    @torch.no_grad()
    def value_path(self, inputs: Mapping[str, torch.Tensor], lengths: Mapping[str, torch.Tensor] | None,
                   mask: torch.Tensor | None, budget: Budget | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The value scout's path of a batch with no threshold (every row goes on while an encoder is left):
        ``(keys, costs)``, each ``[B, m]`` by stage: the value per unit of cost of the encoder a row picks at each
        stage (-inf past its end) and its cost (``budget``'s choice costs). A mean budget with threshold ``t`` runs
        a row's stages while their keys reach ``t``: what :func:`fusionkit.inference.fit_mean_budget` fits."""
        if not self.staged:
            raise FusionkitError("value_path: the model's scout is the gate (conditional.scout: gate)")
        lengths = lengths or {}
        batch = len(next(v for v in inputs.values() if torch.is_tensor(v)))
        raw = torch.stack([self.projectors[n](self.encoders[n](*_input_rows(inputs[n], lengths.get(n), None, batch)))
                           for n in self.encoder_names], dim=1)
        demand = list(self.on_demand)
        present = (torch.ones(raw.shape[:2], dtype=torch.bool, device=raw.device) if mask is None
                   else mask.to(device=raw.device, dtype=torch.bool))
        columns = {k: raw[:, k] if k not in demand else torch.zeros_like(raw[:, k]) for k in range(raw.shape[1])}
        choice = self.choice_costs(budget, raw.device)

        def read(k: int, rows: torch.Tensor) -> torch.Tensor:
            return scatter_rows(raw[rows, k], rows, raw.shape[0])

        _, keys, picks = self._stages(columns, present, present[:, demand], choice, None, -math.inf, read)
        picked = choice[demand][picks.clamp_min(0)]
        return keys, torch.where(picks >= 0, picked, torch.zeros_like(picked))

    def _value_target(self, raw: torch.Tensor, tokens: torch.Tensor, present: torch.Tensor,
                      ran: torch.Tensor) -> ValueTarget:
        """The value scout's training example on the rows where everything ran (``raw``: their tokens before the
        identity; ``ran``: what the row's sampled budget ran, its state): the head's prediction in that state, and
        the on-demand encoders it could add. The drop of the row's loss from the state to the state with each of
        them added is what the head learns (:func:`fusionkit.training.losses.value_loss`)."""
        demand = list(self.on_demand)
        state = ran[:, demand]
        predicted = self.scout(raw * ran.unsqueeze(-1).to(raw.dtype), present, state)
        return ValueTarget(predicted, present[:, demand] & ~state, tokens.detach(), ran)

    @torch.no_grad()
    def value_fusions(self, value: ValueTarget) -> torch.Tensor:
        """``[m + 1, R, d]``: the fused vectors of the value target's rows in their state and with each on-demand
        encoder added, computed as at inference (the gate, fusion and residual in eval mode: no dropout, no gate
        noise), so that the drop between them is the encoder's and not the noise's."""
        masks = [value.state]
        for k in self.on_demand:
            added = value.state.clone()
            added[:, k] = True
            masks.append(added)
        stacked = torch.cat(masks)
        with as_at_inference(self.gate, self.fusion, self.residual):
            fused = self.fuse(value.tokens.repeat(len(masks), 1, 1), stacked, None, None, {},
                               first=self.demanded(stacked)).fused
        return fused.view(len(masks), len(value.tokens), -1)

    def fuse(self, tokens: torch.Tensor, mask: torch.Tensor | None, ran: torch.Tensor | None,
             costs: torch.Tensor | None, aux: dict[str, torch.Tensor], first: torch.Tensor | None = None) -> Encoded:
        """Gate, select and fuse ``tokens`` ``[B, K, d]`` (identity embeddings added) where ``mask`` allows (the
        encoders ``first`` take the slots first); ``ran`` and ``costs`` give each row's cost, ``aux`` the losses to
        carry. What :meth:`encode` ends with, and what an export's fusion graph runs."""
        mask = self.fusable_of(mask, tokens)
        # a gate is called as before when nothing must come first (a plugin's own forward(tokens, mask) keeps working)
        selection = self.gate(tokens, mask) if first is None else self.gate(tokens, mask, first)
        fused = self.fusion(gather_slots(tokens, selection), selection.weights, selection.slot_mask)
        if self.residual is not None:
            present = torch.ones(tokens.shape[:2], device=tokens.device) if mask is None else mask.to(tokens.dtype)
            mean = (tokens * present.unsqueeze(-1)).sum(1) / present.sum(1, keepdim=True).clamp_min(1)
            fused = fused + self.residual(mean)
        cost = None if ran is None else (ran.double() * costs).sum(1)
        return Encoded(tokens, selection, fused, mask, ran, cost, aux)

    @torch.no_grad()
    def fit_standardization(
        self, inputs: Mapping[str, torch.Tensor], lengths: Mapping[str, torch.Tensor] | None = None,
        mask: torch.Tensor | None = None, domain: str = "source",
    ) -> None:
        """Set each encoder's input standardisation from training inputs (per dimension mean and std).

        ``inputs`` has the shapes of a forward pass (or ``[rows, D]`` of stacked frames); only valid
        frames (``lengths``) of available encoders (``mask``) count. Encoders without input
        standardisation (live encoders among them) are skipped and need no input here. Without
        this call the standardisation is the identity. ``domain`` "target" fits the target's own
        statistics (a model with ``data.standardize_per_domain``) from its unlabelled inputs.
        """
        if domain not in self._context.input_domains:
            raise DataError(f"the model keeps no input statistics of domain {domain!r}; set "
                            "data.standardize_per_domain: true in the spec")
        skipped = [n for n in self.encoder_names if not self.encoders[n].standardizes_inputs]
        self._check_inputs({**{n: None for n in skipped}, **inputs}, lengths, mask)
        for k, name in enumerate(self.encoder_names):
            encoder = self.encoders[name]
            if name in skipped:
                continue
            x = inputs[name]
            keep = torch.ones(x.shape[0], dtype=torch.bool) if mask is None else mask[:, k].bool().cpu()
            if x.dim() == 3:
                steps = torch.arange(x.shape[1])
                valid = steps < (lengths or {}).get(name, torch.full((x.shape[0],), x.shape[1])).cpu().unsqueeze(1)
                x = x[valid & keep.unsqueeze(1)]
            else:
                x = x[keep]
            if len(x) < 2:
                raise DataError(f"encoder {name!r}: fewer than two training rows to fit its standardisation")
            if domain == "source":
                encoder.set_standardization(x.mean(0), x.std(0))
            else:
                encoder.set_standardization(x.mean(0), x.std(0), domain=domain)

    def _check_inputs(self, inputs: Mapping[str, torch.Tensor], lengths: Any, mask: Any) -> None:
        if not isinstance(inputs, Mapping):
            raise DataError(f"model inputs must be a dict keyed by encoder name {list(self.encoder_names)}, "
                            f"found {type(inputs).__name__}")
        if lengths is not None and not isinstance(lengths, Mapping):
            raise DataError(f"lengths must be a dict keyed by encoder name (the valid frames of each sequence input, "
                            f"e.g. {{'{self.encoder_names[0]}': tensor([B])}}), found {type(lengths).__name__}")
        if mask is not None and (not torch.is_tensor(mask) or mask.dim() != 2 or mask.shape[1] != len(self.encoder_names)):
            raise DataError(f"mask must be a [B, {len(self.encoder_names)}] tensor (False where an encoder is missing), "
                            f"found {getattr(mask, 'shape', type(mask).__name__)}")
        missing = [n for n in self.encoder_names if n not in inputs]
        unknown = [n for n in inputs if n not in self.encoders]
        if missing or unknown:
            raise DataError(
                f"model inputs must be keyed by encoder name {list(self.encoder_names)}: "
                f"missing {missing}, unknown {unknown} (pass zeros and a mask for missing encoders)"
            )

    def parameter_counts(self) -> dict[str, int]:
        """Trainable parameters per part of the trunk."""
        out = {f"encoder:{n}": count_parameters(self.encoders[n]) + count_parameters(self.projectors[n])
               for n in self.encoder_names}
        out["identity"] = count_parameters(self.identity)
        out["gate"] = count_parameters(self.gate) + (count_parameters(self.token_head) if self.token_head is not None else 0)
        out["fusion"] = count_parameters(self.fusion) + (count_parameters(self.residual) if self.residual is not None else 0)
        return out

    def save_pretrained(self, directory: str) -> None:
        """Write spec, ``model.safetensors`` and metadata to ``directory`` atomically."""
        save_checkpoint(self, directory)


class FusionModel(Trunk):
    """A rank-aware top-n fusion model built from a :class:`~fusionkit.spec.Spec`.

    ``forward(inputs, lengths=None, mask=None)``: ``inputs`` maps every encoder
    name to ``[B, D]`` or ``[B, T, D]``; ``lengths`` maps names of sequence inputs
    to ``[B]`` valid frame counts; ``mask`` ``[B, K]`` is False where an encoder is
    missing for a sample (its input values are then ignored).
    """

    def __init__(self, spec: Spec, registry: Registry | None = None) -> None:
        if registry is None:
            registry = get_registry()
        super().__init__(spec, list(enumerate(spec.encoders)), spec.gate, spec.fusion, registry)
        self.spec = spec
        self.labels: tuple[str, ...] = spec.labels
        ctx = self._context
        head_ctx = attrs.evolve(ctx, in_dim=self.fusion.out_dim)
        self.heads = nn.ModuleDict({role: _build(registry, "head", c, f"heads.{role}", head_ctx) for role, c in spec.heads.items()})
        self.combiner = _build(registry, "combiner", spec.combiner, "combiner", ctx)
        self.decoder: Decoder = _build(registry, "decoder", spec.decoder, "decoder", ctx)

    def forward(
        self,
        inputs: Mapping[str, torch.Tensor],
        lengths: Mapping[str, torch.Tensor] | None = None,
        mask: torch.Tensor | None = None,
        budget: Budget | RowBudgets | str | float | list | None = None,
        everything: bool = False,
        runs: torch.Tensor | None = None,
    ) -> FusionOutput:
        self._check_inputs(inputs, lengths, mask)
        encoded = self.encode(inputs, lengths, mask, parse_budget(budget), everything, runs)
        tokens, selection, fused = encoded.tokens, encoded.selection, encoded.fused
        logits = {role: head(fused) for role, head in self.heads.items()}
        probs_by_role = {role: self.heads[role].probabilities(logit) for role, logit in logits.items()}
        presence = probs_by_role.get("presence")
        salience = probs_by_role.get("salience")
        aux = {} if selection.balance_loss is None else {"gate_balance": selection.balance_loss}
        aux.update(encoded.aux)
        return FusionOutput(
            fused=fused, scores=selection.scores, kept=selection.kept, weights=selection.weights,
            probs=self.combiner(presence, salience), presence=presence, salience=salience,
            logits=logits, tokens=tokens, aux_losses=aux, mask=encoded.mask,
            token_logits=None if self.token_head is None else self.token_head(tokens),
            ran=encoded.ran, cost=encoded.cost, computed=encoded.computed, scout_scores=encoded.scout_scores,
            scout_rows=encoded.scout_rows, available=encoded.available,
            full_logits=None if encoded.full is None else {role: head(encoded.full.fused)
                                                           for role, head in self.heads.items()},
            **self._value_outputs(encoded.value),
        )

    def _value_outputs(self, value: ValueTarget | None) -> dict[str, Any]:
        if value is None:
            return {}
        logits = self.value_logits(value) if value.addable.any() and self.scout.needs_drops else None
        return {"value_predicted": value.predicted, "value_addable": value.addable, "value_logits": logits}

    @torch.no_grad()
    def value_logits(self, value: ValueTarget) -> dict[str, torch.Tensor]:
        """Each head's logits ``[m + 1, R, L]`` of :meth:`value_fusions` (the rows in their state, then with each
        on-demand encoder added), computed as at inference: what a scout's measured drops are read from."""
        fused = self.value_fusions(value)
        with as_at_inference(*self.heads.values()):
            return {role: head(fused) for role, head in self.heads.items()}

    @torch.no_grad()
    def predict(
        self, inputs: Mapping[str, torch.Tensor], lengths: Mapping[str, torch.Tensor] | None = None,
        mask: torch.Tensor | None = None, budget: Budget | str | float | None = None,
    ) -> list[Prediction]:
        """BlEmoRE predictions for a batch, with the model in eval mode and the stored decoder thresholds; on-demand
        encoders within ``budget`` (GFLOPs per sample, or a share such as ``"40%"``) when given."""
        was_training = self.training
        self.eval()
        try:
            out = self(inputs, lengths, mask, budget)
        finally:
            self.train(was_training)
        order, sal = self.decoder.decode(decoder_inputs(out))
        return from_order(order, sal, self.labels)

    def set_decoder(self, config: Any) -> None:
        """Replace the decoder's thresholds (e.g. after fitting on validation data); the spec follows."""
        self.decoder.config = config
        self.spec = self.spec.replace(decoder=Component(self.spec.decoder.type, config))

    @staticmethod
    def teacher_outputs(out: FusionOutput) -> dict[str, torch.Tensor]:
        """What a distillation teacher's batch gives its student's losses: the fused vector, the encoder tokens, and
        each head's logits (``logits.<role>``)."""
        return {"fused": out.fused, "tokens": out.tokens, **{f"logits.{r}": v for r, v in out.logits.items()}}

    def teacher_constants(self) -> dict[str, torch.Tensor]:
        """What a distillation teacher gives once, beside its batches: nothing for a fusion model."""
        return {}

    def parameter_counts(self) -> dict[str, int]:
        """Trainable parameters per part of the model."""
        out = super().parameter_counts()
        for role, head in self.heads.items():
            out[f"head:{role}"] = count_parameters(head)
        out["combiner"] = count_parameters(self.combiner)
        return out


def count_parameters(m: nn.Module | nn.Parameter) -> int:
    """Trainable parameters of a module (or one parameter)."""
    params = [m] if isinstance(m, nn.Parameter) else list(m.parameters())
    return sum(p.numel() for p in params if p.requires_grad)


def decoder_inputs(out: FusionOutput) -> dict[str, np.ndarray]:
    """The probabilities a decoder reads, as NumPy arrays."""
    arrays = {"probs": out.probs}
    if out.presence is not None:
        arrays["presence"] = out.presence
    if out.salience is not None:
        arrays["salience"] = out.salience
    return {k: v.detach().float().cpu().numpy() for k, v in arrays.items()}


def _input_rows(value: torch.Tensor | DeferredInput, lengths: torch.Tensor | None, rows: torch.Tensor | None,
                batch: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(x, lengths)`` of an encoder's input at ``rows`` of the batch (None: every row); a deferred input is read
    for those rows alone."""
    if isinstance(value, DeferredInput):
        return value.load(torch.arange(batch) if rows is None else rows)
    if rows is None:
        return value, lengths
    return gather_rows(value, rows), gather_rows(lengths, rows)


#: How a scout's values decide: in stages (every scout but the gate's), or by the gate's own scores.
SCOUT_RULES = ("staged", "gate")


def _renamed_keys(state: dict[str, Any], prefix: str, *args: Any) -> None:
    """Read a 0.2.0 checkpoint of a value scout: its weights were ``value_head.*``, now ``scout.*``."""
    for key in [k for k in state if k.startswith(prefix + "value_head.")]:
        state[prefix + "scout." + key[len(prefix + "value_head."):]] = state.pop(key)


def _build(registry: Registry, kind: str, component: Component, path: str, ctx: BuildContext) -> Any:
    reg = registry.get(kind, component.type)
    try:
        built = reg.factory(component.config, ctx)
    except FusionkitError:
        raise
    except Exception as exc:
        raise FusionkitError(
            f"{path}: building {kind} {component.type!r} ({reg.provider.describe()}) failed: {type(exc).__name__}: {exc}"
        ) from exc
    if kind == "scout" and not isinstance(built, Scout):
        raise FusionkitError(f"{path}: scout {component.type!r} ({reg.provider.describe()}) built a "
                             f"{type(built).__name__}, not a fusionkit.interfaces.Scout; fix the plugin")
    if kind == "scout" and built.rule not in SCOUT_RULES:
        raise FusionkitError(f"{path}: scout {component.type!r} ({reg.provider.describe()}) declares rule "
                             f"{built.rule!r}; a plugin's scout decides in stages (rule 'staged')")
    if kind == "gate" and not isinstance(built, Gate):  # a 0.1.0-style factory function must still build a Gate
        raise FusionkitError(f"{path}: gate {component.type!r} ({reg.provider.describe()}) built a "
                             f"{type(built).__name__}, not a fusionkit.interfaces.Gate; fix the plugin")
    return built
