"""Inference over a store: a trained model's outputs on rows of a feature store, within a budget.

The one front door for predicting with a budget, shared by the command line (``evaluate``, ``predict``), the Python
API, the training loop's evaluation and an export's checks: :func:`collect_outputs` (probabilities, kept and run
encoders, costs), :func:`predictions_for` (BlEmoRE answers by sample id), :func:`fit_mean_budget` (a mean budget's
threshold, fitted on validation rows) and :func:`measure_encoder_seconds` (each on-demand live encoder's time per
sample, what a budget over measured time counts).
"""

from __future__ import annotations

import time

import attrs
import numpy as np
import torch

from fusionkit.blemore.answers import Prediction, from_order
from fusionkit.conditional.budget import Budget, RowBudgets, parse_budget
from fusionkit.conditional.rules import fit_threshold, path_values
from fusionkit.data.store import FeatureStore
from fusionkit.errors import FusionkitError
from fusionkit.hardware.devices import device_of, synchronize
from fusionkit.hardware.distributed import Dist
from fusionkit.models.fusion import FusionModel, decoder_inputs

__all__ = ["collect_outputs", "predictions_for", "fit_mean_budget", "measure_encoder_seconds", "TIMED_SAMPLES"]


@torch.no_grad()
def collect_outputs(model: FusionModel, store: FeatureStore, index: np.ndarray, batch_size: int = 256,
                    dist: Dist | None = None, domain: str | None = None,
                    budget: Budget | str | float | None = None, runs: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """Probabilities (and kept encoders) of the samples ``index``, in eval mode; for a model with on-demand
    encoders also which encoders ran (``ran``) and each sample's cost in GFLOPs (``cost``), within ``budget``, or
    as ``runs`` says (``[len(index), m]`` bool: which on-demand encoders run for each sample; see
    :meth:`fusionkit.models.fusion.Trunk.encode`).

    A model with per-domain statistics uses each sample's own domain's (the store's ``domain``
    field), or ``domain`` for every sample when given.
    With ``dist`` (torchrun), each rank computes its share and every rank gets all of them, in order.
    """
    budget = parse_budget(budget)  # one per row (a list, or RowBudgets) is sliced with the rows below
    if isinstance(budget, RowBudgets) and len(budget) != len(index):
        raise FusionkitError(f"budget: {len(budget)} budgets for {len(index)} samples (one per sample)")
    if dist is not None and dist.enabled:
        return dist.gather(collect_outputs(model, store, dist.shard(index), batch_size, domain=domain,
                                           budget=_rows(budget, dist.shard(np.arange(len(index)))),
                                           runs=None if runs is None else dist.shard(runs)))
    if len(model.domains) > 1:  # each sample with its own domain's statistics, in the given order
        index = np.asarray(index)
        domains = store.domains[index] if domain is None else np.full(len(index), domain)
        groups = {d: np.flatnonzero(domains == d) for d in np.unique(domains)}
        parts = {}
        try:
            for domain, positions in groups.items():
                model.set_domain(str(domain))
                parts[domain] = _collect(model, store, index[positions], batch_size, _rows(budget, positions),
                                         None if runs is None else runs[positions])
        finally:
            model.set_domain("source")
        out = {}
        for key in next(iter(parts.values()), {}):
            first = parts[next(iter(parts))][key]
            out[key] = np.empty((len(index), *first.shape[1:]), dtype=first.dtype)
            for domain, positions in groups.items():
                out[key][positions] = parts[domain][key]
        return out
    return _collect(model, store, index, batch_size, budget, runs)


def _collect(model: FusionModel, store: FeatureStore, index: np.ndarray, batch_size: int,
             budget: Budget | str | float | None = None, runs: np.ndarray | None = None) -> dict[str, np.ndarray]:
    model.eval()
    budget = parse_budget(budget)
    parts: dict[str, list[np.ndarray]] = {}
    for start in range(0, len(index), batch_size):
        rows = index[start : start + batch_size]
        chosen = None if runs is None else torch.as_tensor(np.asarray(runs[start : start + batch_size], dtype=bool))
        # an on-demand live encoder's files are read only for the rows that run it
        out = model(*store.inputs_for(model, rows, defer=model.deferrable_inputs()),
                    budget=_rows(budget, np.arange(start, start + len(rows))), runs=chosen)
        arrays = decoder_inputs(out)
        bad = ~np.isfinite(arrays["probs"]).all(axis=1)
        if bad.any():
            ids = [store.ids[i] for i in rows[bad][:5]]
            raise FusionkitError(f"the model's outputs are NaN or inf for {int(bad.sum())} sample(s), e.g. {ids}; "
                                 "no metrics are computed from them. Check the checkpoint and the features.")
        arrays["kept"] = out.kept.cpu().numpy()
        if out.ran is not None:
            arrays["ran"] = out.ran.cpu().numpy()
            arrays["cost"] = out.cost.cpu().numpy()
            if out.scout_scores is not None:
                arrays["scout"] = out.scout_scores.detach().float().cpu().numpy()
                arrays["available"] = out.available.cpu().numpy()
        for key, value in arrays.items():
            parts.setdefault(key, []).append(value)
    return {k: np.concatenate(v) for k, v in parts.items()}


def _rows(budget: Budget | RowBudgets | None, positions: np.ndarray) -> Budget | RowBudgets | None:
    """The budgets of the rows at ``positions``: one budget is every row's; one per row is sliced."""
    if isinstance(budget, RowBudgets):
        return RowBudgets([budget.budgets[int(p)] for p in positions])
    return budget


def fit_mean_budget(model: FusionModel, store: FeatureStore, index: np.ndarray, budget: Budget | str) -> Budget:
    """``budget`` as a mean over the data, with its threshold fitted on the rows ``index`` (validation rows, never
    the rows it will be scored on): the lowest threshold whose mean cost there stays within the budget.

    For the gate's scout the threshold is on the scout's value per unit of cost of each on-demand encoder; for the
    value scout (``conditional.scout: value``) on the predicted loss drop per unit of cost along each row's stages,
    found by walking them with every encoder's token at hand."""
    budget = attrs.evolve(Budget.parse(budget), mean=True, threshold=None)
    costs, demand = model.choice_costs(budget, torch.device("cpu")), list(model.on_demand)
    if model.staged:
        values, spent, present = _value_paths(model, store, index, budget)
    else:
        outputs = collect_outputs(model, store, index, budget=Budget(share=0.0))  # the scout's view, nothing run
        scores, present = torch.as_tensor(outputs["scout"]), torch.as_tensor(outputs["available"]).bool()
        values, spent = model.mean_budget_values(scores, present, costs), costs[demand]
    paid = (costs * present).sum(1) - (costs[demand] * present[:, demand]).sum(1)
    threshold = fit_threshold(values, spent, paid, budget.limit(float(costs.sum())))
    return attrs.evolve(budget, threshold=threshold)


@torch.no_grad()
def _value_paths(model: FusionModel, store: FeatureStore, index: np.ndarray,
                 budget: Budget) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The value scout's paths on ``index`` (:meth:`~fusionkit.models.fusion.Trunk.value_path`) as
    :func:`~fusionkit.conditional.rules.fit_threshold` reads them: each stage's threshold, its cost, and which
    encoders each row holds (``[N, m]``, ``[N, m]``, ``[N, K]``)."""
    model.eval()
    values, spent, present = [], [], []
    for start in range(0, len(index), 256):
        rows = index[start : start + 256]
        inputs, lengths, mask = store.inputs_for(model, rows)
        keys, cost = model.value_path(inputs, lengths, mask, budget)
        values.append(path_values(keys).cpu())
        spent.append(cost.cpu())
        present.append(torch.ones(len(rows), len(model.encoder_names), dtype=torch.bool) if mask is None
                       else mask.bool().cpu())
    return torch.cat(values), torch.cat(spent), torch.cat(present)


#: How many samples :func:`measure_encoder_seconds` times by default (the command line's ``--budget-costs time``).
TIMED_SAMPLES = 256


@torch.no_grad()
def measure_encoder_seconds(model: FusionModel, store: FeatureStore, index: np.ndarray, rows: int = TIMED_SAMPLES,
                            batch_size: int = 64) -> dict[str, float]:
    """Seconds per sample of each on-demand encoder, each alone on the first ``rows`` samples of ``index``: reading
    and decoding its inputs, encoding and projecting them, batch by batch as predict runs them (after a warm-up
    pass of every encoder over those samples, on the model's device). What a budget over measured time counts
    (:meth:`Budget.timed`).

    Only live encoders are measured: a stored feature's time here is a table lookup, not what extracting it costs,
    so a model with an on-demand stored encoder budgets by its declared GFLOPs."""
    demand = [model.encoder_names[k] for k in model.on_demand]
    if not demand:
        raise FusionkitError("the model has no on-demand encoder (run: on_demand): there is no encoder time to budget")
    stored = [name for name in demand if name not in model.deferrable_inputs()]
    if stored:
        raise FusionkitError(f"on-demand encoder(s) {stored} read stored features, whose time here is not what "
                             "extracting them costs: budget by GFLOPs (their cost_gflops) instead of measured time")
    index = np.asarray(index)[:rows]
    if len(index) == 0:
        raise FusionkitError("no samples to measure the encoders' time on")
    device, training = device_of(model), model.training
    batches = [index[start:start + batch_size] for start in range(0, len(index), batch_size)]
    model.eval()
    seconds = {}
    try:
        for name in demand:  # warm-up: first calls allocate and pick kernels, and every file is read once, so that
            for batch in batches:  # the encoder measured first does not pay the disk cache for those after it
                _encode_alone(model, store, batch, name)
        for name in demand:
            synchronize(device)
            started = time.perf_counter()
            for batch in batches:
                _encode_alone(model, store, batch, name)
            synchronize(device)
            seconds[name] = (time.perf_counter() - started) / len(index)
    finally:
        model.train(training)
    return seconds


def _encode_alone(model: FusionModel, store: FeatureStore, index: np.ndarray, name: str) -> torch.Tensor:
    """The tokens of one live encoder for the samples ``index``, read and encoded as a deferred input is."""
    x, lengths = store.deferred_input(model, index, name).load(torch.arange(len(index)))
    return model.projectors[name](model.encoders[name](x, lengths))


def predictions_for(model: FusionModel, store: FeatureStore, index: np.ndarray,
                    budget: Budget | str | float | None = None) -> dict[str, Prediction]:
    """Sample id -> BlEmoRE prediction with the model's stored decoder thresholds (on-demand encoders within
    ``budget`` when given)."""
    outputs = collect_outputs(model, store, index, budget=budget)
    order, sal = model.decoder.decode(outputs)
    preds = from_order(order, sal, model.labels)
    return {store.ids[i]: p for i, p in zip(index.tolist(), preds)}
