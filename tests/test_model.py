"""The fusion model: top-n selection, masking, order independence, gradients, pooling, compile."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fusionkit import build_model
from fusionkit.conditional.selection import select_top_n, select_top_p
from fusionkit.errors import DataError
from fusionkit.pooling import stats7


def spec(gate="attention", top_n=2, fusion="rank_concat", **extra):
    out = {
        "latent_dim": 16,
        "encoders": [
            {"name": "a", "type": "features", "dim": 5},
            {"name": "b", "type": "features", "dim": 3, "pooling": "stats7"},
            {"name": "c", "type": "features", "dim": 4, "pooling": "mean"},
            {"name": "d", "type": "features", "dim": 6, "pooling": "attention"},
        ],
        "gate": {"type": gate, "top_n": top_n},
        "fusion": {"type": fusion},
        "projector": {"dropout": 0.0},
    }
    out.update(extra)
    return out


def inputs(batch=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = {
        "a": torch.randn(batch, 5, generator=g),
        "b": torch.randn(batch, 7, 3, generator=g),
        "c": torch.randn(batch, 4, 4, generator=g),
        "d": torch.randn(batch, 5, 6, generator=g),
    }
    lengths = {"b": torch.randint(1, 8, (batch,), generator=g), "d": torch.randint(1, 6, (batch,), generator=g)}
    return x, lengths


scores_st = st.integers(1, 6).flatmap(
    lambda k: st.tuples(
        st.lists(st.lists(st.floats(-5, 5, allow_nan=False, width=32), min_size=k, max_size=k, unique=True), min_size=1, max_size=5),
        st.lists(st.lists(st.booleans(), min_size=k, max_size=k), min_size=5, max_size=5),
        st.integers(1, 7),
    )
)


@settings(max_examples=150, deadline=None)
@given(scores_st)
def test_selection_keeps_the_top_n_available_in_rank_order(case):
    rows, mask_rows, n = case
    scores = torch.tensor(rows)
    mask = torch.tensor(mask_rows[: len(rows)])
    sel = select_top_n(scores, mask, n)
    assert sel.kept.shape == (len(rows), n)
    for i in range(len(rows)):
        available = [k for k in range(scores.shape[1]) if mask[i, k]]
        expected = sorted(available, key=lambda k: -rows[i][k])[:n]
        kept = [k for k in sel.kept[i].tolist() if k >= 0]
        assert kept == expected  # the top n, in rank order; masked never kept; n >= available keeps all
        assert sel.kept[i, len(kept):].eq(-1).all()
        w = sel.weights[i]
        if kept:
            assert float(w.sum()) == pytest.approx(1.0, abs=1e-5)
            assert all(float(w[j]) >= float(w[j + 1]) - 1e-6 for j in range(len(kept) - 1))
        assert w[len(kept):].eq(0).all()


@settings(max_examples=200, deadline=None)
@given(scores_st, st.floats(0.05, 1.0), st.integers(1, 6), st.integers(1, 6))
def test_top_p_keeps_the_smallest_rank_ordered_prefix_reaching_p_within_bounds(case, p, min_n, max_n):
    rows, mask_rows, _ = case
    scores = torch.tensor(rows)
    mask = torch.tensor(mask_rows[: len(rows)])
    k = scores.shape[1]
    max_n = min(max_n, k)
    min_n = min(min_n, max_n)
    sel = select_top_p(scores, mask, p, min_n, max_n)
    assert sel.kept.shape == (len(rows), max_n)
    for i in range(len(rows)):
        available = sorted((j for j in range(k) if mask[i, j]), key=lambda j: -rows[i][j])
        probs = torch.softmax(torch.tensor([rows[i][j] for j in available]), 0).tolist() if available else []
        # the reference: grow the rank-ordered prefix until its probability reaches p, then apply the bounds
        size = next((m for m in range(1, len(available) + 1) if sum(probs[:m]) >= p - 1e-6), len(available))
        size = min(max(size, min_n), max_n, len(available))
        kept = [j for j in sel.kept[i].tolist() if j >= 0]
        assert kept == available[:size]  # rank order, never a masked encoder
        assert sel.kept[i, len(kept):].eq(-1).all() and sel.slot_mask[i].sum() == len(kept)
        if kept:
            assert float(sel.weights[i].sum()) == pytest.approx(1.0, abs=1e-5)
        assert sel.weights[i, len(kept):].eq(0).all()


def test_top_p_in_the_model_varies_the_count_per_sample_and_reports_it():
    torch.manual_seed(0)
    model = build_model(spec(gate="mlp", fusion="rank_attention")
                        | {"gate": {"type": "mlp", "selection": "top_p", "top_p": 0.6, "min_n": 1, "max_n": 3}}).eval()
    assert model.top_n == 3  # the fusion has max_n slots
    x, lengths = inputs(batch=32)
    mask = torch.ones(32, 4, dtype=torch.bool)
    mask[:4, 2] = False
    out = model(x, lengths, mask)
    assert out.kept.shape == (32, 3) and not (out.kept[:4] == 2).any()
    assert torch.equal(out.used, (out.kept >= 0).sum(1)) and out.used.min() >= 1 and out.used.max() <= 3
    probs = torch.softmax(out.scores.masked_fill(~mask, float("-inf")), 1)
    for i in range(32):  # every sample stops at the first rank-ordered prefix that reaches 0.6
        ranked = probs[i].sort(descending=True).values
        need = int((ranked.cumsum(0) < 0.6 - 1e-6).sum()) + 1
        assert int(out.used[i]) == min(need, 3)


def test_residual_mean_path_adds_the_mean_of_the_available_tokens():
    torch.manual_seed(0)
    model = build_model(spec(fusion="weighted_sum") | {"gate": {"type": "attention", "top_n": 1, "residual_mean": True}})
    model.eval()
    x, lengths = inputs()
    mask = torch.ones(6, 4, dtype=torch.bool)
    mask[0, :2] = False
    with torch.no_grad():
        model.residual.weight.zero_()
        model.residual.bias.zero_()
        plain = model(x, lengths, mask)  # the path switched off: the fusion of the top-1 slot alone
        model.residual.weight.copy_(torch.eye(16))
        shifted = model(x, lengths, mask)
    present = mask.float().unsqueeze(-1)
    mean = (plain.tokens * present).sum(1) / present.sum(1)
    assert torch.allclose(shifted.fused - plain.fused, mean, atol=1e-5)


def test_masked_encoders_are_never_kept_in_the_model():
    torch.manual_seed(0)
    model = build_model(spec(top_n=2)).eval()
    x, lengths = inputs()
    mask = torch.ones(6, 4, dtype=torch.bool)
    mask[:, 1] = False
    mask[0] = torch.tensor([False, False, False, True])
    out = model(x, lengths, mask)
    assert not (out.kept == 1).any()
    assert out.kept[0].tolist() == [3, -1]
    assert torch.isfinite(out.probs).all()


def test_top_n_at_least_k_keeps_all():
    model = build_model(spec(top_n=9)).eval()
    x, lengths = inputs()
    out = model(x, lengths)
    assert sorted(out.kept[0, :4].tolist()) == [0, 1, 2, 3]
    assert out.kept[:, 4:].eq(-1).all()


@pytest.mark.parametrize("fusion", ["weighted_sum", "rank_concat", "rank_attention"])
@pytest.mark.parametrize("gate", ["attention", "mlp", "static", "uniform"])
def test_outputs_do_not_depend_on_input_dict_order(gate, fusion):
    torch.manual_seed(0)
    model = build_model(spec(gate=gate, fusion=fusion)).eval()
    x, lengths = inputs()
    reordered = {k: x[k] for k in reversed(list(x))}
    a, b = model(x, lengths), model(reordered, dict(reversed(list(lengths.items()))))
    assert torch.equal(a.probs, b.probs) and torch.equal(a.kept, b.kept)
    assert a.probs.shape == (6, 6) and torch.allclose(a.probs.sum(1), torch.ones(6))


@pytest.mark.parametrize("gate", ["attention", "mlp", "static"])
def test_gradients_reach_the_gate_through_the_kept_weights(gate):
    torch.manual_seed(0)
    model = build_model(spec(gate=gate)).train()
    x, lengths = inputs()
    out = model(x, lengths)
    out.probs[:, 0].sum().backward()
    grads = [p.grad for p in model.gate.parameters()]
    assert grads and all(g is not None for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)


def test_uniform_gate_is_naive_fusion():
    model = build_model(spec(gate="uniform", top_n=4, fusion="weighted_sum")).eval()
    x, lengths = inputs()
    out = model(x, lengths)
    assert out.kept.tolist() == [[0, 1, 2, 3]] * 6
    assert torch.allclose(out.weights, torch.full((6, 4), 0.25), atol=1e-5)
    assert torch.allclose(out.fused, out.tokens.mean(1), atol=1e-5)


def test_soft_warmup_trains_every_encoder_then_hardens():
    torch.manual_seed(0)
    model = build_model(spec() | {"gate": {"type": "attention", "top_n": 1, "warmup_epochs": 2}}).train()
    x, lengths = inputs()

    def grads_per_encoder():
        model.zero_grad()
        model(x, lengths).probs[:, 0].sum().backward()
        return {n: sum(float(p.grad.abs().sum()) for p in model.projectors[n].parameters()) for n in model.encoder_names}

    model.set_epoch(0)
    warm = grads_per_encoder()
    assert all(v > 0 for v in warm.values())
    model.set_epoch(2)
    hard = model(x, lengths)
    kept = set(hard.kept[:, 0].tolist())
    after = grads_per_encoder()
    assert {n for n, v in after.items() if v > 0} == {model.encoder_names[k] for k in kept}


def test_balance_loss_grows_with_collapse():
    mask = torch.ones(64, 4, dtype=torch.bool)
    balanced = select_top_n(torch.randn(64, 4), mask, 1, balance_weight=1.0).balance_loss
    collapsed = select_top_n(torch.tensor([[5.0, 0, 0, 0]]).repeat(64, 1), mask, 1, balance_weight=1.0).balance_loss
    assert float(collapsed) > 3.5 and float(balanced) < 1.6


def test_balance_loss_is_reported_in_aux_losses():
    model = build_model(spec() | {"gate": {"type": "mlp", "top_n": 2, "balance_weight": 0.5}}).train()
    x, lengths = inputs()
    out = model(x, lengths)
    assert set(out.aux_losses) == {"gate_balance"} and out.aux_losses["gate_balance"].requires_grad


def test_stats7_matches_numpy_on_ragged_sequences():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(5, 9, 3, generator=g, dtype=torch.float64)
    lengths = torch.tensor([9, 1, 4, 7, 2])
    got = stats7(x, lengths).numpy()
    for i, n in enumerate(lengths.tolist()):
        frames = x[i, :n].numpy()
        expected = np.concatenate([frames.mean(0), frames.std(0), *np.percentile(frames, [10, 25, 50, 75, 90], axis=0)])
        np.testing.assert_allclose(got[i], expected, rtol=1e-10, atol=1e-12)


def test_bad_inputs_get_clear_errors():
    model = build_model(spec())
    x, lengths = inputs()
    with pytest.raises(DataError, match=r"missing \['a'\]"):
        model({k: v for k, v in x.items() if k != "a"}, lengths)
    with pytest.raises(DataError, match="expected feature size 5"):
        model({**x, "a": torch.randn(6, 7)}, lengths)
    with pytest.raises(DataError, match="pooling 'none' takes"):
        model({**x, "a": torch.randn(6, 2, 5)}, lengths)


def test_head_and_combiner_requirements_are_checked_at_build():
    with pytest.raises(Exception, match="combiner 'product' needs the head"):
        build_model(spec(heads={"salience": {"type": "classifier"}}, decoder={"type": "blemore"}))
    model = build_model(spec(heads={"salience": {"type": "classifier"}}, combiner={"type": "salience_only"},
                             decoder={"type": "blemore"})).eval()
    x, lengths = inputs()
    out = model(x, lengths)
    assert out.presence is None and torch.equal(out.probs, out.salience)
    preds = model.predict(x, lengths)
    assert len(preds) == 6 and all(1 <= len(p) <= 2 for p in preds)


def test_torch_compile_matches_eager():
    torch.manual_seed(0)
    model = build_model(spec()).eval()
    x, lengths = inputs()
    mask = torch.ones(6, 4, dtype=torch.bool)
    mask[2, 0] = False
    eager = model(x, lengths, mask)
    compiled = torch.compile(model)
    out = compiled(x, lengths, mask)
    assert torch.equal(out.kept, eager.kept)
    torch.testing.assert_close(out.probs, eager.probs, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out.weights, eager.weights, rtol=1e-4, atol=1e-5)


def test_precomputed_stats7_equals_pooling_inside_the_model(tmp_path):
    from fusionkit.data.store import Sample, open_store, write_store

    g = np.random.default_rng(0)
    seqs = [g.normal(size=(int(g.integers(1, 12)), 4)) * 3 + 1 for _ in range(20)]
    samples = [Sample(id=f"s{i}", labels=[{"emotion": "ang", "salience": 100.0}]) for i in range(20)]
    store = open_store(write_store(tmp_path / "s", ["ang", "sad"], samples, {"q": seqs, "v": g.normal(size=(20, 3))}))
    model = build_model({"labels": ["ang", "sad"], "neutral": None, "latent_dim": 8,
                         "encoders": [{"name": "q", "type": "features", "dim": 4, "pooling": "stats7"},
                                      {"name": "v", "type": "features", "dim": 3}]})
    model.encoders["q"].set_standardization(torch.tensor([1.0, -2.0, 0.5, 0.0]), torch.tensor([2.0, 0.5, 1.0, 3.0]))
    model.eval()
    rows = np.array([3, 0, 17, 9])
    assert model.precomputed_pooling() == {"q": "stats7"}
    inside = model(*store.batch(rows, model.encoder_names))
    cached = store.inputs_for(model, rows)
    assert cached[0]["q"].shape == (4, 28) and "q" not in cached[1]
    assert torch.allclose(model(*cached).probs, inside.probs, atol=1e-6)
    assert torch.allclose(model.encoders["q"](cached[0]["q"]),
                          model.encoders["q"](*store.encoders["q"].rows(rows)), atol=1e-5)


def test_sequence_batches_are_padded_exactly(tmp_path):
    from fusionkit.data.store import Sample, open_store, write_store

    seqs = [np.full((n, 2), float(i)) for i, n in enumerate([3, 1, 4, 2])]
    samples = [Sample(id=f"s{i}") for i in range(4)]
    feats = open_store(write_store(tmp_path / "s", ["a", "b"], samples, {"q": seqs})).encoders["q"]
    x, lengths = feats.rows(np.array([2, 1, 3]))
    assert lengths.tolist() == [4, 1, 2] and x.shape == (3, 4, 2)
    assert x[0].eq(2.0).all() and x[1, 0].eq(1.0).all() and x[1, 1:].eq(0).all() and x[2, 2:].eq(0).all()


def test_stats7_is_differentiable_when_its_input_needs_gradient():
    x = torch.randn(3, 6, 2, requires_grad=True)
    stats7(x, torch.tensor([6, 2, 4])).sum().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
