"""Training: reproducibility, resume, folds, standardisation, the command line end to end."""

from __future__ import annotations

import json
import subprocess
import zipfile

import numpy as np
import pytest
import torch
from conftest import tiny_spec

from fusionkit.cli import main
from fusionkit.data.open import spec_store
from fusionkit.data.store import open_store
from fusionkit.errors import CheckpointError, DataError
from fusionkit.models.factory import load_model
from fusionkit.spec import load_spec
from fusionkit.training.train import Trainer, make_split, train


def weights(run):
    return load_model(run / "best").state_dict()


def test_same_seed_same_numbers(synthetic_store, tmp_path):
    a = train(tiny_spec(), synthetic_store, tmp_path / "a", fold=0, progress=False)
    b = train(tiny_spec(), synthetic_store, tmp_path / "b", fold=0, progress=False)
    assert a == b
    wa, wb = weights(tmp_path / "a"), weights(tmp_path / "b")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    c = train(tiny_spec(seed=1), synthetic_store, tmp_path / "c", fold=0, progress=False)
    assert c["test"]["per_label_f1"] != a["test"]["per_label_f1"] or c["val"] != a["val"]


def test_a_killed_run_resumes_to_the_same_result(synthetic_store, tmp_path):
    full = train(tiny_spec(epochs=6), synthetic_store, tmp_path / "full", fold=1, progress=False)
    spec = load_spec(tiny_spec(epochs=6))
    store = spec_store(spec, synthetic_store)
    split = make_split(store, 1)
    interrupted = Trainer(spec, store, tmp_path / "part", split, progress=False).fit(stop_after_epochs=2)
    assert interrupted == {"interrupted": True, "epoch": 2}
    # a line logged for an epoch whose checkpoint never landed is dropped on resume
    with open(tmp_path / "part" / "log.jsonl", "a") as fh:
        fh.write(json.dumps({"epoch": 2, "loss": 123.0}) + "\n")
    resumed = Trainer(spec, store, tmp_path / "part", split, progress=False).fit(resume=True)
    assert resumed == full
    wf, wp = weights(tmp_path / "full"), weights(tmp_path / "part")
    assert all(torch.equal(wf[k], wp[k]) for k in wf)
    def records(run):
        lines = (tmp_path / run / "log.jsonl").read_text().splitlines()
        return [{k: v for k, v in json.loads(x).items() if k != "seconds"} for x in lines]

    assert [r["epoch"] for r in records("part")] == list(range(6))
    assert records("part") == records("full")


def test_resume_needs_a_checkpoint_and_the_same_spec(synthetic_store, tmp_path):
    with pytest.raises(CheckpointError, match="nothing to resume"):
        train(tiny_spec(), synthetic_store, tmp_path / "none", fold=0, resume=True, progress=False)
    spec = load_spec(tiny_spec())
    store = spec_store(spec, synthetic_store)
    Trainer(spec, store, tmp_path / "r", make_split(store, 0), progress=False).fit(stop_after_epochs=1)
    with pytest.raises(CheckpointError, match="different spec"):
        train(tiny_spec(lr=1e-2), synthetic_store, tmp_path / "r", fold=0, resume=True, progress=False)


def test_resuming_a_finished_run_under_another_spec_is_refused(synthetic_store, tmp_path, capsys):
    from fusionkit.cli import main

    first = train(tiny_spec(epochs=1), synthetic_store, tmp_path / "r", fold=0, progress=False)
    assert train(tiny_spec(epochs=1), synthetic_store, tmp_path / "r", fold=0, resume=True, progress=False) == first
    metrics = (tmp_path / "r" / "metrics.json").read_bytes()
    with pytest.raises(CheckpointError, match=r"different spec \(train.lr: 0.003 -> 0.01\)"):
        train(tiny_spec(epochs=1, lr=1e-2), synthetic_store, tmp_path / "r", fold=0, resume=True, progress=False)
    import yaml

    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(tiny_spec(epochs=2)))
    assert main(["train", str(tmp_path / "spec.yaml"), "--data", str(synthetic_store), "--out", str(tmp_path / "r"),
                 "--fold", "0", "--resume", "--quiet"]) == 2
    assert "train.epochs: 1 -> 2" in capsys.readouterr().err
    assert (tmp_path / "r" / "metrics.json").read_bytes() == metrics


def test_folds_are_group_disjoint_and_test_is_never_trained_on(synthetic_store):
    store = open_store(synthetic_store)
    split = make_split(store, 2)
    groups = [set(store.groups[idx]) for idx in (split.train, split.val, split.test)]
    assert not (groups[0] & groups[1]) and not (groups[0] & groups[2]) and not (groups[1] & groups[2])
    assert set(store.folds[split.test]) == {2} and set(store.folds[split.val]) == {3}
    with pytest.raises(DataError, match="--fold 9"):
        make_split(store, 9)


def test_standardisation_uses_training_rows_only(synthetic_store, tmp_path):
    train(tiny_spec(epochs=1), synthetic_store, tmp_path / "run", fold=0, progress=False)
    model = load_model(tmp_path / "run" / "best")
    store = open_store(synthetic_store)
    split = make_split(store, 0)
    x = store.encoders["enc1"].data[torch.as_tensor(split.train)]
    assert torch.allclose(model.encoders["enc1"].input_mean, x.mean(0), atol=1e-6)
    assert torch.allclose(model.encoders["enc1"].input_std, x.std(0), atol=1e-6)
    everything = store.encoders["enc1"].data.mean(0)
    assert not torch.allclose(model.encoders["enc1"].input_mean, everything, atol=1e-4)


def test_training_beats_chance_and_decoder_thresholds_come_from_validation(synthetic_store, tmp_path):
    metrics = train(tiny_spec(epochs=20, lr=1e-2), synthetic_store, tmp_path / "run", fold=0, progress=False)
    assert metrics["test"]["acc_presence"] > 0.5  # chance is far lower (6 labels, 15 pairs)
    model = load_model(tmp_path / "run" / "best")
    assert model.decoder.config.threshold == metrics["decoder"]["threshold"]
    log = [json.loads(x) for x in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert {"loss", "presence_bce", "salience_kl", "token_kl", "gate_rank", "val", "lr"} <= set(log[0])


def cli(capsys, *args) -> subprocess.CompletedProcess:
    """A command run through the command line's entry point in this process (what `python -m fusionkit` runs; the
    process itself is tested where it matters, e.g. tests/test_safety.py)."""
    code = main([str(a) for a in args])
    out = capsys.readouterr()
    return subprocess.CompletedProcess(args, code, out.out, out.err)


def test_command_line_end_to_end(tmp_path, capsys):
    import yaml

    store = tmp_path / "store"
    proc = cli(capsys, "data", "build", "synthetic", "--out", store, "--set", "samples=300", "--set", "dim=8",
               "--set", "noise=[0.3, 1.0, 3.0]")
    assert proc.returncode == 0, proc.stderr
    spec_file = tmp_path / "spec.yaml"
    spec_file.write_text(yaml.safe_dump(tiny_spec(epochs=3)))
    proc = cli(capsys, "train", spec_file, "--data", store, "--out", tmp_path / "run", "--fold", 0, "--quiet")
    assert proc.returncode == 0, proc.stderr
    assert "test  ACC_presence" in proc.stdout
    for name in ("spec.yaml", "run.json", "log.jsonl", "metrics.json", "best/model.safetensors", "last/model.safetensors"):
        assert (tmp_path / "run" / name).exists(), name

    proc = cli(capsys, "evaluate", tmp_path / "run", "--data", store)
    assert proc.returncode == 0, proc.stderr
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert f"Score {metrics['test']['score']:.3f}" in proc.stdout

    proc = cli(capsys, "predict", tmp_path / "run", "--data", store, "--out", tmp_path / "sub.json", "--split", "test",
               "--id-suffix", ".mov")
    assert proc.returncode == 0, proc.stderr
    sub = json.loads((tmp_path / "sub.json").read_text())["predictions"]
    assert len(sub) == metrics["test"]["n"] and all(k.endswith(".mov") for k in sub)
    for pred in sub.values():
        assert len(pred) in (1, 2)
        assert sorted(p["salience"] for p in pred) in ([100.0], [50.0, 50.0], [30.0, 70.0])
    with zipfile.ZipFile(tmp_path / "sub.zip") as zf:
        assert json.loads(zf.read("sub.json"))["predictions"] == sub

    proc = cli(capsys, "predict", tmp_path / "run", "--data", store, "--out", tmp_path / "none.json")
    assert proc.returncode == 2 and "no unlabelled samples" in proc.stderr
    assert not (tmp_path / "none.json").exists()

    proc = cli(capsys, "report", tmp_path / "run")
    assert proc.returncode == 0, proc.stderr
    report = tmp_path / "run" / "report"
    for name in ("learning_curves.png", "kept_per_label.png", "presence_confusion.png", "salience_confusion.png"):
        assert (report / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
    assert f"{metrics['test']['score']:.3f}" in (report / "summary.md").read_text()


def test_cross_validation_reports_mean_and_std(synthetic_store, tmp_path):
    from fusionkit.training.train import cross_validate

    summary = cross_validate(tiny_spec(epochs=1), synthetic_store, tmp_path / "cv", progress=False)
    per_fold = [json.loads((tmp_path / "cv" / f"fold{k}" / "metrics.json").read_text())["test"]["score"] for k in range(5)]
    assert summary["score"]["values"] == per_fold
    assert summary["score"]["mean"] == pytest.approx(np.mean(per_fold))
    assert summary["score"]["std"] == pytest.approx(np.std(per_fold))


def test_train_fraction_cuts_only_the_training_rows_the_same_way_for_every_seed(synthetic_store, tmp_path):
    store = spec_store(load_spec(tiny_spec()), synthetic_store)
    full, quarter, half = (make_split(store, 0, f) for f in (1.0, 0.25, 0.5))
    assert len(quarter.train) == round(0.25 * len(full.train)) and set(quarter.train) < set(half.train) < set(full.train)
    assert np.array_equal(quarter.val, full.val) and np.array_equal(quarter.test, full.test)
    spec = tiny_spec(epochs=1)
    spec["train"]["train_fraction"] = 0.25
    train(spec, synthetic_store, tmp_path / "r", fold=0, progress=False)
    assert json.loads((tmp_path / "r" / "run.json").read_text())["n_train"] == len(quarter.train)
    with pytest.raises(DataError, match="train_fraction is 0"):
        make_split(store, 0, 0.0)
