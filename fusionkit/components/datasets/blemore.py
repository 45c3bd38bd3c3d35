"""The ``blemore`` dataset: a BlEmoRE release as the official code writes it (read by :mod:`fusionkit.data.blemore`)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import attrs

from fusionkit.config import option
from fusionkit.data.blemore import ReleaseLayout, read_release
from fusionkit.interfaces import Dataset, Sample

__all__ = ["BlemoreConfig", "BlemoreRelease"]

@attrs.frozen(kw_only=True)
class BlemoreConfig:
    """A BlEmoRE release as the official blemore-common code writes it: <encoder>_static_features.npz (aggregated),
    flat <encoder>/<clip>.npy folders, or <encoder>/<split>/<clip>.npy; labels and folds from the metadata CSVs."""

    root: str = option(doc="Release directory (holding train_metadata.csv).")
    encoders: list[str] = option(factory=list, doc="Encoders to import; empty: every one found (static .npz files and "
                                                   "folders of .npy time series).")
    metadata: str = option("train_metadata.csv", doc="Training metadata CSV (filename, fold, emotion columns), relative "
                                                     "to root.")
    test_metadata: str = option("test_metadata.csv", doc="Test metadata CSV, relative to root; read when it exists (its "
                                                         "emotion columns, when filled, label the test clips).")
    static_dir: str = option("encoded_videos/static_data", doc="Where <encoder>_static_features.npz files are looked for "
                                                               "(relative to root; root itself too).")
    splits: list[str] = option(factory=lambda: ["train", "test"], doc="Split folders of the <encoder>/<split>/ layout.")
    aggregate: Literal["sequences", "stats7"] = option(
        "stats7", doc="stats7: one vector per clip (a static .npz is read as it is, a time series aggregated as "
                      "timeseries2aggregate.py does); sequences: the time series.")


class BlemoreRelease(Dataset):

    def generate(self) -> tuple[list[Sample], dict]:
        c = self.config
        layout = ReleaseLayout(Path(c.root), c.metadata, c.test_metadata, c.static_dir, tuple(c.splits))
        return read_release(layout, c.encoders, c.aggregate)
