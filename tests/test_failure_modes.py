"""Failure modes of raw manifests, extraction, resume and the plugin road: nothing lost and nothing silently wrong.

Each test names the failure it guards against: a bad input gets one clear error, a crash window recovers.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from test_live import IMG, raw_images, spec_with  # noqa: F401 - the fixture is used by name

from fusionkit.data.raw import read_manifest
from fusionkit.errors import DataError, FusionkitError

LABELS = ["a", "b"]


def write(path: Path, text: str, encoding: str = "utf-8") -> Path:
    path.write_bytes(text.encode(encoding))
    return path


# --- the CSV reader -------------------------------------------------------------------------------


def test_a_quoted_line_break_and_comma_stay_in_their_cell(tmp_path):
    """the csv module parses the file itself, so a quoted newline is not dropped."""
    manifest = read_manifest(write(tmp_path / "m.csv", 'id,labels,text\ns1,a,"hello\nworld"\ns2,b,"x, y"\n'), LABELS)
    assert manifest.columns["text"] == ["hello\nworld", "x, y"]


@pytest.mark.parametrize("row, message", [
    ("s2,b,hello, world and more", r"m.csv:3: 4 cells where the header has 3"),
    ("s2,b", r"m.csv:3: 2 cells where the header has 3"),
])
def test_a_row_with_extra_or_missing_cells_is_refused_by_line(tmp_path, row, message):
    """an unquoted comma no longer truncates the cell to 'hello'."""
    with pytest.raises(DataError, match=message):
        read_manifest(write(tmp_path / "m.csv", f"id,labels,text\ns1,a,x\n{row}\n"), LABELS)


@pytest.mark.parametrize("header", ["id,labels,text,text", "id,id,labels,text"])
def test_a_duplicate_header_name_is_refused(tmp_path, header):
    """a duplicate column (a duplicate id included) was last-wins."""
    cells = ",".join(["s1", "a", "x", "y"][: len(header.split(","))])
    with pytest.raises(DataError, match=r"names column\(s\) \['(text|id)'\] more than once"):
        read_manifest(write(tmp_path / "m.csv", f"{header}\n{cells}\n"), LABELS)


def test_a_utf8_byte_order_mark_is_accepted(tmp_path):
    """Excel's "CSV UTF-8" starts with a BOM; the first column was read as '\\ufeffid'."""
    manifest = read_manifest(write(tmp_path / "m.csv", "id,labels,text\ns1,a,x\n", "utf-8-sig"), LABELS)
    assert manifest.ids == ["s1"]


def test_a_cell_over_128_kb_is_read(tmp_path):
    """the csv module's 128 KiB cell limit gave a raw _csv.Error."""
    long = "word " * 40_000
    manifest = read_manifest(write(tmp_path / "m.csv", f"id,labels,text\ns1,a,{long}\n"), LABELS)
    assert manifest.columns["text"] == [long]
    import csv

    assert csv.field_size_limit() == 131072  # the process-wide limit is left as it was


# --- domains ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".csv", ".jsonl"])
def test_a_domain_typo_is_refused_naming_the_row(tmp_path, suffix):
    """'domain: Source' silently removed its rows from training."""
    if suffix == ".csv":
        path = write(tmp_path / "m.csv", "id,labels,domain,text\ns1,a,source,x\ns2,b,Source,y\n")
    else:
        path = write(tmp_path / "m.jsonl", '{"id": "s1", "labels": "a", "text": "x"}\n'
                                           '{"id": "s2", "labels": "b", "domain": "Source", "text": "y"}\n')
    with pytest.raises(DataError, match=r"sample 's2' \(record #1\): domain 'Source' is not one of \['source', 'target'\]"):
        read_manifest(path, LABELS)


def test_a_store_index_with_an_unknown_domain_is_refused(tmp_path):
    """Stores: the same check guards the index that write_store and open_store read."""
    from fusionkit.data.store import Sample, write_store

    with pytest.raises(DataError, match="domain 'tgt' is not one of"):
        write_store(tmp_path / "s", LABELS, [Sample(id="x", domain="tgt")], {"f": np.zeros((1, 2), np.float32)})


# --- linear duplicate check --------------------------------------------------------------------------


def test_a_large_manifest_with_one_duplicate_is_rejected_quickly(tmp_path):
    """100k rows with one duplicate took 133 s (quadratic). Measured against a clean read of the same
    file in the same process, so the test holds on any machine: the rejection costs about as much as the read."""
    rows = [f"s{i},a,t{i}" for i in range(200_000)]
    clean = write(tmp_path / "clean.csv", "id,labels,text\n" + "\n".join(rows) + "\n")
    started = time.perf_counter()
    read_manifest(clean, LABELS)
    read_time = time.perf_counter() - started
    dup = write(tmp_path / "dup.csv", "id,labels,text\n" + "\n".join(rows + ["s7,a,again"]) + "\n")
    started = time.perf_counter()
    with pytest.raises(DataError, match=r"duplicate sample ids \['s7'\] \(1 in all\)"):
        read_manifest(dup, LABELS)
    assert time.perf_counter() - started < 3 * read_time + 1.0


# --- the path rule: which paths are read ----------------------------------------------------------


def test_a_fifo_is_refused_not_opened(raw_images):
    """a FIFO named x.png hung extract and train forever; only regular files and folders are read."""
    from fusionkit.data.extract import extract

    fifo = raw_images / "img" / "s05.png"
    fifo.unlink()
    os.mkfifo(fifo)
    with pytest.raises(DataError, match=r"sample 's05' \(.*s05.png: not a regular file or a folder\)"):
        extract(spec_with(IMG), raw_images / "manifest.csv", raw_images / "out", batch_size=4, workers=0,
                progress=False)
    assert not (raw_images / "out").exists()


def test_confine_refuses_paths_that_resolve_outside(raw_images, tmp_path_factory):
    """Paths: '..', absolute paths and symlinks out of the folder are read by default, refused under --confine."""
    from fusionkit.models.factory import build_model

    outside = tmp_path_factory.mktemp("elsewhere") / "x.png"
    (raw_images / "img" / "s03.png").rename(outside)
    (raw_images / "img" / "s03.png").symlink_to(outside)
    encoders = build_model(spec_with(IMG)).live_encoders()
    read_manifest(raw_images / "manifest.csv", LABELS).check_encoders(encoders)  # allowed without --confine
    confined = read_manifest(raw_images / "manifest.csv", LABELS, confine=raw_images)
    with pytest.raises(DataError, match=r"1 unusable input path.*'s03' .*resolves outside --confine"):
        confined.check_encoders(encoders)


def test_confine_from_the_command_line(raw_images, tmp_path_factory, capsys):
    from fusionkit.cli import main

    outside = tmp_path_factory.mktemp("elsewhere2") / "x.png"
    (raw_images / "img" / "s03.png").rename(outside)
    text = (raw_images / "manifest.csv").read_text().replace("img/s03.png", str(outside))
    (raw_images / "manifest.csv").write_text(text)
    spec = raw_images / "spec.json"
    spec.write_text(json.dumps(spec_with(IMG)))
    code = main(["extract", str(spec), "--data", str(raw_images / "manifest.csv"), "--out", str(raw_images / "out"),
                 "--quiet", "--workers", "0", "--confine", str(raw_images)])
    assert code == 2 and "resolves outside --confine" in capsys.readouterr().err
    assert not (raw_images / "out").exists()


# --- decoders that raise something else ----------------------------------------------------------------


def test_a_decompression_bomb_is_a_clear_error(raw_images):
    """a PNG claiming 20000x20000 gave a raw DecompressionBombError traceback."""
    import struct
    import zlib

    from fusionkit.data.extract import extract

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", 20000, 20000, 8, 0, 0, 0, 0)
    (raw_images / "img" / "s02.png").write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IEND", b""))
    with pytest.raises(DataError, match=r"sample 's02': encoder 'img' cannot read 'img/s02.png' \(DecompressionBombError"):
        extract(spec_with(IMG), raw_images / "manifest.csv", raw_images / "out", batch_size=4, workers=0,
                progress=False)


# --- extraction shards and one writer ------------------------------------------------------------


class Killed(Exception):
    pass


def _interrupted_extraction(raw_images, monkeypatch, shards_written: int = 1, shard_batches: int = 1) -> Path:
    import fusionkit.data.extract as extract_module

    real = extract_module._write_shard
    calls = []

    def write_then_die(*args):
        if len(calls) == shards_written:
            raise Killed()
        calls.append(1)
        real(*args)

    monkeypatch.setattr(extract_module, "_write_shard", write_then_die)
    with pytest.raises(Killed):
        extract_module.extract(spec_with(IMG), raw_images / "manifest.csv", raw_images / "out", batch_size=4,
                               shard_batches=shard_batches, workers=0, progress=False)
    monkeypatch.undo()
    return raw_images / "out.partial"


def test_a_truncated_shard_is_refused_by_name(raw_images, monkeypatch):
    """a truncated shard gave a raw traceback when the store was assembled."""
    from fusionkit.data.extract import extract

    partial = _interrupted_extraction(raw_images, monkeypatch)
    shard = partial / "shard-00000.safetensors"
    shard.write_bytes(shard.read_bytes()[:100])
    with pytest.raises(DataError, match=r"shard-00000.safetensors: unreadable or incomplete shard .*remove .*"
                                        r"shard-00000.safetensors and run the same command again"):
        extract(spec_with(IMG), raw_images / "manifest.csv", raw_images / "out", batch_size=4, shard_batches=1,
                workers=0, progress=False)
    assert not (raw_images / "out").exists()


def test_a_shard_copied_over_another_is_refused(raw_images, monkeypatch):
    """a shard copied over another gave a silently wrong store; each shard's ids are now checked."""
    from fusionkit.data.extract import extract

    partial = _interrupted_extraction(raw_images, monkeypatch, shards_written=2)
    (partial / "shard-00001.safetensors").write_bytes((partial / "shard-00000.safetensors").read_bytes())
    with pytest.raises(DataError, match=r"shard-00001.safetensors: holds other samples than shard 1"):
        extract(spec_with(IMG), raw_images / "manifest.csv", raw_images / "out", batch_size=4, shard_batches=1,
                workers=0, progress=False)
    (partial / "shard-00001.safetensors").unlink()  # as the message says: the next run extracts it again
    store = extract(spec_with(IMG), raw_images / "manifest.csv", raw_images / "out", batch_size=4, shard_batches=1,
                    workers=0, progress=False)
    from fusionkit.data.store import open_store

    assert open_store(store).ids == [f"s{i:02d}" for i in range(24)]


def test_an_empty_leftover_partial_folder_does_not_block(raw_images):
    """an empty, unmarked OUT.partial (what a lost race used to leave) is replaced, not refused."""
    from fusionkit.data.extract import extract

    (raw_images / "out.partial").mkdir()
    extract(spec_with(IMG), raw_images / "manifest.csv", raw_images / "out", batch_size=8, workers=0, progress=False)
    assert (raw_images / "out" / "index.json").exists() and not (raw_images / "out.partial").exists()


def test_a_held_extraction_lock_is_refused_with_a_clear_error(raw_images, monkeypatch):
    """the second writer is refused at once, and the first one's partial folder is untouched."""
    from fusionkit.files import exclusive_lock

    partial = _interrupted_extraction(raw_images, monkeypatch, shards_written=0, shard_batches=8)  # the CLI's default
    before = sorted(p.name for p in partial.iterdir())
    with exclusive_lock(partial, "extraction", "(held by this test)"):
        child = subprocess.run(
            [sys.executable, "-m", "fusionkit", "extract", str(_spec_file(raw_images)), "--data", str(raw_images / "manifest.csv"), "--out",
             str(raw_images / "out"), "--quiet", "--workers", "0", "--batch-size", "4"],
            capture_output=True, text=True, timeout=300)
    assert child.returncode == 2
    assert "another fusionkit process is writing this extraction" in child.stderr
    assert sorted(p.name for p in partial.iterdir()) == before


def _spec_file(root: Path) -> Path:
    spec = root / "spec.json"
    spec.write_text(json.dumps(spec_with(IMG)))
    return spec


# --- what a run's restart may lose or silently change -----------------------------------------------

from test_distill import pair_store, teacher_run, tower_spec  # noqa: E402,F401 - fixtures used by name
from test_distributed import close, ddp_spec, torchrun  # noqa: E402


def test_overwrite_with_a_bad_teacher_keeps_the_previous_run(teacher_run, pair_store, tmp_path):
    """a wrong distill.teacher with --overwrite left only the lock file of the previous run."""
    from fusionkit.errors import CheckpointError
    from fusionkit.training.train import train

    out, _ = teacher_run
    run = tmp_path / "student"
    spec = tower_spec(width=16, embed=8, epochs=2, distill={"teacher": str(out / "best"), "losses": [{"type": "fd"}]})
    train(spec, pair_store, run, fold=0, progress=False)
    before = {p.relative_to(run): p.read_bytes() for p in run.rglob("*") if p.is_file()}
    spec["distill"]["teacher"] = str(tmp_path / "no-such-teacher")
    with pytest.raises(CheckpointError, match="distill.teacher: cannot load the teacher"):
        train(spec, pair_store, run, fold=0, progress=False, overwrite=True)
    after = {p.relative_to(run): p.read_bytes() for p in run.rglob("*") if p.is_file()}
    lock = Path(".fusionkit.lock")  # taken again by the refused call: it names that call's process and second
    assert lock in after and {k: v for k, v in after.items() if k != lock} == {k: v for k, v in before.items() if k != lock}


def test_resume_against_a_retrained_teacher_is_refused(teacher_run, pair_store, tmp_path, monkeypatch):
    """a student killed, its teacher changed, then --resume: it went on against another teacher."""
    import shutil

    from fusionkit.errors import CheckpointError
    from fusionkit.training.train import Trainer, train

    teacher = tmp_path / "teacher"
    shutil.copytree(teacher_run[0] / "best", teacher)
    spec = tower_spec(width=16, embed=8, epochs=3, distill={"teacher": str(teacher), "losses": [{"type": "fd"}]})
    real = Trainer.validate

    def killed_after_one_epoch(self, model, terms, epoch, state, record):
        real(self, model, terms, epoch, state, record)
        if epoch == 1:
            raise KeyboardInterrupt

    monkeypatch.setattr(Trainer, "validate", killed_after_one_epoch)
    with pytest.raises(KeyboardInterrupt):
        train(spec, pair_store, tmp_path / "student", fold=0, progress=False)
    monkeypatch.undo()
    retrained = tower_spec(width=64, embed=32, epochs=2)
    retrained["train"]["seed"] = 1
    train(retrained, pair_store, tmp_path / "retrained", fold=0, progress=False)
    shutil.rmtree(teacher)
    shutil.copytree(tmp_path / "retrained" / "best", teacher)
    with pytest.raises(CheckpointError, match=r"distill.teacher \(the SHA-256 of its weights: it was retrained"):
        train(spec, pair_store, tmp_path / "student", fold=0, progress=False, resume=True)


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


def test_a_killed_torchrun_run_with_dropout_resumes_to_the_uninterrupted_run(synthetic_store, tmp_path):
    """only rank 0's random state was saved and every rank restored it, so with dropout the resumed run
    differed from its first resumed epoch on. Then a resume on another world size: a warning, and run.json says so."""
    import signal

    import torch
    import yaml

    from fusionkit.errors import FusionkitWarning
    from fusionkit.training.train import train

    spec = ddp_spec(epochs=4)
    spec["projector"] = {"dropout": 0.3}
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(spec))
    common = ("-m", "fusionkit", "train", tmp_path / "spec.yaml", "--data", synthetic_store, "--fold", 0, "--quiet")
    whole = torchrun(*common, "--out", tmp_path / "whole", cwd=tmp_path)
    assert whole.returncode == 0, whole.stderr[-3000:]
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
    resumed = torchrun(*common, "--out", run, "--resume", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    expected = json.loads((tmp_path / "whole" / "metrics.json").read_text())
    assert close(json.loads((run / "metrics.json").read_text()), expected)
    whole_log = [json.loads(x)["loss"] for x in (tmp_path / "whole" / "log.jsonl").read_text().splitlines()]
    resumed_log = [json.loads(x)["loss"] for x in (run / "log.jsonl").read_text().splitlines()]
    assert close(resumed_log, whole_log)

    # 2 -> 1 process: accepted, said, and recorded
    import shutil

    shutil.rmtree(run)
    kill_after_epoch(1)
    assert json.loads((run / "last" / "metadata.json").read_text())["extra"]["world_size"] == 2
    assert torch.get_num_threads() == 1  # as torchrun's processes here (tests/conftest.py)
    with pytest.warns(FusionkitWarning, match=r"started with 2 process\(es\) and resumes with 1"):
        train(tmp_path / "spec.yaml", synthetic_store, run, fold=0, progress=False, resume=True)
    assert json.loads((run / "run.json").read_text())["world_size"] == 1


# --- audio too long or too short ---------------------------------------------------------------

from test_live import wavlm_dir  # noqa: E402,F401 - fixture used by name


def _wav_encoder(wavlm_dir, **options):
    from fusionkit.models.factory import build_model

    return build_model(spec_with({"name": "wav", "type": "hf", "model": str(wavlm_dir), "modality": "audio",
                                  **options})).encoders["wav"]


def test_a_long_wav_is_refused_or_cropped_as_configured(wavlm_dir, tmp_path):
    """a 10-minute WAV tried to allocate 1.8 TB; now a documented maximum duration applies."""
    import soundfile

    soundfile.write(tmp_path / "long.wav", np.zeros(16000 * 3, np.float32), 16000)  # 3 s
    with pytest.raises(ValueError, match=r"3.0 s long, over max_seconds 2 of encoder 'wav'; raise max_seconds, or "
                                         r"set too_long: crop"):
        _wav_encoder(wavlm_dir, max_seconds=2.0).load("long.wav", tmp_path)
    with pytest.warns(UserWarning, match=r"3.0 s long, cropped to its first 2 s"):
        wave = _wav_encoder(wavlm_dir, max_seconds=2.0, too_long="crop").load("long.wav", tmp_path)
    assert wave.shape == (32000,)


@pytest.mark.parametrize("samples", [0, 5])
def test_a_wav_too_short_for_the_model_is_refused_not_stored_as_zeros(wavlm_dir, tmp_path, samples):
    """a WAV of 0 or 5 samples was stored as an all-zero feature, or gave a raw traceback."""
    import soundfile

    from fusionkit.data.extract import extract

    for i in range(4):
        soundfile.write(tmp_path / f"a{i}.wav", np.random.default_rng(i).normal(size=8000).astype(np.float32), 16000)
    soundfile.write(tmp_path / "a2.wav", np.zeros(samples, np.float32), 16000)
    (tmp_path / "m.csv").write_text("id,labels,wav\n" + "".join(f"s{i},a,a{i}.wav\n" for i in range(4)))
    spec = spec_with({"name": "wav", "type": "hf", "model": str(wavlm_dir), "modality": "audio"})
    with pytest.raises(DataError, match=rf"sample 's2': encoder 'wav' cannot read 'a2.wav' \(ValueError: too short: "
                                        rf"{samples} samples at 16000 Hz give the model no frame; a clip needs at least"):
        extract(spec, tmp_path / "m.csv", tmp_path / "out", batch_size=4, workers=0, progress=False)
    assert not (tmp_path / "out").exists()


# --- two-tower runs through evaluate, predict and report -----------------------------------------------


def test_evaluate_predict_and_report_on_a_two_tower_run(teacher_run, pair_store, tmp_path, capsys):
    """evaluate and predict gave a raw AttributeError on a two-tower run, report a misleading error."""
    from fusionkit.cli import main

    run = teacher_run[0]
    assert main(["evaluate", str(run), "--data", str(pair_store)]) == 0
    out = capsys.readouterr().out
    assert out.startswith("test: R@1 ")
    metrics = json.loads((run / "evaluation_test.json").read_text())
    assert metrics["r1"] == json.loads((run / "metrics.json").read_text())["test"]["r1"]
    assert main(["predict", str(run), "--data", str(pair_store), "--out", str(tmp_path / "sub.json"),
                 "--split", "labelled"]) == 2
    assert "a two-tower model embeds and retrieves; it predicts no answers" in capsys.readouterr().err
    assert not (tmp_path / "sub.json").exists()
    assert main(["report", str(run)]) == 0
    summary = (run / "report" / "summary.md").read_text()
    assert "(two-tower)" in summary and "| test |" in summary
    assert (run / "report" / "retrieval.png").stat().st_size > 1000


# --- top-p bounds --------------------------------------------------------------------------------------


@pytest.mark.parametrize("gate, message", [
    ({"min_n": 3, "max_n": 2}, r"gate.min_n: 3 is more than gate.max_n \(2\)"),
    ({"min_n": 4}, r"gate.min_n: 4 is more than the 3 encoder\(s\) the gate ranks"),
    ({"max_n": 5}, r"gate.max_n: 5 is more than the 3 encoder\(s\) the gate ranks"),
])
def test_top_p_bounds_that_cannot_hold_are_refused(gate, message):
    """min_n > max_n, or > the number of encoders, was accepted and clamped silently."""
    from conftest import tiny_spec

    from fusionkit.errors import SpecError
    from fusionkit.spec import load_spec

    spec = tiny_spec()
    spec["gate"] = {"type": "mlp", "selection": "top_p", "top_p": 0.5, **gate}
    with pytest.raises(SpecError, match=message):
        load_spec(spec)
    spec["gate"] = {"type": "mlp", "selection": "top_p", "top_p": 0.5, "min_n": 2, "max_n": 3}
    load_spec(spec)


# --- plugin descriptions ---------------------------------------------------------------------------------


def test_plugins_shows_each_registered_description(capsys):
    """`fusionkit plugins` never showed the description= a plugin registers."""
    from fusionkit.cli import main

    assert main(["plugins"]) == 0
    assert "    example_mlp  An MLP over feature vectors." in capsys.readouterr().out
    assert main(["plugins", "--json"]) == 0
    rows = {row["name"]: row for row in json.loads(capsys.readouterr().out)}
    assert rows["example_encoder"]["descriptions"] == {"encoder": {"example_mlp": "An MLP over feature vectors."}}
    assert rows["example_encoder"]["provides"] == {"encoder": ["example_mlp"]}


# --- lists are strict -----------------------------------------------------------------------------------


def test_a_string_is_not_split_into_a_list_and_bad_items_are_shown(tmp_path, capsys):
    """`--set classes=abc` became ['a','b','c'], and an element's type error hid the value."""
    from fusionkit.cli import main

    assert main(["data", "build", "synthetic", "--out", str(tmp_path / "s"), "--set", "noise=abc"]) == 2
    assert "noise: expected a list (list[float]), found 'abc' (str); write [a, b]" in capsys.readouterr().err
    assert main(["data", "build", "synthetic", "--out", str(tmp_path / "s"), "--set", "noise=[1, abc]"]) == 2
    assert "noise: expected list[float], but item [1] is 'abc' (str), not float" in capsys.readouterr().err
    assert main(["data", "build", "synthetic", "--out", str(tmp_path / "s"), "--set", "noise=[1, 2.5]",
                 "--set", "samples=50"]) == 0
    assert not (tmp_path / "s.partial").exists()


# --- a disabled plugin's checkpoint ----------------------------------------------------------------------


def test_a_checkpoint_of_a_disabled_plugin_says_how_to_enable_it(tmp_path, monkeypatch):
    """load_model under FUSIONKIT_DISABLE_PLUGINS said 'no installed plugin provides ... Install'."""
    from fusionkit import plugins
    from fusionkit.errors import CheckpointError
    from fusionkit.models.factory import build_model, load_model

    model = build_model({"latent_dim": 8, "encoders": [{"name": "a", "type": "example_mlp", "dim": 3}]})
    model.save_pretrained(tmp_path / "ckpt")
    monkeypatch.setenv("FUSIONKIT_DISABLE_PLUGINS", "fusionkit-example-encoder")
    plugins.reset()
    with pytest.raises(CheckpointError) as err:
        load_model(tmp_path / "ckpt")
    message = str(err.value)
    assert "encoders[0] is encoder 'example_mlp', saved with fusionkit-example-encoder 0.1.0" in message
    assert "installed but disabled; enable it (remove it from FUSIONKIT_DISABLE_PLUGINS" in message
    assert "Install" not in message and "is gate" not in message


# --- ACC_salience without blends ------------------------------------------------------------------------


def test_acc_salience_is_not_applicable_without_blends():
    """a split without blends reported ACC_salience 0.000, which halved Score."""
    from fusionkit.metrics import blemore_scores

    truth = {"x": [{"emotion": "hap", "salience": 100.0}], "y": [{"emotion": "sad", "salience": 100.0}]}
    pred = {"x": [{"emotion": "hap", "salience": 100.0}], "y": [{"emotion": "ang", "salience": 100.0}]}
    scores = blemore_scores(pred, truth)
    assert scores == {"acc_presence": 0.5, "acc_salience": None, "score": 0.5}
    truth["z"] = [{"emotion": "hap", "salience": 70.0}, {"emotion": "sad", "salience": 30.0}]
    pred["z"] = [{"emotion": "hap", "salience": 70.0}, {"emotion": "sad", "salience": 30.0}]
    assert blemore_scores(pred, truth)["acc_salience"] == 1.0


def test_a_run_without_blends_writes_null_and_prints_n_a(tmp_path, capsys):
    """End to end: metrics.json holds null, the terminal and the report say n/a."""
    from fusionkit.cli import main
    from fusionkit.components.datasets import build_dataset

    store = build_dataset("synthetic", {"samples": 200, "dim": 4, "noise": [0.5, 1.0], "blend_share": 0.0},
                          tmp_path / "store")
    spec = {"latent_dim": 8, "encoders": [{"name": f"enc{k}", "type": "features", "dim": 4} for k in range(2)],
            "gate": {"type": "uniform", "top_n": 2}, "train": {"epochs": 2, "batch_size": 64}}
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    assert main(["train", str(tmp_path / "spec.json"), "--data", str(store), "--out", str(tmp_path / "run"),
                 "--fold", "0", "--quiet"]) == 0
    assert "ACC_salience n/a" in capsys.readouterr().out
    test = json.loads((tmp_path / "run" / "metrics.json").read_text())["test"]
    assert test["acc_salience"] is None and test["score"] == test["acc_presence"]
    assert main(["report", str(tmp_path / "run")]) == 0
    assert "| n/a |" in (tmp_path / "run" / "report" / "summary.md").read_text()


# --- scaffolding every kind -----------------------------------------------------------------------------


def test_plugin_new_makes_every_kind_and_each_one_works(tmp_path, monkeypatch, capsys):
    """`plugin new` made encoders only, and its hint `pip install NAME` would search the index."""
    import importlib

    import fusionkit
    from fusionkit.cli import main
    from fusionkit.components.datasets import build_dataset
    from fusionkit.cli.scaffold import PLUGIN_KINDS
    from fusionkit.training.train import train

    monkeypatch.syspath_prepend(str(tmp_path))
    for kind in PLUGIN_KINDS:
        name = f"my-{kind.replace('_', '-')}"
        assert main(["plugin", "new", name, "--kind", kind, "--out", str(tmp_path)]) == 0
        out = capsys.readouterr().out
        assert f"pip install {(tmp_path / f'fusionkit-{name}').resolve()}" in out
        monkeypatch.syspath_prepend(str(tmp_path / f"fusionkit-{name}"))
        module = importlib.import_module(f"fusionkit_{name.replace('-', '_')}")
        fusionkit.register_plugin(module, f"scaffold-{kind}")
    store = build_dataset("my_dataset", {"samples": 120}, tmp_path / "store")
    teacher = {"labels": ["low", "high"], "neutral": None, "latent_dim": 8,
               "encoders": [{"name": "features", "type": "my_encoder", "dim": 8},
                            {"name": "more", "type": "features", "dim": 8}],
               "train": {"epochs": 2, "batch_size": 32}}
    with pytest.raises(FusionkitError):  # the store has one encoder: 'more' is missing there
        train(teacher, store, tmp_path / "bad", fold=0, progress=False)
    teacher["encoders"] = teacher["encoders"][:1]
    train(teacher, store, tmp_path / "teacher", fold=0, progress=False)
    student = {**teacher, "gate": {"type": "my_gate", "top_n": 1}, "fusion": {"type": "my_fusion"},
               "heads": {"salience": {"type": "my_head"}}, "combiner": {"type": "my_combiner"},
               "decoder": {"type": "my_decoder"}, "adaptation": [{"type": "my_adaptation_loss", "weight": 0.1}],
               "distill": {"teacher": str(tmp_path / "teacher" / "best"), "losses": [{"type": "my_distill_loss"}]}}
    target = build_dataset("my_dataset", {"samples": 40, "seed": 1}, tmp_path / "target")
    metrics = train(student, store, tmp_path / "student", fold=0, progress=False, target=target)
    log = json.loads((tmp_path / "student" / "log.jsonl").read_text().splitlines()[0])
    assert {"distill_my_distill_loss"} <= set(log) and metrics["test"]["n"] > 0


# --- spec and label hints --------------------------------------------------------------------------------


def test_spec_validate_warns_of_a_missing_teacher(tmp_path, capsys):
    """`spec validate` accepted a distill.teacher that does not exist."""
    from fusionkit.cli import main

    spec = {"encoders": [{"name": "a", "type": "features", "dim": 3}],
            "distill": {"teacher": str(tmp_path / "nowhere"), "losses": [{"type": "kd"}]}}
    (tmp_path / "s.json").write_text(json.dumps(spec))
    assert main(["spec", "validate", str(tmp_path / "s.json")]) == 0
    assert "warning: distill.teacher: " in capsys.readouterr().err


def test_a_label_mismatch_says_which_labels_to_write(tmp_path, uci_source):
    """docs/training.md's command failed on label names with no hint."""
    from fusionkit.components.datasets import build_dataset
    from fusionkit.spec import load_spec
    from fusionkit.data.open import spec_store

    store = build_dataset("uci-mfeat", {"source": uci_source}, tmp_path / "uci")
    spec = load_spec({"encoders": [{"name": "fou", "type": "features", "dim": 76}]})
    with pytest.raises(DataError, match=r"`labels: \[d0, d1, d2, d3, d4, d5\]` and `neutral: null`"):
        spec_store(spec, store)
