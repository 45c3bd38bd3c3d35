"""A scout's values fitted on held-out rows (:attr:`fusionkit.interfaces.Scout.values_from` ``"validation"``).

A drop of the loss measured on a row the model is trained on is an in-sample drop: where an input is corrupted on
some samples, the model memorises those samples through their noise, and adding the corrupted token drops a
training row's loss as much as a clean one, while on a new row it adds little or hurts. So such a scout's values
learn from the validation rows, at every evaluation: each row is put in every state it could be in (which on-demand
encoders have run), and the drop of its loss when each encoder is added, fused as at inference, is measured
(:func:`held_out_examples`); the scout fits its values to them (:meth:`~fusionkit.interfaces.Scout.fit_values`).
"""

from __future__ import annotations

import itertools

import numpy as np
import torch

from fusionkit.data.store import FeatureStore
from fusionkit.hardware.distributed import Dist
from fusionkit.interfaces import ScoutExample
from fusionkit.models.fusion import FusionModel, ValueTarget
from fusionkit.spec import TrainConfig
from fusionkit.training.losses import measured_drops

__all__ = ["ALL_STATES_UP_TO", "held_out_states", "held_out_examples", "fit_scout_values", "fits_on_validation"]

#: Up to this many on-demand encoders every state but the full one is measured; beyond, the empty state, each
#: encoder alone and each all-but-one (what a row meets at its first stage, after one, and before its last).
ALL_STATES_UP_TO = 4


def held_out_states(m: int) -> list[tuple[bool, ...]]:
    """The states (which of ``m`` on-demand encoders have run) whose drops :func:`held_out_examples` measures."""
    if m <= ALL_STATES_UP_TO:
        return [s for s in itertools.product((False, True), repeat=m) if not all(s)]
    alone = [tuple(j == i for j in range(m)) for i in range(m)]
    return [(False,) * m, *alone, *(tuple(not x for x in s) for s in alone)]


def fits_on_validation(model: object) -> bool:
    """Whether ``model`` has a staged scout whose values learn on the validation rows."""
    return isinstance(model, FusionModel) and model.staged and model.scout.values_from == "validation"


@torch.no_grad()
def held_out_examples(model: FusionModel, store: FeatureStore, index: np.ndarray, train: TrainConfig,
                      batch_size: int = 256) -> list[ScoutExample]:
    """One :class:`ScoutExample` per state of :func:`held_out_states`, over the rows ``index`` (every on-demand
    encoder run on them once): the scout's prediction in that state (zeros for the gate scout, which predicts no
    drops), which encoders it could add, and the measured drop of each row's loss (the training loss's, per row)
    when each is added, fused as at inference."""
    model.eval()
    demand = list(model.on_demand)
    states = held_out_states(len(demand))
    parts: list[list[ScoutExample]] = [[] for _ in states]
    for start in range(0, len(index), batch_size):
        rows = np.asarray(index[start : start + batch_size])
        inputs, lengths, mask = store.inputs_for(model, rows)
        encoded = model.encode(inputs, lengths, mask, everything=True)
        tokens = encoded.tokens
        present = (torch.ones(tokens.shape[:2], dtype=torch.bool, device=tokens.device) if mask is None
                   else mask.to(device=tokens.device, dtype=torch.bool))
        target = torch.as_tensor(store.truth_matrix(rows) / 100.0, dtype=torch.float32, device=tokens.device)
        raw = tokens - model.identity
        for part, state in zip(parts, states):
            chosen = torch.as_tensor(state, device=tokens.device).expand(len(rows), -1) & present[:, demand]
            ran = present.clone()
            ran[:, demand] = chosen
            predicted = (model.scout(raw * ran.unsqueeze(-1).to(raw.dtype), present, chosen) if model.staged
                         else torch.zeros(chosen.shape, dtype=raw.dtype, device=raw.device))
            addable = present[:, demand] & ~chosen
            measured = measured_drops(model.value_logits(ValueTarget(predicted, addable, tokens, ran)), target, train)
            part.append(ScoutExample(predicted=predicted, addable=addable, state=chosen, measured=measured,
                                     tokens=raw, present=present, target=target))
    return [ScoutExample(**{field: torch.cat([getattr(p, field) for p in part])
                            for field in ScoutExample.__dataclass_fields__}) for part in parts if part]


def fit_scout_values(model: FusionModel, store: FeatureStore, index: np.ndarray, train: TrainConfig,
                     dist: Dist | None = None) -> None:
    """Fit the values of ``model``'s scout on the rows ``index`` (validation rows) where its scout learns them
    there (:func:`fits_on_validation`); every rank fits the same values (rank 0's are kept)."""
    if not fits_on_validation(model) or not len(index):
        return
    was_training = model.training
    try:
        model.scout.fit_values(held_out_examples(model, store, index, train))
    finally:
        model.train(was_training)
    if dist is not None:
        dist.broadcast_parameters(model.scout)
