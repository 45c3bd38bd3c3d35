"""Checkpoints: identical outputs after load, clear errors, atomic saves, no pickle."""

from __future__ import annotations

import json

import pytest
import torch

import fusionkit
from fusionkit import build_model, load_model, plugins
from fusionkit.checkpoint import METADATA_FILE, WEIGHTS_FILE
from fusionkit.errors import CheckpointError

SPEC = {
    "latent_dim": 16,
    "encoders": [
        {"name": "a", "type": "features", "dim": 5},
        {"name": "b", "type": "features", "dim": 3, "pooling": "stats7"},
        {"name": "m", "type": "example_mlp", "dim": 4, "out_dim": 8},
    ],
    "gate": {"type": "attention", "top_n": 2},
    "fusion": {"type": "rank_attention"},
    "decoder": {"type": "presence_salience", "threshold": 0.3},
}


def batch():
    g = torch.Generator().manual_seed(3)
    return {"a": torch.randn(4, 5, generator=g), "b": torch.randn(4, 6, 3, generator=g), "m": torch.randn(4, 4, generator=g)}


@pytest.fixture
def saved(tmp_path):
    torch.manual_seed(0)
    model = build_model(SPEC).eval()
    path = tmp_path / "ckpt"
    model.save_pretrained(path)
    return model, path


def test_save_load_gives_identical_outputs(saved):
    model, path = saved
    loaded = load_model(path)
    assert not loaded.training
    a, b = model(batch()), loaded(batch())
    for field in ("probs", "presence", "salience", "scores", "weights", "kept", "fused"):
        assert torch.equal(getattr(a, field), getattr(b, field)), field
    assert loaded.spec == model.spec
    assert loaded.decoder.config.threshold == 0.3
    assert loaded.predict(batch()) == model.predict(batch())


def test_metadata_records_versions_and_providers(saved):
    _, path = saved
    meta = json.loads((path / METADATA_FILE).read_text())
    assert meta["fusionkit_version"] == fusionkit.__version__
    assert meta["plugins"]["fusionkit-example-encoder"] == "0.1.0"
    comp = {c["path"]: c for c in meta["components"]}
    assert comp["encoders[2]"]["distribution"] == "fusionkit-example-encoder"


def test_truncated_weights_give_a_clear_error(saved):
    _, path = saved
    weights = path / WEIGHTS_FILE
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(CheckpointError, match="truncated or was modified"):
        load_model(path)


def test_tampered_weights_give_a_clear_error(saved):
    _, path = saved
    weights = path / WEIGHTS_FILE
    data = bytearray(weights.read_bytes())
    data[-3] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="SHA-256 does not match"):
        load_model(path)


def test_unreadable_safetensors_is_reported_even_with_matching_hash(saved):
    _, path = saved
    weights = path / WEIGHTS_FILE
    weights.write_bytes(b"not a safetensors file at all")
    meta = json.loads((path / METADATA_FILE).read_text())
    import hashlib

    meta["weights_sha256"] = hashlib.sha256(weights.read_bytes()).hexdigest()
    (path / METADATA_FILE).write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        load_model(path)


def test_missing_plugin_names_the_component_and_its_distribution(saved, monkeypatch):
    _, path = saved
    monkeypatch.setenv("FUSIONKIT_DISABLE_PLUGINS", "fusionkit-example-encoder")
    plugins.reset()
    with pytest.raises(CheckpointError) as err:
        load_model(path)
    message = str(err.value)
    assert "encoders[2]" in message and "'example_mlp'" in message and "fusionkit-example-encoder 0.1.0" in message


def test_missing_directory_and_files(tmp_path, saved):
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        load_model(tmp_path / "nope")
    _, path = saved
    (path / METADATA_FILE).unlink()
    with pytest.raises(CheckpointError, match="metadata.json: missing"):
        load_model(path)


def test_a_crash_mid_save_leaves_the_previous_checkpoint_intact(saved, monkeypatch):
    model, path = saved
    before = {p.name: p.read_bytes() for p in path.iterdir()}
    torch.nn.init.zeros_(model.identity)

    import safetensors.torch

    def crash(tensors, filename, metadata=None):
        with open(filename, "wb") as fh:
            fh.write(b"half a file")
        raise KeyboardInterrupt("killed mid-save")

    monkeypatch.setattr(safetensors.torch, "save_file", crash)
    with pytest.raises(KeyboardInterrupt):
        model.save_pretrained(path)
    assert {p.name: p.read_bytes() for p in path.iterdir()} == before
    assert [p.name for p in path.parent.iterdir() if p.name.startswith(".")] == []
    load_model(path)


def test_loading_never_unpickles(saved, monkeypatch):
    import pickle

    _, path = saved

    def forbidden(*args, **kwargs):
        raise AssertionError("pickle used while loading")

    monkeypatch.setattr(pickle, "load", forbidden)
    monkeypatch.setattr(pickle, "loads", forbidden)
    monkeypatch.setattr(torch, "load", forbidden)
    load_model(path)


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
