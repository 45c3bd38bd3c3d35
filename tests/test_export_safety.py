"""Nothing lost and nothing silently different in export and the runtime: what --overwrite may replace, one writer
at a time, a failed check that leaves nothing, files kept inside the export, a tampered manifest refused in one
line, and the controls' random rows at the scout's cost."""

from __future__ import annotations

import copy
import json
import os
import random
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

import fusionkit
from fusionkit.components.datasets import build_dataset
from fusionkit.data.open import spec_store
from fusionkit.errors import DataError
from fusionkit.export.check import check_export
from fusionkit.export.graphs import ExportError, export_model
from fusionkit.files import LockedError, folder_lock
from fusionkit.inference import fit_mean_budget
from fusionkit.runtime import DeploymentError, load, read_store
from fusionkit.runtime.__main__ import main as runtime_main
from fusionkit.runtime.images import read_image


def spec(**extra):
    return {"latent_dim": 8,
            "encoders": [{"name": "enc0", "type": "features", "dim": 6},
                         {"name": "enc1", "type": "features", "dim": 6, "run": "on_demand", "cost_gflops": 1.0},
                         {"name": "enc2", "type": "features", "dim": 6, "run": "on_demand", "cost_gflops": 3.0}],
            "gate": {"type": "attention", "top_n": 2}, "data": {"nan_policy": "mask"}, **extra}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("safety")
    store_path = build_dataset("synthetic", {"samples": 60, "noise": [0.3, 1.0, 2.0], "dim": 6, "seed": 3},
                               root / "store")
    torch.manual_seed(0)
    model = fusionkit.build_model(spec()).eval()
    store = spec_store(model.spec, store_path)
    budget = fit_mean_budget(model, store, np.arange(30, 60), "mean:40%")
    exported = export_model(model, root / "exported", budget=budget)
    return root, model, store, exported


# --- 1. --overwrite replaces only what the export wrote ---------------------------------------------------------

def test_overwrite_never_deletes_a_users_files_kept_in_an_export(setup, tmp_path):
    _, model, _, exported = setup
    out = tmp_path / "out"
    shutil.copytree(exported, out)
    (out / "notes.txt").write_text("mine")
    (out / "mydata").mkdir()
    (out / "mydata" / "x.csv").write_text("1,2")
    with pytest.raises(ExportError, match=r"it holds what the export did not write: mydata/, notes.txt"):
        export_model(model, out, overwrite=True)
    assert (out / "notes.txt").read_text() == "mine" and (out / "mydata" / "x.csv").exists()
    (out / "notes.txt").unlink()
    shutil.rmtree(out / "mydata")
    export_model(model, out, overwrite=True)  # an intact export alone is replaced
    assert not [p for p in tmp_path.iterdir() if p.name != "out"]  # no lock, temporary or old copy left beside it


def test_a_format_string_alone_does_not_make_a_folder_an_export(setup, tmp_path):
    _, model, _, _ = setup
    thesis = tmp_path / "thesis"
    thesis.mkdir()
    (thesis / "manifest.json").write_text('{"format": "fusionkit-export"}')
    (thesis / "thesis.tex").write_text("\\documentclass{article}")
    with pytest.raises(ExportError, match="not replaced: it is not an intact fusionkit export"):
        export_model(model, thesis, overwrite=True)
    assert (thesis / "thesis.tex").exists() and (thesis / "manifest.json").exists()


def test_an_export_whose_graph_was_edited_is_not_replaced(setup, tmp_path):
    _, model, _, exported = setup
    out = tmp_path / "out"
    shutil.copytree(exported, out)
    (out / "fusion.onnx").write_bytes(b"my own graph")
    with pytest.raises(ExportError, match="SHA-256 does not match"):
        export_model(model, out, overwrite=True)
    assert (out / "fusion.onnx").read_bytes() == b"my own graph"


# --- 2. one writer at a time; a killed export's temporaries ----------------------------------------------------

def test_a_second_writer_is_refused_while_the_first_writes(setup, tmp_path):
    _, model, _, _ = setup
    out = tmp_path / "cc"
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import sys, time
        from pathlib import Path
        from fusionkit.files import folder_lock
        with folder_lock(Path({str(out)!r}), "model export", ""):
            print("held", flush=True)
            time.sleep(60)
    """)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(LockedError, match=r"cc: another fusionkit process is writing this model export \(pid"):
            export_model(model, out)
        assert not out.exists()
    finally:
        holder.kill()
        holder.wait()
    export_model(model, out)  # the dead holder's lock is gone with it
    with pytest.raises(ExportError, match="holds an earlier export; give --overwrite"):
        export_model(model, out)  # the later of two writers never replaces the earlier silently


def test_a_killed_exports_temporaries_are_removed_and_only_those(setup, tmp_path):
    _, model, _, _ = setup
    out = tmp_path / "out"
    stale = tmp_path / ".out.tmp-k1ll3d"  # what write_directory leaves when killed mid-export
    stale.mkdir()
    (stale / "fusion.onnx").write_bytes(b"half")
    (tmp_path / ".other.tmp-x").mkdir()  # another folder's temporary: not ours to touch
    (tmp_path / "out.tmp-notes").write_text("a user's file")
    export_model(model, out)
    assert not stale.exists() and (tmp_path / ".other.tmp-x").exists() and (tmp_path / "out.tmp-notes").exists()


def test_the_lock_is_exclusive_in_one_process_too(tmp_path):
    with folder_lock(tmp_path / "x", "model export", "wait"):
        with pytest.raises(LockedError):
            with folder_lock(tmp_path / "x", "model export", "wait"):
                pass
    assert not (tmp_path / ".x.lock").exists()


# --- 3. a failed check leaves nothing ------------------------------------------------------------------------------

def test_a_failed_check_replaces_nothing_and_leaves_nothing(setup, tmp_path):
    _, model, _, exported = setup
    out = tmp_path / "out"

    def fails(folder):
        assert (folder / "manifest.json").exists()  # the check sees the finished export
        raise ExportError("fusion.onnx: probabilities differ")

    with pytest.raises(ExportError, match="probabilities differ"):
        export_model(model, out, check=fails)
    assert list(tmp_path.iterdir()) == []
    shutil.copytree(exported, out)
    before = (out / "manifest.json").read_bytes()
    with pytest.raises(ExportError):
        export_model(model, out, overwrite=True, check=fails)
    assert (out / "manifest.json").read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_the_export_command_checks_before_replacing(setup, tmp_path, capsys, monkeypatch):
    """`fusionkit export --check` whose check fails (a store of other features) exits 2 and writes nothing."""
    from fusionkit.cli import main
    from fusionkit.training.train import train

    root, _, _, _ = setup
    run = tmp_path / "run"
    train(spec(train={"epochs": 1, "batch_size": 32}), root / "store", run, fold=0, progress=False)
    other = build_dataset("synthetic", {"samples": 20, "noise": [0.3, 1.0, 2.0], "dim": 6, "seed": 9},
                          tmp_path / "other")
    assert main(["export", str(run), "--out", str(tmp_path / "exp"), "--check", str(other)]) == 0
    capsys.readouterr()
    import fusionkit.export.check as export_module

    real = export_module.check_export

    def tampered(model, folder, store, *args, **kwargs):
        (folder / "encoders" / "enc1.onnx").write_bytes(b"broken")  # the check then fails on the written graph
        return real(model, folder, store, *args, **kwargs)

    monkeypatch.setattr(export_module, "check_export", tampered)
    assert main(["export", str(run), "--out", str(tmp_path / "exp2"), "--check", str(other)]) == 2
    assert "enc1.onnx" in capsys.readouterr().err and not (tmp_path / "exp2").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


# --- 3. value scouts on masked sequences, and the two stores' readers -------------------------------------------

def test_both_readers_give_a_sequence_with_a_bad_frame_the_same_zeros(tmp_path):
    from safetensors import safe_open
    from safetensors.numpy import load_file, save_file

    from fusionkit.data.store import open_store

    root = build_dataset("synthetic", {"samples": 12, "dim": 4, "seed": 0, "sequence_length": 3}, tmp_path / "s")
    file = root / "enc1.safetensors"
    tensors = load_file(str(file))
    with safe_open(str(file), framework="numpy") as fh:
        metadata = fh.metadata()
    row = int(np.flatnonzero(np.diff(tensors["offsets"]) >= 2)[0])
    tensors["features"][tensors["offsets"][row], 0] = np.nan
    save_file(tensors, str(file), metadata=metadata)
    store = open_store(root, nan_policy="mask")
    x, lengths = store.encoders["enc1"].rows(np.array([row]))
    assert not store.encoders["enc1"].available[row] and float(x.abs().sum()) == 0.0
    runtime_rows = read_store(root, ["enc1"])
    assert np.isnan(runtime_rows.inputs["enc1"][row]).any()  # the runtime masks the whole row at predict time


def test_the_value_head_does_not_read_a_missing_encoders_token():
    from fusionkit.components.scouts import ValueScout, ValueScoutConfig
    from fusionkit.interfaces import BuildContext

    context = BuildContext(labels=("a", "b"), neutral=None, latent_dim=4, encoder_names=("x", "y", "z"),
                           on_demand=(1, 2))
    head = ValueScout(ValueScoutConfig(hidden=8), context).eval()
    tokens = torch.randn(5, 3, 4)
    present = torch.ones(5, 3, dtype=torch.bool)
    present[[1, 3], 0] = False
    ran = torch.zeros(5, 2, dtype=torch.bool)
    other = tokens.clone()
    other[[1, 3], 0] = torch.randn(2, 4) * 100  # what another reader might hold for a missing encoder
    assert torch.equal(head(tokens, present, ran), head(other, present, ran))


# --- 4. saturated probabilities ----------------------------------------------------------------------------------

def test_a_saturated_model_exports_equal_to_pytorch(setup, tmp_path):
    _, _, store, _ = setup
    torch.manual_seed(1)
    model = fusionkit.build_model(spec(combiner={"type": "product"})).eval()
    with torch.no_grad():
        last = [m for m in model.heads["presence"].modules() if isinstance(m, torch.nn.Linear)][-1]
        last.bias.fill_(-20.0)
        last.weight.zero_()
    out = model.heads["presence"].probabilities(torch.full((1, 6), -20.0))
    assert float(out[0, 0]) == pytest.approx(2.06e-9, rel=1e-2)  # far below onnxruntime's Sigmoid's precision
    folder = export_model(model, tmp_path / "sat")
    report = check_export(model, folder, store, np.arange(30))
    assert max(line["max_prob_diff"] for line in report) < 1e-5


# --- 5. random rows spend what the scout spent --------------------------------------------------------------------

def test_random_rows_draw_among_the_rows_that_have_the_encoder(tmp_path):
    from safetensors import safe_open
    from safetensors.numpy import load_file, save_file

    from fusionkit.evaluation.controls import random_rows

    root = build_dataset("synthetic", {"samples": 80, "noise": [0.3, 1.0, 2.0], "dim": 6, "seed": 4}, tmp_path / "s")
    file = root / "enc2.safetensors"
    tensors = load_file(str(file))
    with safe_open(str(file), framework="numpy") as fh:
        metadata = fh.metadata()
    tensors["features"][:40, 0] = np.nan  # half the rows lack enc2
    save_file(tensors, str(file), metadata=metadata)
    torch.manual_seed(0)
    model = fusionkit.build_model(spec()).eval()
    store = spec_store(model.spec, root)
    index = np.arange(80)
    for seed in range(3):
        point = random_rows(model, store, index, {"enc1": 0.25, "enc2": 0.4}, seed=seed)
        assert point["run_rate"] == {"enc1": 0.25, "enc2": 0.4}  # 32 rows of enc2, all among the 40 that have it
        assert point["mean_gflops"] == pytest.approx(0.25 * 1.0 + 0.4 * 3.0)


# --- 6, 12. a tampered manifest is refused in one line, and nothing is written ------------------------------------

TAMPERS = [
    ("labels", lambda m: m.update(labels=m["labels"][:-1]), "labels"),
    ("labels string", lambda m: m.update(labels="abcdef"), "labels: expected a list of str"),
    ("negative cost", lambda m: m["encoders"][1].update(cost_gflops=-1.0), r"encoders\[1\].cost_gflops"),
    ("boolean cost", lambda m: m["encoders"][1].update(cost_gflops=True), r"encoders\[1\].cost_gflops"),
    ("nan beta", lambda m: m["decoder"].update(beta=float("nan")), "decoder.beta: expected a finite number"),
    ("no neutral", lambda m: m.pop("neutral"), "neutral: missing"),
    ("other neutral", lambda m: m.update(neutral=0), "neutral: 0 is not the spec's neutral label"),
    ("on_demand dropped", lambda m: m.update(on_demand=[]), "on_demand: .* does not name the encoders"),
    ("unknown on_demand", lambda m: m.update(on_demand=["nope"]), "on_demand"),
    ("sha list", lambda m: m.update(sha256=[]), "sha256: expected a mapping"),
    ("latent", lambda m: m.update(latent_dim=-1), "latent_dim: expected a positive integer"),
    ("heads", lambda m: m.update(heads=["bogus"]), "heads: expected some of"),
    ("float16", lambda m: m["encoders"][0]["inputs"]["x"].update(dtype="float16"), r"inputs.x.dtype"),
    ("missing name", lambda m: m["encoders"][0].pop("name"), r"encoders\[0\].name: missing"),
    ("missing inputs", lambda m: m["encoders"][2].pop("inputs"), r"encoders\[2\].inputs: missing"),
    ("graph elsewhere", lambda m: m["encoders"][0].update(graph="/etc/hostname"), r"encoders\[0\].graph"),
    ("absolute sha key", lambda m: m["sha256"].update({"/etc/hostname": "0" * 64}), "a path inside the export"),
    ("scout", lambda m: m.update(scout="oracle"), "scout: expected gate or value"),
    ("slots", lambda m: m.update(slots=0), "slots: expected an integer from 1"),
    ("budget", lambda m: [b.update(threshold="x") for b in (m["budget"], m["budgets"][0])],
     r"budgets\[0\].threshold"),
    ("budget not the first", lambda m: m["budget"].update(threshold=0.0), "budget: is not the first of budgets"),
    ("kind", lambda m: m.update(kind="other"), "kind: expected 'fusion' or 'two_tower'"),
]


@pytest.mark.parametrize("name, tamper, message", TAMPERS, ids=[t[0] for t in TAMPERS])
def test_a_tampered_manifest_is_refused_naming_the_key(setup, tmp_path, name, tamper, message):
    _, _, _, exported = setup
    folder = tmp_path / "exp"
    shutil.copytree(exported, folder)
    manifest = json.loads((folder / "manifest.json").read_text())
    tamper(manifest)
    (folder / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(DeploymentError, match=message) as caught:
        load(folder)
    assert "\n" not in str(caught.value) and "manifest.json" in str(caught.value)


def test_a_deep_or_huge_manifest_is_refused_in_one_line(setup, tmp_path):
    _, _, _, exported = setup
    folder = tmp_path / "exp"
    shutil.copytree(exported, folder)
    (folder / "manifest.json").write_text("[" * 200_000 + "]" * 200_000)
    with pytest.raises(DeploymentError, match="not valid JSON"):
        load(folder)


def test_swapped_or_truncated_graphs_with_their_hash_updated_are_refused(setup, tmp_path):
    from fusionkit.files import sha256_file

    _, _, _, exported = setup
    folder = tmp_path / "exp"
    shutil.copytree(exported, folder)
    manifest = json.loads((folder / "manifest.json").read_text())
    shutil.copy(folder / "scout.onnx", folder / "fusion.onnx")  # swapped, hash updated
    manifest["sha256"]["fusion.onnx"] = sha256_file(folder / "fusion.onnx")
    (folder / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(DeploymentError, match=r"fusion.onnx: takes .* the graphs were swapped"):
        load(folder)
    (folder / "fusion.onnx").write_bytes((exported / "fusion.onnx").read_bytes()[:200])  # truncated
    manifest["sha256"]["fusion.onnx"] = sha256_file(folder / "fusion.onnx")
    (folder / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(DeploymentError, match="fusion.onnx: onnxruntime cannot load it"):
        load(folder)


def test_the_tamper_fuzzer(setup, tmp_path):
    """Random mutations of a real export's manifest and graphs: `fusionkit-runtime` answers each with exit 0 or
    with exit 2 and one line, and writes nothing on a refusal."""
    from fusionkit.files import sha256_file

    root, _, store, exported = setup
    rng = random.Random(0)
    original = json.loads((exported / "manifest.json").read_text())
    values = [None, -1, 0, 1.5, True, "x", "", [], {}, ["nope"], {"a": 1}, float("nan"), 10**12, "../x", "/etc/hostname"]
    refused = 0
    for trial in range(60):
        folder = tmp_path / f"t{trial}"
        shutil.copytree(exported, folder)
        manifest = copy.deepcopy(original)
        for _ in range(rng.randint(1, 3)):
            _mutate(manifest, rng, values)
        if rng.random() < 0.2:  # a graph truncated or swapped, its hash updated
            graphs = sorted(manifest["sha256"]) if isinstance(manifest.get("sha256"), dict) else []
            graphs = [g for g in graphs if (folder / str(g)).is_file() and ".." not in str(g)]
            if graphs:
                victim = folder / rng.choice(graphs)
                victim.write_bytes(victim.read_bytes()[: rng.randint(0, 400)])
                manifest["sha256"][str(victim.relative_to(folder))] = sha256_file(victim)
        (folder / "manifest.json").write_text(json.dumps(manifest))
        out = tmp_path / f"sub{trial}.json"
        with _captured() as err:
            code = runtime_main([str(folder), "--data", str(store.path), "--out", str(out), "--split", "all",
                                 "--budget", rng.choice(["mean", "40%", "0%", "100%"])])
        lines = [line for line in err.getvalue().splitlines() if line.strip()]
        assert code in (0, 2), (trial, manifest)
        if code == 2:
            refused += 1
            assert len(lines) == 1 and lines[0].startswith("fusionkit-runtime: error: "), (trial, lines)
            assert not out.exists() and not out.with_suffix(".zip").exists()
    assert refused >= 40


def _mutate(node, rng, values):
    """Replace, delete or retype one key somewhere in ``node``."""
    path = []
    while isinstance(node, (dict, list)) and node and (not path or rng.random() < 0.6):
        key = rng.choice(list(node)) if isinstance(node, dict) else rng.randrange(len(node))
        if not isinstance(node[key], (dict, list)) or not node[key] or rng.random() < 0.3:
            break
        path.append(key)
        node = node[key]
    if not isinstance(node, (dict, list)) or not node:
        return
    key = rng.choice(list(node)) if isinstance(node, dict) else rng.randrange(len(node))
    if isinstance(node, dict) and rng.random() < 0.25:
        del node[key]
    else:
        node[key] = rng.choice(values)


class _captured:
    """stderr captured in-process (the runtime's command prints its one line there)."""

    def __enter__(self):
        import io

        self.real, sys.stderr = sys.stderr, io.StringIO()
        return sys.stderr

    def __exit__(self, *exc):
        sys.stderr = self.real


# --- 7. reads stay inside the export folder ----------------------------------------------------------------------

def test_symbolic_links_in_an_export_are_refused(setup, tmp_path):
    _, _, _, exported = setup
    for victim in ("encoders/enc0.onnx", "encoders", "manifest.json"):
        folder = tmp_path / victim.replace("/", "_")
        shutil.copytree(exported, folder)
        target = tmp_path / f"outside-{victim.replace('/', '_')}"
        shutil.move(folder / victim, target)
        os.symlink(target, folder / victim)
        with pytest.raises(DeploymentError, match="a symbolic link"):
            load(folder)


def test_an_absolute_sha_key_is_refused_without_hashing_the_file(setup, tmp_path, monkeypatch):
    import fusionkit.export.manifest as manifest_module

    _, _, _, exported = setup
    folder = tmp_path / "exp"
    shutil.copytree(exported, folder)
    manifest = json.loads((folder / "manifest.json").read_text())
    hashed = []
    monkeypatch.setattr(manifest_module, "sha256_file", lambda path: hashed.append(path) or "0" * 64)
    for key in ("/etc/hostname", "encoders/../../x.onnx"):
        (folder / "manifest.json").write_text(json.dumps({**manifest, "sha256": {**manifest["sha256"], key: "0" * 64}}))
        with pytest.raises(DeploymentError, match="a path inside the export folder") as caught:
            load(folder)
        assert "match" not in str(caught.value)
    assert hashed == []


def test_external_data_must_be_covered_by_a_hash(setup, tmp_path):
    import onnx

    from fusionkit.files import sha256_file

    _, model, store, exported = setup
    folder = tmp_path / "exp"
    shutil.copytree(exported, folder)
    graph = folder / "encoders" / "enc0.onnx"
    proto = onnx.load(str(graph))
    onnx.save_model(proto, str(graph), save_as_external_data=True, all_tensors_to_one_file=True,
                    location="enc0.weights", size_threshold=0)
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["sha256"]["encoders/enc0.onnx"] = sha256_file(graph)
    (folder / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(DeploymentError, match="reads the file 'enc0.weights' beside it, which no SHA-256"):
        load(folder)
    manifest["sha256"]["encoders/enc0.weights"] = sha256_file(folder / "encoders" / "enc0.weights")
    (folder / "manifest.json").write_text(json.dumps(manifest))
    runtime = load(folder)
    rows = read_store(store.path, runtime.names).take(np.arange(8))
    reference = load(exported).predict(rows.inputs, "100%")
    assert np.allclose(runtime.predict(rows.inputs, "100%").probs, reference.probs, atol=1e-6)
    data = folder / "encoders" / "enc0.weights"
    data.write_bytes(data.read_bytes()[:-4] + b"\0\0\0\0")
    with pytest.raises(DeploymentError, match="enc0.weights: its SHA-256 does not match"):
        load(folder)


# --- 8. the runtime's store reader shares the store's checks -----------------------------------------------------

def test_the_runtime_store_reader_refuses_what_open_store_refuses(setup, tmp_path):
    from fusionkit.data.store import open_store

    root, _, _, _ = setup
    store = tmp_path / "store"
    shutil.copytree(root / "store", store)
    index = json.loads((store / "index.json").read_text())
    outside = tmp_path / "outside"
    outside.mkdir()
    shutil.copy(store / "enc0.safetensors", outside / "enc0.safetensors")
    index["encoders"]["enc0"]["file"] = "../outside/enc0.safetensors"
    (store / "index.json").write_text(json.dumps(index))
    for read in (lambda: open_store(store), lambda: read_store(store, ["enc0"])):
        with pytest.raises(DataError, match="'file' must be a plain file name inside the store"):
            read()
    index["encoders"]["enc0"]["file"] = "enc0.safetensors"
    index["version"] = 99
    (store / "index.json").write_text(json.dumps(index))
    for read in (lambda: open_store(store), lambda: read_store(store, ["enc0"])):
        with pytest.raises(DataError, match="not a fusionkit-store v1 index"):
            read()


# --- 9. images too long for their width ------------------------------------------------------------------------

def test_a_strip_image_is_refused_before_it_is_resized(tmp_path):
    from PIL import Image

    strip = tmp_path / "strip.png"
    Image.new("L", (400_000, 1)).save(strip)
    assert strip.stat().st_size < 2000
    reads = {"kind": "image", "mode": "RGB", "steps": [{"op": "resize", "size": 235, "interpolation": "bicubic"},
                                                       {"op": "center_crop", "size": [224, 224]}]}
    with pytest.raises(DataError, match=r"strip.png: 400000 x 1 pixels, an aspect ratio over 100:1"):
        read_image(strip, reads)
    wide = tmp_path / "wide.png"
    Image.new("L", (90, 1)).save(wide)
    with pytest.raises(DataError, match=r"would be resized to 90000 x 1000, over"):
        read_image(wide, {**reads, "steps": [{"op": "resize", "size": 1000, "interpolation": "bicubic"}]})
    model = fusionkit.build_model({"latent_dim": 8, "encoders": [  # the PyTorch path refuses it alike
        {"name": "img", "type": "timm", "model": "test_resnet", "in_chans": 1, "img_size": [32, 32]}]})
    with pytest.raises(DataError, match="an aspect ratio over 100:1"):
        model.encoders["img"].load("strip.png", tmp_path)


# --- 11, 13. zero rows, and inputs of the wrong shape or type ------------------------------------------------------

def test_zero_rows_give_empty_results_of_the_right_widths(setup):
    _, model, store, exported = setup
    runtime = load(exported)
    rows = read_store(store.path, runtime.names).take(np.arange(0))
    for budget in (None, "40%", "mean"):
        out = runtime.predict(rows.inputs, budget)
        assert out.probs.shape == (0, len(model.labels)) and out.ran.shape == (0, 3) and out.answers == []
    with torch.no_grad():
        inputs, lengths, mask = store.inputs_for(model, np.arange(0))
        assert tuple(model(inputs, lengths, mask).probs.shape) == out.probs.shape


def test_inputs_of_the_wrong_shape_or_type_are_named(setup):
    _, _, store, exported = setup
    runtime = load(exported)
    rows = read_store(store.path, runtime.names).take(np.arange(3))
    one = {**rows.inputs, "enc0": rows.inputs["enc0"][0]}
    with pytest.raises(DeploymentError, match=r"inputs\['enc0'\]: found one sample's \[6\] without its batch axis; "
                                              r"give \[B, 6\]"):
        runtime.predict(one)
    for bad in ("abc", 3.0, None):
        with pytest.raises(DeploymentError, match=r"inputs\['enc1'\]: expected an array with a row per sample"):
            runtime.predict({**rows.inputs, "enc1": bad})
    with pytest.raises(DeploymentError, match="inputs: expected a mapping"):
        runtime.predict([rows.inputs["enc0"]])
    with pytest.raises(DeploymentError, match=r"inputs\['enc2'\]: not an array of numbers"):
        runtime.predict({**rows.inputs, "enc2": [["a"] * 6] * 3})


def test_an_unwritable_output_is_one_line(setup, tmp_path, capsys):
    _, _, store, exported = setup
    assert runtime_main([str(exported), "--data", str(store.path), "--out", "/proc/x.json", "--split", "all"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("fusionkit-runtime: error: ")
