"""A third party's scout, exactly as docs/writing-a-plugin.md#scouts writes it: it registers through the plugin
hook, trains, evaluates at a mean budget, exports, and the runtime (without torch) decides as the model does."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import tiny_spec

import fusionkit
from fusionkit.data.store import open_store
from fusionkit.errors import SpecError
from fusionkit.evaluation.budgets import fit_run_budget
from fusionkit.export.check import check_export
from fusionkit.export.graphs import export_model
from fusionkit.inference import collect_outputs
from fusionkit.models.factory import load_model
from fusionkit.runtime import load
from fusionkit.training.train import make_split, train

DOCS = Path(__file__).resolve().parents[1] / "docs" / "writing-a-plugin.md"


@pytest.fixture
def mean_scout():
    """The docs' scout, registered by running the docs' own code block (each test: plugins are reset between tests)."""
    section = DOCS.read_text(encoding="utf-8").split("### Scouts", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    namespace: dict = {}
    exec(compile(code, str(DOCS), "exec"), namespace)  # noqa: S102 - the project's own docs
    return namespace["MeanScout"]


def scout_spec(scout="mean_scout"):
    spec = tiny_spec()
    spec["gate"].update(top_n=3, noise=0.0)
    spec["encoders"][1].update(run="on_demand", cost_gflops=1.0)
    spec["encoders"][2].update(run="on_demand", cost_gflops=3.0)
    spec["conditional"] = {"scout": {"type": scout, "hidden": 8} if scout == "mean_scout" else scout}
    spec["train"]["epochs"] = 2
    return spec


def test_a_plugins_scout_trains_fits_a_mean_budget_exports_and_runs_in_the_runtime(mean_scout, synthetic_store,
                                                                                     tmp_path):
    run = tmp_path / "run"
    train(scout_spec(), synthetic_store, run, fold=0, progress=False)
    log = (run / "log.jsonl").read_text().splitlines()
    assert '"scout"' in log[0]  # the trainer gave it its loss
    model = load_model(run / "best")
    assert isinstance(model.scout, mean_scout) and model.staged
    store = open_store(synthetic_store)
    budget = fit_run_budget(run, model, store, fusionkit.conditional.budget.Budget.parse("mean:40%"))
    val = make_split(store, 0).val
    spent = collect_outputs(model, store, val, budget=budget)["cost"].mean()
    assert 0.0 < spent <= 0.4 * 4.0 + 1e-6  # the mean budget holds on the rows it was fitted on
    folder = export_model(model, tmp_path / "exported", budget=budget)
    runtime = load(folder)
    assert runtime.manifest["scout"] == "value" and runtime.manifest["scout_type"] == "mean_scout"
    report = check_export(model, folder, store)  # the runtime runs the same encoders on the same rows
    assert [line["budget"] for line in report] == [None, "0%", "25%", "50%", "100%", "mean", "per row"]
    rows = runtime.read(store.path).take(val)
    got = runtime.predict(rows.inputs, "mean", lengths=rows.lengths)
    assert np.isclose(got.cost.mean(), spent)


def test_a_scout_is_chosen_by_name_and_its_options_are_checked(mean_scout):
    model = fusionkit.build_model(scout_spec())
    assert isinstance(model.scout, mean_scout) and model.scout.net[0].out_features == 8
    with pytest.raises(SpecError, match=r"conditional.scout.hidden: must be > 0"):
        fusionkit.load_spec({**scout_spec(), "conditional": {"scout": {"type": "mean_scout", "hidden": 0}}})
    with pytest.raises(SpecError, match=r"conditional.scout.type: .*'nope'"):
        fusionkit.load_spec({**scout_spec(), "conditional": {"scout": "nope"}})


def test_a_scout_that_breaks_the_contract_is_refused_naming_its_plugin():
    from fusionkit.interfaces import ScoutConfig

    class NotAScout(torch.nn.Module):
        def __init__(self, config, context):
            super().__init__()

    class Broken:
        @fusionkit.hookimpl
        def register_scouts(self, register):
            register("broken_scout", NotAScout, config=ScoutConfig, description="Not a Scout subclass.")

    fusionkit.register_plugin(Broken(), "broken-scout-test")
    with pytest.raises(SpecError, match=r"conditional.scout.type: scout 'broken_scout' .* must register a subclass "
                                        r"of fusionkit.interfaces.Scout"):
        fusionkit.load_spec(scout_spec("broken_scout"))


OLD = Path(__file__).resolve().parent / "data"


@pytest.mark.parametrize("scout", ["gate", "value"])
def test_an_export_made_before_the_layout_step_runs_unchanged(scout):
    """tests/data/export-0.2.0 was written by fusionkit 0.2.0 before this layout (its expected.json records what
    that runtime answered); today's runtime answers the same."""
    expected = json.loads((OLD / "export-0.2.0" / "expected.json").read_text())
    runtime = load(OLD / "export-0.2.0" / scout)
    inputs = {name: np.asarray(value, dtype=np.float32) for name, value in expected["rows"].items()}
    for given, old in expected[scout].items():
        got = runtime.predict(inputs, None if given == "None" else given)
        assert np.array_equal(got.ran, np.asarray(old["ran"])), given
        assert np.allclose(got.probs, np.asarray(old["probs"]), atol=1e-6), given
        assert got.answers == old["answers"], given


def test_a_checkpoint_made_before_the_layout_step_loads_and_predicts_as_its_export():
    """A 0.2.0 value scout's checkpoint (its weights under value_head.*, its spec with `scout: value`) loads, and
    predicts as its 0.2.0 export did."""
    model = load_model(OLD / "checkpoint-0.2.0-value")
    assert type(model.scout).__name__ == "ValueScout" and model.spec.conditional.scout.type == "value"
    expected = json.loads((OLD / "export-0.2.0" / "expected.json").read_text())
    inputs = {name: torch.tensor(value) for name, value in expected["rows"].items()}
    with torch.no_grad():
        out = model(inputs)
    assert np.array_equal(out.ran.numpy(), np.asarray(expected["value"]["None"]["ran"]))
    assert np.allclose(out.probs.numpy(), np.asarray(expected["value"]["None"]["probs"]), atol=1e-4)
