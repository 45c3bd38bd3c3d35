"""fusionkit sweep on Optuna: trials as run directories, pruning, resume after a kill, workers sharing SQLite."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import optuna
import pytest
import yaml
from conftest import tiny_spec

from fusionkit.errors import SpecError
from fusionkit.spec import load_spec
from fusionkit.sweep import STUDY_FILE, load_space, sweep

SPACE = {"train.lr": {"float": [1.0e-3, 1.0e-2], "log": True}, "gate.top_n": {"int": [1, 3]},
         "latent_dim": {"choices": [8, 16]}}


def write(tmp_path, spec, space):
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(spec))
    (tmp_path / "space.yaml").write_text(yaml.safe_dump(space))
    return tmp_path / "spec.yaml", tmp_path / "space.yaml"


def states(out):
    study = optuna.load_study(study_name="fusionkit", storage=f"sqlite:///{out / STUDY_FILE}")
    return [t.state.name for t in study.get_trials()], study


def test_a_four_trial_sweep_writes_runs_the_best_spec_a_table_and_plots(synthetic_store, tmp_path):
    spec, space = write(tmp_path, tiny_spec(epochs=2), SPACE)
    summary = sweep(spec, synthetic_store, space, 4, tmp_path / "sweep")
    got, study = states(tmp_path / "sweep")
    assert got.count("COMPLETE") + got.count("PRUNED") == 4 and summary["complete"] >= 1
    for trial in study.get_trials():
        if trial.state.name == "COMPLETE":
            metrics = json.loads((tmp_path / "sweep" / f"trial-{trial.number:04d}" / "metrics.json").read_text())
            assert metrics["val"]["score"] == pytest.approx(trial.value)
    best = load_spec(tmp_path / "sweep" / "best.yaml")
    assert best.latent_dim == summary["best_params"]["latent_dim"]
    assert best.train.lr == pytest.approx(summary["best_params"]["train.lr"])
    assert "| trial | state | Score |" in (tmp_path / "sweep" / "trials.md").read_text()
    assert (tmp_path / "sweep" / "history.png").stat().st_size > 0


def test_trials_that_fall_behind_are_pruned(synthetic_store, tmp_path):
    space = {"train.lr": {"choices": [3.0e-3, 1.0e-9]}, "latent_dim": {"choices": [8, 16]}}
    spec, space = write(tmp_path, tiny_spec(epochs=5), space)
    summary = sweep(spec, synthetic_store, space, 10, tmp_path / "sweep")
    assert summary["pruned"] >= 1, summary
    pruned = [t for t in states(tmp_path / "sweep")[1].get_trials() if t.state.name == "PRUNED"]
    log = (tmp_path / "sweep" / f"trial-{pruned[0].number:04d}" / "log.jsonl").read_text().splitlines()
    assert len(log) < 5  # stopped before its last epoch


def test_a_sweep_killed_mid_trial_resumes_to_n_finished_trials(synthetic_store, tmp_path):
    spec, space = write(tmp_path, tiny_spec(epochs=40), SPACE)
    args = [sys.executable, "-m", "fusionkit", "sweep", spec, "--data", synthetic_store, "--space", space,
            "--trials", "3", "--out", tmp_path / "sweep", "--heartbeat", "1"]
    proc = subprocess.Popen(list(map(str, args)), start_new_session=True, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not (tmp_path / "sweep" / "trial-0001" / "log.jsonl").exists() and time.time() < deadline:
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert states(tmp_path / "sweep")[0].count("RUNNING") == 1
    spec_short, _ = write(tmp_path, tiny_spec(epochs=40), SPACE)
    done = subprocess.run(list(map(str, args)), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    got, _ = states(tmp_path / "sweep")
    assert got.count("COMPLETE") + got.count("PRUNED") == 3


def test_two_workers_on_one_sqlite_file_lose_no_trial(synthetic_store, tmp_path):
    spec, space = write(tmp_path, tiny_spec(epochs=2), SPACE)
    sweep(spec, synthetic_store, space, 4, tmp_path / "sweep", jobs=2)
    got, study = states(tmp_path / "sweep")
    assert got.count("COMPLETE") + got.count("PRUNED") >= 4 and "RUNNING" not in got
    numbers = [t.number for t in study.get_trials()]
    assert sorted(numbers) == list(range(len(numbers)))
    assert {p.name for p in (tmp_path / "sweep").glob("trial-*")} == {f"trial-{n:04d}" for n in numbers}


@pytest.mark.parametrize(("space", "message"), [
    ({"train.lr": {"float": [1.0, 0.1]}}, r"space.yaml[\s\S]*train.lr: float: expected \[low, high\] with low < high"),
    ({"train.lr": {"float": [0.1, 1.0], "steps": 3}}, r"space.yaml[\s\S]*train.lr: unknown option\(s\) \['steps'\]"),
    ({"gate.top_m": {"choices": [1, 2]}}, r"space.yaml[\s\S]*a spec with this space's values is invalid: .*gate.top_m"),
    ({"encoders": {"subset": ["enc0", "nope"]}}, r"space.yaml[\s\S]*encoders: subset chooses among the spec's encoders"),
    ([1, 2], r"space.yaml[\s\S]*expected a mapping of spec paths"),
])
def test_a_bad_space_file_is_refused_naming_the_path(space, message, tmp_path):
    _, path = write(tmp_path, tiny_spec(), space)
    with pytest.raises(SpecError, match=message):
        load_space(path, tiny_spec())
