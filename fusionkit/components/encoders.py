"""Built-in encoders: ``features`` (pre-extracted vectors or time series, with pooling), ``sequence_cnn`` (1-D
convolutions over a sequence) and ``tower`` (a trained tower of a two-tower checkpoint, as one encoder)."""

from __future__ import annotations

from typing import Literal

import attrs
import torch
from torch import nn

from fusionkit.config import option, positive
from fusionkit.errors import CheckpointError, DataError
from fusionkit.interfaces import BuildContext, Encoder
from fusionkit.models.factory import load_model
from fusionkit.models.towers import TwoTowerModel
from fusionkit.pooling import pool_frames, valid_frames

__all__ = ["SequenceCnnConfig", "SequenceCnnEncoder", "Pooling", "FeaturesConfig", "FeaturesEncoder", "TowerEncoderConfig",
           "TowerEncoder"]

Pooling = Literal["none", "mean", "stats7", "attention"]


@attrs.frozen(kw_only=True)
class FeaturesConfig:
    """Pre-extracted features: a vector per sample, or a time series pooled to one."""

    dim: int = option(doc="Feature size per sample (vectors) or per frame (sequences).", validator=positive)
    pooling: Pooling = option(
        "none",
        doc="none: inputs are [B, D] vectors; mean, stats7 (mean, std, 10/25/50/75/90th percentiles) "
        "or attention pool [B, T, D] sequences over their valid frames.",
    )


@attrs.frozen(kw_only=True)
class SequenceCnnConfig:
    """An order-aware encoder of symbol or frame sequences: 1-D convolutions over time, then the mean and the
    maximum over each sample's valid frames. Where ``features`` with mean pooling sees a bag of frames, this
    sees their order (n-grams of up to layers * (kernel - 1) + 1 frames)."""

    dim: int = option(doc="Feature size per frame (e.g. the size of a one-hot symbol alphabet).", validator=positive)
    channels: int = option(128, doc="Channels of every convolution; the output has 2 * channels.", validator=positive)
    layers: int = option(3, doc="Convolution layers.", validator=positive)
    kernel: int = option(3, doc="Frames each convolution sees (odd).", validator=positive)
    dropout: float = option(0.0, doc="Dropout after each convolution.")


class SequenceCnnEncoder(Encoder):
    """``[B, T, dim]`` sequences (with lengths) -> ``[B, 2 * channels]``: convolutions over time, masked so that
    padding never reaches a valid frame's output, then mean and max pooling over the valid frames."""

    def __init__(self, config: SequenceCnnConfig, context: BuildContext) -> None:
        super().__init__()
        if config.kernel % 2 == 0:
            raise ValueError(f"kernel must be odd (it is centred on each frame), found {config.kernel}")
        self.name = context.encoder_name
        self.dim = config.dim
        self.out_dim = 2 * config.channels
        sizes = [config.dim] + [config.channels] * config.layers
        self.convs = nn.ModuleList(nn.Conv1d(a, b, config.kernel, padding=config.kernel // 2)
                                   for a, b in zip(sizes[:-1], sizes[1:]))
        self.dropout = nn.Dropout(config.dropout)

    def export_inputs(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Two sequences of three frames, with their lengths."""
        return torch.zeros(2, 3, self.dim), torch.tensor([3, 2])

    def forward(self, x: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
        if x.dim() != 3 or x.shape[-1] != self.dim:
            raise DataError(f"encoder {self.name!r}: sequence_cnn takes [B, T, {self.dim}] sequences, found shape "
                            f"{tuple(x.shape)}")
        valid = valid_frames(x, lengths).unsqueeze(1)  # [B, 1, T]
        h = x.transpose(1, 2)
        for conv in self.convs:
            h = self.dropout(torch.nn.functional.gelu(conv(h * valid)))
        h = h * valid
        count = valid.sum(-1).clamp_min(1)
        mean = h.sum(-1) / count
        top = h.masked_fill(~valid, float("-inf")).amax(-1).nan_to_num(0.0, neginf=0.0)
        return torch.cat([mean, top], dim=1)


class FeaturesEncoder(Encoder):
    """Passes vectors through, or pools a sequence into one vector."""

    standardizes_inputs = True

    def __init__(self, config: FeaturesConfig, context: BuildContext) -> None:
        super().__init__()
        self.name = context.encoder_name
        self.dim = config.dim
        self.pooling = config.pooling
        self.out_dim = config.dim * 7 if config.pooling == "stats7" else config.dim
        # stats7 of fixed features can be computed once per sample, outside the model (see forward)
        self.precomputed_pooling = "stats7" if config.pooling == "stats7" else None
        self.attention = nn.Linear(config.dim, 1) if config.pooling == "attention" else None
        self.register_buffer("input_mean", torch.zeros(config.dim))
        self.register_buffer("input_std", torch.ones(config.dim))
        for domain in context.input_domains[1:]:  # further domains' statistics (per-domain standardisation)
            self.register_buffer(f"{domain}_input_mean", torch.zeros(config.dim))
            self.register_buffer(f"{domain}_input_std", torch.ones(config.dim))
        self.domains = context.input_domains
        self.domain = "source"

    def export_inputs(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Vectors ``[2, dim]``, or (any pooling) two sequences of three frames with their lengths: a deployment
        hands the frames, and the graph pools them (stats7 too)."""
        if self.pooling == "none":
            return torch.zeros(2, self.dim), None
        return torch.zeros(2, 3, self.dim), torch.tensor([3, 2])

    def set_standardization(self, mean: torch.Tensor, std: torch.Tensor, domain: str = "source") -> None:
        """Standardise raw inputs (per dimension; frames for sequences) with training-set statistics, or
        with a further domain's own statistics (used while :attr:`domain` is that domain)."""
        prefix = "" if domain == "source" else f"{domain}_"
        getattr(self, f"{prefix}input_mean").copy_(mean)
        getattr(self, f"{prefix}input_std").copy_(std.clamp_min(1e-6))

    def _statistics(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.domain == "source" or self.domain not in self.domains:
            return self.input_mean, self.input_std
        return getattr(self, f"{self.domain}_input_mean"), getattr(self, f"{self.domain}_input_std")

    def forward(self, x: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
        pre_pooled = self.pooling == "stats7" and x.dim() == 2 and x.shape[-1] == 7 * self.dim
        if x.shape[-1] != self.dim and not pre_pooled:
            raise DataError(f"encoder {self.name!r}: expected feature size {self.dim}, found input of shape {tuple(x.shape)}")
        input_mean, input_std = self._statistics()
        inv_std = input_std.reciprocal()
        if pre_pooled:
            # Precomputed stats7 of the raw frames. Standardising is an increasing affine map per
            # dimension, so the statistics of standardised frames follow exactly: every block
            # maps as (v - mean) / std, except the standard deviation, which maps as v / std.
            blocks = x.view(x.shape[0], 7, self.dim)
            shift = (-input_mean * inv_std).expand(7, -1).clone()
            shift[1] = 0.0
            return torch.addcmul(shift, blocks, inv_std).flatten(1)
        x = torch.addcmul(-input_mean * inv_std, x, inv_std)  # (x - mean) / std in one pass
        if self.pooling == "none":
            if x.dim() != 2:
                raise DataError(
                    f"encoder {self.name!r}: pooling 'none' takes [B, {self.dim}] vectors, found shape {tuple(x.shape)}; "
                    "set pooling to mean, stats7 or attention for sequences"
                )
            return x
        if x.dim() != 3:
            raise DataError(f"encoder {self.name!r}: pooling {self.pooling!r} takes [B, T, {self.dim}] sequences, found shape {tuple(x.shape)}")
        if self.pooling in ("stats7", "mean"):
            return pool_frames(x, lengths, self.pooling)
        valid = valid_frames(x, lengths)
        logits = self.attention(x).squeeze(-1).masked_fill(~valid, float("-inf"))
        attn = torch.softmax(logits, dim=1).nan_to_num(0.0)
        return torch.einsum("bt,btd->bd", attn, x)


@attrs.frozen(kw_only=True)
class TowerEncoderConfig:
    """A trained tower of a two-tower checkpoint, as one encoder of a fusion model."""

    checkpoint: str = option(doc="Directory of the two-tower checkpoint (e.g. RUN/best).")
    tower: str = option(doc="Which tower; it must have exactly one encoder, whose features this encoder reads.")
    dim: int = option(doc="Feature size of the input (that of the tower's encoder).")
    freeze: bool = option(True, doc="Keep the tower's weights fixed (eval mode) while the fusion model trains.")


class TowerEncoder(Encoder):
    """Runs a trained tower over one encoder's features; ``out_dim`` is the tower's embedding size."""

    def __init__(self, config: TowerEncoderConfig, context: BuildContext) -> None:
        super().__init__()
        model = load_model(config.checkpoint)
        if not isinstance(model, TwoTowerModel) or config.tower not in model.towers:
            have = list(model.towers) if isinstance(model, TwoTowerModel) else "none (not a two-tower model)"
            raise CheckpointError(f"{config.checkpoint}: has no tower {config.tower!r}; its towers: {have}")
        tower = model.towers[config.tower]
        if len(tower.encoder_names) != 1:
            raise CheckpointError(f"{config.checkpoint}: tower {config.tower!r} reads encoders {list(tower.encoder_names)}; "
                                  "only a one-encoder tower can serve as one encoder")
        self.input_name = tower.encoder_names[0]
        reads = tower.encoders[self.input_name]
        expected = reads.dim if isinstance(reads, FeaturesEncoder) else config.dim
        if expected != config.dim:
            raise CheckpointError(f"{config.checkpoint}: tower {config.tower!r} reads {expected}-dimensional features, "
                                  f"but dim is {config.dim}")
        self.tower = tower
        self.freeze = config.freeze
        self.out_dim = tower.embed_dim
        if config.freeze:
            self.tower.requires_grad_(False)

    def train(self, mode: bool = True) -> TowerEncoder:
        super().train(mode)
        if self.freeze:
            self.tower.eval()
        return self

    def export_inputs(self) -> tuple[torch.Tensor, torch.Tensor | None] | None:
        """The inputs of the tower's one encoder, when that encoder exports."""
        return self.tower.encoders[self.input_name].export_inputs()

    def forward(self, x: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
        lens = None if lengths is None else {self.input_name: lengths}
        return self.tower({self.input_name: x}, lens)[0]
