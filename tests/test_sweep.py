"""fusionkit sweep on Optuna: trials as run directories, pruning, resume after a kill, workers sharing SQLite."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
import yaml
from conftest import tiny_spec

from fusionkit.errors import FusionkitError, SpecError
from fusionkit.spec import load_spec
from fusionkit.training.sweep import STUDY_FILE, load_space, sweep
from fusionkit.training.train import train

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
    spec, space = write(tmp_path, tiny_spec(epochs=6), SPACE)
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
    spec_short, _ = write(tmp_path, tiny_spec(epochs=6), SPACE)
    done = subprocess.run(list(map(str, args)), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    got, _ = states(tmp_path / "sweep")
    assert got.count("COMPLETE") + got.count("PRUNED") == 3
    table = (tmp_path / "sweep" / "trials.md").read_text()  # the killed trial is failed at once, not left running
    assert "| running |" not in table and "| 1 | fail |" in table and got[1] == "FAIL"


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


# --- the sweep directory is fusionkit's, and holds one study ----------------------------------------------------


def test_a_second_study_in_one_directory_is_refused_and_the_first_keeps_its_trials(synthetic_store, tmp_path):
    spec, space = write(tmp_path, tiny_spec(epochs=1), SPACE)
    sweep(spec, synthetic_store, space, 1, tmp_path / "d", study_name="A")
    before = {p.name: p.read_bytes() for p in (tmp_path / "d").iterdir() if p.is_file()}
    metrics = (tmp_path / "d" / "trial-0000" / "metrics.json").read_bytes()
    with pytest.raises(FusionkitError, match=r"holds the trials of study 'A'.*--study A"):
        sweep(spec, synthetic_store, space, 1, tmp_path / "d", study_name="B")
    assert (tmp_path / "d" / "trial-0000" / "metrics.json").read_bytes() == metrics
    assert {p.name: p.read_bytes() for p in (tmp_path / "d").iterdir() if p.is_file()} == before


@pytest.mark.parametrize("name", ["summary.json", "trials.md", "best.yaml", "history.png"])
def test_out_refuses_a_users_directory_and_touches_nothing(synthetic_store, tmp_path, name):
    spec, space = write(tmp_path, tiny_spec(epochs=1), SPACE)
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / name).write_bytes(b"my own file")
    with pytest.raises(FusionkitError, match=r"mine: not a fusionkit sweep directory .*nothing there is touched"):
        sweep(spec, synthetic_store, space, 1, tmp_path / "mine")
    assert [p.name for p in (tmp_path / "mine").iterdir()] == [name]
    assert (tmp_path / "mine" / name).read_bytes() == b"my own file"


def test_out_refuses_a_training_run(synthetic_store, tmp_path):
    spec, space = write(tmp_path, tiny_spec(epochs=1), SPACE)
    train(tiny_spec(epochs=1), synthetic_store, tmp_path / "run", fold=0, progress=False)
    before = sorted(p.name for p in (tmp_path / "run").iterdir())
    with pytest.raises(FusionkitError, match="holds a training run"):
        sweep(spec, synthetic_store, space, 1, tmp_path / "run")
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == before


# --- a study records its spec and space --------------------------------------------------------------------------


def test_a_study_resumed_with_another_space_or_spec_is_refused_saying_what_differs(synthetic_store, tmp_path):
    spec, space = write(tmp_path, tiny_spec(epochs=1), SPACE)
    sweep(spec, synthetic_store, space, 1, tmp_path / "d")
    other_space = tmp_path / "other.yaml"
    other_space.write_text(yaml.safe_dump({"train.lr": {"float": [1.0e-4, 1.0e-3], "log": True}}))
    with pytest.raises(FusionkitError, match=r"another spec or space \(space gate.top_n: .*space train.lr.float"):
        sweep(spec, synthetic_store, other_space, 2, tmp_path / "d")
    other_spec = tmp_path / "other-spec.yaml"
    other_spec.write_text(yaml.safe_dump(tiny_spec(epochs=1, batch_size=16)))
    with pytest.raises(FusionkitError, match=r"spec train.batch_size: 32 -> 16"):
        sweep(other_spec, synthetic_store, space, 2, tmp_path / "d")
    assert [s for s in states(tmp_path / "d")[0]] in (["COMPLETE"], ["PRUNED"])  # nothing ran under either


# --- the readers: one strict reader for specs and spaces -----------------------------------------------------------


def test_an_alias_bomb_in_a_space_is_refused_before_it_expands(tmp_path):
    lines = ["a: &a [1, 1, 1, 1, 1, 1, 1, 1, 1, 1]"]
    lines += [f"{chr(98 + i)}: &{chr(98 + i)} [{', '.join(['*' + chr(97 + i)] * 10)}]" for i in range(8)]
    lines.append("latent_dim: {choices: *i}")
    (tmp_path / "space.yaml").write_text("\n".join(lines) + "\n")
    started = time.perf_counter()
    with pytest.raises(SpecError, match="alias bomb"):
        load_space(tmp_path / "space.yaml", tiny_spec())
    assert time.perf_counter() - started < 10


def test_sweep_reads_a_spec_as_train_does(synthetic_store, tmp_path):
    spec = tiny_spec(epochs=1)
    text = yaml.safe_dump(spec) + "adaptation:\n  - {type: mmd, weight: 0.1, on: encoders}\n"
    (tmp_path / "spec.yaml").write_text(text)
    (tmp_path / "space.yaml").write_text("latent_dim: {choices: [8, 16]}\n")
    load_spec(tmp_path / "spec.yaml")  # train reads it
    from fusionkit.training.sweep import _read_spec

    assert _read_spec(tmp_path / "spec.yaml")["adaptation"][0]["on"] == "encoders"
    (tmp_path / "twice.yaml").write_text("latent_dim: {choices: [8]}\nlatent_dim: {choices: [16]}\n")
    with pytest.raises(SpecError, match="duplicate key 'latent_dim'"):
        load_space(tmp_path / "twice.yaml", spec)
    (tmp_path / "spec.toml").write_text('latent_dim = 16\n[[encoders]]\nname = "enc0"\ntype = "features"\ndim = 8\n'
                                        '[[encoders]]\nname = "enc1"\ntype = "features"\ndim = 8\n'
                                        '[train]\nepochs = 1\n')
    assert _read_spec(tmp_path / "spec.toml")["latent_dim"] == 16
    (tmp_path / "latin1.yaml").write_bytes("latent_dim: {choices: [8]}  # caf\xe9\n".encode("latin-1"))
    with pytest.raises(SpecError, match="not UTF-8"):
        load_space(tmp_path / "latin1.yaml", spec)
    (tmp_path / "latin1-spec.yaml").write_bytes(text.encode() + "# caf\xe9\n".encode("latin-1"))
    with pytest.raises(SpecError, match="not UTF-8"):
        _read_spec(tmp_path / "latin1-spec.yaml")


# --- every value of the space and the data, before the first trial -------------------------------------------------


@pytest.mark.parametrize(("entry", "message"), [
    ({"train.lr": {"float": [1e-3, 1e-2], "step": 0}}, "step: expected a positive number, found 0"),
    ({"train.lr": {"float": [1e-3, 1e-2], "step": -1}}, "step: expected a positive number, found -1"),
    ({"train.lr": {"float": [1e-3, 1e-2], "step": "abc"}}, "step: expected a positive number, found 'abc'"),
    ({"latent_dim": {"int": [8, 16], "step": 0.5}}, "step: expected a positive integer"),
    ({"train.lr": {"float": [1e-3, 1e-2], "log": True, "step": 1e-3}}, "log and step cannot be combined"),
    ({"latent_dim": {"int": [8, 16], "log": "yes"}}, "log: expected true or false"),
    ({"latent_dim": {"int": [16, 100_000_000_000]}}, r"latent_dim = 100000000000: latent_dim: expected an int in"),
    ({"latent_dim": {"choices": [16, "bogus"]}}, r"latent_dim = 'bogus': latent_dim: expected an int"),
    ({"train.device": {"choices": ["cpu", "cuda"]}} if not __import__("torch").cuda.is_available() else
     {"train.device": {"choices": ["cpu", "cuda:99"]}}, r"train.device = 'cuda(:99)?'"),
    ({"latent_dim": {"choices": [[8], 16]}}, "each choice must be a number, a string"),
    ({"latent_dim": {"choices": [8, 1]}}, r"latent_dim = 1: gate: .*gate.heads=2 must divide latent_dim=1"),
    ({"encoders": {"subset": ["enc0", "enc1"], "min": 3}}, r"min: expected an integer from 0 to 2 .*every trial would "
                                                           "be pruned"),
    ({"encoders": {"subset": ["enc0", "enc1", "enc2"], "min": 0}}, r"encoders = \[\]: .*encoders"),
])
def test_every_value_of_the_space_is_checked_before_a_trial(tmp_path, entry, message):
    _, path = write(tmp_path, tiny_spec(), entry)
    with pytest.raises(SpecError, match=message):
        load_space(path, tiny_spec())


@pytest.mark.parametrize(("options", "message"), [
    ({"fold": 99}, r"--fold 99: the store's folds are \[0, 1, 2, 3, 4\]"),
    ({"heartbeat": 0}, "--heartbeat 0: expected an integer of at least 1"),
    ({"seed": -1}, "--seed -1: expected an integer of at least 0"),
    ({"seed": 2**40}, "--seed 1099511627776: expected at most"),
    ({"storage": "sqlite:///:memory:"}, "an in-memory database keeps no study"),
    ({"storage": "nosuchdialect://x/y"}, r"--storage nosuchdialect://x/y: cannot open the study's database"),
    ({"storage": "not a url"}, r"--storage not a url: cannot open the study's database"),
    ({"storage": "postgresql://u@127.0.0.1:1/db"}, r"--storage postgresql://u@127.0.0.1:1/db: cannot open"),
])
def test_bad_sweep_options_are_one_line_errors_before_any_trial(synthetic_store, tmp_path, options, message):
    spec, space = write(tmp_path, tiny_spec(epochs=1), SPACE)
    with pytest.raises(FusionkitError, match=message):
        sweep(spec, synthetic_store, space, 1, tmp_path / "d", **options)
    assert not list((tmp_path / "d").glob("trial-*"))


def test_storages_that_cannot_be_opened_name_the_url(synthetic_store, tmp_path):
    spec, space = write(tmp_path, tiny_spec(epochs=1), SPACE)
    (tmp_path / "junk.db").write_bytes(b"this is not a database" * 100)
    with pytest.raises(FusionkitError, match=r"junk.db: cannot open the study's database"):
        sweep(spec, synthetic_store, space, 1, tmp_path / "d", storage=f"sqlite:///{tmp_path / 'junk.db'}")
    (tmp_path / "afile").write_text("x")
    with pytest.raises(FusionkitError, match=r"cannot open the study's database"):
        sweep(spec, synthetic_store, space, 1, tmp_path / "d", storage=f"sqlite:///{tmp_path / 'afile' / 'x.db'}")


def test_data_that_no_trial_could_train_on_is_refused_first(synthetic_store, tmp_path):
    spec, space = write(tmp_path, tiny_spec(epochs=1), SPACE)
    with pytest.raises(FusionkitError, match="nonexistent"):
        sweep(spec, tmp_path / "nonexistent", space, 1, tmp_path / "d")
    other = tiny_spec(epochs=1)
    other["labels"], other["neutral"] = ["a", "b"], None
    (tmp_path / "other.yaml").write_text(yaml.safe_dump(other))
    with pytest.raises(FusionkitError, match="labels .* differ from the spec's"):
        sweep(tmp_path / "other.yaml", synthetic_store, space, 1, tmp_path / "d")
    assert not (tmp_path / "d").exists()


def test_a_sweep_whose_every_trial_failed_exits_non_zero_with_the_first_failure(synthetic_store, tmp_path,
                                                                                monkeypatch, capsys):
    import fusionkit.training.sweep as sweep_module
    from fusionkit.cli import main

    def failing(*args, **kwargs):
        raise FusionkitError("the data went away\nsecond line")

    monkeypatch.setattr(sweep_module, "train", failing)
    spec, space = write(tmp_path, tiny_spec(epochs=1), SPACE)
    code = main(["sweep", str(spec), "--data", str(synthetic_store), "--space", str(space), "--trials", "2",
                 "--out", str(tmp_path / "d")])
    err = capsys.readouterr().err
    assert code == 2
    assert "fusionkit: error: every trial failed (2); the first, trial 0: the data went away second line" in err
    assert "Traceback" not in err
    assert "| 0 | fail |" in (tmp_path / "d" / "trials.md").read_text()


def test_ctrl_c_ends_a_sweep_with_one_line(synthetic_store, tmp_path):
    spec, space = write(tmp_path, tiny_spec(epochs=60, patience=500), SPACE)
    proc = subprocess.Popen(list(map(str, [sys.executable, "-m", "fusionkit", "sweep", spec, "--data", synthetic_store,
                                           "--space", space, "--trials", "3", "--out", tmp_path / "d"])),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.time() + 120
    while time.time() < deadline and not (tmp_path / "d" / "trial-0000" / "last" / "metadata.json").exists():
        time.sleep(0.1)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "Traceback" not in err
    assert err.strip().splitlines()[-1].startswith("fusionkit: interrupted; the sweep is resumable")


# --- workers end with their parent ------------------------------------------------------------------------------


def _children(pid):
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            out.append(int(stat.parent.name))
    return out


def _alive(pid):
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
def test_workers_end_with_the_sweep_that_started_them(synthetic_store, tmp_path, sig):
    spec, space = write(tmp_path, tiny_spec(epochs=200, patience=500), SPACE)
    proc = subprocess.Popen(list(map(str, [sys.executable, "-m", "fusionkit", "sweep", spec, "--data", synthetic_store,
                                           "--space", space, "--trials", "4", "--out", tmp_path / "d", "--jobs", "2"])),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 180
    while time.time() < deadline and len(list((tmp_path / "d").glob("trial-*/log.jsonl"))) < 2:
        time.sleep(0.2)
    workers = [p for p in _children(proc.pid) if _alive(p)]
    try:
        assert len(list((tmp_path / "d").glob("trial-*/log.jsonl"))) >= 2 and workers
        os.kill(proc.pid, sig)
        proc.wait(timeout=30)
        deadline = time.time() + 30
        while time.time() < deadline and any(_alive(p) for p in workers):
            time.sleep(0.2)
        assert not [p for p in workers if _alive(p)]
    finally:
        os.killpg(proc.pid, signal.SIGKILL)


# --- trials as the other commands know them -------------------------------------------------------------------------


def test_cv_trials_are_cross_validation_directories_the_other_commands_take(synthetic_store, tmp_path):
    from fusionkit.cli import main

    spec, space = write(tmp_path, tiny_spec(epochs=1), {"latent_dim": {"choices": [8]}})
    summary = sweep(spec, synthetic_store, space, 1, tmp_path / "d", cv=True)
    trial = tmp_path / "d" / "trial-0000"
    cv = json.loads((trial / "cv.json").read_text())
    assert summary["best_score"] == pytest.approx(cv["test"]["score"]["mean"])
    assert json.loads((trial / "run.json").read_text())["status"] == "finished"
    assert main(["evaluate", str(trial), "--data", str(synthetic_store), "--split", "labelled"]) == 0
    assert main(["predict", "--cv", str(trial), "--data", str(synthetic_store), "--split", "labelled",
                 "--out", str(tmp_path / "sub.json")]) == 0
    assert len(json.loads((tmp_path / "sub.json").read_text())["predictions"]) > 0
