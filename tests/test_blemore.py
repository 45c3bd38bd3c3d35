"""Decoders, metrics and the answer format match the official BlEmoRE code exactly."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from fusionkit.blemore.answers import from_order, order_to_matrix, parse_blemore_name, to_matrix
from fusionkit.blemore.metrics import blemore_scores, scores_from_matrices
from fusionkit.components.decoders import blemore_decode, presence_salience_decode
from fusionkit.errors import DataError

# Expected outputs of the official BlEmoRE code (a copy of shared/data/blemore-vectors.json, shipped with the tests).
VECTORS = Path(__file__).parent / "data" / "blemore-vectors.json"
LABELS = ["ang", "disg", "fea", "hap", "sad", "neu"]
NEU = 5


def vectors():
    return json.loads(VECTORS.read_text())


def decode_one(p, alpha, beta):
    order, sal = blemore_decode(np.array([p], dtype=float), alpha, beta, NEU)
    return from_order(order, sal, LABELS)[0]


def test_blemore_decoder_matches_every_official_vector():
    data = vectors()
    assert data["labels"] == LABELS
    mismatches = [c for c in data["decoder_cases"] if decode_one(c["probs"], c["alpha"], c["beta"]) != c["prediction"]]
    assert not mismatches, mismatches[:3]


def test_blemore_decoder_batched_equals_row_by_row():
    data = vectors()
    cases = data["decoder_cases"][:200]
    probs = np.array([c["probs"] for c in cases])
    order, sal = blemore_decode(probs, 0.3, 0.2, NEU)
    batched = from_order(order, sal, LABELS)
    assert batched == [decode_one(c["probs"], 0.3, 0.2) for c in cases]


@pytest.mark.parametrize(
    ("probs", "alpha", "beta", "expected"),
    [
        # below alpha: the top emotion alone
        ([0.3, 0.25, 0.2, 0.1, 0.1, 0.05], 0.35, 0.1, [("ang", 100.0)]),
        # the second below alpha: the top alone
        ([0.6, 0.2, 0.1, 0.05, 0.05, 0.0], 0.3, 0.1, [("ang", 100.0)]),
        # 70/30 in favour of the larger, listed in label order
        ([0.5, 0.45, 0.0, 0.0, 0.0, 0.05], 0.3, 0.02, [("ang", 70.0), ("disg", 30.0)]),
        ([0.0, 0.3, 0.0, 0.0, 0.6, 0.1], 0.2, 0.1, [("disg", 30.0), ("sad", 70.0)]),
        # |p1 - p2| == beta is still 50/50 (boundary inclusive)
        ([0.0, 0.0, 0.5, 0.25, 0.25, 0.0], 0.2, 0.25, [("fea", 50.0), ("hap", 50.0)]),
        ([0.0, 0.0, 0.5, 0.25, 0.25, 0.0], 0.2, 0.24, [("fea", 70.0), ("hap", 30.0)]),
        # neutral among the survivors: the other if at least neutral's probability, else neutral
        ([0.0, 0.0, 0.0, 0.4, 0.0, 0.6], 0.3, 0.1, [("neu", 100.0)]),
        ([0.0, 0.0, 0.0, 0.5, 0.0, 0.5], 0.3, 0.1, [("hap", 100.0)]),
        ([0.55, 0.0, 0.0, 0.0, 0.0, 0.45], 0.3, 0.5, [("ang", 100.0)]),
        # exact tie at the top, below alpha: the lower label index
        ([0.0, 0.0, 0.0, 0.0, 0.3, 0.3], 0.5, 0.1, [("sad", 100.0)]),
    ],
)
def test_blemore_rule_table(probs, alpha, beta, expected):
    assert decode_one(probs, alpha, beta) == [{"emotion": e, "salience": s} for e, s in expected]


def test_metrics_match_every_official_case():
    for case in vectors()["metric_cases"]:
        got = blemore_scores(case["predictions"], case["truths"], LABELS)
        assert got["acc_presence"] == pytest.approx(float(case["acc_presence"]), abs=1e-12)
        assert got["acc_salience"] == pytest.approx(float(case["acc_salience"]), abs=1e-12)
        assert got["score"] == pytest.approx(0.5 * (got["acc_presence"] + got["acc_salience"]))


def test_metrics_hand_computed():
    truths = {
        "A1_mix_hap_sad_70_30_ver1": parse_blemore_name("A1_mix_hap_sad_70_30_ver1"),
        "A1_mix_ang_fea_50_50_ver1": parse_blemore_name("A1_mix_ang_fea_50_50_ver1"),
        "A2_neu_sit1_ver1": parse_blemore_name("A2_neu_sit1_ver1"),
        "A2_mix_disg_sad_30_70_ver1": parse_blemore_name("A2_mix_disg_sad_30_70_ver1"),
    }
    preds = {
        # right set, reversed ratio: presence yes, salience no
        "A1_mix_hap_sad_70_30_ver1": [{"emotion": "sad", "salience": 70}, {"emotion": "hap", "salience": 30}],
        # exact
        "A1_mix_ang_fea_50_50_ver1": [{"emotion": "fea", "salience": 50.0}, {"emotion": "ang", "salience": 50.0}],
        # single right
        "A2_neu_sit1_ver1": [{"emotion": "neu", "salience": 100.0}],
        # one emotion for a blend: wrong for both
        "A2_mix_disg_sad_30_70_ver1": [{"emotion": "sad", "salience": 100.0}],
    }
    got = blemore_scores(preds, truths, LABELS)
    assert got == {"acc_presence": 0.75, "acc_salience": 1 / 3, "score": 0.5 * (0.75 + 1 / 3)}


def test_metrics_reject_mismatched_ids():
    with pytest.raises(DataError, match="same sample ids"):
        blemore_scores({"a": [{"emotion": "hap", "salience": 100}]}, {"b": [{"emotion": "hap", "salience": 100}]}, LABELS)


def test_parse_names():
    assert parse_blemore_name("A102_ang_int1_ver1") == [{"emotion": "ang", "salience": 100.0}]
    assert parse_blemore_name("A303_neu_sit2_ver1.npy") == [{"emotion": "neu", "salience": 100.0}]
    assert parse_blemore_name("A438_mix_disg_hap_30_70_ver1") == [
        {"emotion": "disg", "salience": 30.0}, {"emotion": "hap", "salience": 70.0}]
    with pytest.raises(DataError, match="not a BlEmoRE file name"):
        parse_blemore_name("test_0001.mov")


def test_presence_salience_decoder():
    presence = np.array([
        [0.9, 0.8, 0.1, 0.1, 0.1, 0.1],  # two present, shares 0.5/0.3 -> gap 0.25
        [0.9, 0.2, 0.1, 0.1, 0.1, 0.1],  # one present
        [0.9, 0.1, 0.1, 0.1, 0.1, 0.8],  # neutral never blends
        [0.1, 0.1, 0.2, 0.1, 0.1, 0.1],  # nothing present: the most present alone
    ])
    salience = np.array([[0.5, 0.3, 0.05, 0.05, 0.05, 0.05]] * 4)
    order, sal = presence_salience_decode(presence, salience, 0.5, 0.3, NEU)
    preds = from_order(order, sal, LABELS)
    assert preds[0] == [{"emotion": "ang", "salience": 50.0}, {"emotion": "disg", "salience": 50.0}]
    assert preds[1] == [{"emotion": "ang", "salience": 100.0}]
    assert preds[2] == [{"emotion": "ang", "salience": 100.0}]
    assert preds[3] == [{"emotion": "fea", "salience": 100.0}]
    order, sal = presence_salience_decode(presence, salience, 0.5, 0.2, NEU)
    assert from_order(order, sal, LABELS)[0] == [{"emotion": "ang", "salience": 70.0}, {"emotion": "disg", "salience": 30.0}]


def test_matrix_round_trip():
    preds = [[{"emotion": "hap", "salience": 70.0}, {"emotion": "sad", "salience": 30.0}], [{"emotion": "neu", "salience": 100.0}]]
    m = to_matrix(preds, LABELS)
    assert m.tolist() == [[0, 0, 0, 70, 30, 0], [0, 0, 0, 0, 0, 100]]
    order = np.array([[4, 3], [5, -1]])
    sal = np.array([[30.0, 70.0], [100.0, 0.0]])
    assert np.array_equal(order_to_matrix(order, sal, 6), m)
    assert scores_from_matrices(m, m) == {"acc_presence": 1.0, "acc_salience": 1.0, "score": 1.0}


# --- ACC_salience without blends ------------------------------------------------------------------------


def test_acc_salience_is_not_applicable_without_blends():
    """a split without blends reported ACC_salience 0.000, which halved Score."""
    from fusionkit.blemore.metrics import blemore_scores

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
