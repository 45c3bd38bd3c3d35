"""Plugins written against the 0.1.0 docs keep working in 0.2.x (tests/plugins_010), with a DeprecationWarning
that says what to change where the style is deprecated."""

from __future__ import annotations

import warnings

import pytest
import torch

import fusionkit
from fusionkit.errors import FusionkitError, SpecError
from fusionkit.plugins import register_plugin


@pytest.fixture
def legacy():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # the old import paths warn; tested in test_layers
        from plugins_010 import legacy
    register_plugin(legacy, "legacy-010")
    return legacy


def spec(gate):
    return {"latent_dim": 8, "gate": {"type": gate, "top_n": 1}, "fusion": {"type": "old_max_fusion"},
            "encoders": [{"name": "a", "type": "old_encoder", "dim": 3}, {"name": "b", "type": "features", "dim": 5}],
            "adaptation": [{"type": "old_mean_gap", "on": "encoders"}]}


def test_a_gate_registered_with_a_factory_function_builds_and_runs_with_a_deprecation(legacy):
    with pytest.warns(DeprecationWarning, match=r"factory function(.|\n)*register the Gate subclass(.|\n)*0\.3\.0"):
        model = fusionkit.build_model(spec("old_norm_gate"))
    assert isinstance(model.gate, legacy.NormGate)
    out = model({"a": torch.randn(4, 3), "b": torch.randn(4, 5)})
    assert out.kept.shape == (4, 1) and torch.isfinite(out.probs).all()


def test_every_other_010_registration_style_works_without_a_warning(legacy, tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)
        model = fusionkit.build_model(spec("old_class_gate"))
        assert model({"a": torch.randn(4, 3), "b": torch.randn(4, 5)}).fused.shape == (4, 8)
        from fusionkit.components.datasets import build_dataset
        from fusionkit.data.store import open_store

        store = open_store(build_dataset("old-two-class", {"samples": 8}, tmp_path / "two-class"))
        assert store.labels == ("low", "high") and store.encoders["level"].dim == 3
    assert float(legacy.MeanGap(legacy.MeanGapConfig(), None).discrepancy(torch.zeros(4, 2), torch.ones(5, 2), 0.0)) == 2.0


def test_a_factory_gate_cannot_run_encoders_on_demand_and_must_build_a_gate(legacy):
    on_demand = spec("old_norm_gate")
    on_demand["encoders"][1].update(run="on_demand", cost_gflops=1.0)
    with pytest.warns(DeprecationWarning), pytest.raises(SpecError, match="cannot score an encoder before"):
        fusionkit.build_model(on_demand)

    class Plugin:
        @fusionkit.hookimpl
        def register_gates(self, register):
            register("not_a_gate", lambda config, context: torch.nn.Identity(), config=legacy.NormGateConfig)

    register_plugin(Plugin(), "not-a-gate")
    with pytest.warns(DeprecationWarning), pytest.raises(FusionkitError, match="built a Identity"):
        fusionkit.build_model(spec("not_a_gate"))


def test_a_distillation_loss_registered_through_a_lambda_validates(legacy):
    two_tower = {"towers": {"a": {"encoders": ["x"]}, "b": {"encoders": ["y"]}},
                 "encoders": [{"name": "x", "type": "features", "dim": 3}, {"name": "y", "type": "features", "dim": 3}],
                 "distill": {"teacher": "teacher", "losses": [{"type": "old_cosine", "weight": 0.5}]}}
    assert fusionkit.load_spec(two_tower).distill.losses[0].type == "old_cosine"
