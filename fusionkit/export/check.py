"""Checking an export against the model it came from: the runtime (numpy and onnxruntime, no torch) and PyTorch on
the same rows, at the gate's own rule, several caps, the stored mean budgets and a budget per row. A mismatch is
an :class:`~fusionkit.export.graphs.ExportError` that names the graph at fault."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from fusionkit.errors import require_torch

require_torch("fusionkit.export")

import torch  # noqa: E402 - after the check that torch is there

from fusionkit.blemore.answers import from_order  # noqa: E402
from fusionkit.data.store import FeatureStore  # noqa: E402
from fusionkit.export.graphs import ExportError  # noqa: E402
from fusionkit.inference.outputs import collect_outputs  # noqa: E402
from fusionkit.models.fusion import FusionModel  # noqa: E402
from fusionkit.models.towers import TwoTowerModel  # noqa: E402
from fusionkit.runtime.model import RuntimeModel, load  # noqa: E402
from fusionkit.runtime.store import StoreRows  # noqa: E402

__all__ = ["CHECK_ROWS", "CHECK_BUDGETS", "check_export"]


#: How many of a store's rows ``check_export`` compares (the first ones).
CHECK_ROWS = 512
#: The budgets ``check_export`` compares at, beside the gate's own rule and an export's stored mean budget.
CHECK_BUDGETS = ("0%", "25%", "50%", "100%")


def check_export(model: FusionModel | TwoTowerModel, folder: str | os.PathLike, store: FeatureStore, index: np.ndarray | None = None,
                 atol: float = 1e-4) -> list[dict[str, Any]]:
    """Run the export in ``folder`` (without torch) and ``model`` on the rows ``index`` of ``store`` (default: its
    first :data:`CHECK_ROWS`) at the gate's own rule, several caps and the stored mean budget, and compare: the
    probabilities within ``atol``, the same encoders run on the same rows, the same answers except on exact ties.
    Returns one line per budget; a mismatch is an :class:`ExportError` that names the graph at fault."""
    runtime = load(folder)
    index = np.arange(min(len(store), CHECK_ROWS)) if index is None else np.asarray(index)
    raw = None if store.raw is None or Path(store.raw.path) == Path(store.path) else store.raw.path
    rows = runtime.read(store.path, raw).take(index)
    _check_tokens(model, runtime, store, index, rows, atol)
    if isinstance(model, TwoTowerModel):
        return _check_towers(model, runtime, store, index, rows, atol)
    budgets: list[Any] = [None, *(CHECK_BUDGETS if runtime.demand else ())]
    stored = [b.describe() for b in runtime.stored_budgets]
    budgets += ["mean"] if len(stored) == 1 else stored
    if runtime.demand:  # every kind at once, one per row: each row decided as if alone
        budgets.append([[None, *CHECK_BUDGETS, *stored][n % (len(CHECK_BUDGETS) + 1 + len(stored))]
                        for n in range(len(index))])
    report = []
    for given in budgets:
        budget = (runtime.row_budgets(given, len(index)) if isinstance(given, list) else runtime.budget(given))
        expected = collect_outputs(model, store, index, budget=budget)
        got = runtime.predict(rows.inputs, given, lengths=rows.lengths)
        where = "a budget per row" if isinstance(given, list) else f"budget {given or 'the gate rule'}"
        if runtime.demand and not np.array_equal(expected["ran"].astype(bool), got.ran):
            rows_off = np.flatnonzero((expected["ran"].astype(bool) != got.ran).any(axis=1))
            raise ExportError(f"{runtime.scout_graph} ({where}): the runtime runs other encoders than the model on "
                              f"{len(rows_off)} of {len(index)} rows (e.g. {[rows.ids[i] for i in rows_off[:3]]})")
        diff = float(np.abs(expected["probs"] - got.probs).max())
        if diff > atol:
            raise ExportError(f"fusion.onnx ({where}): probabilities differ from the model's by up to {diff:.3g} "
                              f"(more than {atol:g})")
        order, sal = model.decoder.decode(expected)
        wrong = [i for i, (a, b) in enumerate(zip(from_order(order, sal, model.labels), got.answers))
                 if a != b and not _tied(expected, i)]
        if wrong:
            raise ExportError(f"the decoder ({where}): {len(wrong)} answers differ from the model's, e.g. "
                              f"{rows.ids[wrong[0]]}")
        report.append({"budget": "per row" if isinstance(given, list) else given, "rows": int(len(index)),
                       "max_prob_diff": diff,
                       "mean_gflops": float(got.cost.mean())})
    return report


def _tied(outputs: dict[str, np.ndarray], row: int, tolerance: float = 1e-6) -> bool:
    """Whether a row's decoding rests on an exact tie (two top probabilities within ``tolerance``)."""
    for key in ("probs", "presence", "salience"):
        if key in outputs:
            top = np.sort(outputs[key][row])[::-1]
            if len(top) > 2 and (abs(top[0] - top[1]) <= tolerance or abs(top[1] - top[2]) <= tolerance):
                return True
    return False


def _check_tokens(model: FusionModel | TwoTowerModel, runtime: RuntimeModel, store: FeatureStore, index: np.ndarray,
                  rows: StoreRows, atol: float) -> None:
    """Each encoder graph against the model's encoder and projector on the same rows, so that a mismatch names the
    encoder's graph rather than the fusion."""
    inputs, lengths, mask = store.inputs_for(model, index)
    feeds, present = runtime.feeds(rows.inputs, rows.lengths, None)
    trunks = [model] if isinstance(model, FusionModel) else list(model.towers.values())
    with torch.no_grad():
        for trunk in trunks:
            for name in trunk.encoder_names:
                k = model.encoder_names.index(name)
                expected = trunk.projectors[name](trunk.encoders[name](inputs[name], lengths.get(name))).cpu().numpy()
                got = runtime.encode(name, feeds[name], None)
                valid = mask[:, k].cpu().numpy() & present[:, runtime.names.index(name)]
                diff = float(np.abs(expected[valid] - got[valid]).max()) if valid.any() else 0.0
                if diff > atol:
                    raise ExportError(f"encoders/{name}.onnx: its tokens differ from the model's by up to {diff:.3g} "
                                      f"(more than {atol:g})")


def _check_towers(model: TwoTowerModel, runtime: RuntimeModel, store: FeatureStore, index: np.ndarray,
                  rows: StoreRows, atol: float) -> list[dict[str, Any]]:
    """Each tower's embeddings from the export against the model's."""
    inputs, lengths, mask = store.inputs_for(model, index)
    with torch.no_grad():
        expected = model(inputs, lengths, mask).embeddings
    got = runtime.embed(rows.inputs, lengths=rows.lengths)
    report = []
    for name, value in expected.items():
        diff = float(np.abs(value.cpu().numpy() - got[name]).max())
        if diff > atol:
            raise ExportError(f"towers/{name}.onnx: its embeddings differ from the model's by up to {diff:.3g} "
                              f"(more than {atol:g})")
        report.append({"tower": name, "rows": int(len(index)), "max_embedding_diff": diff})
    return report
