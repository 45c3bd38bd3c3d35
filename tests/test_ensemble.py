"""Fold ensembles (fusionkit.evaluation.ensemble): averaged models, out-of-fold thresholds, and the checks that come
before anything is combined: a complete cross-validation, one spec, the store the folds trained on."""

from __future__ import annotations

import json
import re
import shutil

import numpy as np
import pytest
from conftest import tiny_spec

from fusionkit.cli import main
from fusionkit.data.open import spec_store
from fusionkit.errors import CheckpointError, DataError, FusionkitWarning
from fusionkit.evaluation.ensemble import FoldEnsemble, expand_runs
from fusionkit.inference import collect_outputs
from fusionkit.spec import load_spec
from fusionkit.training.train import cross_validate, train


@pytest.fixture(scope="module")
def cv_run(synthetic_store, tmp_path_factory):
    out = tmp_path_factory.mktemp("ensemble") / "cv"
    cross_validate(tiny_spec(epochs=1), synthetic_store, out, progress=False)
    return out


@pytest.fixture
def cv_copy(cv_run, tmp_path):
    shutil.copytree(cv_run, tmp_path / "cv")
    return tmp_path / "cv"


def test_an_ensemble_averages_its_models_and_fits_thresholds_out_of_fold(cv_run, synthetic_store, tmp_path):
    ensemble = FoldEnsemble([cv_run])
    assert [p.name for p in ensemble.runs] == [f"fold{k}" for k in range(5)]
    store = spec_store(load_spec(tiny_spec()), synthetic_store)
    index = store.select(labelled=True)[:20]
    single = [collect_outputs(m, store, index)["probs"] for m in ensemble.models]
    np.testing.assert_allclose(ensemble.outputs(store, index)["probs"], np.mean(single, axis=0), rtol=1e-6)
    config = ensemble.fit_decoder(store)
    assert all(m.decoder.config == config for m in ensemble.models)
    with pytest.raises(CheckpointError, match="name one run twice"):
        FoldEnsemble([cv_run / "fold0", cv_run / "fold0" / ".." / "fold0"])
    train(tiny_spec(epochs=1), synthetic_store, tmp_path / "again", fold=0, progress=False)
    with pytest.raises(DataError, match="overlaps"):
        FoldEnsemble([cv_run / "fold0", tmp_path / "again"]).fit_decoder(store)


# --- the store the folds trained on ----------------------------------------------------------------------------


def test_a_store_with_its_folds_reassigned_is_refused(cv_run, synthetic_store, tmp_path, capsys):
    shutil.copytree(synthetic_store, tmp_path / "moved")  # the same store elsewhere: accepted
    FoldEnsemble([cv_run]).fit_decoder(spec_store(load_spec(tiny_spec()), tmp_path / "moved"))
    shutil.copytree(synthetic_store, tmp_path / "rotated")
    index = json.loads((tmp_path / "rotated" / "index.json").read_text())
    for sample in index["samples"]:
        if sample["fold"] >= 0:
            sample["fold"] = (sample["fold"] + 1) % 5
    (tmp_path / "rotated" / "index.json").write_text(json.dumps(index))
    with pytest.raises(DataError, match=r"fold0: trained on other data than .*rotated .*folds were reassigned"):
        FoldEnsemble([cv_run]).fit_decoder(spec_store(load_spec(tiny_spec()), tmp_path / "rotated"))
    assert main(["evaluate", "--cv", str(cv_run), "--data", str(tmp_path / "rotated"), "--split", "labelled"]) == 2
    assert "trained on other data" in capsys.readouterr().err
    assert not (cv_run / "evaluation_ensemble_labelled.json").exists()


# --- a complete cross-validation -----------------------------------------------------------------------------------


def _break(cv, how):
    if how == "deleted":
        shutil.rmtree(cv / "fold2")
        return "fold2 (missing)"
    if how == "no best":
        shutil.rmtree(cv / "fold2" / "best")
        return "fold2 (no best/ checkpoint)"
    if how == "running":
        info = json.loads((cv / "fold2" / "run.json").read_text())
        (cv / "fold2" / "run.json").write_text(json.dumps({**info, "status": "running"}))
        return "fold2 (status running)"
    for k in (1, 2, 3, 4):  # one fold left
        shutil.rmtree(cv / f"fold{k}")
    return "fold1 (missing), fold2 (missing), fold3 (missing), fold4 (missing)"


@pytest.mark.parametrize("how", ["deleted", "no best", "running", "one left"])
def test_an_incomplete_cross_validation_is_refused_naming_the_folds(cv_copy, synthetic_store, tmp_path, how, capsys):
    named = _break(cv_copy, how)
    with pytest.raises(CheckpointError, match=rf"the cross-validation is incomplete: {re.escape(named)}\. .*--partial"):
        FoldEnsemble([cv_copy])
    assert main(["predict", "--cv", str(cv_copy), "--data", str(synthetic_store), "--out",
                 str(tmp_path / "sub.json"), "--split", "labelled"]) == 2
    assert named in capsys.readouterr().err
    assert not (tmp_path / "sub.json").exists()
    with pytest.warns(FusionkitWarning, match="a partial ensemble of"):
        runs = expand_runs([cv_copy], partial=True)
    assert len(runs) == (1 if how == "one left" else 4)
    assert main(["predict", "--cv", str(cv_copy), "--partial", "--data", str(synthetic_store), "--out",
                 str(tmp_path / "sub.json"), "--split", "labelled"]) == 0


# --- runs that fit together ----------------------------------------------------------------------------------------


def test_a_fold_retrained_with_another_spec_is_named_before_anything_loads(cv_copy, synthetic_store):
    other = tiny_spec(epochs=1)
    other["gate"]["top_n"] = 1
    train(other, synthetic_store, cv_copy / "fold3", fold=3, overwrite=True, progress=False)
    with pytest.raises(CheckpointError, match=r"fold3: its spec differs from .*fold0's \(gate.*top_n: 2 -> 1\)"):
        FoldEnsemble([cv_copy])


def test_runs_with_other_encoders_are_named(cv_run, synthetic_store, tmp_path):
    fewer = tiny_spec(epochs=1)
    fewer["encoders"] = fewer["encoders"][:2]
    train(fewer, synthetic_store, tmp_path / "fewer", fold=1, progress=False)
    with pytest.raises(CheckpointError, match=r"fewer: its spec differs .*encoders"):
        FoldEnsemble([cv_run / "fold0", tmp_path / "fewer"])


def test_an_empty_run_json_and_a_stray_folder_are_handled(cv_copy, synthetic_store):
    shutil.copytree(cv_copy / "fold1", cv_copy / "fold1_backup")  # not a fold's name: not the ensemble's
    assert [p.name for p in FoldEnsemble([cv_copy]).runs] == [f"fold{k}" for k in range(5)]
    shutil.copytree(cv_copy / "fold1", cv_copy / "fold9")
    with pytest.warns(FusionkitWarning, match=r"fold folder\(s\) \[9\] are not among the cross-validation's folds"):
        assert [p.name for p in FoldEnsemble([cv_copy]).runs] == [f"fold{k}" for k in range(5)]
    (cv_copy / "fold4" / "run.json").write_text("")
    with pytest.raises(CheckpointError, match=r"fold4 \(.*fold4/run.json: unreadable"):
        FoldEnsemble([cv_copy])
    (cv_copy / "run.json").write_text("")
    with pytest.raises(CheckpointError, match=r"cv/run.json: unreadable"):
        FoldEnsemble([cv_copy])
