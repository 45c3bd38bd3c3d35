"""The quality scout (conditional.scout: quality): from a preview that tells, it learns where an on-demand
encoder's input is bad, without being told which inputs are, and a budget runs the encoder where it is good."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fusionkit.components.datasets import build_dataset
from fusionkit.data.store import open_store, write_store
from fusionkit.errors import SpecError
from fusionkit.export.check import check_export
from fusionkit.export.graphs import export_model
from fusionkit.inference import collect_outputs, fit_mean_budget
from fusionkit.models.factory import load_model
from fusionkit.spec import load_spec
from fusionkit.training.train import make_split, train


@pytest.fixture(scope="module")
def corrupted_store(tmp_path_factory):
    """enc1 (strong) replaced by noise on 40% of the samples, recorded in the index; enc0 (always run) says enough
    of the sample that a clean enc1 agrees with it; enc1_look, its preview, a cheap signal of whether it was (its
    level, with noise)."""
    root = tmp_path_factory.mktemp("quality")
    base = open_store(build_dataset("synthetic", {"samples": 600, "noise": [0.8, 0.3], "dim": 8, "seed": 0},
                                    root / "base"))
    rng = np.random.default_rng(0)
    enc0, enc1 = (base.encoders[n].data.numpy() for n in ("enc0", "enc1"))
    bad = rng.random(len(enc1)) < 0.4
    enc1 = np.where(bad[:, None], rng.normal(0.0, enc1.std(), enc1.shape), enc1).astype(np.float32)
    look = np.stack([bad + rng.normal(0, 0.3, len(bad)), rng.normal(0, 1, len(bad))], 1).astype(np.float32)
    samples = [s if not b else type(s)(s.id, s.labels, s.group, s.fold, s.domain, ("enc1",))
               for s, b in zip(base.samples, bad)]
    return write_store(root / "corrupted", base.labels, samples, {"enc0": enc0, "enc1": enc1, "enc1_look": look})


def quality_spec(**scout):
    return {"latent_dim": 16, "gate": {"type": "attention", "top_n": 2, "heads": 2},
            "encoders": [{"name": "enc0", "type": "features", "dim": 8},
                         {"name": "enc1", "type": "features", "dim": 8, "run": "on_demand", "cost_gflops": 1.0},
                         {"name": "enc1_look", "type": "features", "dim": 2, "preview_of": "enc1", "fused": False,
                          "cost_gflops": 0.05}],
            "conditional": {"scout": {"type": "quality", **scout}},
            "train": {"epochs": 8, "batch_size": 32, "lr": 3e-3, "seed": 0}}


def test_the_quality_scout_learns_where_an_input_is_bad_and_runs_it_where_it_is_good(corrupted_store, tmp_path):
    run = tmp_path / "run"
    train(quality_spec(), corrupted_store, run, fold=0, progress=False)
    model = load_model(run / "best")
    store = open_store(corrupted_store)
    split = make_split(store, 0)
    bad = np.array(["enc1" in store.samples[i].corrupted for i in split.test])
    inputs, lengths, mask = store.inputs_for(model, split.test)
    with torch.no_grad():  # the judge, never told which inputs are bad, tells them from the preview
        tokens = torch.stack([model.projectors[n](model.encoders[n](inputs[n])) for n in model.encoder_names], 1)
        judged = model.scout.judged(tokens, torch.ones(tokens.shape[:2], dtype=torch.bool))[:, 0].numpy()
    assert _auc(judged, bad) > 0.9
    budget = fit_mean_budget(model, store, split.val, "mean:50%")
    ran = collect_outputs(model, store, split.test, budget=budget)["ran"][:, 1].astype(bool)
    assert ran[~bad].mean() > ran[bad].mean() + 0.3, (ran[~bad].mean(), ran[bad].mean())
    folder = export_model(model, tmp_path / "exported", budget=budget)
    check_export(model, folder, store)  # the runtime judges and runs the same rows, the stored budget included


def _auc(scores: np.ndarray, positive: np.ndarray) -> float:
    """The probability that a positive scores above a negative."""
    pos, neg = scores[positive], scores[~positive]
    return float((pos[:, None] > neg[None, :]).mean() + 0.5 * (pos[:, None] == neg[None, :]).mean())


def test_the_quality_scouts_options_are_checked():
    with pytest.raises(SpecError, match=r"conditional.scout.hidden: must be > 0"):
        load_spec(quality_spec(hidden=0))
