"""A miniature BlEmoRE release in the official layout: what blemore-common's scripts write."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

ACTORS = {"A101": 0, "A202": 1, "A303": 2, "A404": 3, "A505": 4}
CLIPS = ["ang_int1_ver1", "hap_int2_ver1", "neu_sit1_ver1", "sad_int3_ver1", "mix_hap_sad_70_30_ver1",
         "mix_ang_disg_50_50_ver1", "mix_disg_fea_30_70_ver1", "fea_int4_ver1"]
DIMS = {"openface": 4, "wavlm": 3, "hubert": 2}
METADATA_COLUMNS = ["filename", "video_id", "gender", "mix", "emotion_1", "emotion_2", "emotion_1_salience",
                    "emotion_2_salience", "version", "intensity_level", "situation", "fold"]


def official_aggregate(x: np.ndarray) -> np.ndarray:
    """timeseries2aggregate.py's layout, written out as the official script does it."""
    return np.concatenate([x.mean(axis=0), x.std(axis=0), np.percentile(x, 10, axis=0), np.percentile(x, 25, axis=0),
                           np.percentile(x, 50, axis=0), np.percentile(x, 75, axis=0), np.percentile(x, 90, axis=0)])


def metadata_row(clip: str, fold: int | str, labelled: bool = True) -> list:
    parts = clip.split("_")
    if not labelled:
        return [f"{clip}.mov", clip, "", "", "", "", "", "", "", "", "", fold]
    if parts[1] == "mix":
        return [f"{clip}.mov", clip, "f", 1, parts[2], parts[3], parts[4], parts[5], 1, "", "", fold]
    return [f"{clip}.mov", clip, "m", 0, parts[1], "", "", "", 1, parts[2] if parts[1] != "neu" else "",
            parts[2] if parts[1] == "neu" else "", fold]


def write_official_release(root: Path, seed: int = 0, tests: int = 6, test_labels: bool = False) -> dict[str, dict]:
    """Training clips of five actors (folds 0-4) and ``tests`` test clips: each encoder's time series as a flat
    folder of .npy files, openface and wavlm also aggregated into encoded_videos/static_data/*_static_features.npz,
    train_metadata.csv and test_metadata.csv. Returns each encoder's series by clip."""
    rng = np.random.default_rng(seed)
    train = [f"{actor}_{clip}" for actor in ACTORS for clip in CLIPS]
    test_truth = [f"A9{i:02d}_{CLIPS[i % len(CLIPS)]}" for i in range(tests)]
    test = [f"test_{i + 1:04d}" for i in range(tests)]
    series: dict[str, dict] = {}
    for enc, dim in DIMS.items():
        (root / enc).mkdir(parents=True)
        series[enc] = {}
        for clip in train + test:
            x = rng.normal(size=(int(rng.integers(3, 12)), dim)).astype(np.float32)
            np.save(root / enc / f"{clip}.npy", x)
            series[enc][clip] = x
    static = root / "encoded_videos" / "static_data"
    static.mkdir(parents=True)
    for enc in ("openface", "wavlm"):
        names = sorted(series[enc])
        np.savez(static / f"{enc}_static_features.npz", X=np.stack([official_aggregate(series[enc][n]) for n in names]),
                 filenames=np.array(names))
    with open(root / "train_metadata.csv", "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(METADATA_COLUMNS)
        for clip in train:
            writer.writerow(metadata_row(clip, ACTORS[clip[:4]]))
    with open(root / "test_metadata.csv", "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(METADATA_COLUMNS)
        for clip, truth in zip(test, test_truth):
            row = metadata_row(truth, "", labelled=test_labels)
            writer.writerow([f"{clip}.mov", clip, *row[2:]])
    return series
