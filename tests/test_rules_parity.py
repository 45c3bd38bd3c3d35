"""Each rule of conditional execution lives twice, once on tensors (fusionkit.conditional.rules, the model's) and
once on numpy arrays (fusionkit.conditional.numpy_rules, the runtime's): each pair agrees on random inputs."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fusionkit.conditional import numpy_rules
from fusionkit.conditional import rules as torch_rules


@pytest.mark.parametrize("seed", range(20))
def test_within_budget_runs_the_same_encoders(seed):
    rng = np.random.default_rng(seed)
    scores = rng.normal(size=(32, 4)).astype(np.float32)
    scores[:, 3] = scores[:, 2]  # ties: the lower index first, in both
    present = rng.random((32, 4)) > 0.2
    costs = rng.uniform(0.5, 5.0, size=4)
    limit = rng.uniform(0.0, 10.0, size=32)
    got = numpy_rules.within_budget(scores, present, costs, limit)
    expected = torch_rules.within_budget(torch.as_tensor(scores), torch.as_tensor(present), torch.as_tensor(costs),
                                         torch.as_tensor(limit)).numpy()
    assert np.array_equal(got, expected)


@pytest.mark.parametrize("seed", range(20))
def test_value_per_cost_and_relative_costs_agree(seed):
    rng = np.random.default_rng(seed)
    scores = (rng.normal(size=(32, 5)) * rng.choice([1.0, 50.0])).astype(np.float32)
    present = rng.random((32, 5)) > 0.3
    costs = rng.uniform(0.01, 20.0, size=5)
    demand = sorted(rng.choice(5, size=3, replace=False).tolist())
    got = numpy_rules.value_per_cost(scores, present, costs, demand)
    expected = torch_rules.value_per_cost(torch.as_tensor(scores), torch.as_tensor(present), torch.as_tensor(costs),
                                          demand).numpy()
    assert np.array_equal(np.isinf(got), np.isinf(expected))
    assert np.allclose(got[np.isfinite(got)], expected[np.isfinite(expected)], rtol=1e-6)
    assert np.allclose(numpy_rules.relative_costs(costs, demand),
                       torch_rules.relative_costs(torch.as_tensor(costs), demand).numpy(), rtol=1e-6)


@pytest.mark.parametrize("seed", range(20))
def test_one_stage_picks_the_same_encoder_and_stops_alike(seed):
    rng = np.random.default_rng(seed)
    values = rng.normal(size=(64, 4)).astype(np.float32)
    relative = rng.uniform(0.2, 3.0, size=4).astype(np.float32)
    eligible = rng.random((64, 4)) > 0.3
    eligible[:5] = False  # rows with nothing left: none picked, and they stop
    threshold = rng.choice([-np.inf, 0.0, 0.3])
    per_row = rng.normal(size=64).astype(np.float32)  # a threshold per row (budgets per row)
    for bar in (threshold, per_row):
        pick, best, going = numpy_rules.stage_pick(values, relative, eligible, bar)
        t_pick, t_best, t_going = torch_rules.stage_pick(torch.as_tensor(values), torch.as_tensor(relative),
                                                         torch.as_tensor(eligible), torch.as_tensor(bar))
        assert np.array_equal(going, t_going.numpy())
        assert np.array_equal(pick[going], t_pick.numpy()[going])
        assert np.allclose(best[going], t_best.numpy()[going], rtol=1e-6)
        assert not going[:5].any()
