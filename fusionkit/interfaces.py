"""The small interfaces every component implements, built-in or third-party.

A factory registered for a kind returns an object of that kind's class here.
Each takes ``(config, context)``: its attrs config and a :class:`BuildContext`
saying where in the model it sits.
"""

from __future__ import annotations

import contextlib
import contextvars
import itertools
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import attrs
import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from fusionkit.blemore.answers import BLEMORE_LABELS, Prediction
from fusionkit.conditional.selection import Selection, in_encoder_order, select_top_n, select_top_p, slot_count
from fusionkit.config import non_negative, option, positive, unit_interval
from fusionkit.hardware.devices import full_precision

__all__ = ["BuildContext", "Encoder", "LiveEncoderConfig", "LiveEncoder", "DeferredInput", "restoring", "restoring_checkpoint",
           "freeze_stages", "GateConfig", "Gate", "SCOUT_VALUES_FROM", "ScoutConfig", "ScoutExample", "Scout", "Fusion", "Head", "Combiner",
           "Decoder", "Dataset", "DOMAINS", "Sample", "AdaptationConfig", "AdaptationLoss", "Pair", "DistillBatch", "DistillConfig", "DistillLoss"]


@attrs.frozen(kw_only=True)
class BuildContext:
    """What a component needs to know about the model it is built into."""

    labels: tuple[str, ...]
    neutral: str | None
    latent_dim: int
    encoder_names: tuple[str, ...]
    top_n: int = 0
    in_dim: int = 0
    encoder_name: str = ""
    head_roles: tuple[str, ...] = ()
    #: Domains whose input statistics encoders keep (``data.standardize_per_domain`` adds "target").
    input_domains: tuple[str, ...] = ("source",)
    #: Positions (into ``encoder_names``) of the encoders that run on demand (for a scout).
    on_demand: tuple[int, ...] = ()
    #: Per on-demand encoder (in ``on_demand`` order), the position of its preview (``preview_of``), or -1.
    previews: tuple[int, ...] = ()
    #: The spec's ``conditional`` block (for a scout: its training settings).
    conditional: Any = None

    @property
    def num_labels(self) -> int:
        return len(self.labels)

    @property
    def num_encoders(self) -> int:
        return len(self.encoder_names)

    @property
    def neutral_index(self) -> int | None:
        return None if self.neutral is None else self.labels.index(self.neutral)


class Encoder(nn.Module):
    """Turns one input into a vector. ``out_dim`` is the size of that vector.

    ``forward(x, lengths)``: ``x`` is ``[B, D]`` or ``[B, T, D]`` (then ``lengths``
    ``[B]`` gives the valid frames, or is None when all are valid) -> ``[B, out_dim]``.
    """

    out_dim: int
    #: A pooling of fixed inputs (``"stats7"``) that a data source may compute once per sample, handing the
    #: encoder the pooled vector instead of the sequence; None: the encoder reads its inputs as they are.
    precomputed_pooling: str | None = None
    #: Whether the encoder standardises its inputs with statistics fitted on the training rows
    #: (``data.standardize``), through :meth:`set_standardization`.
    standardizes_inputs: bool = False

    def set_standardization(self, mean: torch.Tensor, std: torch.Tensor, domain: str = "source") -> None:
        """Use ``mean`` and ``std`` ``[D]`` (of ``domain``'s training rows) to standardise the inputs."""
        raise NotImplementedError(f"{type(self).__name__} does not standardise its inputs (standardizes_inputs)")

    def export_inputs(self) -> tuple[torch.Tensor, torch.Tensor | None] | None:
        """Example inputs ``(x, lengths)`` as a deployment hands them to :meth:`forward`: a batch of two rows
        (``[2, D]``, or ``[2, T, D]`` frames with ``lengths`` ``[2]``), on which ``fusionkit export`` traces the
        encoder's graph with a dynamic batch (and frame count). None, the default: the encoder does not export, and
        an export of a model that has it is refused, naming it (see docs/deployment.md)."""
        return None


@attrs.frozen
class DeferredInput:
    """An on-demand encoder's input in a batch, read only for the rows that run the encoder.

    ``load(rows)`` reads and preprocesses the samples at positions ``rows`` of the batch (a ``[R]`` integer tensor)
    and returns ``(x, lengths)`` of those rows alone, on the model's device. A feature store hands the model one for
    each on-demand live encoder when it evaluates (``FeatureStore.inputs_for(model, index, defer=...)``), so that a
    sample the gate does not send to the encoder is neither read from disk nor decoded.
    """

    load: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor | None]]


@attrs.frozen(kw_only=True)
class LiveEncoderConfig:
    """Options every live encoder has. A plugin's config class for a live encoder subclasses this one:
    that is how fusionkit knows the encoder reads raw inputs (files or text) rather than stored features."""

    freeze: Literal["none", "all"] = option(
        "none", doc="none: the whole backbone trains with the model; all: its weights stay fixed "
        "(and its normalisation statistics too), except the last `unfreeze_last` stages or layers."
    )
    unfreeze_last: int = option(0, doc="With freeze: all, the last k stages (timm) or layers (transformers) "
                                       "still train.", validator=non_negative)


class LiveEncoder(Encoder):
    """An encoder that reads raw inputs: a file (image, audio, a clip's frame directory) or a text.

    The data path calls :meth:`load` for each sample (in data-loader workers, so it must not
    touch the module's weights) and :meth:`collate` for each batch; the model calls
    :meth:`embed` (extraction) or ``forward`` (training), which pools what :meth:`embed` gives.
    """

    #: A short word for docs and errors: image, clip, audio, text.
    modality: str = "raw"

    def load(self, value: str, base: Path) -> Any:
        """One sample's manifest value (a path relative to ``base``, or a text) -> a preprocessed item.
        Raise ``OSError`` or ``ValueError`` when the file is missing or unreadable."""
        raise NotImplementedError

    def collate(self, items: Sequence[Any]) -> tuple[Any, torch.Tensor | None]:
        """Items of one batch -> ``(x, lengths)``: equal-shape tensors are stacked; tensors of different
        lengths along their first dimension are zero-padded, with ``lengths`` [B]."""
        if len({tuple(item.shape) for item in items}) == 1:
            return torch.stack(list(items)), None
        lengths = torch.tensor([len(item) for item in items])
        out = items[0].new_zeros((len(items), int(lengths.max()), *items[0].shape[1:]))
        for i, item in enumerate(items):
            out[i, : len(item)] = item
        return out, lengths

    def example_input(self) -> tuple[Any, torch.Tensor | None] | None:
        """A batch of one typical input ``(x, lengths)`` as :meth:`collate` gives it, on which fusionkit measures the
        encoder's FLOPs per sample (``torch.utils.flop_counter``); None: the cost is unknown, and a spec that runs
        the encoder on demand must declare ``cost_gflops``."""
        return None

    def embed(self, x: Any, lengths: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """What ``fusionkit extract`` stores: ``([B, out_dim], None)``, or ``([B, T, out_dim], lengths)`` for
        inputs with a time axis (clips), which a ``features`` encoder then pools."""
        raise NotImplementedError

    def train(self, mode: bool = True) -> "LiveEncoder":
        """As ``nn.Module.train``, but normalisation layers whose weights are frozen keep their running
        statistics fixed (eval mode): a frozen backbone stays exactly the backbone it was."""
        super().train(mode)
        for module in self.modules():
            params = list(module.parameters(recurse=False))
            if mode and getattr(module, "track_running_stats", False) and not any(p.requires_grad for p in params):
                module.eval()
        return self

    def provenance(self) -> dict[str, Any]:
        """What made these features, for the store's index: model name, weights file, preprocessing."""
        return {}

    def export_preprocessing(self) -> dict[str, Any] | None:
        """How the runtime without torch turns one input file into what :meth:`export_inputs` shows the graph,
        written into the export's manifest as the encoder's ``reads``: for an image, ``{"kind": "image", "mode":
        "RGB" | "L", "steps": [...]}`` with the steps of :mod:`fusionkit.runtime.images` (``resize``,
        ``center_crop``), which must give exactly the pixels :meth:`load` gives. None, the default: the runtime
        cannot read this encoder's inputs, and an export of a model that has it is refused, naming it."""
        return None


_restoring: contextvars.ContextVar[bool] = contextvars.ContextVar("fusionkit_restoring", default=False)


@contextlib.contextmanager
def restoring() -> Iterator[None]:
    """While the block runs, :func:`restoring_checkpoint` is True (the model factory loading a checkpoint)."""
    token = _restoring.set(True)
    try:
        yield
    finally:
        _restoring.reset(token)


def restoring_checkpoint() -> bool:
    """True while a checkpoint is being loaded: its own weights replace whatever initial weights a
    component would read (a live encoder's ``pretrained`` file), so such files need not exist."""
    return _restoring.get()


def freeze_stages(backbone: nn.Module, stages: Sequence[nn.Module], config: LiveEncoderConfig) -> None:
    """Apply ``freeze``/``unfreeze_last``: with freeze all, every parameter of ``backbone`` stops training
    except those of the last ``unfreeze_last`` of ``stages`` (its blocks or layers, in order)."""
    if config.freeze == "none":
        return
    if config.unfreeze_last > len(stages):
        raise ValueError(f"unfreeze_last is {config.unfreeze_last}, but the backbone has {len(stages)} stages")
    for p in backbone.parameters():
        p.requires_grad_(False)
    for stage in list(stages)[len(stages) - config.unfreeze_last:] if config.unfreeze_last else []:
        for p in stage.parameters():
            p.requires_grad_(True)


@attrs.frozen(kw_only=True)
class GateConfig:
    """Options every gate has: how many encoders to keep and how to keep the gate alive."""

    selection: Literal["top_n", "top_p"] = option(
        "top_n", doc="top_n: every sample keeps its top_n encoders; top_p: each keeps the smallest rank-ordered "
        "prefix whose gate probability reaches top_p, between min_n and max_n encoders.")
    top_n: int = option(2, doc="How many encoders each sample keeps, in rank order (selection: top_n).", validator=positive)
    top_p: float = option(0.8, doc="Cumulative gate probability a sample's kept encoders reach (selection: top_p).",
                          validator=[unit_interval, positive])
    min_n: int = option(1, doc="Fewest encoders a sample keeps with top_p.", validator=positive)
    max_n: int = option(0, doc="Most encoders a sample keeps with top_p (0: all); also the fusion's slot count.",
                        validator=non_negative)
    slot_order: Literal["rank", "fixed"] = option(
        "rank", doc="rank: the fusion reads the kept encoders in rank order (the seed method); fixed: in the spec's "
        "encoder order, a control that keeps selection and removes ranking.")
    residual_mean: bool = option(False, doc="Add a residual path: the mean of every available encoder token, "
                                            "projected and added to the fused vector beside the ranked slots.")
    temperature: float = option(1.0, doc="Softmax temperature of the weights over kept scores.", validator=positive)
    noise: float = option(0.0, doc="Std of Gaussian noise added to the scores in training.", validator=non_negative)
    warmup_epochs: int = option(
        0, doc="Epochs of soft warm-up: the last slot mixes every encoder below the top n-1.", validator=non_negative
    )
    balance_weight: float = option(
        0.0, doc="Weight of the load-balance loss that discourages collapse onto one encoder.", validator=non_negative
    )
    supervision: float = option(
        0.0, doc="Weight of rank supervision: every encoder token also predicts the labels, and the gate learns to "
        "score encoders by how well their own prediction fits each sample.", validator=non_negative
    )
    supervision_temperature: float = option(
        0.5, doc="Temperature of the rank-supervision target softmax(-per-encoder loss / T).", validator=positive
    )


class Gate(nn.Module):
    """Scores every encoder token per sample; the shared :meth:`forward` ranks and selects.

    Subclasses implement :meth:`score` only: ``[B, K, d]`` tokens and a ``[B, K]``
    availability mask (None when every encoder is available) -> ``[B, K]`` scores.

    A gate whose class sets :attr:`scouts` can also score an on-demand encoder before it runs: its token is then
    the encoder's identity embedding alone, and the score must come from the other tokens (attention reads them)
    or from what the gate learned of that encoder (a static gate).
    """

    #: Whether :meth:`score` gives a meaningful score to a token that holds only its encoder's identity: the
    #: contract that lets the gate scout for on-demand encoders (docs/conditional.md). Gates that score each
    #: token from its own content alone leave it False.
    scouts: bool = False
    #: Whether a step's loss reaches every encoder's parameters through :meth:`score`, whichever encoders the
    #: samples keep: True when the scores of the kept tokens read every token (attention). Under torchrun, DDP
    #: then need not look for parameters without a gradient.
    reaches_every_encoder: bool = False

    def __init__(self, config: GateConfig) -> None:
        super().__init__()
        self.config = config
        self.top_n = config.top_n
        self.temperature = config.temperature
        self.noise = config.noise
        self.warmup_epochs = config.warmup_epochs
        self.balance_weight = config.balance_weight
        self.supervision = config.supervision
        self.supervision_temperature = config.supervision_temperature
        self.epoch = 0

    def score(self, tokens: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, tokens: torch.Tensor, mask: torch.Tensor | None, first: torch.Tensor | None = None) -> Selection:
        return self.select(self.score(tokens, mask), mask, first)

    def select(self, scores: torch.Tensor, mask: torch.Tensor | None, first: torch.Tensor | None = None) -> Selection:
        """Rank ``[B, K]`` scores and keep the top-n (or top-p) available encoders: the selection every gate shares
        (training noise and the soft warm-up included). ``first`` ``[B, K]``: encoders kept before any other (the
        on-demand encoders that ran for each sample, so that what runs is fused)."""
        scores = full_precision(scores)  # ranks and weights in float32 (at least) under autocast
        if self.training and self.noise > 0:
            scores = scores + self.noise * torch.randn_like(scores)
        soft_tail = self.training and self.epoch < self.warmup_epochs
        if self.config.selection == "top_p":
            max_n = slot_count(self.config, scores.shape[1])
            selection = select_top_p(scores, mask, self.config.top_p, min(self.config.min_n, max_n), max_n,
                                     self.temperature, soft_tail, self.balance_weight, first)
        else:
            selection = select_top_n(scores, mask, self.top_n, self.temperature, soft_tail, self.balance_weight, first)
        return in_encoder_order(selection) if self.config.slot_order == "fixed" else selection


@dataclass
class ScoutExample:
    """What the trainer gives a scout's :meth:`Scout.loss`, on the rows where every on-demand encoder ran (``R``):
    its ``predicted`` values ``[R, m]`` in the state each row's sampled budget ran (``state`` ``[R, m]``), which
    encoders that state could add (``addable``), the ``measured`` drop of each row's loss when each is added
    (``[R, m]``, fused as at inference; None for a scout that sets ``needs_drops = False``), every token the rows
    computed before the identity embeddings (``tokens`` ``[R, K, d]``, detached), which encoders are there
    (``present`` ``[R, K]``) and the rows' label targets (``target`` ``[R, L]``, each row summing to 1). A scout
    whose values learn on validation rows gets one per state in :meth:`Scout.fit_values`, there with the drops
    measured on those rows."""

    predicted: torch.Tensor
    addable: torch.Tensor
    state: torch.Tensor
    measured: torch.Tensor | None
    tokens: torch.Tensor
    present: torch.Tensor
    target: torch.Tensor


#: Where a scout's values may learn the measured drops (:attr:`Scout.values_from`).
SCOUT_VALUES_FROM = ("training", "validation")


@attrs.frozen(kw_only=True)
class ScoutConfig:
    """Options every scout takes (none yet): a scout's own config derives from it."""


class Scout(nn.Module):
    """Decides, per sample, which on-demand encoders run (``conditional.scout``; docs/writing-a-plugin.md#scouts).

    **What it sees**, at each stage: ``tokens`` ``[B, K, d]``, every encoder's token computed so far (the always-run
    encoders and previews from the start, each on-demand encoder once it ran; zeros elsewhere and for a missing
    encoder; before the identity embeddings), ``present`` ``[B, K]`` (bool: the encoder's input is there) and
    ``ran`` ``[B, m]`` (bool: which on-demand encoders ran, in ``context.on_demand`` order).

    **What it gives**: :meth:`forward` returns ``[B, m]``, the predicted value of running each on-demand encoder
    for each row: how much the row's loss would drop when its token joined the fusion. The model decides in
    stages: each row still going picks the encoder left of most value per unit of cost (relative to the mean
    on-demand cost), runs it when that reaches the threshold (0 by default: while a gain is expected; a mean
    budget's fitted threshold; any, under a cap, while the cost fits), and the scout is asked again with its
    token. The rule lives in :func:`fusionkit.conditional.rules.stage_pick`, with its numpy twin that the runtime
    calls; a scout writes :meth:`forward` only.

    **How it trains**: on the rows where every on-demand encoder ran (``conditional.scout_rows``), the trainer
    measures, for each encoder the row's sampled state could add, the drop of the row's loss when its token is
    added (both fused as at inference), and calls :meth:`loss` with a :class:`ScoutExample` (the prediction in
    that state, the drops, the rows' tokens and labels); ``conditional.scout_weight`` weighs it. Its inputs are
    detached: a scout learns to predict the fusion, never to shape the tokens. A scout that learns from the
    tokens and labels alone sets :attr:`needs_drops` False and spares the trainer the fusions.

    **A mean budget** (``--budget mean:S%``) runs a row's stages while their values per cost reach a threshold,
    fitted on validation rows along each row's path of stages (:func:`fusionkit.inference.fit_mean_budget`).

    **Values learned on held-out rows** (:attr:`values_from` ``"validation"``): a drop measured on a row the model
    is trained on is an in-sample drop. Where an input is corrupted on some samples, the model memorises those
    samples through their noise, so adding a corrupted token drops a training row's loss as much as a clean one,
    while on a new row it adds little or hurts. A scout that sets ``values_from = "validation"`` is given, at every
    evaluation, the drops measured on the validation rows (every state a row could be in, :class:`ScoutExample`
    each) and fits its values to them in :meth:`fit_values`; its :meth:`loss` then trains only what learns without
    the drops.

    **Export**: :meth:`forward` is traced to ``value.onnx`` (inputs ``tokens``, ``present``, ``ran``; output
    ``values``), which the runtime runs once per stage. It must therefore be traceable: tensor operations only.

    The built-in ``gate`` scout (:attr:`rule` ``"gate"``) is the exception: the gate's own scores before the
    on-demand encoders run decide, once, and it has no :meth:`forward` of its own.
    """

    #: How the model applies the scout: ``"staged"`` (the contract above) or ``"gate"`` (the built-in gate scout
    #: alone: the gate's scores decide).
    rule: str = "staged"
    #: Whether :meth:`loss` reads ``example.measured`` (the trainer fuses each row once more per addable encoder).
    needs_drops: bool = True
    #: Where its values learn the measured drops: ``"training"`` (:meth:`loss`, every step, on the training rows)
    #: or ``"validation"`` (:meth:`fit_values`, at every evaluation, on the validation rows).
    values_from: str = "training"

    def __init__(self, config: ScoutConfig, context: BuildContext) -> None:
        super().__init__()
        self.config = config
        self.context = context

    def forward(self, tokens: torch.Tensor, present: torch.Tensor, ran: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def loss(self, example: ScoutExample) -> torch.Tensor:
        """The scout's loss on one training example: by default the squared error of its predicted loss drops
        against the measured ones, over the encoders each row's state could add."""
        addable = example.addable
        if example.measured is None or not addable.any():  # nothing to learn from: a zero term keeps it in the graph
            return 0.0 * example.predicted.sum()
        return (example.predicted.float()[addable] - example.measured.float()[addable]).pow(2).mean()

    def fit_values(self, examples: Sequence[ScoutExample]) -> None:
        """For a scout whose :attr:`values_from` is ``"validation"``: fit its values to the drops measured on the
        validation rows, one example per state the rows could be in, each over the same rows in the same order
        (``measured`` given; ``predicted`` is the scout's prediction when the examples were made, without
        gradients). Called at every evaluation, before
        the validation score; it must give the same values wherever it runs on the same examples (seed any
        initialisation itself, leave the global random state alone)."""
        raise NotImplementedError(f"{type(self).__name__} sets values_from = 'validation' and must define fit_values")


class Fusion(nn.Module):
    """Fuses ``[B, n, d]`` rank-ordered slots with weights ``[B, n]`` and a slot mask into ``[B, out_dim]``."""

    out_dim: int


class Head(nn.Module):
    """Fused vector ``[B, d]`` -> logits ``[B, L]``; ``activation`` turns them into probabilities."""

    activation: str = "softmax"

    def probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        if self.activation == "sigmoid":
            # sigmoid as exp(-softplus(-x)): the same value, but ONNX Runtime's Sigmoid kernel keeps no relative
            # precision below about 1e-6, where Exp and Softplus keep float32's; an exported model's saturated
            # presence probabilities (which the product combiner renormalises) then agree with torch's
            return torch.exp(-F.softplus(-logits))
        return torch.softmax(logits, dim=-1)


class Combiner(nn.Module):
    """Probability-level fusion: presence ``[B, L]`` and/or salience ``[B, L]`` -> one distribution ``[B, L]``."""

    def forward(self, presence: torch.Tensor | None, salience: torch.Tensor | None) -> torch.Tensor:
        raise NotImplementedError


class Decoder:
    """Turns probabilities into BlEmoRE predictions; its thresholds can be fitted on validation data.

    :meth:`decode` returns ``(order, saliences)``: ``order`` ``[N, 2]`` label indices
    (second -1 for a single emotion) and ``saliences`` ``[N, 2]`` on the 0-100 scale.
    """

    def __init__(self, config: Any, context: BuildContext) -> None:
        self.config = config
        self.context = context

    def decode(self, outputs: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        raise NotImplementedError

    def fit(self, outputs: dict[str, np.ndarray], truth: np.ndarray) -> Any:
        """Search the thresholds on validation data; return the best config (not applied)."""
        raise NotImplementedError


class Dataset:
    """A dataset plugin: :meth:`generate` gives samples and features; ``build_dataset`` (and
    ``fusionkit data build``) writes them as a feature store.

    Subclasses implement :meth:`generate` and, when their labels are not BlEmoRE's, :meth:`labels`.
    """

    def __init__(self, config: Any) -> None:
        self.config = config

    def labels(self) -> tuple[str, ...]:
        return BLEMORE_LABELS

    def generate(self) -> tuple[list, dict]:
        """(samples, encoder name -> [N, D] array or list of N [T, D] arrays)."""
        raise NotImplementedError


# --- samples (what a dataset generates and a store indexes) ----------------------------------------


#: The domains a sample may belong to; anything else is refused (a typo would silently drop rows).
DOMAINS = ("source", "target")


@attrs.frozen
class Sample:
    """One sample's record in the index. ``labels`` is None for unlabelled samples. ``corrupted`` names the
    encoders whose features a dataset corrupted on purpose (benchmarks), so that reports can show whether the
    gate keeps them less."""

    id: str
    labels: Prediction | None = None
    group: str = ""
    fold: int = -1
    domain: str = "source"
    corrupted: tuple[str, ...] = attrs.field(default=(), converter=tuple)


# --- adaptation losses --------------------------------------------------------------------------------


@attrs.frozen(kw_only=True)
class AdaptationConfig:
    """Options every adaptation loss has."""

    weight: float = option(0.1, doc="Weight of the loss.", validator=non_negative)
    warmup: float = option(0.0, doc="Share of training over which the weight ramps up linearly from 0.",
                           validator=unit_interval)
    on: Literal["fused", "encoders"] = option(
        "fused", doc="Align the fused feature, or each encoder's projected feature (averaged over encoders)."
    )


class AdaptationLoss(nn.Module):
    """A loss between source and target features ``[B, d]`` (``discrepancy``), or on target outputs.

    Subclasses implement :meth:`discrepancy`; losses on predictions (entropy) override
    :meth:`forward` instead.

    Under torchrun a loss with ``global_batch`` (the default) receives the source and target outputs of every
    rank, gathered in the global batch's order (gradients flow back to each rank's own rows), so that it
    computes what one process would: batch statistics such as MMD and CORAL need it. A loss that is a mean of
    per-sample terms may set ``global_batch = False`` to see only its rank's rows (its value is then averaged
    over ranks, weighted by their shares of the source batch). Either way it calls no collective itself.
    """

    global_batch: bool = True

    def __init__(self, config: AdaptationConfig) -> None:
        super().__init__()
        self.config = config

    def discrepancy(self, source: torch.Tensor, target: torch.Tensor, progress: float) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, source: Any, target: Any, progress: float) -> torch.Tensor:
        """The discrepancy on the fused features, or averaged over encoders; 0 where a side has < 2 samples
        (a batch of one has no covariance or spread to compare)."""
        if self.config.on == "fused":
            pairs = [(source.fused, target.fused)]
        else:
            pairs = [(_available(source, k), _available(target, k)) for k in range(source.tokens.shape[1])]
        losses = [self.discrepancy(s, t, progress) for s, t in pairs if len(s) > 1 and len(t) > 1]
        return torch.stack(losses).mean() if losses else source.fused.new_zeros(())

    def scale(self, progress: float) -> float:
        ramp = 1.0 if self.config.warmup <= 0 else min(1.0, progress / self.config.warmup)
        return self.config.weight * ramp


def _available(out: Any, k: int) -> torch.Tensor:
    tokens = out.tokens[:, k]
    return tokens if out.mask is None else tokens[out.mask[:, k]]


# --- distillation losses ----------------------------------------------------------------------------


Pair = tuple[torch.Tensor, torch.Tensor]


@dataclass
class DistillBatch:
    """What a distillation loss sees for one training batch.

    ``views`` and ``modalities`` map a name to ``(student, teacher)`` embeddings ``[B, e]``,
    L2-normalised, the student projected into the teacher's width. ``logits`` maps a head role
    to ``(student, teacher, activation)`` logits ``[B, L]``. ``scale_s`` / ``scale_t`` are the
    two models' contrastive logit scales (two-tower models), else None.
    """

    views: dict[str, Pair]
    modalities: dict[str, Pair]
    logits: dict[str, tuple[torch.Tensor, torch.Tensor, str]] = field(default_factory=dict)
    scale_s: torch.Tensor | None = None
    scale_t: torch.Tensor | None = None

    def pairs(self) -> list[tuple[Pair, Pair]]:
        """Every pair of modalities (A, B), each as ``((s_A, t_A), (s_B, t_B))``."""
        return list(itertools.combinations(self.modalities.values(), 2))


@attrs.frozen(kw_only=True)
class DistillConfig:
    """Options every distillation loss has."""

    weight: float = option(1.0, doc="Weight of the loss.", validator=non_negative)


class DistillLoss(nn.Module):
    """A distillation loss: ``forward(batch: DistillBatch) -> scalar``.

    ``needs`` says what it reads, so that a spec pairing it with a model that lacks it gets a
    clear error before training: ``"views"``, ``"pairs"`` (two modalities at least) or
    ``"logits"``.
    """

    needs: str = "views"
    #: Under torchrun, see every rank's rows of the batch (gathered, in the global batch's order, gradients through
    #: each rank's own rows), as the relational losses need; False: this rank's rows only (a per-sample mean,
    #: averaged over ranks). The objective gathers; a loss never calls a collective itself.
    global_batch: bool = True

    def __init__(self, config: DistillConfig) -> None:
        super().__init__()
        self.config = config

    def forward(self, batch: DistillBatch) -> torch.Tensor:
        raise NotImplementedError

    def mean_over_pairs(self, batch: DistillBatch, fn) -> torch.Tensor:
        """The mean of ``fn((s_A, t_A), (s_B, t_B))`` over every pair of modalities."""
        return torch.stack([fn(a, b) for a, b in batch.pairs()]).mean()
