"""Per-sample selection: the value scout (conditional.scout: value), its stages and its target, and the rule that
what runs is fused (an on-demand encoder that could not enter a sample's top-n never runs)."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_spec
from test_conditional import halves_spec, halves_store  # noqa: F401 - the store is a fixture

from fusionkit.conditional.selection import select_top_n, select_top_p
from fusionkit.errors import FusionkitError
from fusionkit.inference import collect_outputs, fit_mean_budget
from fusionkit.models.factory import build_model, load_model
from fusionkit.training.losses import row_losses, training_loss
from fusionkit.training.tasks import compute_summary
from fusionkit.training.train import make_split, train


def value_spec(top_n=3, **conditional):
    spec = tiny_spec()
    spec["gate"].update(top_n=top_n, noise=0.0, warmup_epochs=0)
    spec["projector"] = {"dropout": 0.0}
    spec["heads"] = {role: {"type": role, "dropout": 0.0} for role in ("presence", "salience")}
    spec["encoders"][1].update(run="on_demand", cost_gflops=1.0)
    spec["encoders"][2].update(run="on_demand", cost_gflops=3.0)
    spec["conditional"] = {"scout": "value", **conditional}
    return spec


def batch(n=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {f"enc{k}": torch.randn(n, 8, generator=g) for k in range(3)}


def test_the_value_target_is_computed_on_the_rows_where_everything_ran():
    """On the scout's rows (every on-demand token computed), the state is what the row's sampled budget ran; the
    drop of the row's loss when each encoder it could add joins is what the value head learns, both fusions made as
    at inference (dropout and gate noise reach neither)."""
    torch.manual_seed(0)
    spec = value_spec(scout_rows=0.5, full_budget_weight=0.0)
    spec["heads"] = {role: {"type": role, "dropout": 0.5} for role in ("presence", "salience")}
    spec["gate"]["noise"] = 0.5
    model = build_model(spec).train()
    x = batch(64)
    out = model(x)
    rows = out.scout_rows
    r = int(rows.sum())
    assert 0 < r < 64 and out.value_predicted.shape == (r, 2) and out.computed[rows].all()
    state = out.ran[rows]
    assert torch.equal(out.value_addable, ~state[:, 1:]) and out.value_addable.any() and state[:, 1:].any()
    rows_x = {name: value[rows] for name, value in x.items()}
    model.eval()
    with torch.no_grad():
        references = [model(rows_x, mask=state, everything=True)]
        for k in (1, 2):
            added = state.clone()
            added[:, k] = True
            references.append(model(rows_x, mask=added, everything=True))
    model.train()
    for role, logits in out.value_logits.items():
        assert not logits.requires_grad
        for j, reference in enumerate(references):
            torch.testing.assert_close(logits[j], reference.logits[role], rtol=1e-5, atol=1e-5)
    target = torch.softmax(torch.randn(64, 6), dim=1)
    loss, parts = training_loss(model, out, target)
    losses = torch.stack([row_losses(ref.logits, target[rows], model.spec.train) for ref in references])
    drop = (losses[:1] - losses[1:]).T
    expected = ((out.value_predicted - drop)[out.value_addable] ** 2).mean()
    assert parts["scout"] == pytest.approx(float(expected.detach()), rel=1e-4) and parts["scout"] > 0
    loss.backward()
    assert model.scout.net[0].weight.grad.abs().sum() > 0


class _Scripted(torch.nn.Module):
    """A value head with known answers: enc1 first for every row; then enc2 only for the rows whose enc1 token is
    positive in its first dimension (it reads the token the first stage computed)."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def forward(self, tokens, present, ran):
        self.seen.append((tokens.clone(), ran.clone()))
        after = torch.where(tokens[:, 1, 0] > 0, 1.0, -1.0)
        first = torch.stack([torch.full_like(after, 1.0), torch.full_like(after, 0.5)], dim=1)
        second = torch.stack([torch.full_like(after, -1.0), after], dim=1)
        return torch.where(ran[:, :1], second, first)


def test_the_stages_gather_and_scatter_and_rescore_with_the_tokens_that_ran():
    torch.manual_seed(0)
    model = build_model(value_spec()).eval()
    model.scout = _Scripted()
    seen = {"enc1": [], "enc2": []}
    for name in seen:
        model.encoders[name].register_forward_hook(lambda m, args, out, name=name: seen[name].append(len(args[0])))
    x = batch(16)
    out = model(x)  # the gate's own rule: run while the predicted value is positive
    tokens_1 = model.projectors["enc1"](model.encoders["enc1"](x["enc1"]))
    wants_2 = tokens_1[:, 0] > 0
    assert 0 < int(wants_2.sum()) < 16
    assert out.ran[:, 1].all() and torch.equal(out.ran[:, 2], wants_2)
    assert seen["enc1"] == [16, 16] and seen["enc2"] == [int(wants_2.sum())]  # the last enc1 call: the test's own
    stage_2_tokens, stage_2_ran = model.scout.seen[1]
    assert stage_2_ran[:, 0].all() and torch.allclose(stage_2_tokens[:, 1], tokens_1, atol=1e-6)
    assert (stage_2_tokens[:, 2] == 0).all()  # enc2 had not run when it was re-scored
    reference = model(x, mask=out.ran, everything=True)
    torch.testing.assert_close(out.probs, reference.probs, rtol=1e-5, atol=1e-6)
    capped = model(x, budget=2.0)  # 2 GFLOPs: enc1 fits, enc2 (3) never does
    assert capped.ran[:, 1].all() and not capped.ran[:, 2].any()


@pytest.mark.parametrize("budget", [None, "0%", "40%", "100%"])
def test_a_value_scouts_outputs_equal_running_what_it_chose(budget):
    torch.manual_seed(0)
    model = build_model(value_spec()).eval()
    x = batch(32)
    out = model(x, budget=budget)
    reference = model(x, mask=out.ran, everything=True)
    torch.testing.assert_close(out.probs, reference.probs, rtol=1e-5, atol=1e-6)
    if budget is not None:
        assert (out.cost <= {"0%": 0.0, "40%": 1.6, "100%": 4.0}[budget] + 1e-9).all()


@pytest.mark.parametrize("top_n", [1, 2])
@pytest.mark.parametrize("scout", ["gate", "value"])
def test_what_runs_is_fused_at_every_budget(synthetic_store, tmp_path, top_n, scout):
    """With fewer slots than encoders, a run on-demand encoder always takes a slot, and a budget runs only the
    encoders that could enter a sample's top-n: no run is left unused."""
    spec = value_spec(top_n=top_n) if scout == "value" else tiny_spec()
    if scout == "gate":
        spec["gate"]["top_n"] = top_n
        spec["encoders"][1].update(run="on_demand", cost_gflops=1.0)
        spec["encoders"][2].update(run="on_demand", cost_gflops=3.0)
    spec["train"]["epochs"] = 2
    train(spec, synthetic_store, tmp_path / "run", fold=0, progress=False)
    model = load_model(tmp_path / "run" / "best")
    from fusionkit.data.store import open_store

    store = open_store(synthetic_store)
    split = make_split(store, 0)
    budgets = [None, "0%", "30%", "100%", fit_mean_budget(model, store, split.val, "mean:50%")]
    for budget in budgets:
        outputs = collect_outputs(model, store, split.test, budget=budget)
        summary = compute_summary(model, outputs)
        assert summary["unused_runs"] == 0.0, budget
        assert (outputs["ran"][:, 1:].sum(1) <= top_n).all()


def test_first_encoders_take_the_slots_in_the_order_of_their_scores():
    scores = torch.tensor([[4.0, 3.0, 2.0, 1.0], [1.0, 2.0, 3.0, 4.0]])
    first = torch.tensor([[False, False, True, True], [False, False, False, False]])
    kept = select_top_n(scores, None, 2, first=first).kept
    assert kept.tolist() == [[2, 3], [3, 2]]
    three = select_top_n(scores, None, 3, first=first).kept
    assert three.tolist() == [[0, 2, 3], [3, 2, 1]]  # the first ones, then the best other; by score
    unavailable = torch.tensor([[True, True, False, True], [True] * 4])
    assert select_top_n(scores, unavailable, 2, first=first).kept.tolist() == [[0, 3], [3, 2]]
    top_p = select_top_p(torch.tensor([[9.0, 0.0, 0.0]]), None, 0.5, 1, 3, first=torch.tensor([[False, False, True]]))
    assert set(top_p.kept[0][top_p.kept[0] >= 0].tolist()) == {0, 2}  # kept beyond the prefix that p asks


def test_the_value_scout_learns_which_encoder_each_sample_needs(halves_store, tmp_path):  # noqa: F811
    from fusionkit.data.open import spec_store

    root, up = halves_store
    spec = halves_spec()
    spec["gate"]["top_n"] = 3
    spec["conditional"] = {"scout": "value"}
    train(spec, root, tmp_path / "run", fold=0, progress=False)
    model = load_model(tmp_path / "run" / "best")
    store = spec_store(model.spec, root)
    split = make_split(store, 0)
    mean = fit_mean_budget(model, store, split.val, "mean:50%")  # one of the two encoders per sample on average
    assert collect_outputs(model, store, split.val, budget=mean)["cost"].mean() <= 1.0 + 1e-9  # exact on its rows
    one = collect_outputs(model, store, split.test, budget=mean)
    ran_a, ran_b = one["ran"][:, 1].astype(bool), one["ran"][:, 2].astype(bool)
    assert 0.25 < ran_a.mean() < 0.75 and 0.25 < ran_b.mean() < 0.75
    assert (ran_a == up[split.test]).mean() > 0.8 and (ran_b == ~up[split.test]).mean() > 0.8


@pytest.mark.parametrize(("conditional", "message"), [
    ({"scout": "values"}, "conditional.scout"),
    ({"scout": "value", "value_hidden": 0}, "conditional.value_hidden"),
])
def test_the_scouts_options_reject_bad_values(conditional, message):
    spec = value_spec()
    spec["conditional"] = conditional
    with pytest.raises(FusionkitError, match=message):
        build_model(spec)


def test_value_path_needs_the_value_scout():
    with pytest.raises(FusionkitError, match="gate"):
        build_model({**tiny_spec(), "encoders": value_spec()["encoders"]}).value_path(batch(), None, None)
    keys, costs = build_model(value_spec()).eval().value_path(batch(), None, None)
    assert torch.isfinite(keys[:, 0]).all() and set(costs[:, 0].tolist()) <= {1.0, 3.0}


def test_a_value_scout_exports_and_the_runtime_decides_in_the_same_stages(synthetic_store, tmp_path):
    from fusionkit.data.store import open_store
    from fusionkit.export.check import check_export
    from fusionkit.export.graphs import export_model
    from fusionkit.runtime import load

    spec = value_spec()
    spec["train"]["epochs"] = 2
    train(spec, synthetic_store, tmp_path / "run", fold=0, progress=False)
    model = load_model(tmp_path / "run" / "best")
    store = open_store(synthetic_store)
    budget = fit_mean_budget(model, store, make_split(store, 0).val, "mean:40%")
    folder = export_model(model, tmp_path / "exported", budget=budget)
    manifest = load(folder).manifest
    assert manifest["scout"] == "value" and "value.onnx" in manifest["sha256"] and "scout.onnx" not in manifest["sha256"]
    report = check_export(model, folder, store)
    assert [line["budget"] for line in report] == [None, "0%", "25%", "50%", "100%", "mean", "per row"]
    assert 0.0 < report[-1]["mean_gflops"] < 4.0  # the mean budget runs some encoders on some rows
