"""The small interfaces every component implements, built-in or third-party.

A factory registered for a kind returns an object of that kind's class here.
Each takes ``(config, context)``: its attrs config and a :class:`BuildContext`
saying where in the model it sits.
"""

from __future__ import annotations

import contextvars
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import attrs
import numpy as np
import torch
from torch import nn

from fusionkit.config import non_negative, option, positive, unit_interval
from fusionkit.selection import Selection, select_top_n, select_top_p, slot_count


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


_restoring: contextvars.ContextVar[bool] = contextvars.ContextVar("fusionkit_restoring", default=False)


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
    """

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

    def forward(self, tokens: torch.Tensor, mask: torch.Tensor | None) -> Selection:
        scores = self.score(tokens, mask)
        if self.training and self.noise > 0:
            scores = scores + self.noise * torch.randn_like(scores)
        soft_tail = self.training and self.epoch < self.warmup_epochs
        if self.config.selection == "top_p":
            max_n = slot_count(self.config, scores.shape[1])
            return select_top_p(scores, mask, self.config.top_p, min(self.config.min_n, max_n), max_n,
                                self.temperature, soft_tail, self.balance_weight)
        return select_top_n(scores, mask, self.top_n, self.temperature, soft_tail, self.balance_weight)


class Fusion(nn.Module):
    """Fuses ``[B, n, d]`` rank-ordered slots with weights ``[B, n]`` and a slot mask into ``[B, out_dim]``."""

    out_dim: int


class Head(nn.Module):
    """Fused vector ``[B, d]`` -> logits ``[B, L]``; ``activation`` turns them into probabilities."""

    activation: str = "softmax"

    def probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        if self.activation == "sigmoid":
            return torch.sigmoid(logits)
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
    """A dataset plugin: :meth:`generate` gives samples and features, :meth:`build` writes a store.

    Subclasses implement :meth:`generate` and, when their labels are not BlEmoRE's, :meth:`labels`.
    """

    def __init__(self, config: Any) -> None:
        self.config = config

    def labels(self) -> tuple[str, ...]:
        from fusionkit.spec import BLEMORE_LABELS

        return BLEMORE_LABELS

    def generate(self) -> tuple[list, dict]:
        """(samples, encoder name -> [N, D] array or list of N [T, D] arrays)."""
        raise NotImplementedError

    def build(self, out, overwrite: bool = False):
        """Write the dataset as a feature store at ``out``; returns its path."""
        from fusionkit.data.store import write_store

        samples, features = self.generate()
        return write_store(out, self.labels(), samples, features, overwrite=overwrite)
