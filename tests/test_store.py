"""The feature store: round trips, validation on open, and clear errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from fusionkit.data.store import Sample, open_store, write_store
from fusionkit.errors import DataError

LABELS = ["ang", "disg", "fea", "hap", "sad", "neu"]


def samples(n=5):
    return [Sample(id=f"s{i}", labels=[{"emotion": "hap", "salience": 100.0}], group=f"g{i % 2}", fold=i % 2) for i in range(n)]


def test_vectors_and_sequences_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    vec = rng.normal(size=(5, 3)).astype(np.float32)
    seqs = [rng.normal(size=(t, 2)).astype(np.float32) for t in (3, 1, 4, 2, 5)]
    write_store(tmp_path / "s", LABELS, samples(), {"v": vec, "q": seqs})
    store = open_store(tmp_path / "s", {"v": 3, "q": 2})
    assert store.ids == [f"s{i}" for i in range(5)]
    inputs, lengths, mask = store.batch(np.array([4, 1]), ["v", "q"])
    assert torch.equal(inputs["v"], torch.from_numpy(vec[[4, 1]]))
    assert lengths["q"].tolist() == [5, 1]
    assert torch.equal(inputs["q"][0], torch.from_numpy(seqs[4]))
    assert torch.equal(inputs["q"][1, :1], torch.from_numpy(seqs[1])) and inputs["q"][1, 1:].eq(0).all()
    assert mask.all()
    assert store.truth_matrix([0]).tolist() == [[0, 0, 0, 100, 0, 0]]


def test_missing_file_is_named(tmp_path):
    write_store(tmp_path / "s", LABELS, samples(), {"v": np.zeros((5, 3))})
    (tmp_path / "s" / "v.safetensors").unlink()
    with pytest.raises(DataError, match=r"v\.safetensors: missing feature file of encoder 'v'"):
        open_store(tmp_path / "s")


def test_feature_size_must_match_the_spec(tmp_path):
    write_store(tmp_path / "s", LABELS, samples(), {"v": np.zeros((5, 3))})
    with pytest.raises(DataError, match="feature size 3, but the spec's encoder 'v' has dim 4"):
        open_store(tmp_path / "s", {"v": 4})
    with pytest.raises(DataError, match="no encoder 'w'"):
        open_store(tmp_path / "s", {"w": 3})


def test_nan_is_reported_with_sample_ids_or_masked(tmp_path):
    x = np.ones((5, 3), dtype=np.float32)
    x[2, 1] = np.nan
    x[4, 0] = np.inf
    write_store(tmp_path / "s", LABELS, samples(), {"v": x})
    with pytest.raises(DataError) as err:
        open_store(tmp_path / "s")
    assert "s2" in str(err.value) and "s4" in str(err.value) and "nan_policy: mask" in str(err.value)
    store = open_store(tmp_path / "s", nan_policy="mask")
    assert store.encoders["v"].available.tolist() == [True, True, False, True, False]
    assert torch.isfinite(store.encoders["v"].data).all()


def test_ids_must_align_across_encoders(tmp_path):
    write_store(tmp_path / "s", LABELS, samples(), {"v": np.zeros((5, 3))})
    other = tmp_path / "t"
    write_store(other, LABELS, list(reversed(samples())), {"v": np.zeros((5, 3))})
    (tmp_path / "s" / "v.safetensors").write_bytes((other / "v.safetensors").read_bytes())
    with pytest.raises(DataError, match="sample ids do not match"):
        open_store(tmp_path / "s")


def test_an_existing_store_is_not_overwritten_by_accident(tmp_path):
    write_store(tmp_path / "s", LABELS, samples(), {"v": np.zeros((5, 3))})
    before = (tmp_path / "s" / "index.json").read_text()
    with pytest.raises(DataError, match="already exists"):
        write_store(tmp_path / "s", LABELS, samples(3), {"v": np.zeros((3, 3))})
    assert (tmp_path / "s" / "index.json").read_text() == before
    with pytest.raises(DataError, match="2 rows for 5 samples"):
        write_store(tmp_path / "s", LABELS, samples(), {"v": np.zeros((2, 3))}, overwrite=True)
    assert (tmp_path / "s" / "index.json").read_text() == before


def test_malformed_index_is_reported(tmp_path):
    write_store(tmp_path / "s", LABELS, samples(), {"v": np.zeros((5, 3))})
    index = json.loads((tmp_path / "s" / "index.json").read_text())
    index["samples"][1] = {"labels": None}
    (tmp_path / "s" / "index.json").write_text(json.dumps(index))
    with pytest.raises(DataError, match="sample record #1: .id. must be a non-empty string"):
        open_store(tmp_path / "s")
