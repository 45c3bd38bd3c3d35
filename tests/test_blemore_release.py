"""The official BlEmoRE release layouts: static .npz, flat .npy folders, metadata CSVs."""

from __future__ import annotations

import csv

import numpy as np
import pytest
import torch
from official_release import DIMS, official_aggregate, write_official_release

from fusionkit.components.datasets import build_dataset
from fusionkit.data.store import open_store
from fusionkit.errors import DataError
from fusionkit.pooling import stats7, stats7_numpy


def metadata(path):
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def test_stats7_is_the_official_aggregation_and_a_static_npz_is_read_as_it_is(tmp_path):
    series = write_official_release(tmp_path / "r")
    x = series["wavlm"]["A101_ang_int1_ver1"]
    np.testing.assert_allclose(stats7_numpy(x), official_aggregate(x), rtol=1e-6)
    pooled = stats7(torch.from_numpy(x)[None], torch.tensor([len(x)]))[0].numpy()
    np.testing.assert_allclose(pooled, official_aggregate(x), rtol=1e-5, atol=1e-6)
    static = open_store(build_dataset("blemore", {"root": str(tmp_path / "r"), "encoders": ["wavlm", "hubert"]},
                                      tmp_path / "static"))
    # hubert has no .npz: its flat folder is aggregated by fusionkit; wavlm's .npz is read without re-aggregation
    for i, clip in enumerate(static.ids):
        np.testing.assert_allclose(static.encoders["wavlm"].data[i].numpy(), official_aggregate(series["wavlm"][clip]),
                                   rtol=1e-6)
        np.testing.assert_allclose(static.encoders["hubert"].data[i].numpy(), stats7_numpy(series["hubert"][clip]),
                                   rtol=1e-6)


def test_labels_and_folds_come_from_the_metadata(tmp_path):
    write_official_release(tmp_path / "r")
    store = open_store(build_dataset("blemore", {"root": str(tmp_path / "r")}, tmp_path / "s"))
    assert set(store.encoders) == set(DIMS)
    by_id = {s.id: s for s in store.samples}
    rows = metadata(tmp_path / "r" / "train_metadata.csv")
    assert len(rows) == sum(s.domain == "source" for s in store.samples)
    for row in rows:
        sample = by_id[row["filename"][: -len(".mov")]]
        assert sample.fold == int(row["fold"]) and sample.domain == "source"
        truth = {row["emotion_1"]: float(row["emotion_1_salience"] or 100)}
        if row["emotion_2"]:
            truth[row["emotion_2"]] = float(row["emotion_2_salience"])
        assert {e["emotion"]: e["salience"] for e in sample.labels} == truth
    tests = [s for s in store.samples if s.domain == "target"]
    assert [s.id for s in tests] == [r["filename"][:-4] for r in metadata(tmp_path / "r" / "test_metadata.csv")]
    assert all(s.labels is None and s.fold == -1 for s in tests)


def test_filled_test_metadata_labels_the_test_clips(tmp_path):
    write_official_release(tmp_path / "r", test_labels=True)
    store = open_store(build_dataset("blemore", {"root": str(tmp_path / "r"), "aggregate": "sequences"},
                                     tmp_path / "s"))
    rows = {r["filename"][:-4]: r for r in metadata(tmp_path / "r" / "test_metadata.csv")}
    for sample in store.samples:
        if sample.domain == "target":
            assert sample.labels[0]["emotion"] == rows[sample.id]["emotion_1"]


def test_missing_and_extra_clips_are_listed_per_encoder(tmp_path):
    write_official_release(tmp_path / "r")
    (tmp_path / "r" / "hubert" / "A202_sad_int3_ver1.npy").unlink()
    np.save(tmp_path / "r" / "hubert" / "A999_ang_int1_ver1.npy", np.zeros((3, 2), dtype=np.float32))
    with pytest.raises(DataError) as err:
        build_dataset("blemore", {"root": str(tmp_path / "r")}, tmp_path / "s")
    assert "encoder 'hubert'" in str(err.value) and "lacks 1 clip(s): A202_sad_int3_ver1" in str(err.value)
    assert "1 clip(s) that no metadata lists: A999_ang_int1_ver1" in str(err.value)
    assert not (tmp_path / "s").exists()


def test_a_test_clip_in_the_training_metadata_is_refused(tmp_path):
    write_official_release(tmp_path / "r")
    with open(tmp_path / "r" / "test_metadata.csv", "a", newline="") as fh:
        csv.writer(fh).writerow(["A101_ang_int1_ver1.mov", "A101_ang_int1_ver1"] + [""] * 10)
    with pytest.raises(DataError, match=r"test_metadata.csv: 1 test clip\(s\) are also in train_metadata.csv: "
                                        r"A101_ang_int1_ver1"):
        build_dataset("blemore", {"root": str(tmp_path / "r")}, tmp_path / "s")


def test_metadata_that_contradicts_the_file_name_is_refused_by_line(tmp_path):
    write_official_release(tmp_path / "r")
    path = tmp_path / "r" / "train_metadata.csv"
    lines = path.read_text().splitlines()
    lines[1] = lines[1].replace(",ang,", ",sad,", 1)
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=r"train_metadata.csv:2: the emotion columns say .*sad.* but the file name"):
        build_dataset("blemore", {"root": str(tmp_path / "r")}, tmp_path / "s")


def test_an_unknown_encoder_names_what_the_release_holds(tmp_path):
    write_official_release(tmp_path / "r")
    with pytest.raises(DataError, match=r"no encoder 'videomae'.*found: \['hubert', 'openface', 'wavlm'\]"):
        build_dataset("blemore", {"root": str(tmp_path / "r"), "encoders": ["videomae"]}, tmp_path / "s")


def test_an_official_release_trains_cross_validates_ensembles_and_writes_a_submission(tmp_path):
    """The participant's path from the command line: data build -> train --cv -> predict --cv -> the zip, and
    evaluate --cv on a labelled test set."""
    import json
    import zipfile

    import yaml

    from fusionkit.cli import main

    write_official_release(tmp_path / "release", tests=6, test_labels=True)
    assert main(["data", "build", "blemore", "--out", str(tmp_path / "store"), "--set", f"root={tmp_path / 'release'}"]) == 0
    spec = {"encoders": [{"name": n, "type": "features", "dim": 7 * d} for n, d in DIMS.items()],
            "latent_dim": 8, "gate": {"type": "attention", "top_n": 2, "heads": 2},
            "train": {"epochs": 2, "batch_size": 8, "lr": 3e-3, "seed": 0}}
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(spec))
    assert main(["train", str(tmp_path / "spec.yaml"), "--data", str(tmp_path / "store"), "--out", str(tmp_path / "cv"),
                 "--cv", "--quiet"]) == 0
    assert main(["predict", "--cv", str(tmp_path / "cv"), "--data", str(tmp_path / "store"), "--out",
                 str(tmp_path / "submission.zip"), "--split", "target", "--id-suffix", ".mov"]) == 0
    with zipfile.ZipFile(tmp_path / "submission.zip") as zf:
        assert zf.namelist() == ["submission.json"]
        predictions = json.loads(zf.read("submission.json"))["predictions"]
    assert sorted(predictions) == [f"test_{i:04d}.mov" for i in range(1, 7)]
    for answer in predictions.values():
        assert 1 <= len(answer) <= 2 and abs(sum(e["salience"] for e in answer) - 100) < 1e-6
    assert main(["evaluate", str(tmp_path / "cv"), "--cv", "--data", str(tmp_path / "store"), "--split", "target"]) == 0
    metrics = json.loads((tmp_path / "cv" / "evaluation_ensemble_target.json").read_text())
    assert metrics["n"] == 6 and 0.0 <= metrics["score"] <= 1.0


# --- damaged releases: one-line errors naming the file, never a hang ------------------------------------------------


def test_a_fifo_in_place_of_a_static_npz_is_refused_not_opened(tmp_path):
    import os
    import subprocess
    import sys

    write_official_release(tmp_path / "r")
    npz = tmp_path / "r" / "encoded_videos" / "static_data" / "wavlm_static_features.npz"
    npz.unlink()
    os.mkfifo(npz)
    done = subprocess.run([sys.executable, "-m", "fusionkit", "data", "build", "blemore", "--set",
                           f"root={tmp_path / 'r'}", "--out", str(tmp_path / "s")], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 2, done.stderr
    assert "wavlm_static_features.npz: not a regular file" in done.stderr and "Traceback" not in done.stderr


def _rewrite_metadata(root, change):
    path = root / "train_metadata.csv"
    rows = list(csv.reader(path.open(newline="")))
    rows = change(rows)
    with path.open("w", newline="") as fh:
        csv.writer(fh).writerows(rows)


def test_a_column_named_twice_in_the_metadata_is_refused(tmp_path):
    write_official_release(tmp_path / "r")
    _rewrite_metadata(tmp_path / "r", lambda rows: [rows[0] + ["fold"]] + [r + ["0"] for r in rows[1:]])
    with pytest.raises(DataError, match=r"train_metadata.csv: the header names column\(s\) \['fold'\] more than once"):
        build_dataset("blemore", {"root": str(tmp_path / "r")}, tmp_path / "s")
    assert not (tmp_path / "s").exists()


def test_metadata_cells_over_128_kb_are_read(tmp_path):
    write_official_release(tmp_path / "r")
    long = "x" * 200_000
    _rewrite_metadata(tmp_path / "r", lambda rows: [rows[0] + [long]] + [r + [long] for r in rows[1:]])
    store = open_store(build_dataset("blemore", {"root": str(tmp_path / "r")}, tmp_path / "s"))
    assert len(store) == 46


def test_latin1_metadata_is_a_one_line_error(tmp_path):
    write_official_release(tmp_path / "r")
    path = tmp_path / "r" / "train_metadata.csv"
    path.write_bytes(path.read_bytes().replace(b",m,", "\xe9".join([",", ","]).encode("latin-1"), 1))
    with pytest.raises(DataError, match=r"train_metadata.csv: not UTF-8 text \(invalid continuation byte at byte"):
        build_dataset("blemore", {"root": str(tmp_path / "r")}, tmp_path / "s")


def test_strings_where_features_belong_are_refused_by_file(tmp_path):
    write_official_release(tmp_path / "r")
    npz = tmp_path / "r" / "encoded_videos" / "static_data" / "wavlm_static_features.npz"
    with np.load(npz) as data:
        names = data["filenames"]
    np.savez(npz, X=np.array([["a"] * 21] * len(names)), filenames=names)
    with pytest.raises(DataError, match=r"wavlm_static_features.npz: X must hold numbers, found an array of <U1"):
        build_dataset("blemore", {"root": str(tmp_path / "r"), "encoders": ["wavlm"]}, tmp_path / "s")
    np.save(tmp_path / "r" / "hubert" / "A101_ang_int1_ver1.npy", np.array([["1.0", "x"]]))
    with pytest.raises(DataError, match=r"hubert/A101_ang_int1_ver1.npy: expected numbers, found an array of <U3"):
        build_dataset("blemore", {"root": str(tmp_path / "r"), "encoders": ["hubert"]}, tmp_path / "s")


def test_one_clip_of_another_width_is_named(tmp_path):
    write_official_release(tmp_path / "r")
    np.save(tmp_path / "r" / "hubert" / "A303_sad_int3_ver1.npy", np.zeros((4, 5), dtype=np.float32))
    with pytest.raises(DataError, match=r"hubert/A303_sad_int3_ver1.npy: 35 features, where encoder 'hubert' has 14"):
        build_dataset("blemore", {"root": str(tmp_path / "r"), "encoders": ["hubert"]}, tmp_path / "s")
