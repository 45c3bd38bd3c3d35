"""The controls of an accuracy-compute curve (fusionkit.evaluation.controls): static choices and their frontier,
random rows at the scout's rates, the confidence cascade, and the verdict the command line prints."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import tiny_spec

from fusionkit.cli import main
from fusionkit.errors import FusionkitError
from fusionkit.evaluation.controls import (
    cascade,
    curve_controls,
    frontier_at,
    random_rows,
    static_choices,
    static_frontier,
)
from fusionkit.evaluation.curves import budget_curve
from fusionkit.inference import collect_outputs
from fusionkit.models.factory import build_model
from fusionkit.training.train import make_split, train


def demand_spec(**train_options):
    spec = tiny_spec(**train_options)
    spec["encoders"][1].update(run="on_demand", cost_gflops=1.0)
    spec["encoders"][2].update(run="on_demand", cost_gflops=3.0)
    return spec


@pytest.fixture(scope="module")
def trained(synthetic_store, tmp_path_factory):
    from fusionkit.data.store import open_store
    from fusionkit.models.factory import load_model

    run = tmp_path_factory.mktemp("controls") / "run"
    train(demand_spec(epochs=3), synthetic_store, run, fold=0, progress=False)
    store = open_store(synthetic_store)
    split = make_split(store, 0)
    return load_model(run / "best"), store, split, run


def test_a_static_choice_equals_the_model_that_runs_exactly_those_encoders():
    model = build_model(demand_spec()).eval()
    g = torch.Generator().manual_seed(0)
    inputs = {f"enc{k}": torch.randn(12, 8, generator=g) for k in range(3)}
    for chosen in ([], [0], [1], [0, 1]):
        runs = torch.zeros(12, 2, dtype=torch.bool)
        runs[:, chosen] = True
        mask = torch.ones(12, 3, dtype=torch.bool)
        mask[:, [1 + j for j in range(2) if j not in chosen]] = False
        with torch.no_grad():
            static = model(inputs, runs=runs)
            exact = model(inputs, mask=mask, everything=True)
        assert torch.allclose(static.probs, exact.probs, atol=1e-6)
        assert static.ran[:, 1:].tolist() == runs.tolist()
        assert torch.allclose(static.cost, torch.full((12,), float(sum((1.0, 3.0)[j] for j in chosen)),
                                                      dtype=static.cost.dtype))


def test_static_choices_cover_every_subset_and_the_frontier_is_their_upper_hull(trained):
    model, store, split, _ = trained
    points = static_choices(model, store, split.test)
    assert sorted(tuple(p["encoders"]) for p in points) == [(), ("enc1",), ("enc1", "enc2"), ("enc2",)]
    assert {p["mean_gflops"] for p in points} == {0.0, 1.0, 3.0, 4.0}
    frontier = static_frontier(points)
    for p in points:  # no static choice lies above its frontier
        assert p["score"] <= frontier_at(frontier, p["mean_gflops"]) + 1e-12


def test_the_frontier_mixes_choices_and_never_falls():
    points = [{"mean_gflops": 0.0, "score": 0.2}, {"mean_gflops": 1.0, "score": 0.3},
              {"mean_gflops": 2.0, "score": 0.7}, {"mean_gflops": 3.0, "score": 0.6}, {"mean_gflops": 4.0, "score": 0.65}]
    frontier = static_frontier(points)
    assert [p["mean_gflops"] for p in frontier] == [0.0, 2.0]  # (1, 0.3) lies below the mix of 0 and 2
    assert frontier_at(frontier, 1.0) == pytest.approx(0.45)
    assert frontier_at(frontier, 3.5) == pytest.approx(0.7)  # a budget may be left unspent
    assert np.isnan(frontier_at(frontier, -1.0))


def test_random_rows_meet_the_rates_exactly(trained):
    model, store, split, _ = trained
    point = random_rows(model, store, split.test, {"enc1": 0.5, "enc2": 0.25}, seed=3)
    n = len(split.test)
    assert point["run_rate"] == {"enc1": round(0.5 * n) / n, "enc2": round(0.25 * n) / n}
    assert point["mean_gflops"] == pytest.approx((round(0.5 * n) * 1.0 + round(0.25 * n) * 3.0) / n)
    with pytest.raises(FusionkitError, match="shares in \\[0, 1\\]"):
        random_rows(model, store, split.test, {"enc1": 1.5})
    with pytest.raises(FusionkitError, match="shares in \\[0, 1\\]"):
        random_rows(model, store, split.test, {"enc0": 0.5})


def test_the_cascade_adds_encoders_in_cost_order_within_its_validation_budget(trained):
    model, store, split, _ = trained
    steps = cascade(model, store, split.test, split.val, [0.0, 0.5, 2.0, 4.0])
    assert steps[-1]["mean_gflops"] == 4.0  # the full budget: every row goes on to the last stage
    assert steps[0]["mean_gflops"] <= 1.0  # fitted to spend nothing on the validation rows; test rows land near
    assert all(a["mean_gflops"] <= b["mean_gflops"] + 1e-9 for a, b in zip(steps, steps[1:]))
    on_val = cascade(model, store, split.val, split.val, [0.5, 2.0])  # fitted and scored on the same rows
    assert on_val[0]["mean_gflops"] <= 0.5 + 1e-9 and on_val[1]["mean_gflops"] <= 2.0 + 1e-9
    assert on_val[0]["run_rate"]["enc2"] <= on_val[0]["run_rate"]["enc1"]  # the cheaper encoder comes first


def test_runs_are_checked():
    model = build_model(demand_spec()).eval()
    inputs = {f"enc{k}": torch.randn(4, 8) for k in range(3)}
    with pytest.raises(FusionkitError, match=r"runs: expected \[4, 2\]"):
        model(inputs, runs=torch.ones(4, 3, dtype=torch.bool))
    with pytest.raises(FusionkitError, match="without a budget"):
        model(inputs, runs=torch.ones(4, 2, dtype=torch.bool), budget="50%")
    with pytest.raises(FusionkitError, match="model with on-demand encoders"):
        build_model(tiny_spec())(inputs, runs=torch.ones(4, 0, dtype=torch.bool))


def test_the_controls_sit_beside_the_scouts_curve_with_a_verdict(trained):
    model, store, split, _ = trained
    points = budget_curve(model, store, split.test, kind="cap")
    controls = curve_controls(model, store, split.test, split.val, points)
    assert len(controls["random"]) == len(controls["cascade"]) == len(points)
    for p, r in zip(points, controls["random"]):  # random rows run each encoder as often as the scout did
        n = len(split.test)
        assert all(abs(r["run_rate"][k] - v) <= 0.5 / n + 1e-12 for k, v in p["run_rate"].items() if k != "enc0")
    margins = controls["verdict"]["margins"]
    assert [m["budget_share"] for m in margins] == [p["budget_share"] for p in points]
    full = collect_outputs(model, store, split.test, budget="100%")
    assert points[-1]["mean_gflops"] == pytest.approx(float(np.mean(full["cost"])))
    assert isinstance(controls["verdict"]["summary"], str)


def test_the_command_line_writes_and_reports_the_controls(trained, synthetic_store, capsys):
    _, _, _, run = trained
    assert main(["evaluate", str(run), "--data", str(synthetic_store), "--budget-curve"]) == 0
    out = capsys.readouterr().out
    assert "static" in out and "random" in out and "cascade" in out and "middle budget" in out
    curve = json.loads((run / "budget_curve_test.json").read_text())
    for key in ("static", "random", "cascade"):
        assert curve[key] and all({"mean_gflops", "score"} <= set(p) for p in curve[key])
    assert curve["frontier"] and isinstance(curve["verdict"]["pays"], bool)
    assert curve["kind"] == "mean" and {p["kind"] for p in curve["points"]} == {"mean"}  # the default: mean budgets
    assert all(isinstance(p["threshold"], float) for p in curve["points"]) and "cap_points" not in curve
    assert main(["report", str(run)]) == 0
    assert "Per-sample selection:" in (run / "report" / "summary.md").read_text()
    assert main(["evaluate", str(run), "--data", str(synthetic_store), "--budget-curve", "both"]) == 0
    curve = json.loads((run / "budget_curve_test.json").read_text())
    assert curve["kind"] == "mean" and {p["kind"] for p in curve["cap_points"]} == {"cap"}
    assert len(curve["cap_points"]) == len(curve["points"]) == len(curve["verdict"]["margins"])
    assert "at mean budgets:" in capsys.readouterr().out
    assert main(["report", str(run)]) == 0 and (run / "report" / "budget_curve_test.png").stat().st_size > 0
    with pytest.raises(SystemExit) as refused:  # argparse names the choices
        main(["evaluate", str(run), "--data", str(synthetic_store), "--budget-curve", "caps"])
    assert refused.value.code == 2 and "invalid choice: 'caps' (choose from 'mean', 'cap', 'both')" in \
        capsys.readouterr().err


def test_a_mean_budget_curve_meets_its_budgets_on_the_rows_it_was_fitted_on(trained):
    """Each point of a curve at mean budgets spends at most its share of the full cost on average over the
    validation rows its threshold was fitted on; caps spend at most their share on every row."""
    model, store, split, _ = trained
    full = float(sum(c or 0.0 for c in model.encoder_costs().values()))
    points = budget_curve(model, store, split.val, val_index=split.val)
    assert [p["kind"] for p in points] == ["mean"] * len(points)
    for p in points:
        assert p["mean_gflops"] <= p["budget_share"] * full + 1e-9
    for p in budget_curve(model, store, split.val, kind="cap"):
        assert p["mean_gflops"] <= p["budget_share"] * full + 1e-9
    with pytest.raises(FusionkitError, match="give val_index"):
        budget_curve(model, store, split.test)
    with pytest.raises(FusionkitError, match="kind 'median': expected one of mean, cap"):
        budget_curve(model, store, split.test, kind="median")


def test_compute_counts_the_on_demand_runs_the_gate_did_not_keep(trained):
    """The controls may run what the gate's top-n cannot keep (every static choice runs its encoders on every row):
    compute counts those runs; under the scout's own choices none is unused (tests/test_conditional.py)."""
    from fusionkit.training.tasks import compute_summary

    model, store, split, _ = trained
    runs = np.ones((len(split.test), 2), dtype=bool)  # both on-demand encoders on every row, top_n 2 of 3
    outputs = collect_outputs(model, store, split.test, runs=runs)
    summary = compute_summary(model, outputs)
    ran, kept = outputs["ran"], outputs["kept"]
    for k, name in ((1, "enc1"), (2, "enc2")):
        wasted = ran[:, k].astype(bool) & ~(kept == k).any(axis=1)
        assert summary["unused_run_rate"][name] == pytest.approx(wasted.sum() / max(ran[:, k].sum(), 1))
    wasted = sum((runs[:, j] & ~(kept == k).any(axis=1)).sum() for j, k in enumerate((1, 2)))
    assert summary["unused_runs"] == pytest.approx(wasted / runs.sum())
    assert summary["unused_runs"] == 0.0  # the two that ran take the two slots: what runs is fused
    assert compute_summary(model, collect_outputs(model, store, split.test, budget="100%"))["unused_runs"] == 0.0


def test_the_known_corruption_control_runs_exactly_the_clean_rows(trained, tmp_path, monkeypatch):
    """Where the store records which samples' inputs were corrupted, the control runs each on-demand encoder only on
    the rows whose input of it is clean (and its cheaper variants: the k cheapest clean per row), and the curve's
    controls and verdict carry it."""
    import shutil

    import fusionkit.evaluation.controls as controls
    from fusionkit.data.store import open_store
    from fusionkit.evaluation.controls import known_corruption

    model, store, split, _ = trained
    assert known_corruption(model, store, split.test) == []  # nothing recorded: nothing to know
    copy = tmp_path / "store"
    shutil.copytree(store.path, copy)
    index = json.loads((copy / "index.json").read_text())
    rng = np.random.default_rng(0)
    for sample in index["samples"]:
        sample["corrupted"] = [n for n in ("enc0", "enc1", "enc2") if rng.random() < 0.4]
    (copy / "index.json").write_text(json.dumps(index))
    corrupt = open_store(copy)
    seen = []
    real = controls.collect_outputs
    monkeypatch.setattr(controls, "collect_outputs", lambda *a, runs=None, **k: seen.append(runs) or
                        real(*a, runs=runs, **k))
    points = known_corruption(model, corrupt, split.test)
    clean = np.array([[n not in corrupt.samples[i].corrupted for n in ("enc1", "enc2")] for i in split.test])
    assert [p["max_views"] for p in points] == [0, 1, 2] and points[-1]["rule"] == "clean"
    assert not seen[0].any() and np.array_equal(seen[2], clean)  # every clean view, and only those
    cheap = clean[:, 0] | (~clean[:, 0] & clean[:, 1])  # at most one: enc1 (1 GFLOP) where clean, else enc2
    assert np.array_equal(seen[1].sum(1), cheap.astype(int)) and not (seen[1] & ~clean).any()
    assert seen[1][clean[:, 0], 0].all()
    assert points[-1]["run_rate"] == {"enc1": pytest.approx(clean[:, 0].mean()),
                                      "enc2": pytest.approx(clean[:, 1].mean())}
    monkeypatch.setattr(controls, "collect_outputs", real)
    curve = curve_controls(model, corrupt, split.test, split.val, budget_curve(model, corrupt, split.test,
                                                                                 val_index=split.val))
    assert curve["known"] and curve["known_frontier"] and "under_known" in curve["verdict"]["margins"][0]
    assert "the rule that knows which inputs are corrupted" in curve["verdict"]["summary"]
