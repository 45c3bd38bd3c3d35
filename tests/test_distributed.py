"""Scale-out on torchrun + DDP (gloo, 2 processes on loopback), launched by the tests themselves."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import yaml
from conftest import tiny_spec

from fusionkit.hardware.distributed import Dist, unused_parameters_possible
from fusionkit.models.factory import load_model
from fusionkit.spec import load_spec
from fusionkit.training.train import cross_validate, train


def ddp_spec(**train_options):
    """Routing that leaves parameters unused (mlp gate, top 1 of 3, no auxiliary losses), no dropout or noise
    (their random draws differ between one process and two)."""
    spec = tiny_spec(batch_size=50, **train_options)
    spec["gate"] = {"type": "mlp", "top_n": 1}
    spec["projector"] = {"dropout": 0.0}
    spec["heads"] = {"presence": {"type": "presence", "dropout": 0.0}, "salience": {"type": "salience", "dropout": 0.0}}
    return spec


#: The torchrun tests run one after another on one xdist worker (`make test`: --dist loadgroup): two of them at once
#: would put four ranks and two launchers on two cores.
pytestmark = pytest.mark.xdist_group("torchrun")


def torchrun(*args, cwd, timeout=300, **popen):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *map(str, args)]
    if popen:
        return subprocess.Popen(cmd, cwd=cwd, env=env, **popen)
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


@contextlib.contextmanager
def one_thread():
    """As torchrun's processes here (OMP_NUM_THREADS=1): float results are bitwise equal at one thread count."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def one_process(synthetic_store, tmp_path_factory):
    root = tmp_path_factory.mktemp("ddp")
    (root / "spec.yaml").write_text(yaml.safe_dump(ddp_spec(epochs=4)))
    with one_thread():
        metrics = train(root / "spec.yaml", synthetic_store, root / "one", fold=0, progress=False)
    return root, metrics


def close(a, b, tol=1e-5):
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(close(a[k], b[k], tol) for k in a)
    if isinstance(a, list):
        return len(a) == len(b) and all(close(x, y, tol) for x, y in zip(a, b))
    if isinstance(a, float):
        return abs(a - b) <= tol
    return a == b


# --- one torchrun launch for every case that compares two processes with one --------------------------------------
#
# A torchrun launch costs about ten seconds of interpreter starts here (torch, and torch._dynamo, which the first
# optimizer imports, in the launcher and in each rank), and the training each case compares takes about one. So the
# cases train in one launch, one after the other, as a loop that embeds fusionkit would: each `train` call joins the
# process group and leaves it. Each test then trains its case in this process and compares. A case that trains
# after others in the same ranks must still equal a fresh single process: nothing may carry over between runs.

#: name -> prepare(folder, synthetic store) -> the case: {"spec": file, "data": path} for `train` on fold 0, with
#: "cv": {options} for `cross_validate`; the cases train in the shared launch in this order
CASES: dict[str, Callable[[Path, Path], dict]] = {}


def case(prepare: Callable[[Path, Path], dict]) -> Callable[[Path, Path], dict]:
    CASES[prepare.__name__] = prepare
    return prepare


@pytest.fixture(scope="session")
def two_processes(synthetic_store, tmp_path_factory):
    """Every case of :data:`CASES` run on two processes under one torchrun launch, into ROOT/NAME/two (a fusionkit
    error into ROOT/NAME/error.txt); returns ROOT, the launch's completed process and the cases. Once per session:
    a module's fixture is torn down whenever pytest-xdist runs another module's test in between, and the launch
    would run again."""
    root = tmp_path_factory.mktemp("two-processes")
    cases = {}
    for name, prepare in CASES.items():
        (root / name).mkdir()
        prepared = prepare(root / name, synthetic_store)
        cases[name] = {k: str(v) if isinstance(v, Path) else v for k, v in prepared.items()}
        cases[name]["out"] = str(root / name / "two")
    script = root / "cases.py"
    script.write_text(textwrap.dedent(f"""
        from pathlib import Path

        from fusionkit.errors import FusionkitError
        from fusionkit.hardware.distributed import end_rank
        from fusionkit.training.train import cross_validate, train

        for case in {list(cases.values())!r}:
            try:
                if "cv" in case:
                    cross_validate(case["spec"], case["data"], case["out"], progress=False, **case["cv"])
                else:
                    train(case["spec"], case["data"], case["out"], fold=0, progress=False)
            except FusionkitError as exc:
                Path(case["out"]).with_name("error.txt").write_text(str(exc))
        end_rank(0)
    """))
    return root, torchrun(script, cwd=root), cases


def launched(two_processes, name: str, written: str = "metrics.json") -> Path:
    """The case ``name``'s run on two processes (the launch's errors where its ``written`` file is missing)."""
    root, proc, _ = two_processes
    run = root / name / "two"
    assert (run / written).exists(), f"torchrun exited with {proc.returncode}:\n{proc.stderr[-3000:]}"
    return run


def equals_one_process(two_processes, name: str) -> list[list[dict]]:
    """Train the case ``name`` in this process (one thread, as torchrun's processes here) into ROOT/NAME/one, check
    that its metrics equal the two processes' and return the log records of both."""
    root, _, cases = two_processes
    two = launched(two_processes, name)
    with one_thread():
        one = train(cases[name]["spec"], cases[name]["data"], root / name / "one", fold=0, progress=False)
    assert close(json.loads((two / "metrics.json").read_text()), one)
    return [[json.loads(x) for x in (run / "log.jsonl").read_text().splitlines()] for run in (root / name / "one", two)]


@case
def same_global_batch(folder: Path, store: Path) -> dict:
    (folder / "spec.yaml").write_text(yaml.safe_dump(ddp_spec(epochs=4)))  # one_process's spec
    return {"spec": folder / "spec.yaml", "data": store}


def test_two_processes_end_as_one_with_the_same_global_batch(one_process, two_processes):
    root, metrics = one_process
    _, proc, _ = two_processes
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Expected to have finished reduction" not in proc.stderr  # the DDP error of unused parameters
    two = launched(two_processes, "same_global_batch")
    assert close(json.loads((two / "metrics.json").read_text()), metrics)
    a, b = load_model(root / "one" / "best").state_dict(), load_model(two / "best").state_dict()
    assert all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)
    assert json.loads((two / "run.json").read_text())["world_size"] == 2


def test_a_killed_distributed_run_resumes_to_the_same_metrics(one_process, synthetic_store):
    root, metrics = one_process
    run = root / "killed"
    args = ("-m", "fusionkit", "train", root / "spec.yaml", "--data", synthetic_store, "--out", run, "--fold", 0, "--quiet")
    proc = torchrun(*args, cwd=root, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while time.time() < deadline:
        meta = run / "last" / "metadata.json"
        if meta.exists() and json.loads(meta.read_text())["extra"]["trainer"]["epoch"] >= 2:
            break
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (run / "metrics.json").exists()
    resumed = torchrun(*args, "--resume", cwd=root)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert resumed.stdout.count("run written to") == 1  # rank 0 reports
    assert close(json.loads((run / "metrics.json").read_text()), metrics)


def test_a_rank_that_raises_stops_the_run_with_an_error_naming_it(one_process, synthetic_store):
    root, _ = one_process
    script = root / "failing.py"
    script.write_text(textwrap.dedent(f"""
        import os, sys
        from fusionkit.errors import FusionkitError
        from fusionkit.training.train import Trainer
        real = Trainer.batches
        def batches(self, order, model):
            for i, item in enumerate(real(self, order, model)):
                if os.environ["RANK"] == "1" and model.gate.epoch == 2 and i == 1:
                    raise FusionkitError("the features of a batch could not be read")
                yield item
        Trainer.batches = batches
        from fusionkit.cli import main
        sys.exit(main(["train", {str(root / 'spec.yaml')!r}, "--data", {str(synthetic_store)!r}, "--out",
                       {str(root / 'failing')!r}, "--fold", "0", "--quiet"]))
    """))
    proc = torchrun(script, cwd=root)
    assert proc.returncode != 0
    assert "fusionkit: error (rank 1 of 2): the features of a batch could not be read" in proc.stderr
    last = load_model(root / "failing" / "last")  # the last checkpoint is intact
    assert json.loads((root / "failing" / "last" / "metadata.json").read_text())["extra"]["trainer"]["epoch"] == 2
    assert last is not None and not (root / "failing" / "metrics.json").exists()


def test_find_unused_parameters_follows_the_spec():
    routed = load_spec(ddp_spec())
    assert unused_parameters_possible(routed)
    attention = load_spec(tiny_spec())  # attention gate: every token shapes the kept scores
    assert not unused_parameters_possible(attention)
    assert unused_parameters_possible(attention, missing_encoders=True)
    supervised = load_spec({**ddp_spec(), "gate": {"type": "mlp", "top_n": 1, "supervision": 1.0}})
    assert not unused_parameters_possible(supervised)
    everything = load_spec({**ddp_spec(), "gate": {"type": "uniform", "top_n": 3}})
    assert not unused_parameters_possible(everything)


def test_dist_helpers_shard_weight_and_gather_in_order():
    import numpy as np

    rows = np.arange(7)
    ranks = [Dist(rank=r, world_size=2) for r in range(2)]
    shards = [d.shard(rows) for d in ranks]
    assert shards[0].tolist() == [0, 2, 4, 6] and shards[1].tolist() == [1, 3, 5]
    # DDP averages the ranks' gradients: the weights make that the mean over the 7 rows
    assert sum(d.loss_scale(len(s), 7) for d, s in zip(ranks, shards)) / 2 * 7 == pytest.approx(7)
    assert ranks[0].loss_scale(4, 7) / 2 == pytest.approx(4 / 7)
    assert Dist().shard(rows).tolist() == rows.tolist() and Dist().gather({"a": rows})["a"] is rows


def test_cross_validation_folds_in_separate_processes(synthetic_store, tmp_path):
    with one_thread():
        serial = cross_validate(tiny_spec(epochs=1), synthetic_store, tmp_path / "serial", progress=False)
    parallel = cross_validate(tiny_spec(epochs=1), synthetic_store, tmp_path / "parallel", progress=False, jobs=2)
    assert parallel == serial


@case
def cross_validated(folder: Path, store: Path) -> dict:
    (folder / "spec.yaml").write_text(yaml.safe_dump(ddp_spec(epochs=1)))
    return {"spec": folder / "spec.yaml", "data": store, "cv": {}}


@case
def cross_validated_in_jobs(folder: Path, store: Path) -> dict:
    return {**cross_validated(folder, store), "cv": {"jobs": 2}}


def test_cross_validation_under_torchrun_trains_each_fold_on_every_rank_as_one_process(two_processes):
    """Under torchrun the ranks train each fold together and rank 0 alone writes the cross-validation's directory
    (every rank started it: rank 0 found it "already holds a run"); the ranks leave the process group only at the
    end (each fold joined it again, and a second join waited forever on the first one's stale addresses)."""
    root, _, cases = two_processes
    two = launched(two_processes, "cross_validated", "cv.json")
    with one_thread():
        one = cross_validate(cases["cross_validated"]["spec"], cases["cross_validated"]["data"],
                             root / "cross_validated" / "one", progress=False)
    assert close(json.loads((two / "cv.json").read_text())["test"], one)
    assert json.loads((two / "run.json").read_text())["status"] == "finished"
    folds = sorted(p.name for p in two.glob("fold*"))
    assert len(folds) > 1 and all((two / f / "metrics.json").exists() for f in folds)
    error = root / "cross_validated_in_jobs" / "error.txt"
    assert error.exists(), "cross-validation with jobs=2 under torchrun was not refused"
    assert "jobs=2" in error.read_text() and "torchrun" in error.read_text()
    assert not (root / "cross_validated_in_jobs" / "two").exists()  # refused before anything was written


def test_the_batch_source_prefetches_in_order_and_passes_errors_on():
    import threading

    from fusionkit.training.train import prefetch

    threads = set()

    def make(key):
        threads.add(threading.current_thread().name)
        if key == 3:
            raise ValueError("unreadable batch 3")
        return key * 10

    out = prefetch(make, [0, 1, 2, 3])
    assert [next(out), next(out), next(out)] == [0, 10, 20]
    with pytest.raises(ValueError, match="unreadable batch 3"):
        next(out)
    assert all(name.startswith("fusionkit-batches") for name in threads)
    assert list(prefetch(make, [])) == []


# --- two-tower models with negatives from every rank ---------------------------------------------------


def pair_store_for(root):
    import numpy as np

    from fusionkit.data.store import Sample, write_store

    rng = np.random.default_rng(0)
    n = 200
    latent = rng.normal(size=(n, 6))
    views = {"img": latent @ rng.normal(size=(6, 10)) + 0.3 * rng.normal(size=(n, 10)),
             "txt": latent @ rng.normal(size=(6, 7)) + 0.3 * rng.normal(size=(n, 7))}
    samples = [Sample(id=f"s{i}", labels=[{"emotion": "a", "salience": 100.0}], group=f"g{i % 12}", fold=i % 12 % 4)
               for i in range(n)]
    return write_store(root / "pairs", ["a", "b"], samples, views)


def tower_ddp_spec(local_loss: bool) -> dict:
    """Two towers, no dropout (its random draws differ between one process and two); batches of 33 of the 100
    training rows: two processes hold 17 and 16 rows (unequal shares in the gathers), and in the last batch of
    one row the second process holds only a stand-in row that weighs nothing."""
    return {"labels": ["a", "b"], "neutral": None, "latent_dim": 16,
            "encoders": [{"name": "img", "type": "features", "dim": 10}, {"name": "txt", "type": "features", "dim": 7}],
            "projector": {"dropout": 0.0},
            "towers": {"a": {"encoders": ["img"], "embed_dim": 8}, "b": {"encoders": ["txt"], "embed_dim": 8}},
            "contrastive": {"local_loss": local_loss},
            "train": {"epochs": 3, "batch_size": 33, "lr": 3e-3, "seed": 0}}


@case
def towers_global_batch(folder: Path, store: Path) -> dict:
    (folder / "spec.yaml").write_text(yaml.safe_dump(tower_ddp_spec(False)))
    return {"spec": folder / "spec.yaml", "data": pair_store_for(folder)}


@case
def towers_local_loss(folder: Path, store: Path) -> dict:
    (folder / "spec.yaml").write_text(yaml.safe_dump(tower_ddp_spec(True)))
    return {"spec": folder / "spec.yaml", "data": pair_store_for(folder)}


@pytest.mark.parametrize("name", ["towers_global_batch", "towers_local_loss"])
def test_two_tower_training_on_two_processes_equals_one(name, two_processes):
    """The CLIP loss sees the global batch (every rank's embeddings gathered, gradients through each rank's own
    rows), or with local_loss each rank's rows against every column: either way 2 processes = 1 process."""
    logs = equals_one_process(two_processes, name)
    root = two_processes[0] / name
    a, b = load_model(root / "one" / "best").state_dict(), load_model(root / "two" / "best").state_dict()
    assert all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)
    assert close([r["clip"] for r in logs[0]], [r["clip"] for r in logs[1]])


def test_gather_rows_without_torchrun_is_the_identity():
    x = torch.randn(3, 4, requires_grad=True)
    gathered, offset = Dist().gather_rows(x)
    assert gathered is x and offset == 0


# --- extraction sharded over ranks -------------------------------------------------------------------


def test_extraction_on_two_processes_is_byte_identical_and_resumes_from_one(tmp_path, monkeypatch):
    """Each rank extracts its share of the shards and rank 0 assembles one store: the same bytes as a 1-process
    extraction, also when it resumes a 1-process extraction that was killed."""
    import numpy as np
    from PIL import Image

    import fusionkit.data.extract as extract_module

    rng = np.random.default_rng(0)
    (tmp_path / "img").mkdir()
    lines = ["id,labels,img"]
    for i in range(20):
        Image.fromarray(rng.integers(0, 255, (16, 15), dtype=np.uint8)).save(tmp_path / "img" / f"{i}.png")
        lines.append(f"s{i:02d},{'ab'[i % 2]},img/{i}.png")
    (tmp_path / "m.csv").write_text("\n".join(lines) + "\n")
    spec = {"labels": ["a", "b"], "encoders": [{"name": "img", "type": "timm", "model": "test_resnet", "in_chans": 1,
                                                "img_size": [32, 32], "crop_pct": 1.0}],
            "gate": {"type": "uniform", "top_n": 1}, "fusion": {"type": "weighted_sum"}}
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(spec))
    options = dict(batch_size=3, shard_batches=1, workers=0, progress=False)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as torchrun's processes here: float results are bitwise equal at one thread count
    extract_module.extract(spec, tmp_path / "m.csv", tmp_path / "one", **options)

    real, written = extract_module._write_shard, []

    def killed_after_three(*args):
        if len(written) == 3:
            raise KeyboardInterrupt
        written.append(1)
        real(*args)

    monkeypatch.setattr(extract_module, "_write_shard", killed_after_three)
    try:
        with pytest.raises(KeyboardInterrupt):
            extract_module.extract(spec, tmp_path / "m.csv", tmp_path / "two", **options)
    finally:
        monkeypatch.undo()
        torch.set_num_threads(threads)
    assert len(list((tmp_path / "two.partial").glob("shard-*"))) == 3
    proc = torchrun("-m", "fusionkit", "extract", tmp_path / "spec.yaml", "--data", tmp_path / "m.csv", "--out",
                    tmp_path / "two", "--batch-size", 3, "--shard-batches", 1, "--workers", 0, "--quiet", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("feature store written") == 1
    one = {p.relative_to(tmp_path / "one"): p.read_bytes() for p in (tmp_path / "one").rglob("*") if p.is_file()}
    two = {p.relative_to(tmp_path / "two"): p.read_bytes() for p in (tmp_path / "two").rglob("*") if p.is_file()}
    assert one == two and not (tmp_path / "two.partial").exists()


@case
def distilled_towers(folder: Path, store: Path) -> dict:
    pairs = pair_store_for(folder)
    teacher = tower_ddp_spec(False)
    teacher["latent_dim"], teacher["towers"]["a"]["embed_dim"], teacher["towers"]["b"]["embed_dim"] = 32, 16, 16
    train(teacher, pairs, folder / "teacher", fold=0, progress=False)
    student = {**tower_ddp_spec(False),
               "distill": {"teacher": str(folder / "teacher" / "best"), "preset": "clip-rd",
                           "losses": [{"type": "rkd", "angle_samples": 8}]}}
    (folder / "student.yaml").write_text(yaml.safe_dump(student))
    return {"spec": folder / "student.yaml", "data": pairs}


def test_distillation_of_towers_on_two_processes_equals_one(two_processes):
    """CLIP-RD (its preset) and RKD on the gathered global batch: the teacher's cache covers every row, the
    relational losses see the batch one process sees, and the losses' own parameters (the learned scales, the
    projection) average over ranks: 2 processes = 1 process."""
    logs = equals_one_process(two_processes, "distilled_towers")
    for key in ("distill_vrd", "distill_xrd", "distill_rkd", "distill_icl", "distill_fd", "clip"):
        assert [r[key] for r in logs[1]] == pytest.approx([r[key] for r in logs[0]], rel=1e-6, abs=1e-5), key


@case
def distilled_fusion(folder: Path, store: Path) -> dict:
    teacher = ddp_spec(epochs=2)
    teacher["latent_dim"] = 24
    train(teacher, store, folder / "teacher", fold=0, progress=False)
    student = {**ddp_spec(epochs=3), "distill": {"teacher": str(folder / "teacher" / "best"),
                                                 "losses": [{"type": "kd"}, {"type": "rkd", "angle_samples": 8}]}}
    (folder / "student.yaml").write_text(yaml.safe_dump(student))
    return {"spec": folder / "student.yaml", "data": store}


def test_kd_distillation_of_a_fusion_student_on_two_processes_equals_one(two_processes):
    logs = equals_one_process(two_processes, "distilled_fusion")
    for key in ("distill_kd", "distill_rkd", "loss"):
        assert [r[key] for r in logs[1]] == pytest.approx([r[key] for r in logs[0]], rel=1e-6, abs=1e-5), key


@case
def adaptation(folder: Path, store: Path) -> dict:
    from test_adaptation import shifted_store

    spec = ddp_spec(epochs=3)
    spec["projector"] = {"dropout": 0.0, "domain_norm": True}
    spec["data"] = {"standardize_per_domain": True}
    spec["adaptation"] = [{"type": "mmd"}, {"type": "coral", "on": "encoders"}, {"type": "dann", "weight": 0.1},
                          {"type": "entropy", "weight": 0.05}]
    (folder / "spec.yaml").write_text(yaml.safe_dump(spec))
    return {"spec": folder / "spec.yaml", "data": shifted_store(folder / "store", samples=240, target_shift=1.0)}


def test_adaptation_on_two_processes_equals_one(two_processes):
    """Adaptation under torchrun: target batches shared out like source batches; mmd, coral, DANN and entropy on the
    gathered global source and target batches; DANN's discriminator averaged over ranks; per-domain input statistics
    and AdaBN's batch statistics global (GlobalBatchNorm): 2 processes = 1 process."""
    logs = equals_one_process(two_processes, "adaptation")
    for key in ("adapt_mmd", "adapt_coral", "adapt_dann", "adapt_entropy", "loss"):
        assert [r[key] for r in logs[1]] == pytest.approx([r[key] for r in logs[0]], rel=1e-6, abs=1e-5), key
    root = two_processes[0] / "adaptation"
    a, b = load_model(root / "one" / "best").state_dict(), load_model(root / "two" / "best").state_dict()
    assert all(torch.allclose(a[k].float(), b[k].float(), atol=1e-5) for k in a)


# --- a killed run with dropout resumes to the uninterrupted one ------------------------------------------------

def descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (read from /proc)."""
    parent = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            parent[int(entry.name)] = int(fields[1])
    out, frontier = [], [pid]
    while frontier:
        children = [p for p, pp in parent.items() if pp in frontier]
        out += children
        frontier = children
    return out


@case
def dropout(folder: Path, store: Path) -> dict:
    spec = ddp_spec(epochs=4)
    spec["projector"] = {"dropout": 0.3}
    (folder / "spec.yaml").write_text(yaml.safe_dump(spec))
    return {"spec": folder / "spec.yaml", "data": store}


def test_a_killed_torchrun_run_with_dropout_resumes_to_the_uninterrupted_run(two_processes, synthetic_store, tmp_path):
    """only rank 0's random state was saved and every rank restored it, so with dropout the resumed run
    differed from its first resumed epoch on. Then a resume on another world size: a warning, and run.json says so.
    The uninterrupted run is the shared launch's (its `train` call is what the command line calls)."""
    from fusionkit.errors import FusionkitWarning

    whole = launched(two_processes, "dropout")
    (tmp_path / "spec.yaml").write_text(Path(two_processes[2]["dropout"]["spec"]).read_text())
    common = ("-m", "fusionkit", "train", tmp_path / "spec.yaml", "--data", synthetic_store, "--fold", 0, "--quiet")
    run = tmp_path / "killed"

    def kill_after_epoch(n: int) -> None:
        proc = torchrun(*common, "--out", run, cwd=tmp_path, start_new_session=True, stdout=subprocess.DEVNULL,
                        stderr=subprocess.DEVNULL)
        deadline = time.time() + 240
        while time.time() < deadline:
            meta = run / "last" / "metadata.json"
            if meta.exists() and json.loads(meta.read_text())["extra"]["trainer"]["epoch"] >= n:
                break
            time.sleep(0.02)
        for pid in [proc.pid, *descendants(proc.pid)]:  # torchrun starts its workers in sessions of their own
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        proc.wait()
        from fusionkit.files import LockedError, exclusive_lock

        for _ in range(600):  # the killed workers release the run's lock as they exit
            try:
                with exclusive_lock(run, "run", ""):
                    return
            except LockedError:
                time.sleep(0.05)

    kill_after_epoch(1)
    assert not (run / "metrics.json").exists()
    import shutil

    shutil.copytree(run, tmp_path / "killed-too")  # the same killed run, resumed below on one process
    resumed = torchrun(*common, "--out", run, "--resume", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    expected = json.loads((whole / "metrics.json").read_text())
    assert close(json.loads((run / "metrics.json").read_text()), expected)
    whole_log = [json.loads(x)["loss"] for x in (whole / "log.jsonl").read_text().splitlines()]
    resumed_log = [json.loads(x)["loss"] for x in (run / "log.jsonl").read_text().splitlines()]
    assert close(resumed_log, whole_log)

    # 2 -> 1 process: accepted, said, and recorded
    run = tmp_path / "killed-too"
    assert json.loads((run / "last" / "metadata.json").read_text())["extra"]["world_size"] == 2
    with pytest.warns(FusionkitWarning, match=r"started with 2 process\(es\) and resumes with 1"):
        train(tmp_path / "spec.yaml", synthetic_store, run, fold=0, progress=False, resume=True)
    assert json.loads((run / "run.json").read_text())["world_size"] == 1


@case
def sampled_budgets(folder: Path, store: Path) -> dict:
    spec = ddp_spec(epochs=1)
    spec["gate"] = {"type": "static", "top_n": 2}
    spec["encoders"][1].update(run="on_demand", cost_gflops=1.0)
    spec["encoders"][2].update(run="on_demand", cost_gflops=3.0)
    (folder / "spec.yaml").write_text(yaml.safe_dump(spec))
    return {"spec": folder / "spec.yaml", "data": store}


def test_an_on_demand_model_with_sampled_budgets_trains_in_two_processes_as_in_one(two_processes):
    """The per-row budgets drawn in training are the global batch's draws, so 2 processes = 1 process."""
    logs = equals_one_process(two_processes, "sampled_budgets")
    assert close(logs[1][0]["loss"], logs[0][0]["loss"])


@case
def domain_norm_on_demand(folder: Path, store: Path) -> dict:
    from fusionkit.components.datasets import build_dataset

    store = build_dataset("synthetic", {"samples": 120, "noise": [0.5, 1.0, 2.0], "dim": 8, "seed": 0,
                                        "target_shift": 1.5}, folder / "store")
    spec = tiny_spec(epochs=1, batch_size=8)
    spec["encoders"][1].update(run="on_demand", cost_gflops=1.0)
    spec["encoders"][2].update(run="on_demand", cost_gflops=3.0)
    spec["projector"] = {"domain_norm": True, "dropout": 0.0}
    spec["conditional"] = {"scout_rows": 0.02}
    (folder / "spec.yaml").write_text(yaml.safe_dump(spec))
    return {"spec": folder / "spec.yaml", "data": store}


def test_domain_norm_with_on_demand_encoders_trains_under_torchrun(two_processes):
    """A rank with no row for an on-demand encoder still joins its projector's global batch norm (with no rows, in
    the forward and the backward pass), and a loss term that only one rank's rows gave in an epoch (the scout's, on
    2% of the rows) is summed with the others' zero: the ranks' collectives match (they did not: gloo's size
    mismatch, SIGABRT)."""
    run = launched(two_processes, "domain_norm_on_demand")
    assert json.loads((run / "metrics.json").read_text())["epochs_run"] == 1
