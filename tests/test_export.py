"""Export to split ONNX graphs and the runtime without torch (fusionkit.export.graphs, fusionkit.runtime)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from conftest import tiny_spec

import fusionkit
from fusionkit.cli import main
from fusionkit.data.open import spec_store
from fusionkit.errors import FusionkitError
from fusionkit.export.check import check_export
from fusionkit.export.graphs import ExportError, export_model
from fusionkit.inference import fit_mean_budget, predictions_for
from fusionkit.models.factory import load_model
from fusionkit.runtime import DeploymentError, load, read_store
from fusionkit.training.train import make_split, train


def sequence_spec(**train_options):
    """Every built-in pooling of stored features, two encoders on demand."""
    spec = tiny_spec(epochs=2, **train_options)
    spec["encoders"][0]["pooling"] = "mean"
    spec["encoders"][1].update(run="on_demand", cost_gflops=1.0, pooling="stats7")
    spec["encoders"][2].update(run="on_demand", cost_gflops=3.0, pooling="attention")
    return spec


@pytest.fixture(scope="module")
def sequences(tmp_path_factory):
    from fusionkit.components.datasets import build_dataset

    root = tmp_path_factory.mktemp("export")
    store = build_dataset("synthetic", {"samples": 200, "noise": [0.3, 1.0, 3.0], "dim": 8, "seed": 0,
                                        "sequence_length": 4}, root / "store")
    train(sequence_spec(), store, root / "run", fold=0, progress=False)
    model = load_model(root / "run" / "best", device="cpu")
    return root, model, spec_store(model.spec, store)


@pytest.fixture(scope="module")
def exported(sequences):
    root, model, store = sequences
    budget = fit_mean_budget(model, store, make_split(store, 0).val, "mean:40%")
    return export_model(model, root / "exported", budget=budget)


def test_an_export_runs_as_the_model_at_every_budget(sequences, exported):
    _, model, store = sequences
    report = check_export(model, exported, store)
    assert [line["budget"] for line in report] == [None, "0%", "25%", "50%", "100%", "mean", "per row"]
    assert all(line["max_prob_diff"] <= 1e-4 for line in report)
    assert report[1]["mean_gflops"] == 0.0 and 0.0 < report[4]["mean_gflops"] <= 4.0  # top_n 2 of 3: the
    # on-demand encoders that could enter a row's top two run at 100%
    manifest = json.loads((exported / "manifest.json").read_text())
    assert manifest["budget"]["threshold"] is not None and set(manifest["sha256"]) == {
        "fusion.onnx", "scout.onnx", "encoders/enc0.onnx", "encoders/enc1.onnx", "encoders/enc2.onnx"}


def test_each_on_demand_graph_runs_only_on_the_rows_that_keep_it(sequences, exported, monkeypatch):
    _, model, store = sequences
    runtime = load(exported)
    rows = read_store(store.path, runtime.names).take(np.arange(40))
    seen = []
    real = runtime.encode

    def spy(name, feed, chosen):
        seen.append((name, 40 if chosen is None else len(chosen)))
        return real(name, feed, chosen)

    monkeypatch.setattr(runtime, "encode", spy)
    out = runtime.predict(rows.inputs, "25%", lengths=rows.lengths)
    ran = out.ran.sum(axis=0)
    assert dict(seen) == {"enc0": 40, **{runtime.names[k]: int(ran[k]) for k in (1, 2) if ran[k]}}
    seen.clear()
    out = runtime.predict(rows.inputs, "0%", lengths=rows.lengths)  # no row keeps an on-demand encoder
    assert seen == [("enc0", 40)] and not out.ran[:, 1:].any() and (out.cost == 0).all()
    assert len(out.answers) == 40 and out.probs.shape == (40, len(model.labels))


def test_the_dynamo_exporter_round_trips_at_every_budget(sequences, tmp_path):
    """torch.export's exporter (`--exporter dynamo`) writes graphs that keep the dynamic batch and frame count and
    run as the model does: mean, stats7 and attention pooling, on-demand encoders, a stored mean budget."""
    _, model, store = sequences
    budget = fit_mean_budget(model, store, make_split(store, 0).val, "mean:40%")
    folder = export_model(model, tmp_path / "dynamo", budget=budget, exporter="dynamo")
    assert json.loads((folder / "manifest.json").read_text())["exporter"] == "dynamo"
    report = check_export(model, folder, store, np.arange(37))  # a batch size the example inputs did not have
    assert [line["budget"] for line in report] == [None, "0%", "25%", "50%", "100%", "mean", "per row"]
    with pytest.raises(ExportError, match="exporter 'jit': expected one of torchscript, dynamo"):
        export_model(model, tmp_path / "other", exporter="jit")
    assert not (tmp_path / "other").exists()


def test_a_batch_of_one_row_and_missing_encoders(sequences, exported):
    _, model, store = sequences
    runtime = load(exported)
    rows = read_store(store.path, runtime.names).take(np.arange(6))
    one = runtime.predict({n: v[:1] for n, v in rows.inputs.items()}, "100%",
                          lengths={n: v[:1] for n, v in rows.lengths.items()})
    assert one.probs.shape == (1, len(model.labels)) and len(one.answers) == 1
    mask = np.ones((6, 3), dtype=bool)
    mask[[0, 3], 2] = False
    mask[1, 1] = False
    out = runtime.predict(rows.inputs, "100%", lengths=rows.lengths, mask=mask)
    assert not out.ran[[0, 3], 2].any() and not out.ran[1, 1] and out.ran[2, 1:].all()
    with torch.no_grad():
        inputs, lengths, _ = store.inputs_for(model, np.arange(6))
        expected = model(inputs, lengths, torch.as_tensor(mask), budget="100%")
    assert np.allclose(expected.probs.numpy(), out.probs, atol=1e-5)


def test_nan_inputs_follow_the_models_nan_policy(sequences, exported):
    root, model, store = sequences
    runtime = load(exported)
    rows = read_store(store.path, runtime.names).take(np.arange(4))
    rows.inputs["enc2"][2, 0, 0] = np.nan
    with pytest.raises(DeploymentError, match=r"inputs\['enc2'\]: NaN .* rows \[2\]"):
        runtime.predict(rows.inputs, "100%", lengths=rows.lengths)
    runtime.manifest["nan_policy"] = "mask"  # as an export of a nan_policy: mask model says
    out = runtime.predict(rows.inputs, "100%", lengths=rows.lengths)
    assert not out.ran[2, 2] and np.isfinite(out.probs).all()


def test_tampered_graphs_and_manifests_are_refused(exported, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(exported, copy)
    graph = copy / "encoders" / "enc1.onnx"
    graph.write_bytes(graph.read_bytes()[:-1] + bytes([graph.read_bytes()[-1] ^ 1]))
    with pytest.raises(DeploymentError, match=r"enc1.onnx: its SHA-256 does not match"):
        load(copy)
    shutil.copy(exported / "encoders" / "enc1.onnx", graph)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["sha256"]["../outside.onnx"] = "0" * 64
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(DeploymentError, match=r"sha256\['../outside.onnx'\]: .* no '..'"):
        load(copy)
    del manifest["sha256"]["../outside.onnx"], manifest["sha256"]["fusion.onnx"]
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(DeploymentError, match="sha256: names no SHA-256 for fusion.onnx"):
        load(copy)
    (copy / "manifest.json").write_text('{"format": "fusionkit-export"}')
    with pytest.raises(DeploymentError, match="kind: missing"):
        load(copy)


def test_an_export_folder_holding_a_users_files_is_refused_untouched(sequences, tmp_path):
    _, model, _ = sequences
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("mine")
    with pytest.raises(FusionkitError, match="not a model export made by fusionkit"):
        export_model(model, tmp_path / "mine")
    assert [p.name for p in (tmp_path / "mine").iterdir()] == ["notes.txt"]
    export_model(model, tmp_path / "ours")
    with pytest.raises(ExportError, match="--overwrite"):
        export_model(model, tmp_path / "ours")
    export_model(model, tmp_path / "ours", overwrite=True)


def test_a_two_tower_model_exports_each_tower(sequences, tmp_path, capsys):
    _, _, store = sequences
    spec = {"latent_dim": 16, "encoders": [{"name": "enc0", "type": "features", "dim": 8, "pooling": "mean"},
                                           {"name": "enc1", "type": "features", "dim": 8, "pooling": "stats7"},
                                           {"name": "enc2", "type": "features", "dim": 8, "pooling": "attention"}],
            "towers": {"a": {"encoders": ["enc0", "enc1"], "embed_dim": 8}, "b": {"encoders": ["enc2"]}}}
    model = fusionkit.build_model(spec).eval()
    folder = export_model(model, tmp_path / "towers")
    report = check_export(model, folder, spec_store(model.spec, store.path))
    assert [line["tower"] for line in report] == ["a", "b"] and all(line["max_embedding_diff"] <= 1e-4 for line in report)
    runtime = load(folder)
    rows = read_store(store.path, ["enc2"]).take(np.arange(4))
    only_b = runtime.embed(rows.inputs, ["b"], lengths=rows.lengths)
    assert list(only_b) == ["b"] and np.allclose(np.linalg.norm(only_b["b"], axis=1), 1.0, atol=1e-5)
    with pytest.raises(DeploymentError, match="embeds and predicts no answers"):
        runtime.predict(rows.inputs)
    with pytest.raises(ExportError, match="stores a mean budget|needs on-demand"):
        export_model(model, tmp_path / "again", budget=fusionkit.conditional.budget.Budget(share=0.4, mean=True,
                                                                                          threshold=0.1))


def test_what_does_not_export_is_refused_naming_it(tmp_path):
    from fusionkit.interfaces import Encoder

    with pytest.raises(ExportError, match="not a fusionkit model"):
        export_model(torch.nn.Linear(2, 2), tmp_path / "a")
    model = fusionkit.build_model(tiny_spec())
    model.encoders["enc1"].export_inputs = lambda: None
    with pytest.raises(ExportError, match=r"encoder 'enc1' \(FeaturesEncoder\) declares no export_inputs"):
        export_model(model, tmp_path / "b")
    assert Encoder.export_inputs(model.encoders["enc1"]) is None  # the default: not exportable


def test_a_third_party_encoder_exports_through_its_plugin(tmp_path):
    """The installed example plugin's encoder (what `fusionkit plugin new` writes) declares export_inputs, so a model
    with it on demand exports and runs as the model does."""
    from fusionkit.components.datasets import build_dataset

    store = build_dataset("synthetic", {"samples": 60, "noise": [0.3, 1.0, 3.0], "dim": 8, "seed": 0}, tmp_path / "s")
    spec = tiny_spec()
    spec["encoders"][1] = {"name": "enc1", "type": "example_mlp", "dim": 8, "run": "on_demand", "cost_gflops": 1.0}
    spec["gate"] = {"type": "attention", "top_n": 2}
    model = fusionkit.build_model(spec).eval()
    report = check_export(model, export_model(model, tmp_path / "exp"), spec_store(model.spec, store))
    assert len(report) == 6 and all(line["max_prob_diff"] <= 1e-4 for line in report)


def test_the_runtime_imports_no_torch(exported, sequences):
    _, _, store = sequences
    code = textwrap.dedent(f"""
        import sys
        sys.modules["torch"] = None  # any import of torch fails
        import numpy as np
        import fusionkit.runtime as rt
        model = rt.load({str(exported)!r})
        rows = rt.read_store({str(store.path)!r}, model.names).take(np.arange(5))
        out = model.predict(rows.inputs, "mean", lengths=rows.lengths)
        print(len(out.answers), [m for m in sys.modules if m.startswith("torch")])
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split() == ["5", "['torch']"]  # only the blocker itself


def test_the_runtime_extra_installs_no_torch():
    """The installed package's requirements: `fusionkit[runtime]` brings onnxruntime and Pillow and no torch (an
    extra cannot remove a requirement, so torch is an extra too); `fusionkit[torch]` and `[export]` bring it."""
    from importlib import metadata

    from packaging.requirements import Requirement

    requirements = [Requirement(line) for line in metadata.requires("fusionkit")]

    def names(extra):
        return {r.name.lower() for r in requirements if r.marker is None or r.marker.evaluate({"extra": extra})}

    assert "torch" not in names("runtime") and {"onnxruntime", "pillow", "numpy", "safetensors"} <= names("runtime")
    assert "torch" in names("torch") and {"torch", "onnx"} <= names("export")


def test_a_command_that_needs_torch_says_how_to_install_it():
    code = textwrap.dedent("""
        import sys
        sys.modules["torch"] = None  # torch not installed
        import fusionkit
        from fusionkit.cli import main
        print(main(["train", "spec.yaml", "--data", "store", "--out", "run"]))
        try:
            fusionkit.build_model
        except ModuleNotFoundError as exc:
            print(exc)
        for module in ("fusionkit.export.graphs", "fusionkit.models.fusion", "fusionkit.training.train"):
            try:
                __import__(module)
            except ModuleNotFoundError as exc:
                print(exc)
        from fusionkit.cli import build_parser
        print(build_parser().format_help().replace("\\n", " "))
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.stdout.splitlines()[0] == "2", proc.stderr[-2000:]
    assert "fusionkit: error: this needs PyTorch, which is not installed here: pip install 'fusionkit[torch]'" in \
        proc.stderr
    assert proc.stdout.splitlines()[1].startswith("fusionkit.build_model: this needs PyTorch")
    for line, package in zip(proc.stdout.splitlines()[2:5], ("export", "models", "training")):
        assert line.startswith(f"fusionkit.{package}: this needs PyTorch, which is not installed here: pip install")
    assert "PyTorch is not installed here, and every command above but serve needs it" in " ".join(proc.stdout.split())


def test_the_command_line_exports_checks_and_predicts_without_torch(sequences, tmp_path, capsys):
    root, model, store = sequences
    assert main(["export", str(root / "run"), "--out", str(tmp_path / "exp"), "--budget", "mean:40%", "--data",
                 str(store.path), "--check", str(store.path)]) == 0
    out = capsys.readouterr().out
    assert "threshold" in out and "the export matches the model" in out
    proc = subprocess.run([sys.executable, "-m", "fusionkit.runtime", str(tmp_path / "exp"), "--data", str(store.path),
                           "--out", str(tmp_path / "sub.json"), "--split", "all", "--budget", "mean"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    got = json.loads((tmp_path / "sub.json").read_text())["predictions"]
    budget = fit_mean_budget(model, store, make_split(store, 0).val, "mean:40%")
    expected = predictions_for(model, store, np.arange(len(store)), budget=budget)
    assert got == expected
    proc = subprocess.run([sys.executable, "-m", "fusionkit.runtime", str(tmp_path / "exp"), "--data", str(store.path),
                           "--out", str(tmp_path / "sub.json"), "--budget", "mean:10%"], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2 and "stores the mean budget(s) mean:40%; give one of them" in proc.stderr
    assert main(["export", str(root / "run"), "--out", str(tmp_path / "exp2"), "--budget", "40%"]) == 2
    assert "a cap needs nothing stored" in capsys.readouterr().err


@pytest.mark.parametrize("gate, fusion, combiner, decoder", [
    ("mlp", "weighted_sum", "mean", "blemore"),
    ("static", "rank_concat", "salience_only", "blemore"),
    ("uniform", "rank_attention", "product", "presence_salience"),
])
def test_every_built_in_part_round_trips(sequences, tmp_path, gate, fusion, combiner, decoder):
    """Untrained models of other built-in gates, fusions, combiners and decoders, with a sequence_cnn encoder,
    on demand where the gate scouts."""
    _, _, store = sequences
    spec = tiny_spec()
    spec["encoders"] = [{"name": "enc0", "type": "features", "dim": 8, "pooling": "stats7"},
                        {"name": "enc1", "type": "sequence_cnn", "dim": 8, "channels": 8, "layers": 2},
                        {"name": "enc2", "type": "features", "dim": 8, "pooling": "mean"}]
    if gate == "static":
        spec["encoders"][1].update(run="on_demand", cost_gflops=1.0)
    spec["gate"] = {"type": gate, "top_n": 2}
    spec["fusion"], spec["combiner"], spec["decoder"] = {"type": fusion}, {"type": combiner}, {"type": decoder}
    model = fusionkit.build_model(spec).eval()
    report = check_export(model, export_model(model, tmp_path / "exp"), spec_store(model.spec, store.path))
    assert all(line["max_prob_diff"] <= 1e-4 for line in report)
