"""Conditional execution (fusionkit.conditional.rules): on-demand encoders scored by the gate before they run, run
on the rows that keep them, within a compute budget; costs per encoder; the scout's training."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from conftest import tiny_spec

from fusionkit.cli import main
from fusionkit.conditional.budget import Budget
from fusionkit.conditional.rules import within_budget
from fusionkit.errors import DataError, FusionkitError, SpecError
from fusionkit.models.factory import build_model, load_model
from fusionkit.spec import load_spec


def demand_spec(gate="attention", top_n=2, **train):
    """Three encoders, enc1 (1 GFLOP) and enc2 (3 GFLOPs) on demand; ``top_n`` 3 keeps every encoder that runs."""
    spec = tiny_spec(**train)
    spec["gate"]["top_n"] = top_n
    spec["encoders"][1].update(run="on_demand", cost_gflops=1.0)
    spec["encoders"][2].update(run="on_demand", cost_gflops=3.0)
    spec["gate"]["type"] = gate
    if gate != "attention":
        spec["gate"].pop("heads")
    return spec


def batch(n=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {f"enc{k}": torch.randn(n, 8, generator=g) for k in range(3)}


@pytest.mark.parametrize("gate", ["attention", "static"])
@pytest.mark.parametrize("budget", [None, "0%", "30%", 1.0, 3.5, "100%"])
def test_outputs_equal_running_every_encoder_and_masking_the_rows_not_kept(gate, budget):
    torch.manual_seed(0)
    model = build_model(demand_spec(gate)).eval()
    x = batch()
    mask = torch.ones(16, 3, dtype=torch.bool)
    mask[3, 2] = mask[5, 0] = False  # missing encoders stay missing
    out = model(x, mask=mask, budget=budget)
    reference = model(x, mask=out.ran, everything=True)
    torch.testing.assert_close(out.probs, reference.probs, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.kept, reference.kept)
    assert not (out.ran & ~mask).any()
    assert out.ran[:, 0].equal(mask[:, 0])  # the always-run encoder ran wherever it is present


def test_an_on_demand_encoder_runs_once_on_the_rows_that_keep_it():
    model = build_model(demand_spec()).eval()
    seen = {name: [] for name in ("enc0", "enc1", "enc2")}
    for name, encoder in model.encoders.items():
        encoder.register_forward_hook(lambda m, args, out, name=name: seen[name].append(len(args[0])))
    out = model(batch(), budget="40%")
    assert seen["enc0"] == [16]
    for k, name in ((1, "enc1"), (2, "enc2")):
        assert sum(seen[name]) == int(out.ran[:, k].sum()) and len(seen[name]) <= 1


def test_a_budget_caps_every_samples_cost_in_the_scouts_order():
    model = build_model(demand_spec(top_n=3)).eval()
    x = batch(64)
    spent = {}
    for budget in ("0%", "25%", "50%", "75%", "100%", 0.5, 2.0):
        out = model(x, budget=budget)
        limit = Budget.parse(budget).limit(4.0)
        assert (out.cost <= limit + 1e-9).all(), budget
        spent[budget] = float(out.cost.mean())
    assert spent["0%"] == 0.0 and spent["100%"] == 4.0
    assert spent["0%"] <= spent["25%"] <= spent["50%"] <= spent["75%"] <= spent["100%"]
    scores = torch.tensor([[0.1, 0.9], [0.9, 0.1]])
    run = within_budget(scores, torch.ones(2, 2, dtype=torch.bool), torch.tensor([1.0, 3.0], dtype=torch.float64),
                        torch.tensor([3.0, 3.0], dtype=torch.float64))
    assert run.tolist() == [[False, True], [True, False]]  # row 0: the dear one first, then nothing else fits


def test_a_mean_budgets_threshold_is_the_lowest_that_meets_it():
    from fusionkit.conditional.rules import fit_threshold

    values = torch.tensor([[0.9, 0.1], [0.6, 0.5], [0.2, 0.8], [0.4, float("-inf")]])
    costs, paid = torch.tensor([1.0, 1.0]), torch.zeros(4)
    for target, expected_runs in ((0.0, 0), (0.5, 2), (1.0, 4), (1.75, 7), (5.0, 7)):
        threshold = fit_threshold(values, costs, paid, target)
        runs = int((values >= threshold).sum())
        assert runs == expected_runs and runs / 4 <= target + 1e-9
    assert fit_threshold(values, costs, torch.full((4,), 2.0), 1.0) == float("inf")  # the always-run part alone is over
    assert Budget.parse("mean:40%") == Budget(share=0.4, mean=True)


@pytest.mark.parametrize(("text", "message"), [("-1", "expected GFLOPs >= 0"), ("150%", "from 0% to 100%"),
                                               ("abc", "expected GFLOPs per sample"), ("nan", "expected GFLOPs")])
def test_a_bad_budget_is_a_clear_error(text, message):
    with pytest.raises(FusionkitError, match=message):
        Budget.parse(text)


@pytest.mark.parametrize(("change", "message"), [
    (lambda s: [e.update(run="on_demand", cost_gflops=1.0) for e in s["encoders"]], r"every encoder is on_demand"),
    (lambda s: s["gate"].update(type="mlp") or s["gate"].pop("heads"), r"gate.type: gate 'mlp' cannot score an encoder "
                                                                       "before it runs"),
    (lambda s: s["gate"].update(type="uniform") or s["gate"].pop("heads"), r"gate 'uniform' cannot score"),
    (lambda s: s["encoders"][1].update(run="sometimes"), r"encoders\[1\].run: expected one of 'always', 'on_demand'"),
    (lambda s: s["encoders"][1].update(cost_gflops=-2), r"encoders\[1\].cost_gflops: must be >= 0"),
])
def test_specs_that_cannot_run_on_demand_are_refused(change, message, tmp_path, capsys):
    spec = demand_spec()
    change(spec)
    with pytest.raises(SpecError, match=message):
        load_spec(spec)
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(spec))
    assert main(["spec", "validate", str(tmp_path / "spec.yaml")]) == 1
    assert "INVALID" in capsys.readouterr().err


def test_conditional_options_without_an_on_demand_encoder_are_refused():
    with pytest.raises(SpecError, match="conditional: configures on-demand encoders, but no encoder"):
        load_spec({**tiny_spec(), "conditional": {"scout_rows": 0.5}})


def test_todays_specs_write_and_load_as_before(tmp_path):
    spec = load_spec(tiny_spec())
    data = spec.to_dict()
    assert "conditional" not in data and all("run" not in e and "cost_gflops" not in e for e in data["encoders"])
    model = build_model(tiny_spec())
    model.save_pretrained(str(tmp_path / "ckpt"))
    assert "on_demand" not in (tmp_path / "ckpt" / "spec.yaml").read_text()
    again = load_model(tmp_path / "ckpt")
    x = batch()
    torch.testing.assert_close(model.eval()(x).probs, again.eval()(x).probs)
    assert again(x).ran is None and again(x).cost is None


def test_a_checkpoint_keeps_its_run_modes_and_costs(tmp_path):
    model = build_model(demand_spec())
    model.save_pretrained(str(tmp_path / "ckpt"))
    again = load_model(tmp_path / "ckpt")
    assert again.spec.on_demand == ("enc1", "enc2") and again.encoder_costs() == {"enc0": 0.0, "enc1": 1.0, "enc2": 3.0}


@pytest.mark.parametrize("share", [0.0, 0.5, 1.0])
def test_budget_sampling_gives_a_share_of_the_training_rows_the_full_budget(share):
    """conditional.full_budget_rows: that share of a training batch runs every on-demand encoder (the 100% case);
    the rest keep a random share of their cost, so some rows run fewer."""
    spec = demand_spec(top_n=3)
    spec["conditional"] = {"full_budget_rows": share, "scout_rows": 0.0, "scout_weight": 0.0}
    torch.manual_seed(0)
    model = build_model(spec).train()
    ran = model(batch(n=400)).ran[:, 1:]
    every = ran.all(1).float().mean().item()
    assert every >= share - 0.1 and (every < 0.9 if share < 1 else every == 1.0)


def test_the_full_budget_pass_fuses_the_scout_rows_with_every_token_and_adds_their_label_loss():
    """conditional.full_budget_weight (the sandwich rule): beside the budget-sampled pass, the scout's rows are fused
    with every token they computed; their logits equal a forward that runs everything, and their label loss is
    one more term of the training loss, reaching the heads."""
    from fusionkit.training.losses import label_losses, training_loss

    spec = demand_spec()
    spec["gate"].update(noise=0.0)
    spec["projector"] = {"dropout": 0.0}
    spec["heads"] = {role: {"type": role, "dropout": 0.0} for role in ("presence", "salience")}
    spec["conditional"] = {"full_budget_weight": 0.5, "scout_rows": 0.5}
    torch.manual_seed(0)
    model = build_model(spec).train()
    x = batch(n=64)
    torch.manual_seed(1)
    out = model(x)
    rows = out.scout_rows
    assert 0 < int(rows.sum()) < 64 and out.full_logits["salience"].shape == (int(rows.sum()), 6)
    everything = model(x, everything=True)
    for role, logits in out.full_logits.items():
        torch.testing.assert_close(logits, everything.logits[role][rows], rtol=1e-5, atol=1e-5)
        assert not torch.allclose(out.logits[role][rows], logits)  # the sampled pass left some encoders out
    target = torch.softmax(torch.randn(64, 6), dim=1)
    loss, parts = training_loss(model, out, target)
    expected = 0.5 / 1.5 * sum(label_losses(out.full_logits, target[rows], model.spec.train).values())
    assert parts["full_budget"] == pytest.approx(float(expected), rel=1e-5)  # the passes averaged, weights 1 and 0.5
    sampled = label_losses(out.logits, target, model.spec.train)
    assert parts["salience_kl"] == pytest.approx(float(sampled["salience_kl"]) / 1.5, rel=1e-5)
    loss.backward()
    assert model.heads["salience"].net[-1].weight.grad.abs().sum() > 0
    model.eval()
    assert model(x).full_logits is None  # inference runs one pass
    off = build_model({**demand_spec(), "conditional": {"full_budget_weight": 0.0}}).train()
    assert build_model(demand_spec()).spec.conditional.full_budget_weight == 3.0  # on by default
    assert off(x).full_logits is None and "full_budget" not in training_loss(off, off(x), target)[1]


@pytest.fixture(scope="module")
def halves_store(tmp_path_factory):
    """Encoder a shows the class on the samples whose flag (the always-run encoder) is up, b on the others; each is
    noise elsewhere. A scout that learned something runs a where the flag is up and b where it is down."""
    import numpy as np

    from fusionkit.data.store import Sample, write_store
    from fusionkit.spec import BLEMORE_LABELS

    rng = np.random.default_rng(0)
    n, labels = 600, list(BLEMORE_LABELS)
    protos = rng.normal(size=(len(labels), 8)) * 2
    y = rng.integers(len(labels), size=n)
    up = rng.random(n) < 0.5
    flag = np.where(up[:, None], 1.0, -1.0) * np.ones((n, 4)) + 0.1 * rng.normal(size=(n, 4))
    a = np.where(up[:, None], protos[y], 0) + rng.normal(size=(n, 8)) * np.where(up[:, None], 0.3, 2.0)
    b = np.where(~up[:, None], protos[y], 0) + rng.normal(size=(n, 8)) * np.where(~up[:, None], 0.3, 2.0)
    samples = [Sample(id=f"s{i}", labels=[{"emotion": labels[y[i]], "salience": 100.0}], group=f"g{i % 20}",
                      fold=(i % 20) % 5) for i in range(n)]
    root = write_store(tmp_path_factory.mktemp("halves") / "store", labels, samples,
                       {"flag": flag.astype("float32"), "a": a.astype("float32"), "b": b.astype("float32")})
    return root, up


def halves_spec(epochs=25):
    return {"latent_dim": 16,
            "encoders": [{"name": "flag", "type": "features", "dim": 4},
                         {"name": "a", "type": "features", "dim": 8, "run": "on_demand", "cost_gflops": 1.0},
                         {"name": "b", "type": "features", "dim": 8, "run": "on_demand", "cost_gflops": 1.0}],
            "gate": {"type": "attention", "top_n": 2, "heads": 2, "supervision": 0.5},
            "train": {"epochs": epochs, "batch_size": 32, "lr": 3e-3, "patience": 50, "seed": 0}}


def test_the_scout_learns_which_encoder_each_sample_needs(halves_store, tmp_path):
    from fusionkit.data.open import spec_store
    from fusionkit.inference import collect_outputs
    from fusionkit.training.tasks import ClassificationTask
    from fusionkit.training.train import make_split, train

    root, up = halves_store
    metrics = train(halves_spec(), root, tmp_path / "run", fold=0, progress=False)
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert "scout" in log[0] and log[-1]["scout"] < log[0]["scout"]  # the scout learns the gate's scores
    assert metrics["test"]["compute"]["full_gflops"] == 2.0
    model = load_model(tmp_path / "run" / "best")
    store = spec_store(model.spec, root)
    test = make_split(store, 0).test
    one = collect_outputs(model, store, test, budget=1.0)  # room for one of the two on-demand encoders
    ran_a, ran_b = one["ran"][:, 1].astype(bool), one["ran"][:, 2].astype(bool)
    assert (ran_a ^ ran_b).all()  # exactly one each: neither "always" nor "never"
    assert 0.25 < ran_a.mean() < 0.75
    assert (ran_a == up[test]).mean() > 0.8  # and the one that shows the sample's class
    scores = {b: ClassificationTask.evaluate_model(model, store, test, budget=b)["score"] for b in ("0%", 1.0, "100%")}
    assert scores["0%"] < scores[1.0]  # nothing on demand is worse than the scout's one
    from fusionkit.inference import fit_mean_budget

    val = make_split(store, 0).val
    mean = fit_mean_budget(model, store, val, "mean:50%")  # a mean of 1 GFLOP: half the on-demand cost
    assert mean.mean and mean.threshold is not None
    assert collect_outputs(model, store, val, budget=mean)["cost"].mean() <= 1.0 + 1e-9  # met where it was fitted
    assert abs(collect_outputs(model, store, test, budget=mean)["cost"].mean() - 1.0) < 0.35
    with pytest.raises(FusionkitError, match="a mean budget needs its threshold"):
        model(*store.inputs_for(model, test[:4]), budget="mean:50%")


def test_the_command_line_prints_costs_and_takes_budgets(synthetic_store, tmp_path, capsys):
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(demand_spec(top_n=3, epochs=2)))
    assert main(["build", str(tmp_path / "spec.yaml")]) == 0
    out = capsys.readouterr().out
    assert "cost per sample (GFLOPs):" in out and "enc2" in out and "on_demand" in out and "declared" in out
    assert main(["spec", "resolve", str(tmp_path / "spec.yaml")]) == 0
    resolved = capsys.readouterr().out
    assert yaml.safe_load(resolved)["encoders"][2]["run"] == "on_demand" and "# cost per sample" in resolved
    assert main(["train", str(tmp_path / "spec.yaml"), "--data", str(synthetic_store), "--out", str(tmp_path / "run"),
                 "--fold", "0", "--quiet"]) == 0
    capsys.readouterr()
    assert main(["evaluate", str(tmp_path / "run"), "--data", str(synthetic_store), "--budget", "25%"]) == 0
    assert "compute: " in capsys.readouterr().out
    metrics = json.loads((tmp_path / "run" / "evaluation_test_budget-25pct.json").read_text())
    assert metrics["compute"]["mean_gflops"] <= 1.0 + 1e-9
    assert main(["evaluate", str(tmp_path / "run"), "--data", str(synthetic_store), "--budget", "mean:50%"]) == 0
    assert "threshold" in capsys.readouterr().out
    assert (tmp_path / "run" / "evaluation_test_budget-mean-50pct.json").exists()
    assert main(["evaluate", str(tmp_path / "run"), "--data", str(synthetic_store), "--budget-curve"]) == 0
    curve = json.loads((tmp_path / "run" / "budget_curve_test.json").read_text())["points"]
    assert [p["budget_share"] for p in curve][0] == 0.0 and curve[-1]["mean_gflops"] == 4.0
    assert main(["report", str(tmp_path / "run")]) == 0
    assert (tmp_path / "run" / "report" / "budget_curve_test.png").stat().st_size > 0
    assert "budget_curve_test.png" in (tmp_path / "run" / "report" / "summary.md").read_text()
    assert main(["predict", str(tmp_path / "run"), "--data", str(synthetic_store), "--split", "labelled",
                 "--budget", "1.5", "--out", str(tmp_path / "sub.json")]) == 0
    assert len(json.loads((tmp_path / "sub.json").read_text())["predictions"]) > 0


def test_a_budget_for_a_model_without_on_demand_encoders_is_refused(synthetic_store, tmp_path, capsys):
    from fusionkit.training.train import train

    train(tiny_spec(epochs=1), synthetic_store, tmp_path / "run", fold=0, progress=False)
    assert main(["evaluate", str(tmp_path / "run"), "--data", str(synthetic_store), "--budget", "50%"]) == 2
    assert "runs every encoder always" in capsys.readouterr().err


# --- live encoders: measured cost, the backbone skipped, torchrun ------------------------------------------------------

from test_live import IMG, raw_images  # noqa: E402,F401 - the fixture of labelled images, its manifest and store


def live_spec(**train):
    return {"labels": ["a", "b"], "neutral": None, "latent_dim": 16,
            "encoders": [{"name": "vec", "type": "features", "dim": 5}, {**IMG, "run": "on_demand"}],
            "gate": {"type": "attention", "top_n": 2, "heads": 2, "supervision": 0.5},
            "train": {"epochs": 2, "batch_size": 8, "seed": 0, **train}}


def test_a_live_encoders_cost_is_measured_and_its_backbone_skipped_for_rows_not_kept(raw_images):
    from torch.utils.flop_counter import FlopCounterMode

    model = build_model(live_spec()).eval()
    backbone = model.encoders["img"].backbone
    with FlopCounterMode(display=False) as counter:
        backbone(torch.zeros(3, 1, 32, 32))
    assert model.encoder_costs()["img"] == pytest.approx(counter.get_total_flops() / 3 / 1e9)
    assert model.encoder_costs()["img"] > 0.005  # test_resnet at 32x32: about 8 MFLOPs
    rows = []
    backbone.register_forward_hook(lambda m, args, out: rows.append(len(args[0])))
    encoder = model.encoders["img"]
    images, _ = encoder.collate([encoder.load(f"img/s{i:02d}.png", raw_images) for i in range(8)])
    x = {"vec": torch.randn(8, 5), "img": images}
    for budget in ("0%", "100%", None):
        rows.clear()
        out = model(x, budget=budget)
        assert sum(rows) == int(out.ran[:, 1].sum())
        torch.testing.assert_close(out.probs, model(x, mask=out.ran, everything=True).probs, rtol=1e-5, atol=1e-6)
    assert model(x, budget="0%").ran[:, 1].sum() == 0 and model(x, budget="100%").ran[:, 1].all()


def test_an_on_demand_encoders_files_are_read_only_for_the_rows_that_run_it(raw_images):
    """Evaluation reads an on-demand live encoder's images for the rows the scout sends to it, and nothing else;
    the outputs are those of reading every image first."""
    import numpy as np

    from fusionkit.data.open import spec_store
    from fusionkit.inference import collect_outputs

    model = build_model(live_spec()).eval()
    store = spec_store(model.spec, raw_images / "store", raw_images / "manifest.csv")
    encoder, read = model.encoders["img"], []
    real_load = encoder.load
    encoder.load = lambda value, base: read.append(value) or real_load(value, base)
    index = np.arange(len(store))
    for budget in ("0%", "100%", None):
        read.clear()
        lazy = collect_outputs(model, store, index, batch_size=8, budget=budget)
        ran = lazy["ran"][:, 1]
        assert sorted(read) == sorted(store.raw.columns["img"][int(r)] for r in store.raw_rows[index[ran]])
        with torch.no_grad():
            eager = [model(*store.inputs_for(model, index[i : i + 8]), budget=budget) for i in range(0, len(index), 8)]
        assert np.array_equal(ran, torch.cat([o.ran[:, 1] for o in eager]).numpy())
        np.testing.assert_allclose(lazy["probs"], torch.cat([o.probs for o in eager]).numpy(), rtol=1e-5, atol=1e-6)
    assert not collect_outputs(model, store, index, budget="0%")["ran"][:, 1].any()
    with pytest.raises(DataError, match=r"defer: \['vec'\] are not live encoders"):
        store.inputs_for(model, index[:2], defer=["vec"])


@pytest.mark.xdist_group("torchrun")  # beside the other torchrun tests (tests/test_distributed.py)
def test_an_on_demand_live_encoder_trains_under_torchrun(raw_images, capsys):
    from test_distributed import torchrun

    # a share of the rows for the scout: some steps give a rank no row of the CNN, or one (a second joins it)
    (raw_images / "spec.yaml").write_text(yaml.safe_dump({**live_spec(batch_size=6), "conditional": {"scout_rows": 0.3}}))
    proc = torchrun("-m", "fusionkit", "train", "spec.yaml", "--data", "store", "--raw", "manifest.csv", "--out", "run",
                    "--quiet", cwd=raw_images)
    assert proc.returncode == 0, proc.stderr[-2000:]
    metrics = json.loads((raw_images / "run" / "metrics.json").read_text())
    assert metrics["epochs_run"] == 2 and "compute" in metrics["val"]
    assert main(["evaluate", str(raw_images / "run"), "--data", str(raw_images / "store"), "--raw",
                 str(raw_images / "manifest.csv"), "--split", "labelled", "--budget", "0%"]) == 0
    assert "compute: 0 of" in capsys.readouterr().out


def test_the_compute_term_trains_the_gates_own_rule_to_a_mean_cost(halves_store, tmp_path):
    from fusionkit.data.open import spec_store
    from fusionkit.inference import collect_outputs
    from fusionkit.training.train import make_split, train

    root, _ = halves_store
    spent = {}
    for name, conditional in (("free", {}), ("budgeted", {"budget_gflops": 0.5, "compute_weight": 5.0})):
        spec = {**halves_spec(epochs=12), **({"conditional": conditional} if conditional else {})}
        train(spec, root, tmp_path / name, fold=0, progress=False)
        log = [json.loads(line) for line in (tmp_path / name / "log.jsonl").read_text().splitlines()]
        assert ("compute" in log[0]) == bool(conditional)
        model = load_model(tmp_path / name / "best")
        store = spec_store(model.spec, root)
        spent[name] = float(collect_outputs(model, store, make_split(store, 0).test)["cost"].mean())  # no budget
    assert spent["budgeted"] < spent["free"] and spent["budgeted"] <= 1.0, spent


def test_on_demand_encoders_train_in_bf16(synthetic_store, tmp_path):
    from fusionkit.training.train import train

    metrics = train(demand_spec(epochs=2, precision="bf16"), synthetic_store, tmp_path / "run", fold=0, progress=False)
    assert 0.0 < metrics["test"]["compute"]["mean_gflops"] < 4.0


def test_a_compute_budget_in_the_spec_is_validated():
    with pytest.raises(SpecError, match=r"conditional.budget_gflops: must be >= 0"):
        load_spec({**demand_spec(), "conditional": {"budget_gflops": -1.0}})


def test_a_fold_ensemble_takes_a_cap_and_a_mean_budget_fitted_per_model(synthetic_store, tmp_path, capsys):
    from fusionkit.data.open import spec_store
    from fusionkit.evaluation.ensemble import FoldEnsemble
    from fusionkit.training.train import cross_validate

    cross_validate(demand_spec(epochs=1), synthetic_store, tmp_path / "cv", progress=False)
    assert main(["evaluate", "--cv", str(tmp_path / "cv"), "--data", str(synthetic_store), "--split", "labelled",
                 "--budget", "25%"]) == 0
    metrics = json.loads((tmp_path / "cv" / "evaluation_ensemble_labelled_budget-25pct.json").read_text())
    assert metrics["compute"]["mean_gflops"] <= 5 * 1.0 + 1e-9  # five models, each within its cap of 1 GFLOP
    assert metrics["compute"]["full_gflops"] == 5 * 4.0  # and each costs 4 in full
    capsys.readouterr()
    assert main(["evaluate", "--cv", str(tmp_path / "cv"), "--data", str(synthetic_store), "--split", "labelled",
                 "--budget", "25%", "--budget-costs", "time"]) == 2
    assert "['enc1', 'enc2'] read stored features" in capsys.readouterr().err  # only live encoders are timed
    assert main(["evaluate", "--cv", str(tmp_path / "cv"), "--data", str(synthetic_store), "--split", "labelled",
                 "--budget", "mean:25%"]) == 0
    assert "each model's threshold fitted on its own validation fold" in capsys.readouterr().out
    mean = json.loads((tmp_path / "cv" / "evaluation_ensemble_labelled_budget-mean-25pct.json").read_text())
    assert abs(mean["compute"]["mean_gflops"] - 5 * 1.0) < 5 * 0.35  # each model meets its 1 GFLOP on average

    ensemble = FoldEnsemble([tmp_path / "cv"])
    store = spec_store(ensemble.spec, synthetic_store)
    ensemble.fit_decoder(store)
    index = store.select(labelled=True)
    assert ensemble.evaluate(store, index, budget="mean:25%")["score"] == pytest.approx(mean["score"])
    thresholds = [b.threshold for b in ensemble.model_budgets(store, "mean:25%")]
    assert len(thresholds) == 5 and all(t is not None for t in thresholds)
    per_model = ensemble.model_budgets(store, "mean:5")  # GFLOPs: an equal part for each model
    assert [b.gflops for b in per_model] == [1.0] * 5
    with pytest.raises(FusionkitError, match="2 budgets for an ensemble of 5 models"):
        ensemble.outputs(store, index, budget=["25%", "50%"])

# --- budgets over measured time ------------------------------------------------------------------------------------


def test_a_budget_over_measured_seconds_chooses_by_them_and_reports_gflops():
    model = build_model(demand_spec(top_n=3)).eval()  # enc1 1 GFLOP, enc2 3 GFLOPs; in seconds the other way round
    x = batch(64)
    seconds = {"enc1": 3e-3, "enc2": 1e-3}
    flops, timed = model(x, budget="25%"), model(x, budget=Budget.parse("25%").timed(seconds))
    assert flops.ran[:, 1].any() and not flops.ran[:, 2].any()  # 1 of 4 GFLOPs: enc1 alone fits
    assert timed.ran[:, 2].any() and not timed.ran[:, 1].any()  # 1 of 4 ms: enc2 alone fits
    assert torch.equal(timed.cost, timed.ran[:, 2].double() * 3.0)  # the cost reported stays in GFLOPs
    reference = model(x, mask=timed.ran, everything=True)
    torch.testing.assert_close(timed.probs, reference.probs, rtol=1e-5, atol=1e-6)
    full = model(x, budget=Budget(share=1.0, seconds=seconds))
    assert full.ran.all()
    budget = Budget(share=0.4, mean=True, seconds=seconds)
    assert budget == Budget(share=0.4, mean=True, seconds=[("enc2", 1e-3), ("enc1", 3e-3)])  # a value, order-free
    assert budget.describe() == "mean:40% of the measured time" and hash(budget) == hash(budget.timed(seconds))


@pytest.mark.parametrize(("make", "message"), [
    (lambda: Budget(gflops=2.0, seconds={"enc1": 1.0}), "GFLOPs count FLOPs"),
    (lambda: Budget(share=0.5, seconds={"enc1": -1.0}), "finite and >= 0"),
    (lambda: Budget(share=0.5, seconds={}), "none given"),
])
def test_a_bad_time_budget_is_a_clear_error(make, message):
    with pytest.raises(FusionkitError, match=message):
        make()


def test_a_time_budget_must_name_each_on_demand_encoder():
    model = build_model(demand_spec()).eval()
    with pytest.raises(FusionkitError, match=r"missing \['enc2'\], not on demand \['enc0'\]"):
        model(batch(), budget=Budget(share=0.5, seconds={"enc1": 1.0, "enc0": 1.0}))


def test_an_encoders_measured_seconds_count_reading_its_files(raw_images):
    import time

    import numpy as np

    from fusionkit.data.open import spec_store
    from fusionkit.inference import measure_encoder_seconds

    model = build_model(live_spec())
    store = spec_store(model.spec, raw_images / "store", raw_images / "manifest.csv")
    quick = measure_encoder_seconds(model, store, np.arange(len(store)), batch_size=8)
    assert set(quick) == {"img"} and quick["img"] > 0 and model.training  # its mode is left as it was
    encoder, real_load = model.encoders["img"], model.encoders["img"].load
    # a slow disk: 20 ms an image, far above reading and encoding one (about 1 ms, and under 5 ms on a loaded machine)
    encoder.load = lambda value, base: time.sleep(0.02) or real_load(value, base)
    slow = measure_encoder_seconds(model, store, np.arange(len(store)), rows=10, batch_size=4)
    assert slow["img"] >= 0.02 > quick["img"]
    with pytest.raises(FusionkitError, match=r"on-demand encoder\(s\) \['enc1', 'enc2'\] read stored features"):
        measure_encoder_seconds(build_model(demand_spec()), store, np.arange(4))


def test_the_command_line_budgets_by_measured_time(raw_images, capsys):
    (raw_images / "spec.yaml").write_text(yaml.safe_dump(live_spec(epochs=1)))
    data = ["--data", str(raw_images / "store"), "--raw", str(raw_images / "manifest.csv")]
    run = raw_images / "run"
    assert main(["train", str(raw_images / "spec.yaml"), *data, "--out", str(run), "--fold", "0", "--quiet"]) == 0
    capsys.readouterr()
    for costs in ("flops", "time"):
        assert main(["evaluate", str(run), *data, "--budget", "mean:50%", "--budget-costs", costs]) == 0
    out = capsys.readouterr().out
    assert "encoder time measured on" in out and "mean budget mean:50% of the measured time: threshold" in out
    flops = json.loads((run / "evaluation_test_budget-mean-50pct.json").read_text())["compute"]
    timed = json.loads((run / "evaluation_test_budget-mean-50pct-time.json").read_text())["compute"]
    assert timed["run_rate"] == flops["run_rate"]  # one on-demand encoder: time and FLOPs choose alike
    assert timed["encoder_seconds"]["img"] > 0 and "encoder_seconds" not in flops
    assert timed["mean_encoder_seconds"] == pytest.approx(timed["run_rate"]["img"] * timed["encoder_seconds"]["img"])
    assert main(["evaluate", str(run), *data, "--budget-curve", "--budget-costs", "time"]) == 0
    curve = json.loads((run / "budget_curve_test_time.json").read_text())
    assert curve["costs"] == "time" and curve["points"][0]["mean_encoder_seconds"] == 0.0
    assert curve["points"][-1]["mean_encoder_seconds"] == pytest.approx(curve["encoder_seconds"]["img"])
    assert main(["report", str(run)]) == 0
    assert (run / "report" / "budget_curve_test_time.png").stat().st_size > 0
    assert main(["predict", str(run), *data, "--split", "labelled", "--budget", "40%", "--budget-costs", "time",
                 "--out", str(raw_images / "sub.json")]) == 0
    assert len(json.loads((raw_images / "sub.json").read_text())["predictions"]) == 24
    capsys.readouterr()
    assert main(["evaluate", str(run), *data, "--budget", "2.5", "--budget-costs", "time"]) == 2
    assert "GFLOPs count FLOPs" in capsys.readouterr().err
    assert main(["evaluate", str(run), *data, "--budget-costs", "time"]) == 2
    assert "give a --budget such as 40%" in capsys.readouterr().err
