"""Domain adaptation: the losses, gradient reversal, no label leakage, and a measured gain."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from conftest import tiny_spec

from fusionkit.components.adaptation import (
    CoralConfig,
    CoralLoss,
    DannConfig,
    DannLoss,
    EntropyConfig,
    EntropyLoss,
    GradientReversal,
    MMDConfig,
    MMDLoss,
    coral,
    grl_schedule,
    mmd,
)
from fusionkit.interfaces import BuildContext
from fusionkit.models.factory import load_model
from fusionkit.training.train import train

CTX = BuildContext(labels=("a", "b", "c"), neutral=None, latent_dim=8, encoder_names=("x",), in_dim=8)


def samples(shift: float, seed: int = 0, n: int = 128, d: int = 8):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g), torch.randn(n, d, generator=g) * (1 + 0.5 * shift) + shift


@pytest.mark.parametrize("loss", [
    lambda s, t: mmd(s, t),
    lambda s, t: mmd(s, t, estimator="linear"),
    lambda s, t: coral(s, t),
], ids=["mmd-quadratic", "mmd-linear", "coral"])
def test_discrepancies_are_near_zero_for_one_distribution_and_grow_with_shift(loss):
    values = [float(loss(*samples(shift))) for shift in (0.0, 0.5, 1.0, 2.0)]
    assert abs(values[0]) < 0.1 * values[1]
    assert values[0] < values[1] < values[2] < values[3]


def test_dann_discriminator_separates_only_shifted_domains():
    def trained_loss(shift):
        torch.manual_seed(0)
        loss = DannLoss(DannConfig(weight=1.0), CTX)
        opt = torch.optim.Adam(loss.parameters(), lr=1e-2)
        src, tgt = samples(shift, seed=1)
        for _ in range(200):
            opt.zero_grad()
            value = loss.discrepancy(src, tgt, progress=1.0)
            value.backward()
            opt.step()
        held_src, held_tgt = samples(shift, seed=2)
        return float(loss.discrepancy(held_src, held_tgt, progress=1.0).detach())

    same, shifted = trained_loss(0.0), trained_loss(2.0)
    assert same > 0.6 * math.log(2)  # cannot tell one distribution from itself (held-out samples)
    assert shifted < 0.3 * math.log(2)


def test_entropy_is_low_for_confident_and_high_for_uncertain_predictions():
    from fusionkit.models.fusion import FusionOutput

    def out(logit_scale):
        logits = torch.tensor([[1.0, -1.0, 0.5]]) * logit_scale
        z = torch.zeros(1, 4)
        return FusionOutput(fused=z, scores=z, kept=z.long(), weights=z, probs=z, presence=None, salience=None,
                            logits={"presence": logits, "salience": logits}, tokens=z.unsqueeze(1))

    loss = EntropyLoss(EntropyConfig())
    confident, uncertain = float(loss(out(50.0), out(50.0), 0.5)), float(loss(out(0.1), out(0.1), 0.5))
    assert confident < 0.01 and uncertain > 1.0
    only_presence = EntropyLoss(EntropyConfig(salience_weight=0.0))
    assert float(only_presence(out(0.1), out(0.1), 0.5)) < uncertain


def test_gradient_reversal_flips_the_sign_with_the_scheduled_factor():
    assert grl_schedule(0.0) == 0.0
    assert grl_schedule(0.5) == pytest.approx(2 / (1 + math.exp(-5)) - 1)
    assert grl_schedule(1.0) == pytest.approx(1.0, abs=1e-4)
    x = torch.randn(5, 3, requires_grad=True)
    GradientReversal.apply(x, 0.25).mul(torch.arange(3.0)).sum().backward()
    assert torch.equal(x.grad, -0.25 * torch.arange(3.0).expand(5, 3))


@pytest.mark.parametrize("on", ["fused", "encoders"])
def test_a_batch_of_one_gives_zero_not_nan(on):
    from fusionkit.models.fusion import FusionOutput

    def out(n):
        z = torch.randn(n, 8)
        return FusionOutput(fused=z, scores=z, kept=z.long(), weights=z, probs=z, presence=None, salience=None,
                            logits={}, tokens=z.unsqueeze(1))

    for loss in (CoralLoss(CoralConfig(on=on)), MMDLoss(MMDConfig(on=on))):
        assert float(loss(out(1), out(16), 0.5)) == 0.0
        assert torch.isfinite(loss(out(16), out(16), 0.5))


def test_adaptation_weight_warms_up():
    loss = MMDLoss(MMDConfig(weight=2.0, warmup=0.5))
    assert loss.scale(0.0) == 0.0 and loss.scale(0.25) == pytest.approx(1.0) and loss.scale(0.9) == 2.0
    assert CoralLoss(CoralConfig(weight=0.3)).scale(0.0) == 0.3


def shifted_store(path, **overrides):
    from fusionkit.components.datasets import build_dataset

    options = {"samples": 500, "noise": [0.5, 1.0, 2.0], "dim": 8, "seed": 0, "target_shift": 1.5, **overrides}
    return build_dataset("synthetic", options, path, overwrite=True)


def adapt_spec(**train_options):
    spec = tiny_spec(**{"epochs": 12, "lr": 5e-3, **train_options})
    spec["adaptation"] = [{"type": "mmd", "weight": 1.0}, {"type": "dann", "weight": 0.1, "on": "encoders"},
                          {"type": "entropy", "weight": 0.05}]
    return spec


def test_target_labels_never_reach_the_training_loss(tmp_path):
    store = shifted_store(tmp_path / "store")
    first = train(adapt_spec(), store, tmp_path / "a", fold=0, progress=False)
    index_path = store / "index.json"
    index = json.loads(index_path.read_text())
    labels = ["ang", "disg", "fea", "hap", "sad", "neu"]
    poisoned = 0
    for rec in index["samples"]:
        if rec["domain"] == "target":
            rec["labels"] = [{"emotion": labels[(labels.index(rec["labels"][0]["emotion"]) + 1) % 5], "salience": 100.0}]
            poisoned += 1
    assert poisoned > 50
    index_path.write_text(json.dumps(index))
    second = train(adapt_spec(), store, tmp_path / "b", fold=0, progress=False)
    wa, wb = load_model(tmp_path / "a" / "best").state_dict(), load_model(tmp_path / "b" / "best").state_dict()
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert first["val"] == second["val"] and first["test"] == second["test"]
    assert first["target"] != second["target"]  # evaluation does read them
    log = [json.loads(x) for x in (tmp_path / "a" / "log.jsonl").read_text().splitlines()]
    assert {"adapt_mmd", "adapt_dann", "adapt_entropy"} <= set(log[0])


def test_adaptation_from_a_second_store(tmp_path):
    source = shifted_store(tmp_path / "src", target_shift=0.0)
    target = shifted_store(tmp_path / "tgt", seed=1, target_shift=0.0)
    metrics = train(adapt_spec(epochs=2), source, tmp_path / "run", fold=0, progress=False, target=target)
    assert metrics["target"]["n"] == 500


def test_adaptation_improves_target_accuracy_on_a_synthetic_shift(tmp_path):
    store = shifted_store(tmp_path / "store", target_shift=0.5)
    plain = tiny_spec(epochs=20, lr=1e-2)
    source_only = train(plain, store, tmp_path / "plain", fold=0, progress=False)
    adapted = train({**plain, "adaptation": [{"type": "coral", "weight": 1.0, "on": "encoders"}]}, store,
                    tmp_path / "coral", fold=0, progress=False)
    assert adapted["target"]["score"] > source_only["target"]["score"] + 0.03


def domain_spec(**train_options):
    spec = tiny_spec(**{"epochs": 3, "lr": 5e-3, **train_options})
    spec["data"] = {"standardize_per_domain": True}
    spec["projector"] = {"domain_norm": True, "dropout": 0.0}
    return spec


def test_per_domain_statistics_come_from_target_inputs_never_its_labels(tmp_path):
    store = shifted_store(tmp_path / "store", target_shift=1.0)
    train(domain_spec(), store, tmp_path / "a", fold=0, progress=False)
    index_path = store / "index.json"
    index = json.loads(index_path.read_text())
    labels = ["ang", "disg", "fea", "hap", "sad", "neu"]
    for rec in index["samples"]:
        if rec["domain"] == "target":  # poison every target label
            rec["labels"] = [{"emotion": labels[(labels.index(rec["labels"][0]["emotion"]) + 2) % 5], "salience": 100.0}]
    index_path.write_text(json.dumps(index))
    train(domain_spec(), store, tmp_path / "b", fold=0, progress=False)
    wa, wb = load_model(tmp_path / "a" / "best").state_dict(), load_model(tmp_path / "b" / "best").state_dict()
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    # the target statistics are those of the target rows' features, and differ from the source's
    from fusionkit.data.store import open_store

    opened = open_store(store)
    target_rows = opened.select(domain="target")
    feats = opened.encoders["enc0"].data[torch.as_tensor(target_rows)]
    assert torch.allclose(wa["encoders.enc0.target_input_mean"], feats.mean(0), atol=1e-5)
    assert not torch.allclose(wa["encoders.enc0.target_input_mean"], wa["encoders.enc0.input_mean"], atol=0.1)
    norm = "projectors.enc0.net.1.norms"
    assert not torch.allclose(wa[f"{norm}.target.running_mean"], wa[f"{norm}.source.running_mean"], atol=1e-3)


def test_a_checkpoint_with_per_domain_statistics_round_trips_and_predict_picks_the_domain(tmp_path, capsys):
    from fusionkit.cli import main
    from fusionkit.data.store import open_store
    from fusionkit.inference import collect_outputs

    store = shifted_store(tmp_path / "store", target_shift=1.0)
    metrics = train(domain_spec(), store, tmp_path / "run", fold=0, progress=False)
    model = load_model(tmp_path / "run" / "best")
    opened = open_store(store)
    rows = np.concatenate([opened.select(domain="target")[:20], opened.select(domain="source")[:20]])
    chosen = collect_outputs(model, opened, rows)["probs"]
    as_source = collect_outputs(model, opened, rows, domain="source")["probs"]
    as_target = collect_outputs(model, opened, rows, domain="target")["probs"]
    # (batches of other sizes may differ in the last bits)
    assert np.allclose(chosen[:20], as_target[:20], atol=1e-6) and np.allclose(chosen[20:], as_source[20:], atol=1e-6)
    assert not np.allclose(as_source[:20], as_target[:20])
    again = load_model(tmp_path / "run" / "best")
    assert np.array_equal(collect_outputs(again, opened, rows)["probs"], chosen)
    assert main(["evaluate", str(tmp_path / "run"), "--data", str(store), "--split", "labelled"]) == 0
    assert "target" in metrics


@pytest.mark.parametrize("schedule, progress, factor", [("constant", 0.3, 0.25), ("linear", 0.4, 0.1),
                                                        ("dann", 0.5, 0.25 * grl_schedule(0.5))])
def test_dann_reversal_follows_its_schedule_and_grl_max(schedule, progress, factor):
    torch.manual_seed(0)
    loss = DannLoss(DannConfig(weight=1.0, schedule=schedule, grl_max=0.25), CTX)
    source, target = (x.requires_grad_(True) for x in samples(1.0, n=16))
    loss.discrepancy(source, target, progress).backward()
    reversed_grad = source.grad.clone()
    plain = torch.nn.functional.binary_cross_entropy_with_logits(
        loss.discriminator(torch.cat([source, target])).squeeze(-1), torch.cat([torch.zeros(16), torch.ones(16)]))
    direct = torch.autograd.grad(plain, source)[0]
    assert torch.allclose(reversed_grad, -factor * direct, atol=1e-7)


@pytest.mark.parametrize("hidden", [0, 8])
def test_a_checkpoint_with_a_bias_before_domain_norm_loads_to_the_same_outputs(hidden):
    """The layer before DomainNorm has no bias (the normalisation cancels it); an older checkpoint's bias moves into
    every domain's running mean, so its outputs are unchanged."""
    from fusionkit.models.fusion import Projector
    from fusionkit.spec import ProjectorConfig

    torch.manual_seed(0)
    projector = Projector(5, 4, ProjectorConfig(hidden=hidden, domain_norm=True, dropout=0.0))
    linear = 2 if hidden else 0
    assert projector.net[linear].bias is None
    old = {k: v.clone() for k, v in projector.state_dict().items()}
    old[f"net.{linear}.bias"] = bias = torch.randn(4)
    for domain in ("source", "target"):
        old[f"net.{linear + 1}.norms.{domain}.running_mean"] = torch.randn(4)
        old[f"net.{linear + 1}.norms.{domain}.running_var"] = torch.rand(4) + 0.5
    projector.load_state_dict(old)
    projector.eval()
    x = torch.randn(6, 5)
    pre = projector.net[: linear + 1](x) + bias  # the old layer's output
    norm = projector.net[linear + 1]
    expected = (pre - old[f"net.{linear + 1}.norms.source.running_mean"]) / torch.sqrt(
        old[f"net.{linear + 1}.norms.source.running_var"] + norm.norms["source"].eps) * norm.weight + norm.bias
    assert torch.allclose(norm(projector.net[: linear + 1](x)), expected, atol=1e-5)
