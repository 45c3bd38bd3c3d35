"""`fusionkit sweep --storage postgresql://...` against a real PostgreSQL server: two workers, each its own process
(as on two machines), share one study; one is killed mid-trial, its trial is failed once its heartbeat stops and
replaced, and the study ends with exactly N finished trials and no process left behind.

The server is PostgreSQL 15 from Debian's packages (`make test` installs it where it is missing), started on a free
loopback port for this test alone; as root, it runs as the unprivileged user ``nobody`` (initdb refuses root).
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import optuna
import pytest
import yaml
from conftest import tiny_spec

SPACE = {"train.lr": {"float": [1.0e-3, 1.0e-2], "log": True}, "latent_dim": {"choices": [8, 16]}}
TRIALS = 3


def _binary(name: str) -> str:
    found = shutil.which(name) or next(iter(sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))), None)
    if found is None:
        pytest.fail(f"PostgreSQL's {name} was not found: run the tests with `make test`, which installs Debian's "
                    "postgresql package where it is missing")
    return found


@pytest.fixture
def postgres():
    """A PostgreSQL server on a free 127.0.0.1 port with trust authentication; yields its storage URL."""
    folder = Path(tempfile.mkdtemp(prefix="fusionkit-pg-"))
    as_root = os.geteuid() == 0
    user = "nobody" if as_root else pwd.getpwuid(os.geteuid()).pw_name
    if as_root:
        entry = pwd.getpwnam("nobody")
        os.chown(folder, entry.pw_uid, entry.pw_gid)

    def demote():
        if as_root:
            os.setgid(entry.pw_gid)
            os.setuid(entry.pw_uid)

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    data = folder / "data"
    env = {**os.environ, "LC_ALL": "C"}
    run = dict(preexec_fn=demote, env=env, capture_output=True, text=True, timeout=120, cwd=folder)
    made = subprocess.run([_binary("initdb"), "-D", str(data), "-U", user, "-A", "trust", "-E", "UTF8", "--no-sync"], **run)
    assert made.returncode == 0, made.stderr[-2000:]
    options = f"-c listen_addresses=127.0.0.1 -c port={port} -c unix_socket_directories={folder} -c fsync=off"
    started = subprocess.run([_binary("pg_ctl"), "-D", str(data), "-o", options, "-l", str(folder / "log"), "-w",
                              "start"], **run)
    assert started.returncode == 0, started.stderr[-2000:] + (folder / "log").read_text()[-2000:]
    try:
        yield f"postgresql://{user}@127.0.0.1:{port}/postgres"
    finally:
        subprocess.run([_binary("pg_ctl"), "-D", str(data), "-m", "immediate", "stop"], **run)
        shutil.rmtree(folder, ignore_errors=True)


def test_two_workers_on_postgresql_one_killed_mid_trial(postgres, synthetic_store, tmp_path):
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(tiny_spec(epochs=6)))
    (tmp_path / "space.yaml").write_text(yaml.safe_dump(SPACE))

    def worker(name: str) -> subprocess.Popen:
        args = [sys.executable, "-m", "fusionkit", "sweep", tmp_path / "spec.yaml", "--data", synthetic_store,
                "--space", tmp_path / "space.yaml", "--trials", str(TRIALS), "--out", tmp_path / name,
                "--storage", postgres, "--heartbeat", "1"]
        return subprocess.Popen(list(map(str, args)), start_new_session=True, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)

    first = worker("first")
    deadline = time.time() + 120
    while not list((tmp_path / "first").glob("trial-*/log.jsonl")) and time.time() < deadline:
        assert first.poll() is None, first.stderr.read()[-2000:]
        time.sleep(0.2)
    second = worker("second")  # joins while the first is mid-trial
    os.killpg(first.pid, signal.SIGKILL)  # a machine lost mid-trial: its worker never says goodbye
    first.wait()
    out, err = second.communicate(timeout=600)
    assert second.returncode == 0, err[-2000:]
    study = optuna.load_study(study_name="fusionkit", storage=postgres)
    states = [t.state.name for t in study.get_trials()]
    assert states.count("COMPLETE") + states.count("PRUNED") == TRIALS, states
    assert states.count("FAIL") == 1 and "RUNNING" not in states, states  # the killed worker's trial, replaced
    killed = [t for t in study.get_trials() if t.state.name == "FAIL"][0]
    assert (tmp_path / "first" / f"trial-{killed.number:04d}").is_dir()  # it was the first worker's
    for proc in (first, second):  # no worker left behind
        with pytest.raises(ProcessLookupError):
            os.killpg(proc.pid, 0)
