"""Selection controls: the controls that isolate selection (slot order) and the regimes where it should pay."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fusionkit.conditional.selection import in_encoder_order, select_top_n, select_top_p


def test_fixed_order_keeps_the_same_encoders_and_weights_in_the_spec_order():
    scores = torch.tensor([[0.1, 3.0, -1.0, 2.0], [5.0, 0.0, 1.0, 4.0]])
    mask = torch.tensor([[True, True, True, True], [True, False, True, True]])
    for ranked in (select_top_n(scores, mask, 3), select_top_p(scores, mask, 0.6, 1, 3)):
        fixed = in_encoder_order(ranked)
        for row in range(2):
            pairs = {int(k): float(w) for k, w in zip(ranked.kept[row], ranked.weights[row]) if k >= 0}
            kept = [int(k) for k in fixed.kept[row] if k >= 0]
            assert kept == sorted(pairs)  # the encoders' own order
            assert {int(k): float(w) for k, w in zip(fixed.kept[row], fixed.weights[row]) if k >= 0} == pairs
            assert fixed.slot_mask[row].tolist() == sorted(fixed.slot_mask[row].tolist(), reverse=True)  # empties last
    assert ranked.kept[0].tolist() != in_encoder_order(select_top_n(scores, mask, 3)).kept[0].tolist()


def test_a_fixed_order_gate_feeds_the_fusion_in_encoder_order():
    from fusionkit.models.factory import build_model

    spec = {"latent_dim": 8, "encoders": [{"name": f"e{k}", "type": "features", "dim": 3} for k in range(4)],
            "gate": {"type": "mlp", "top_n": 3, "slot_order": "fixed"}, "fusion": {"type": "rank_concat"}}
    model = build_model(spec).eval()
    out = model({f"e{k}": torch.randn(5, 3) for k in range(4)})
    kept = out.kept.numpy()
    assert (np.diff(kept, axis=1) > 0).all()  # strictly increasing encoder indices in every row


def test_distractors_and_heavy_corruption_are_dataset_options(uci_source, tmp_path):
    from fusionkit.components.datasets import build_dataset
    from fusionkit.data.store import open_store

    clean = open_store(build_dataset("uci-mfeat", {"source": uci_source}, tmp_path / "clean"))
    noisy = open_store(build_dataset("uci-mfeat", {"source": uci_source, "distractors": 7}, tmp_path / "noise"))
    assert list(noisy.encoders)[:6] == list(clean.encoders) and list(noisy.encoders)[6:] == [f"x{j:02d}" for j in range(7)]
    assert noisy.encoders["x06"].dim == clean.encoders["fou"].dim  # sizes of the six views, in turn
    for name in clean.encoders:  # the real views are untouched
        assert torch.equal(noisy.encoders[name].data, clean.encoders[name].data)
    labels = np.array([s.labels[0]["emotion"] for s in clean.samples])
    x = noisy.encoders["x01"].data.numpy()
    means = np.stack([x[labels == lab].mean(0) for lab in np.unique(labels)])
    assert np.abs(means).max() < 0.5  # noise: no class signal in its means
    shuffled = open_store(build_dataset("uci-mfeat", {"source": uci_source, "distractors": 1,
                                                      "distractor_kind": "shuffled"}, tmp_path / "shuffled"))
    real, other = clean.encoders["fou"].data.numpy(), shuffled.encoders["x00"].data.numpy()
    assert sorted(map(tuple, other.round(4))) == sorted(map(tuple, real.round(4)))  # real rows, of other samples
    assert (np.abs(other - real).sum(1) > 0).mean() > 0.99
    heavy = open_store(build_dataset("uci-mfeat", {"source": uci_source, "corrupt_fraction": 1.0, "corrupt_min": 2,
                                                   "corrupt_max": 2}, tmp_path / "heavy"))
    changed = np.stack([(heavy.encoders[n].data != clean.encoders[n].data).any(1).numpy() for n in clean.encoders], 1)
    assert (changed.sum(1) == 2).all()  # every sample, exactly two encoders


def test_the_controls_each_change_one_thing_of_the_best_recipe():
    from fusionkit.spec.recipes import controls, selective

    found = controls()
    assert found["best: top-p 0.9 (min 2), rank order"] == selective()
    base = selective()["gate"]
    for name, spec in found.items():
        gate = spec["gate"]
        changed = {k for k in set(gate) | set(base) if gate.get(k) != base.get(k)}
        assert spec["fusion"] == selective()["fusion"], name
        assert changed <= {"selection", "top_n", "top_p", "min_n", "slot_order", "type"}, (name, changed)


@pytest.mark.parametrize("bad", [{"corrupt_min": 0}, {"distractors": -1}, {"distractor_kind": "loud"}])
def test_bad_regime_options_are_refused(bad, uci_source, tmp_path):
    from fusionkit.components.datasets import build_dataset
    from fusionkit.errors import SpecError

    with pytest.raises(SpecError):
        build_dataset("uci-mfeat", {"source": uci_source, **bad}, tmp_path / "x")


def test_the_gate_diagnostics_split_keep_rates_by_corruption(uci_source, tmp_path):
    """Per encoder, the keep rate on clean against corrupted samples, in metrics.json and the report."""
    import json

    from fusionkit.components.datasets import build_dataset
    from fusionkit.data.store import open_store
    from fusionkit.evaluation.report import write_report
    from fusionkit.spec import recipes
    from fusionkit.training.train import train

    store = build_dataset("uci-mfeat", {"source": uci_source, "corrupt_fraction": 0.5, "blends_per_single": 0.2},
                          tmp_path / "store")
    opened = open_store(store)
    hit = [s for s in opened.samples if s.corrupted]
    assert 0.4 < len(hit) / len(opened.samples) < 0.6 and all(1 <= len(s.corrupted) <= 3 for s in hit)
    index = json.loads((store / "index.json").read_text())["samples"]
    assert sum("corrupted" in r for r in index) == len(hit)  # written only where there is something to say
    spec = recipes.selective()
    spec["train"] = {**spec["train"], "epochs": 3}
    metrics = train(spec, store, tmp_path / "run", fold=0, progress=False)
    rates = metrics["test"]["keep_rates"]
    assert set(rates) == set(recipes.UCI_DIMS)
    for r in rates.values():
        assert all(0.0 <= r[k] <= 1.0 for k in ("all", "clean", "corrupted"))
    write_report(tmp_path / "run")
    assert (tmp_path / "run" / "report" / "keep_rates.png").stat().st_size > 1000
    assert "Keep rate per encoder (clean / corrupted samples)" in (tmp_path / "run" / "report" / "summary.md").read_text()
