"""Bad input gets a clear error naming the path, file or key: specs, YAML, stores, checkpoints."""

from __future__ import annotations

import json
import time
import tracemalloc

import numpy as np
import pytest
import torch
from conftest import tiny_spec
from safetensors.torch import load_file, save_file

from fusionkit.data.store import Sample, open_store, write_store
from fusionkit.errors import CheckpointError, DataError, FusionkitError, SpecError
from fusionkit.models.factory import build_model, load_model
from fusionkit.spec import load_spec


def problems(spec) -> list[str]:
    with pytest.raises(SpecError) as err:
        load_spec(spec)
    return err.value.problems


# --- 6. specs -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("path, value, message", [
    ("train.lr", float("nan"), "must be a finite number"),
    ("gate.temperature", float("nan"), "must be a finite number"),
    ("train.lr", float("inf"), "must be a finite number"),
    ("gate.noise", float("nan"), "must be a finite number"),
    ("projector.dropout", float("nan"), "must lie in [0, 1]"),
    ("train.seed", 10**20, "must lie in [0, "),
    ("train.seed", -1, "must lie in [0, "),
    ("train.epochs", 10**9, "must be at most 1,048,576"),
])
def test_nan_and_unbounded_options_are_refused(path, value, message):
    spec = tiny_spec()
    block, key = path.split(".")
    spec.setdefault(block, {})[key] = value
    (problem,) = problems(spec)
    assert problem.startswith(f"{path}: ") and message in problem


def test_latent_dim_labels_and_encoder_names_are_checked():
    assert problems({**tiny_spec(), "latent_dim": 10**9})[0].startswith("latent_dim: expected an int in [1, 65536]")
    assert problems({**tiny_spec(), "labels": 5})[0].startswith("labels: expected a list of at least two")
    assert problems({**tiny_spec(), "labels": ["only"], "neutral": None})[0].startswith("labels:")
    for name, why in (("a.b", "a letter then"), ("keys", "reserved"), ("training", "reserved"), ("", "a letter then")):
        spec = tiny_spec()
        spec["encoders"][1]["name"] = name
        (problem,) = problems(spec)
        assert problem.startswith("encoders[1].name: ") and why in problem


def test_error_text_is_bounded():
    spec = tiny_spec()
    spec["gate"] = {"type": "attention", **{f"bogus{i}": "x" * 10_000 for i in range(500)}}
    with pytest.raises(SpecError) as err:
        load_spec(spec)
    assert len(str(err.value)) < 40_000 and "more problem(s)" in str(err.value)


def test_model_inputs_give_clear_errors():
    model = build_model({**tiny_spec(), "encoders": [{"name": "s", "type": "features", "dim": 3, "pooling": "mean"},
                                                      {"name": "v", "type": "features", "dim": 2}]})
    x = {"s": torch.randn(2, 4, 3), "v": torch.randn(2, 2)}
    with pytest.raises(DataError, match="lengths must be a dict keyed by encoder name"):
        model(x, torch.tensor([4, 2]))
    with pytest.raises(DataError, match=r"mask must be a \[B, 2\] tensor"):
        model(x, None, torch.ones(2, 3, dtype=torch.bool))
    assert model(x, {"s": torch.tensor([4, 2])}).probs.shape == (2, 6)


# --- 7. YAML ------------------------------------------------------------------------------------------------

BOMB = "a: &a [lol,lol,lol,lol,lol,lol,lol,lol,lol]\n" + "".join(
    f"{c}: &{c} [{', '.join(['*' + p] * 9)}]\n" for p, c in zip("abcdefgh", "bcdefghi"))


def test_an_alias_bomb_is_refused_quickly_in_little_memory(tmp_path):
    path = tmp_path / "bomb.yaml"
    path.write_text(BOMB)
    assert len(BOMB) < 400
    tracemalloc.start()
    started = time.perf_counter()
    with pytest.raises(SpecError) as err:
        load_spec(path)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert "alias" in str(err.value) and len(str(err.value)) < 2_000
    assert peak < 50 * 2**20 and time.perf_counter() - started < 5


def test_an_alias_bomb_inside_a_checkpoint_is_refused(tmp_path):
    build_model(tiny_spec()).save_pretrained(str(tmp_path / "ckpt"))
    (tmp_path / "ckpt" / "spec.yaml").write_text(BOMB)
    with pytest.raises(CheckpointError, match="alias"):
        load_model(tmp_path / "ckpt")


def test_duplicate_keys_are_errors_and_on_stays_a_key(tmp_path):
    path = tmp_path / "spec.yaml"
    path.write_text("latent_dim: 16\nlatent_dim: 32\nencoders: [{name: a, type: features, dim: 3}]\n")
    with pytest.raises(SpecError, match="duplicate key 'latent_dim'"):
        load_spec(path)
    path.write_text("encoders: [{name: a, type: features, dim: 3}]\nadaptation:\n"
                    "  - {type: mmd, weight: 0.3, on: encoders}\n  - {type: coral, on: fused}\n")
    spec = load_spec(path)
    assert [c.config.on for c in spec.adaptation] == ["encoders", "fused"]
    path.write_text("encoders: [{name: a, type: features, dim: 3}]\ndata: {standardize: yes}\n")
    (problem,) = problems(path)
    assert problem.startswith("data.standardize: expected bool")


def test_non_utf8_spec_is_a_spec_error(tmp_path):
    path = tmp_path / "spec.yaml"
    path.write_bytes(b"latent_dim: \xff\xfe\n")
    with pytest.raises(SpecError, match="not UTF-8"):
        load_spec(path)


# --- 8. stores -------------------------------------------------------------------------------------------

LABELS = ["ang", "sad", "neu"]


def make_store(tmp_path, name="s", seq=False):
    samples = [Sample(id=f"s{i}", labels=[{"emotion": LABELS[i % 3], "salience": 100.0}], group=f"g{i % 2}",
                      fold=i % 2) for i in range(4)]
    feats = [np.ones((2, 3))] * 4 if seq else np.zeros((4, 3))
    return write_store(tmp_path / name, LABELS, samples, {"v": feats})


def edit_index(root, change):
    index = json.loads((root / "index.json").read_text())
    change(index)
    (root / "index.json").write_text(json.dumps(index))


@pytest.mark.parametrize("change, message", [
    (lambda ix: ix.pop("labels"), "'labels' must be a list"),
    (lambda ix: ix.pop("samples"), "'samples' must be a list"),
    (lambda ix: ix["encoders"]["v"].pop("file"), "'file' must be a plain file name"),
    (lambda ix: ix["encoders"]["v"].update(file="../../other.safetensors"), "'file' must be a plain file name"),
    (lambda ix: ix["encoders"]["v"].update(file="/etc/passwd"), "'file' must be a plain file name"),
    (lambda ix: ix["samples"][0].update(fold="1"), "'fold' must be an integer"),
    (lambda ix: ix["samples"][0].update(fold=True), "'fold' must be an integer"),
    (lambda ix: ix["samples"][0].update(labels=[{"emotion": "ang", "salience": 60}]), "must sum to 100"),
    (lambda ix: ix["samples"][0].update(labels=[{"emotion": "ang", "salience": float("nan")}]), "finite saliences"),
    (lambda ix: ix["samples"][0].update(labels=[{"emotion": "joy", "salience": 100}]), "not one of"),
    (lambda ix: ix["samples"][1].update(fold=0), "group 'g1' lies in folds"),
    (lambda ix: ix.update(labels="ang"), "'labels' must be a list"),
])
def test_malformed_indexes_are_reported(tmp_path, change, message):
    root = make_store(tmp_path)
    edit_index(root, change)
    with pytest.raises(DataError, match=message.replace("(", r"\(").replace("[", r"\[")):
        open_store(root)


def test_feature_files_are_checked(tmp_path):
    root = make_store(tmp_path, seq=True)
    tensors = load_file(str(root / "v.safetensors"))
    meta = {"ids": json.dumps([f"s{i}" for i in range(4)])}
    save_file(tensors, str(root / "v.safetensors"))  # no ids metadata
    with pytest.raises(DataError, match="no sample ids"):
        open_store(root)
    bad = dict(tensors, offsets=torch.tensor([0, 2, 1, 6, 8]))
    save_file(bad, str(root / "v.safetensors"), metadata=meta)
    with pytest.raises(DataError, match="'offsets' must start at 0, never decrease"):
        open_store(root)
    save_file(dict(tensors, offsets=torch.tensor([0, 2, 4, 6, 99])), str(root / "v.safetensors"), metadata=meta)
    with pytest.raises(DataError, match="end at the 8 frames"):
        open_store(root)
    save_file({"features": torch.zeros(4)}, str(root / "v.safetensors"), metadata=meta)
    with pytest.raises(DataError, match="must be 2-D"):
        open_store(root)


def test_write_store_stays_inside_the_store(tmp_path):
    with pytest.raises(DataError, match="a letter then"):
        write_store(tmp_path / "s", LABELS, [Sample(id="a")], {"../../escaped": np.zeros((1, 2))})
    assert not (tmp_path.parent / "escaped.safetensors").exists() and not (tmp_path / "s").exists()
    with pytest.raises(DataError, match="must sum to 100"):
        write_store(tmp_path / "s", LABELS, [Sample(id="a", labels=[{"emotion": "ang", "salience": 30.0}])],
                    {"v": np.zeros((1, 2))})


# --- 9. checkpoints ----------------------------------------------------------------------------------------


@pytest.fixture
def ckpt(tmp_path):
    build_model(tiny_spec()).save_pretrained(str(tmp_path / "ckpt"))
    return tmp_path / "ckpt"


def test_malformed_metadata_and_non_utf8_files(ckpt):
    meta = json.loads((ckpt / "metadata.json").read_text())
    (ckpt / "metadata.json").write_text(json.dumps({**meta, "components": [{"path": 3}]}))
    with pytest.raises(CheckpointError, match="'components' must be a list of objects"):
        load_model(ckpt)
    (ckpt / "metadata.json").write_text(json.dumps([1, 2]))
    with pytest.raises(CheckpointError, match="expected a JSON object"):
        load_model(ckpt)
    (ckpt / "metadata.json").write_bytes(b"\xff\xfe{}")
    with pytest.raises(CheckpointError, match="not UTF-8"):
        load_model(ckpt)


def test_non_finite_weights_are_refused(ckpt):
    import hashlib

    weights = load_file(str(ckpt / "model.safetensors"))
    key = next(k for k, v in weights.items() if v.is_floating_point() and v.numel() > 1)
    weights[key][0] = float("nan")
    save_file(weights, str(ckpt / "model.safetensors"), metadata={"format": "fusionkit"})
    meta = json.loads((ckpt / "metadata.json").read_text())
    meta["weights_sha256"] = hashlib.sha256((ckpt / "model.safetensors").read_bytes()).hexdigest()
    (ckpt / "metadata.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match=f"NaN or inf in \\['{key}'"):
        load_model(ckpt)


def test_several_missing_plugins_are_named_at_once(ckpt):
    meta = json.loads((ckpt / "metadata.json").read_text())
    meta["components"][0].update(type="vision_x", distribution="fk-vision", version="1.0")
    meta["components"][-1].update(type="fancy", distribution="fk-fancy", version="2.0")
    (ckpt / "metadata.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError) as err:
        load_model(ckpt)
    message = str(err.value)
    assert "needs 2 component(s)" in message and "fk-vision" in message and "fk-fancy" in message
    assert "Install fk-fancy, fk-vision" in message


def test_evaluation_refuses_nan_outputs(tmp_path, synthetic_store):
    from fusionkit.data.open import spec_store
    from fusionkit.inference import collect_outputs
    from fusionkit.training.train import make_split

    model = build_model(tiny_spec())
    with torch.no_grad():
        model.heads["salience"].net[-1].bias.fill_(float("nan"))
    store = spec_store(model.spec, synthetic_store)
    with pytest.raises(FusionkitError, match="NaN or inf for .* sample"):
        collect_outputs(model, store, make_split(store, 0).test)


def test_error_message_slips_are_fixed():
    from fusionkit.errors import UnknownComponentError
    from fusionkit.plugins import get_registry

    with pytest.raises(UnknownComponentError) as err:
        get_registry().get("adaptation_loss", "mdd")
    assert "Known adaptation losses: coral, dann, entropy, mmd" in str(err.value) and "losss" not in str(err.value)
    (problem,) = problems({**tiny_spec(), "projector": {"zzz": 1}})
    assert problem.startswith("projector.zzz: unknown option. Options of ProjectorConfig: hidden")
    (problem,) = problems({**tiny_spec(), "projector": {"hiden": 1}})
    assert "did you mean 'hidden'? Options of ProjectorConfig" in problem


def test_dataset_options_are_discoverable(capsys):
    from fusionkit.cli import main

    assert main(["data", "options", "synthetic"]) == 0
    out = capsys.readouterr().out
    assert "samples (int, default 600): Number of samples" in out and "seed (int, default 0)" in out
    with pytest.raises(SystemExit):
        main(["data", "build", "--help"])
    assert "fusionkit data options" in capsys.readouterr().out


def test_a_dataset_option_without_a_value_is_a_fusionkit_error(tmp_path, capsys):
    """`--set samples` (no `=`) ends like every other bad input: exit 2 and one line, nothing written."""
    from fusionkit.cli import EXIT_ERROR, main

    assert main(["data", "build", "synthetic", "--out", str(tmp_path / "store"), "--set", "samples"]) == EXIT_ERROR
    err = capsys.readouterr().err
    assert err == "fusionkit: error: --set expects key=value, got 'samples'\n" and not (tmp_path / "store").exists()


def test_a_spec_edited_to_other_sizes_than_the_weights_is_a_checkpoint_error(ckpt):
    import yaml

    spec = yaml.safe_load((ckpt / "spec.yaml").read_text())
    spec["encoders"][0]["dim"] = 1
    (ckpt / "spec.yaml").write_text(yaml.safe_dump(spec))
    with pytest.raises(CheckpointError, match="weights do not fit the stored spec .*size mismatch"):
        load_model(ckpt)
