"""The runtime against PyTorch over random specs: every built-in gate, fusion, combiner, decoder and pooling, on-demand
encoders under both scouts, sequences with NaN frames under ``nan_policy: mask``, and saturated heads, at the gate's
own rule, caps and a stored mean budget (``check_export`` compares probabilities, the encoders run and the answers).
"""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.numpy import load_file, save_file

import fusionkit
from fusionkit.components.datasets import build_dataset
from fusionkit.data.open import spec_store
from fusionkit.errors import SpecError
from fusionkit.export.check import check_export
from fusionkit.export.graphs import export_model
from fusionkit.inference import fit_mean_budget
from fusionkit.runtime import DeploymentError

SPECS = 24
POOLINGS = ["mean", "stats7", "attention"]


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    """Two stores of four encoders: sequences with NaN frames in a third of the rows of two encoders (one of them
    always-run in most specs), and vectors."""
    root = tmp_path_factory.mktemp("parity")
    sequences = build_dataset("synthetic", {"samples": 90, "noise": [0.3, 1.0, 2.0, 3.0], "dim": 6, "seed": 1,
                                            "sequence_length": 4}, root / "sequences")
    rng = np.random.default_rng(0)
    for name in ("enc0", "enc2"):
        file = sequences / f"{name}.safetensors"
        tensors = load_file(str(file))
        with safe_open(str(file), framework="numpy") as fh:  # its ids metadata, kept
            metadata = fh.metadata()
        offsets = tensors["offsets"]
        for row in rng.choice(len(offsets) - 1, size=30, replace=False):
            if offsets[row + 1] > offsets[row]:  # one frame of the row goes bad
                tensors["features"][rng.integers(offsets[row], offsets[row + 1]), rng.integers(6)] = np.nan
        save_file(tensors, str(file), metadata=metadata)
    vectors = build_dataset("synthetic", {"samples": 90, "noise": [0.3, 1.0, 2.0, 3.0], "dim": 6, "seed": 2},
                            root / "vectors")
    return {"sequences": sequences, "vectors": vectors}


def random_spec(seed: int) -> tuple[dict, str, bool]:
    """A spec drawn at random (valid by construction or redrawn), which store it reads, and whether its heads are
    saturated."""
    rng = random.Random(seed)
    while True:
        data = rng.choice(["sequences", "sequences", "vectors"])
        K = 4
        demand = rng.sample(range(1, K), rng.choice([0, 1, 2, 2, 3]))
        encoders = []
        for k in range(K):
            entry = {"name": f"enc{k}", "type": "features", "dim": 6}
            if data == "sequences":
                entry["pooling"] = rng.choice(POOLINGS)
            if k in demand:
                entry.update(run="on_demand", cost_gflops=rng.choice([0.5, 1.0, 2.0, 4.0]))
            encoders.append(entry)
        gate = rng.choice(["attention", "mlp", "static"] if demand else ["attention", "mlp", "static", "uniform"])
        spec = {
            "latent_dim": 8,
            "encoders": encoders,
            "gate": {"type": gate, "top_n": rng.randint(1, K)},
            "fusion": {"type": rng.choice(["weighted_sum", "rank_concat", "rank_attention"])},
            "combiner": {"type": rng.choice(["product", "product", "mean", "salience_only", "presence_only"])},
            "decoder": {"type": rng.choice(["blemore", "presence_salience"])},
            "data": {"nan_policy": "mask"},
            "train": {"seed": seed},
        }
        if demand:
            spec["conditional"] = {"scout": rng.choice(["gate", "value"])}
        if spec["decoder"]["type"] == "presence_salience" and spec["combiner"]["type"] == "salience_only":
            spec["combiner"]["type"] = "product"
        try:
            fusionkit.load_spec(spec)
        except SpecError:
            continue
        return spec, data, rng.random() < 0.35


@pytest.mark.parametrize("seed", range(SPECS))
def test_the_runtime_equals_pytorch_on_a_random_spec(seed, stores, tmp_path):
    spec, data, saturated = random_spec(seed)
    torch.manual_seed(seed)
    model = fusionkit.build_model(spec).eval()
    if saturated and "presence" in model.heads:  # presence probabilities of about 1e-9 to 1e-13
        with torch.no_grad():
            last = [m for m in model.heads["presence"].modules() if isinstance(m, torch.nn.Linear)][-1]
            last.bias.fill_(-24.0)
            last.weight.mul_(0.1)
    store = spec_store(model.spec, stores[data])
    budget = fit_mean_budget(model, store, np.arange(45, 90), "mean:40%") if model.on_demand else None
    folder = export_model(model, tmp_path / "export", budget=budget)
    report = check_export(model, folder, store, np.arange(45))
    expected = [None, "0%", "25%", "50%", "100%", "mean", "per row"] if model.on_demand else [None]
    assert [line["budget"] for line in report] == expected, json.dumps(spec)
    assert all(line["max_prob_diff"] <= 1e-4 for line in report)


def test_the_random_specs_cover_what_the_issue_names():
    """Value scouts on masked sequences, saturated heads under the product combiner, both scouts and no scout."""
    drawn = [random_spec(seed) for seed in range(SPECS)]
    scouts = {spec.get("conditional", {}).get("scout") for spec, _, _ in drawn}
    assert scouts == {None, "gate", "value"}
    assert any(spec.get("conditional", {}).get("scout") == "value" and data == "sequences" for spec, data, _ in drawn)
    assert any(saturated and spec["combiner"]["type"] == "product" for spec, _, saturated in drawn)


@pytest.mark.parametrize("scout", ["gate", "value"])
def test_budgets_per_row_decide_each_row_as_if_alone(scout, stores, tmp_path):
    """One batch with a budget per row (the gate's rule, caps and two stored mean budgets): the runtime equals
    PyTorch given the same budgets, and each row equals that row predicted alone with its budget, in both."""
    from fusionkit.runtime import load, read_store

    spec = {"latent_dim": 8, "data": {"nan_policy": "mask"}, "conditional": {"scout": scout},
            "gate": {"type": "attention", "top_n": 3},
            "encoders": [{"name": "enc0", "type": "features", "dim": 6, "pooling": "mean"},
                         {"name": "enc1", "type": "features", "dim": 6, "pooling": "stats7", "run": "on_demand",
                          "cost_gflops": 1.0},
                         {"name": "enc2", "type": "features", "dim": 6, "pooling": "mean", "run": "on_demand",
                          "cost_gflops": 2.0},
                         {"name": "enc3", "type": "features", "dim": 6, "pooling": "attention", "run": "on_demand",
                          "cost_gflops": 4.0}]}
    torch.manual_seed(3)
    model = fusionkit.build_model(spec).eval()
    store = spec_store(model.spec, stores["sequences"])
    stored = [fit_mean_budget(model, store, np.arange(45, 90), b) for b in ("mean:25%", "mean:60%")]
    folder = export_model(model, tmp_path / "export", budget=stored)
    runtime = load(folder)
    assert [b.describe() for b in runtime.stored_budgets] == ["mean:25%", "mean:60%"]
    rows = read_store(store.path, runtime.names).take(np.arange(30))
    choices = [None, "0%", "30%", "100%", "mean:25%", "mean:60%", 3.5]
    given = [choices[n % len(choices)] for n in range(30)]
    mixed = runtime.predict(rows.inputs, given, lengths=rows.lengths)
    torch_budgets = runtime.row_budgets(given, 30)
    with torch.no_grad():
        inputs, lengths, mask = store.inputs_for(model, np.arange(30))
        expected = model(inputs, lengths, mask, budget=torch_budgets)
    assert np.array_equal(expected.ran.numpy(), mixed.ran)
    assert np.allclose(expected.probs.numpy(), mixed.probs, atol=1e-5)
    assert len({tuple(r) for r in mixed.ran[:, 1:]}) > 2  # the budgets chose differently
    for n in range(30):
        alone = runtime.predict({k: v[n:n + 1] for k, v in rows.inputs.items()}, given[n],
                                lengths={k: v[n:n + 1] for k, v in rows.lengths.items()})
        assert np.array_equal(alone.ran[0], mixed.ran[n]) and alone.answers[0] == mixed.answers[n]
        assert abs(alone.cost[0] - mixed.cost[n]) < 1e-9
        with torch.no_grad():
            one = model({k: v[n:n + 1] for k, v in inputs.items()}, {k: v[n:n + 1] for k, v in lengths.items()},
                        mask[n:n + 1], budget=torch_budgets.budgets[n])
        assert torch.equal(one.ran[0], expected.ran[n])
    cap = runtime.budget("30%").limit(float(runtime.costs.sum()))
    assert all(mixed.cost[n] <= cap + 1e-9 for n in range(30) if given[n] == "30%")
    with pytest.raises(DeploymentError, match="stores the mean budget\\(s\\) mean:25%, mean:60%"):
        runtime.predict(rows.inputs, "mean", lengths=rows.lengths)
    with pytest.raises(DeploymentError, match="budget: 2 budgets for 30 rows"):
        runtime.predict(rows.inputs, ["10%", "20%"], lengths=rows.lengths)
