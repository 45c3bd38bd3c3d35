"""Data safety: nothing that is not fusionkit's is replaced, one writer per run, resume continues
the same run, every crash window recovers, interrupts and OS errors end cleanly."""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import tiny_spec

from fusionkit.data.store import Sample, write_store
from fusionkit.errors import CheckpointError, DataError, FusionkitError, FusionkitWarning
from fusionkit.models.factory import build_model, load_model
from fusionkit.training.rundir import RunDirectory, RunLockedError
from fusionkit.training.train import train


def cli(*args, cwd, timeout=600):
    return subprocess.run([sys.executable, "-m", "fusionkit", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, cwd=cwd)


def user_dir(path: Path) -> Path:
    path.mkdir(parents=True)
    (path / "thesis.tex").write_text("years of work")
    (path / "data").mkdir()
    (path / "data" / "raw.csv").write_text("1,2,3")
    return path


def assert_untouched(path: Path) -> None:
    assert (path / "thesis.tex").read_text() == "years of work"
    assert (path / "data" / "raw.csv").read_text() == "1,2,3"


# --- 1. --overwrite never deletes what is not ours ---------------------------------------------------


def test_data_build_overwrite_refuses_the_current_directory_and_user_files(tmp_path, monkeypatch, capsys):
    from fusionkit.cli import main

    home = user_dir(tmp_path / "home")
    monkeypatch.chdir(home)
    assert main(["data", "build", "synthetic", "--out", ".", "--overwrite", "--set", "samples=50"]) == 2
    assert "current directory" in capsys.readouterr().err
    assert_untouched(home)
    monkeypatch.chdir(tmp_path)
    assert main(["data", "build", "synthetic", "--out", str(home), "--overwrite", "--set", "samples=50"]) == 2
    err = capsys.readouterr().err
    assert "not a feature store made by fusionkit" in err and "thesis.tex" in err
    assert_untouched(home)
    assert not list(tmp_path.glob(".home.*"))  # no temporary left beside it either


def test_overwrite_replaces_a_store_or_an_empty_directory_only(tmp_path, synthetic_store):
    samples = [Sample(id=f"s{i}", labels=[{"emotion": "ang", "salience": 100.0}]) for i in range(3)]
    (tmp_path / "empty").mkdir()
    write_store(tmp_path / "empty", ["ang", "sad"], samples, {"v": np.zeros((3, 2))})  # empty: no flag needed
    write_store(tmp_path / "empty", ["ang", "sad"], samples, {"v": np.ones((3, 2))}, overwrite=True)
    train(tiny_spec(epochs=1), synthetic_store, tmp_path / "run", fold=0, progress=False)
    with pytest.raises(DataError, match="not a feature store made by fusionkit"):
        write_store(tmp_path / "run", ["ang", "sad"], samples, {"v": np.zeros((3, 2))}, overwrite=True)
    assert (tmp_path / "run" / "best" / "model.safetensors").exists()


def test_save_pretrained_never_replaces_a_user_directory(tmp_path):
    home = user_dir(tmp_path / "home")
    model = build_model(tiny_spec())
    with pytest.raises(FusionkitError, match="not a checkpoint made by fusionkit"):
        model.save_pretrained(str(home))
    assert_untouched(home)
    model.save_pretrained(str(tmp_path / "ckpt"))
    model.save_pretrained(str(tmp_path / "ckpt"))  # a checkpoint may be replaced by a checkpoint


def test_train_out_must_be_new_empty_or_a_run(tmp_path, synthetic_store):
    home = user_dir(tmp_path / "home")
    with pytest.raises(FusionkitError, match="not a fusionkit run directory"):
        train(tiny_spec(epochs=1), synthetic_store, home, fold=0, progress=False, overwrite=True)
    assert_untouched(home) and not (home / ".fusionkit.lock").exists()
    first = train(tiny_spec(epochs=1), synthetic_store, tmp_path / "run", fold=0, progress=False)
    (tmp_path / "run" / "notes.md").write_text("my notes")
    with pytest.raises(FusionkitError, match=r"already holds a run \(status: finished\).*--resume.*--overwrite"):
        train(tiny_spec(epochs=2), synthetic_store, tmp_path / "run", fold=0, progress=False)
    second = train(tiny_spec(epochs=2), synthetic_store, tmp_path / "run", fold=0, progress=False, overwrite=True)
    assert second["epochs_run"] == 2 and first["epochs_run"] == 1
    assert (tmp_path / "run" / "notes.md").read_text() == "my notes"  # --overwrite removes run outputs only
    assert [r["epoch"] for r in RunDirectory(tmp_path / "run").log()] == [0, 1]


# --- 2. one run directory, one writer ------------------------------------------------------------------


def test_a_second_writer_is_refused_while_the_first_holds_the_run(tmp_path, synthetic_store):
    spec_file = tmp_path / "spec.yaml"
    spec_file.write_text(yaml.safe_dump(tiny_spec(epochs=1)))
    with RunDirectory(tmp_path / "run").locked():
        proc = cli("train", spec_file, "--data", synthetic_store, "--out", tmp_path / "run", "--fold", 0, "--quiet",
                   cwd=tmp_path)
        with pytest.raises(RunLockedError, match=f"pid {os.getpid()}"):
            train(tiny_spec(epochs=1), synthetic_store, tmp_path / "run", fold=0, progress=False)
    assert proc.returncode == 2 and "another fusionkit process is writing this run" in proc.stderr
    assert f"pid {os.getpid()}" in proc.stderr
    # A lock file left by a crashed writer holds no lock: the next run proceeds.
    assert (tmp_path / "run" / ".fusionkit.lock").exists()
    (tmp_path / "run" / ".fusionkit.lock").write_text("pid 999999 on nowhere since 1999-01-01 00:00:00")
    assert train(tiny_spec(epochs=1), synthetic_store, tmp_path / "run", fold=0, progress=False)["epochs_run"] == 1


# --- 3. --resume continues the same run ----------------------------------------------------------------


def test_a_run_stopped_before_its_first_checkpoint_resumes_from_the_start(tmp_path, synthetic_store):
    full = train(tiny_spec(epochs=2), synthetic_store, tmp_path / "full", fold=0, progress=False)
    run = RunDirectory(tmp_path / "run")
    run.path.mkdir()
    with run.locked():
        run.start({"data": str(synthetic_store), "test_fold": 0})
    run.update(status="interrupted")
    assert train(tiny_spec(epochs=2), synthetic_store, run.path, fold=0, resume=True, progress=False) == full


def test_resume_refuses_another_fold_data_spec_or_seed(tmp_path, synthetic_store):
    from fusionkit.components.datasets import build_dataset

    other = build_dataset("synthetic", {"samples": 400, "noise": [0.3, 1.0, 3.0], "dim": 8, "seed": 1}, tmp_path / "o")
    run = tmp_path / "run"
    train(tiny_spec(epochs=6), synthetic_store, run, fold=0, progress=False, resume=False)
    RunDirectory(run).update(status="interrupted")
    (run / "metrics.json").unlink()
    cases = [({"fold": 1}, "--fold: the run used 0, now 1"), ({"data": other}, "--data"),
             ({"spec": tiny_spec(epochs=6, seed=3)}, "train.seed: 0 -> 3"),
             ({"spec": tiny_spec(epochs=6, lr=0.5)}, "train.lr: 0.003 -> 0.5")]
    for change, message in cases:
        kwargs = {"spec": tiny_spec(epochs=6), "data": synthetic_store, "fold": 0, **change}
        with pytest.raises(CheckpointError, match=message.replace(".", r"\.").replace("(", r"\(")):
            train(kwargs["spec"], kwargs["data"], run, fold=kwargs["fold"], resume=True, progress=False)


def test_resuming_a_finished_or_early_stopped_run_trains_no_further(tmp_path, synthetic_store):
    spec = tiny_spec(epochs=20, patience=2, lr=3e-2)
    run = tmp_path / "run"
    done = train(spec, synthetic_store, run, fold=0, progress=False)
    assert done["epochs_run"] < 20  # early stopping ended it
    log = (run / "log.jsonl").read_text()
    assert train(spec, synthetic_store, run, fold=0, resume=True, progress=False) == done
    assert (run / "log.jsonl").read_text() == log
    # killed inside its final step: after the last checkpoint, before metrics.json
    (run / "metrics.json").unlink()
    RunDirectory(run).update(status="running")
    again = train(spec, synthetic_store, run, fold=0, resume=True, progress=False)
    assert again == done and (run / "log.jsonl").read_text() == log


# --- 4. every crash window is recoverable ----------------------------------------------------------------

KILL_EPOCH = 2


def die() -> None:
    os._exit(99)  # as a kill: nothing after it runs, no buffer is flushed, no finally block


def train_killed_at(point: str, spec_file: str, store: str, out: str) -> None:
    """Train ``out`` in a child process that dies at ``point`` (one of :data:`KILL_POINTS`) in epoch KILL_EPOCH."""
    import shutil

    import fusionkit.files as files

    real_rename, real_replace, real_rmtree = os.rename, os.replace, shutil.rmtree
    saves = {"last": 0}

    def rename(src, dst):
        real_rename(src, dst)
        if point == "between-last-renames" and Path(dst).name.startswith(".last.old-"):
            saves["last"] += 1
            if saves["last"] == KILL_EPOCH:
                die()

    def rmtree(path, *a, **k):
        if point == "before-old-last-removed" and Path(path).name.startswith(".last.old-") and Path(path).exists():
            saves["last"] += 1
            if saves["last"] == KILL_EPOCH:
                die()
        real_rmtree(path, *a, **k)

    def replace(src, dst):
        if point == "metrics-written" and Path(dst).name == "metrics.json":
            die()
        real_replace(src, dst)

    files.os.rename, files.os.replace, files.shutil.rmtree = rename, replace, rmtree
    real_append, real_swap = RunDirectory.append_log, files.replace_directory

    def append_log(self, record):
        if point == "before-log" and record["epoch"] == KILL_EPOCH:
            die()
        real_append(self, record)
        if point == "after-log" and record["epoch"] == KILL_EPOCH:
            die()

    def swap(new, target):
        if point == "last-written-not-swapped" and target.name == "last":
            saves["last"] += 1
            if saves["last"] == KILL_EPOCH:
                die()
        real_swap(new, target)

    RunDirectory.append_log = append_log
    files.replace_directory = swap  # what write_directory calls for checkpoints (and stores)
    train(spec_file, store, out, fold=1, progress=False)


def killed_child(target, *args) -> int:
    """Run ``target(*args)`` in a child process and return its exit code. The children fork from a server that
    imported fusionkit, torch and torch._dynamo once (multiprocessing's forkserver), so each starts in a fraction
    of a second instead of the five that a fresh interpreter takes to import them; the monkeypatching stays in the
    child."""
    import multiprocessing

    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["fusionkit.training.train", "torch._dynamo", "test_safety"])
    child = context.Process(target=target, args=args)
    child.start()
    child.join(timeout=300)
    return child.exitcode


KILL_POINTS = ["before-log", "after-log", "between-last-renames", "before-old-last-removed",
               "last-written-not-swapped", "metrics-written"]


@pytest.fixture(scope="module")
def full_run(tmp_path_factory, synthetic_store):
    root = tmp_path_factory.mktemp("crash")
    spec_file = root / "spec.yaml"
    spec_file.write_text(yaml.safe_dump(tiny_spec(epochs=4)))
    metrics = train(spec_file, synthetic_store, root / "full", fold=1, progress=False)
    return spec_file, metrics, root / "full"


def records(run: Path) -> list[dict]:
    return [{k: v for k, v in r.items() if k != "seconds"} for r in RunDirectory(run).log()]


@pytest.mark.parametrize("point", KILL_POINTS)
def test_a_kill_at_each_crash_point_resumes_to_the_uninterrupted_result(point, full_run, synthetic_store, tmp_path):
    spec_file, full_metrics, full_dir = full_run
    run = tmp_path / "run"
    code = killed_child(train_killed_at, point, str(spec_file), str(synthetic_store), str(run))
    assert code == 99, f"the child ended with {code}, not killed at {point}"
    if point == "between-last-renames":
        assert not (run / "last").exists() and list(run.glob(".last.old-*"))
    if point == "metrics-written":
        assert list(run.glob(".metrics.json.*.tmp"))
    if point == "last-written-not-swapped":
        assert list(run.glob(".last.tmp-*"))
    resumed = train(spec_file, synthetic_store, run, fold=1, resume=True, progress=False)
    assert resumed == full_metrics
    assert records(run) == records(full_dir)
    a, b = load_model(run / "best").state_dict(), load_model(full_dir / "best").state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not [p.name for p in run.iterdir() if p.name.startswith(".") and p.name != ".fusionkit.lock"]
    assert json.loads((run / "run.json").read_text())["status"] == "finished"


# --- 5. Ctrl-C ------------------------------------------------------------------------------------------------


def test_ctrl_c_prints_one_line_marks_the_run_interrupted_and_it_resumes(tmp_path, synthetic_store):
    spec_file = tmp_path / "spec.yaml"
    spec_file.write_text(yaml.safe_dump(tiny_spec(epochs=10, patience=500)))
    run = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "fusionkit", "train", str(spec_file), "--data", str(synthetic_store),
                             "--out", str(run), "--fold", "0", "--quiet"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True,
                            # a shell's background job starts with SIGINT ignored, which Python then keeps
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.time() + 120
    while time.time() < deadline and not (run / "last" / "metadata.json").exists():
        time.sleep(0.1)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130
    assert err.strip().count("\n") == 0 and "Traceback" not in err
    assert err.startswith("fusionkit: interrupted; the run is resumable: add --resume")
    assert json.loads((run / "run.json").read_text())["status"] == "interrupted"
    state = json.loads((run / "last" / "metadata.json").read_text())["extra"]["trainer"]
    assert 1 <= state["epoch"] < 10
    proc = cli("train", spec_file, "--data", synthetic_store, "--out", run, "--fold", 0, "--quiet", "--resume",
               cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert [r["epoch"] for r in RunDirectory(run).log()] == list(range(10))


# --- 10. the command line ends every failure with one line -------------------------------------------------


def test_os_errors_and_broken_pipes_end_with_one_line_and_an_exit_code(tmp_path):
    (tmp_path / "file").write_text("x")
    proc = cli("data", "build", "synthetic", "--out", tmp_path / "file" / "store", "--set", "samples=50", cwd=tmp_path)
    assert proc.returncode == 74 and proc.stderr.count("\n") == 1 and "is a file where a directory" in proc.stderr
    proc = cli("data", "build", "synthetic", "--out", "/proc/fusionkit-test/store", "--set", "samples=50", cwd=tmp_path)
    assert proc.returncode == 74 and proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr
    pipe = subprocess.Popen([sys.executable, "-m", "fusionkit", "plugins", "--json"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    pipe.stdout.close()  # the reader goes away, as `| head -1` does
    err = pipe.stderr.read()
    assert pipe.wait(timeout=60) == 141 and err == "fusionkit: output closed early (broken pipe)\n"


def test_predict_writes_both_files_whichever_is_named_and_never_a_user_file(tmp_path, synthetic_store, capsys):
    from fusionkit.cli import main

    run = tmp_path / "run"
    train(tiny_spec(epochs=1), synthetic_store, run, fold=0, progress=False)
    common = ["predict", str(run), "--data", str(synthetic_store), "--split", "test", "--out"]
    assert main([*common, str(tmp_path / "sub.zip")]) == 0
    sub = json.loads((tmp_path / "sub.json").read_text())
    with zipfile.ZipFile(tmp_path / "sub.zip") as zf:
        assert zf.namelist() == ["sub.json"] and json.loads(zf.read("sub.json")) == sub
    (tmp_path / "mine.json").write_text('{"my": "data"}')
    capsys.readouterr()
    assert main([*common, str(tmp_path / "mine.json")]) == 2
    assert "not a fusionkit submission" in capsys.readouterr().err
    assert (tmp_path / "mine.json").read_text() == '{"my": "data"}'
    assert main([*common, str(tmp_path)]) == 2
    assert "FILE.json or FILE.zip" in capsys.readouterr().err


# --- 11. outputs respect the umask ---------------------------------------------------------------------------


def test_outputs_respect_the_umask(tmp_path, synthetic_store):
    old = os.umask(0o002)
    try:
        train(tiny_spec(epochs=1), synthetic_store, tmp_path / "run", fold=0, progress=False)
        from fusionkit.components.datasets import build_dataset

        build_dataset("synthetic", {"samples": 60}, tmp_path / "store")
    finally:
        os.umask(old)
    for path in [tmp_path / "store", tmp_path / "run", tmp_path / "run" / "best", tmp_path / "run" / "last"]:
        assert stat.S_IMODE(path.stat().st_mode) == 0o775, path
    files = [tmp_path / "store" / "index.json", tmp_path / "run" / "metrics.json", tmp_path / "run" / "run.json",
             tmp_path / "run" / "best" / "model.safetensors", tmp_path / "run" / "spec.yaml"]
    for path in files:
        assert stat.S_IMODE(path.stat().st_mode) == 0o664, path


# --- 12. determinism needs one thread count -------------------------------------------------------------------


def test_thread_count_is_recorded_and_a_different_one_on_resume_warns(tmp_path, synthetic_store):
    run = tmp_path / "run"
    train(tiny_spec(epochs=3), synthetic_store, run, fold=0, progress=False)
    assert json.loads((run / "run.json").read_text())["torch_threads"] == torch.get_num_threads()
    RunDirectory(run).update(status="interrupted", torch_threads=torch.get_num_threads() + 1)
    (run / "metrics.json").unlink()
    with pytest.warns(FusionkitWarning, match="torch threads"):
        train(tiny_spec(epochs=3), synthetic_store, run, fold=0, resume=True, progress=False)
