"""A scout whose values learn on held-out rows (Scout.values_from = "validation"): at every evaluation the trainer
measures, on the validation rows and nowhere else, the drop of each row's loss when each on-demand encoder joins
each state, and the scout fits its values to them."""

from __future__ import annotations

import attrs
import pytest
import torch
from conftest import tiny_spec

import fusionkit
from fusionkit.data.store import open_store
from fusionkit.errors import FusionkitError, SpecError
from fusionkit.interfaces import ScoutConfig
from fusionkit.models.factory import load_model
from fusionkit.training.losses import row_losses
from fusionkit.training.scout_values import held_out_examples, held_out_states
from fusionkit.training.tasks import ClassificationTask
from fusionkit.training.train import make_split, train


class RecordingScout(fusionkit.interfaces.Scout):
    """Values that are one learned number per encoder, set by fit_values to the mean measured drop; it keeps
    what it was given."""

    needs_drops = False
    values_from = "validation"
    given: list = []

    def __init__(self, config, context):
        super().__init__(config, context)
        self.register_buffer("mean_drop", torch.zeros(len(context.on_demand)))

    def forward(self, tokens, present, ran):
        return self.mean_drop.expand(len(tokens), -1) + 0.0 * tokens.sum((1, 2)).unsqueeze(1)

    def fit_values(self, examples):
        RecordingScout.given.append(examples)
        self.mean_drop.copy_(mean_drops(examples))


def mean_drops(examples):
    """Each on-demand encoder's mean measured drop over every state that could add it."""
    return torch.stack([torch.cat([e.measured[e.addable[:, j], j] for e in examples]).mean()
                        for j in range(examples[0].measured.shape[1])])


class Plugin:
    @fusionkit.hookimpl
    def register_scouts(self, register):
        register("recording", RecordingScout, config=ScoutConfig, description="Records its held-out examples.")


@pytest.fixture
def recording():
    RecordingScout.given = []
    fusionkit.register_plugin(Plugin(), "recording-scout-test")
    return RecordingScout


def held_out_spec(scout="recording"):
    spec = tiny_spec()
    spec["gate"].update(top_n=3, noise=0.0)
    spec["encoders"][1].update(run="on_demand", cost_gflops=1.0)
    spec["encoders"][2].update(run="on_demand", cost_gflops=3.0)
    spec["conditional"] = {"scout": scout}
    spec["train"]["epochs"] = 2
    return spec


def test_values_are_fitted_on_the_validation_rows_at_every_evaluation(recording, synthetic_store, tmp_path):
    run = tmp_path / "run"
    train(held_out_spec(), synthetic_store, run, fold=0, progress=False)
    store = open_store(synthetic_store)
    val = make_split(store, 0).val
    assert len(recording.given) == 2  # one fit per evaluation
    examples = recording.given[-1]
    assert [tuple(e.state[0].tolist()) for e in examples] == held_out_states(2) == [(False, False), (False, True),
                                                                                    (True, False)]
    assert all(len(e.measured) == len(val) for e in examples)  # the validation rows, every one
    model = load_model(run / "best")
    assert torch.allclose(model.scout.mean_drop, mean_drops(examples))  # the best model holds its fitted values


@pytest.mark.parametrize("scout", ["recording", "gate"])
def test_a_held_out_drop_is_the_rows_loss_without_the_encoder_less_its_loss_with_it(recording, synthetic_store, scout):
    model = fusionkit.build_model(held_out_spec(scout)).eval()
    store = open_store(synthetic_store)
    rows = make_split(store, 0).val[:20]
    examples = held_out_examples(model, store, rows, model.spec.train)
    target = torch.as_tensor(store.truth_matrix(rows) / 100.0, dtype=torch.float32)
    inputs, lengths, mask = store.inputs_for(model, rows)
    for example, state in zip(examples, held_out_states(2)):
        if scout == "gate":  # the gate scout predicts no drops
            assert not example.predicted.any()
        with torch.no_grad():
            before = row_losses(model(inputs, lengths, mask, runs=torch.tensor([state] * len(rows))).logits, target,
                                model.spec.train)
            for j in range(2):
                if state[j]:
                    assert not example.addable[:, j].any()
                    continue
                added = tuple(s or i == j for i, s in enumerate(state))
                after = row_losses(model(inputs, lengths, mask, runs=torch.tensor([added] * len(rows))).logits,
                                   target, model.spec.train)
                assert torch.allclose(example.measured[:, j], before - after, atol=1e-5)


def test_a_scout_that_fits_on_validation_refuses_a_run_without_validation_rows(recording, synthetic_store):
    store = open_store(synthetic_store)
    split = make_split(store, 0)
    task = ClassificationTask(fusionkit.load_spec(held_out_spec()), store, attrs.evolve(split, val=split.val[:0]))
    with pytest.raises(FusionkitError, match=r"conditional.scout: 'recording' fits its values on the validation "
                                             r"rows, and this run has none"):
        task.prepare(fusionkit.build_model(held_out_spec()))


def test_a_scout_that_says_its_values_come_from_elsewhere_is_refused_naming_its_plugin():
    class Elsewhere(RecordingScout):
        values_from = "test"

    class Bad:
        @fusionkit.hookimpl
        def register_scouts(self, register):
            register("elsewhere", Elsewhere, config=ScoutConfig, description="Learns on the test rows.")

    fusionkit.register_plugin(Bad(), "elsewhere-scout-test")
    with pytest.raises(SpecError, match=r"conditional.scout.type: scout 'elsewhere' .* sets values_from = 'test'; "
                                        r"it must be one of 'training', 'validation'"):
        fusionkit.load_spec(held_out_spec("elsewhere"))
