"""Devices and precision on a CPU-only machine: one device setting for every command, bf16 and fp16 precision, resume across
devices, and a clear error for a GPU that is not there. tests/gpu/ checks the GPU itself (make test-gpu)."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import tiny_spec

from fusionkit.errors import FusionkitError, FusionkitWarning
from fusionkit.training.train import Trainer, make_split, train


def spec_with(**train_options):
    return tiny_spec(epochs=3, **train_options)


def test_an_explicit_cpu_device_runs_end_to_end_and_is_recorded(synthetic_store, tmp_path, capsys):
    from fusionkit.cli import main

    metrics = train(spec_with(device="cpu"), synthetic_store, tmp_path / "run", fold=0, progress=False)
    run = json.loads((tmp_path / "run" / "run.json").read_text())
    assert run["device"] == "cpu" and run["precision"] == "32" and run["device_name"]
    assert metrics["test"]["n"] > 0
    for command in (["evaluate", str(tmp_path / "run"), "--data", str(synthetic_store), "--device", "cpu"],
                    ["predict", str(tmp_path / "run"), "--data", str(synthetic_store), "--device", "cpu",
                     "--split", "test", "--out", str(tmp_path / "sub.json")]):
        assert main(command) == 0, capsys.readouterr().err
    assert json.loads((tmp_path / "run" / "evaluation_test.json").read_text())["score"] == pytest.approx(
        metrics["test"]["score"])


def test_asking_for_cuda_without_one_names_the_option(synthetic_store, tmp_path, capsys, monkeypatch):
    from fusionkit.cli import main

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # a machine without CUDA, wherever this runs
    with pytest.raises(FusionkitError, match=r"train.device 'cuda': this machine has no CUDA device .*set train.device "
                                             r"to cpu or auto"):
        train(spec_with(device="cuda"), synthetic_store, tmp_path / "run", fold=0, progress=False)
    assert not (tmp_path / "run").exists()
    (tmp_path / "spec.json").write_text(json.dumps(spec_with()))
    assert main(["train", str(tmp_path / "spec.json"), "--data", str(synthetic_store), "--out", str(tmp_path / "r2"),
                 "--device", "cuda:1", "--quiet"]) == 2
    assert "train.device 'cuda:1': this machine has no CUDA device" in capsys.readouterr().err


@pytest.mark.parametrize("precision", ["bf16", "16"])
def test_mixed_precision_trains_and_resumes_to_the_uninterrupted_run(precision, synthetic_store, tmp_path):
    spec = spec_with(precision=precision, device="cpu")
    from fusionkit.spec import load_spec

    spec = load_spec(spec)
    split = make_split(_store(synthetic_store, spec), 0)
    whole = Trainer(spec, _store(synthetic_store, spec), tmp_path / "whole", split, progress=False).fit()
    Trainer(spec, _store(synthetic_store, spec), tmp_path / "part", split, progress=False).fit(stop_after_epochs=2)
    last = json.loads((tmp_path / "part" / "last" / "metadata.json").read_text())["extra"]
    if precision == "16":  # the scaler's state is checkpointed
        assert last["scaler"]["scale"] > 0 and "growth_interval" in last["scaler"]
    else:
        assert last["scaler"] == {}
    resumed = Trainer(spec, _store(synthetic_store, spec), tmp_path / "part", split, progress=False).fit(resume=True)
    assert resumed == whole
    assert json.loads((tmp_path / "whole" / "run.json").read_text())["precision"] == precision
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in map(json.loads, (tmp_path / "whole" / "log.jsonl")
                                                                       .read_text().splitlines()))


def test_the_fp16_scaler_state_round_trips_through_last(synthetic_store, tmp_path):
    from fusionkit.spec import load_spec
    from fusionkit.training.precision import Precision

    spec = load_spec(spec_with(precision="16", device="cpu"))
    store = _store(synthetic_store, spec)
    trainer = Trainer(spec, store, tmp_path / "run", make_split(store, 0), progress=False)
    trainer.fit(stop_after_epochs=1)
    saved = json.loads((tmp_path / "run" / "last" / "metadata.json").read_text())["extra"]["scaler"]
    again = Trainer(spec, store, tmp_path / "run", make_split(store, 0), progress=False)
    setup = again._prepare()
    setup.forward = setup.model
    again._restore(setup)
    assert again.precision.state_dict() == saved
    fresh = Precision("16", torch.device("cpu")).state_dict()
    assert saved["_growth_tracker"] != fresh["_growth_tracker"] or saved["scale"] != fresh["scale"]


def test_a_run_moved_to_another_device_resumes_with_a_warning(synthetic_store, tmp_path):
    from fusionkit.spec import load_spec

    spec = load_spec(spec_with(device="cpu"))
    store = _store(synthetic_store, spec)
    Trainer(spec, store, tmp_path / "run", make_split(store, 0), progress=False).fit(stop_after_epochs=1)
    record = json.loads((tmp_path / "run" / "run.json").read_text())
    record["device"] = "cuda:0"  # as a GPU machine would have written it
    (tmp_path / "run" / "run.json").write_text(json.dumps(record))
    with pytest.warns(FusionkitWarning, match=r"started on cuda:0, it resumes on cpu; .*no longer bit-identical"):
        metrics = Trainer(spec, store, tmp_path / "run", make_split(store, 0), progress=False).fit(resume=True)
    assert metrics["test"]["n"] > 0
    assert json.loads((tmp_path / "run" / "run.json").read_text())["device"] == "cpu"


def test_load_model_takes_a_device(tmp_path):
    import fusionkit

    model = fusionkit.build_model({"latent_dim": 8, "encoders": [{"name": "a", "type": "features", "dim": 3}]})
    model.save_pretrained(tmp_path / "ckpt")
    loaded = fusionkit.load_model(tmp_path / "ckpt", device="cpu")
    assert next(loaded.parameters()).device.type == "cpu"
    with pytest.raises(FusionkitError, match="--device 'tpu'"):
        from fusionkit.hardware.devices import resolve_device

        resolve_device("tpu")


def test_benchmark_gpu_script_runs_in_its_short_mode_on_the_cpu(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, str(root / "benchmarks" / "gpu.py"), "--short", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=600, cwd=root)
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads((tmp_path / "gpu.json").read_text())
    assert data["device"] == "cpu" and data["short"] is True
    step = data["training_step"]
    assert {row["precision"] for row in step} == {"32", "bf16"} and all(row["samples_per_s"] > 0 for row in step)
    assert all(0 < row["fraction_of_bare_gemm"] for row in step)
    assert "device: cpu" in (tmp_path / "gpu.md").read_text()


def _store(path, spec):
    from fusionkit.data.open import spec_store

    return spec_store(spec, path)
