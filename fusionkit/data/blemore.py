"""Reading a BlEmoRE release as the official ``blemore-common`` code writes it.

Three layouts, chosen per encoder:

- **static**: ``<encoder>_static_features.npz`` holding ``X`` (N x 7*D: mean, std, then the 10th, 25th, 50th, 75th
  and 90th percentiles, as ``feature_extraction/timeseries2aggregate.py`` writes it) and ``filenames`` (clip names
  without extension). Read as it is: :func:`fusionkit.pooling.stats7_numpy` has the same layout and order, so
  nothing is aggregated twice.
- **flat**: one folder ``<encoder>/`` of ``<clip>.npy`` time series (frames x D), as the extraction scripts write.
- **folders**: ``<encoder>/<split>/<clip>.npy``, fusionkit's earlier layout.

Labels and folds come from ``train_metadata.csv`` (and ``test_metadata.csv`` when it exists): the columns
``emotion_1``, ``emotion_2``, ``emotion_1_salience``, ``emotion_2_salience`` when they are filled, else the file
name; ``fold`` always. Clip ids are checked across every encoder and the metadata, and a test clip listed in the
training metadata is refused.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import attrs
import numpy as np

from fusionkit.blemore.answers import BLEMORE_LABELS, Prediction, parse_blemore_name
from fusionkit.data.tables import read_csv
from fusionkit.errors import DataError
from fusionkit.interfaces import Sample
from fusionkit.pooling import stats7_numpy

__all__ = ["STATIC_SUFFIX", "ReleaseLayout", "EncoderSource", "read_metadata", "metadata_labels", "find_encoders",
           "read_release"]

STATIC_SUFFIX = "_static_features.npz"
#: The dtype kinds a feature array may have: booleans, integers, floats.
NUMERIC_KINDS = "biuf"


@attrs.frozen
class ReleaseLayout:
    """Where a release keeps its files (relative paths are under ``root``)."""

    root: Path
    metadata: str = "train_metadata.csv"
    test_metadata: str = "test_metadata.csv"
    static_dir: str = "encoded_videos/static_data"
    splits: tuple[str, ...] = ("train", "test")


@attrs.define
class EncoderSource:
    """One encoder's files: ``kind`` static, flat or folders; ``paths`` every clip's file (or the one .npz)."""

    name: str
    kind: str
    where: Path
    paths: dict[str, Path] = attrs.field(factory=dict)
    split_of: dict[str, str] = attrs.field(factory=dict)
    static: dict[str, int] = attrs.field(factory=dict)
    matrix: np.ndarray | None = None

    @property
    def ids(self) -> set[str]:
        return set(self.static) if self.kind == "static" else set(self.paths)

    def load(self, clip: str, aggregate: str) -> np.ndarray:
        if self.kind == "static":
            return self.matrix[self.static[clip]].astype(np.float32)
        path = self.paths[clip]
        if not path.is_file():
            raise DataError(f"{path}: not a regular file")
        try:
            arr = np.load(path, allow_pickle=False)
        except Exception as exc:  # a damaged or pickled file: named, never executed
            raise DataError(f"{path}: not a readable .npy array ({type(exc).__name__}: {exc})") from exc
        if not isinstance(arr, np.ndarray) or arr.dtype.kind not in NUMERIC_KINDS:
            raise DataError(f"{path}: expected numbers, found an array of {getattr(arr, 'dtype', type(arr).__name__)}")
        arr = arr.astype(np.float32)
        if arr.ndim == 1:
            arr = arr[None, :]
        if arr.ndim != 2 or len(arr) == 0:
            raise DataError(f"{self.paths[clip]}: expected a time series of frames x features, found shape {arr.shape}")
        return stats7_numpy(arr).astype(np.float32) if aggregate == "stats7" else arr


def read_metadata(path: Path, required: Sequence[str] = ("filename", "fold")) -> dict[str, tuple[int, dict[str, str]]]:
    """The rows of a metadata CSV by clip id (the ``filename`` column without its extension), with their line.
    Read by :func:`fusionkit.data.tables.read_csv`: UTF-8, each column named once, every row as long as the
    header."""
    _, table = read_csv(path, required)
    rows: dict[str, tuple[int, dict[str, str]]] = {}
    for line, row in table:
        clip = Path((row.get("filename") or "").strip()).stem
        if not clip:
            raise DataError(f"{path}:{line}: empty filename")
        if clip in rows:
            raise DataError(f"{path}:{line}: clip {clip!r} is listed twice (first on line {rows[clip][0]})")
        rows[clip] = (line, row)
    return rows


def _blank(value: Any) -> bool:
    return value is None or str(value).strip().lower() in ("", "nan", "none")


def metadata_labels(row: dict[str, str], where: str) -> Prediction | None:
    """The truth of a metadata row from its emotion columns, or None when they are absent or empty."""
    if _blank(row.get("emotion_1")):
        return None
    labels = []
    for k in (1, 2):
        emotion = row.get(f"emotion_{k}")
        if _blank(emotion):
            continue
        emotion = str(emotion).strip()
        if emotion not in BLEMORE_LABELS:
            raise DataError(f"{where}: emotion_{k} {emotion!r} is not a BlEmoRE label {list(BLEMORE_LABELS)}")
        salience = row.get(f"emotion_{k}_salience")
        try:
            value = 100.0 if _blank(salience) else float(salience)
        except ValueError:
            raise DataError(f"{where}: emotion_{k}_salience {salience!r} is not a number") from None
        labels.append({"emotion": emotion, "salience": value})
    if len(labels) == 1:
        labels[0]["salience"] = 100.0
    return labels


def _npy_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.glob("*.npy") if p.is_file())


def find_encoders(layout: ReleaseLayout) -> tuple[dict[str, Path], dict[str, tuple[str, Path]]]:
    """Every encoder the release holds: its static .npz files, and its folders of time series (flat or per split)."""
    root = layout.root
    static = {}
    for folder in (root / layout.static_dir, root):
        if folder.is_dir():
            for path in sorted(folder.glob(f"*{STATIC_SUFFIX}")):
                static.setdefault(path.name[: -len(STATIC_SUFFIX)], path)
    series = {}
    for folder in sorted(p for p in root.iterdir() if p.is_dir()):
        if _npy_files(folder):
            series[folder.name] = ("flat", folder)
        elif any(_npy_files(folder / split) for split in layout.splits if (folder / split).is_dir()):
            series[folder.name] = ("folders", folder)
    return static, series


def _open_static(name: str, path: Path) -> EncoderSource:
    if not path.is_file():  # a FIFO or a device would block the read for ever
        raise DataError(f"{path}: not a regular file; the static features of encoder {name!r} are an .npz file")
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {k: data[k] for k in data.files}
    except Exception as exc:
        raise DataError(f"{path}: not a readable .npz of arrays ({type(exc).__name__}: {exc}); object arrays are "
                        "never unpickled") from exc
    if "X" not in arrays or "filenames" not in arrays:
        raise DataError(f"{path}: expected the arrays X and filenames (as timeseries2aggregate.py writes them), found "
                        f"{sorted(arrays)}")
    matrix = arrays["X"]
    if matrix.dtype.kind not in NUMERIC_KINDS:
        raise DataError(f"{path}: X must hold numbers, found an array of {matrix.dtype}")
    if arrays["filenames"].ndim != 1 or arrays["filenames"].dtype.kind not in "US":
        raise DataError(f"{path}: filenames must be a list of clip names, found an array of {arrays['filenames'].dtype} "
                        f"with shape {arrays['filenames'].shape}")
    names = [Path(str(n)).stem for n in arrays["filenames"]]
    if matrix.ndim != 2 or len(matrix) != len(names):
        raise DataError(f"{path}: X has shape {matrix.shape} for {len(names)} filenames; expected one row per file")
    rows: dict[str, int] = {}
    for i, clip in enumerate(names):
        if clip in rows:
            raise DataError(f"{path}: clip {clip!r} appears twice in filenames (rows {rows[clip]} and {i})")
        rows[clip] = i
    return EncoderSource(name, "static", path, static=rows, matrix=matrix)


def _open_series(name: str, kind: str, folder: Path, splits: Sequence[str]) -> EncoderSource:
    source = EncoderSource(name, kind, folder)
    places = [(None, folder)] if kind == "flat" else [(s, folder / s) for s in splits if (folder / s).is_dir()]
    for split, place in places:
        for path in _npy_files(place):
            if path.stem in source.paths:
                raise DataError(f"{path}: clip {path.stem!r} is also in {source.paths[path.stem]}")
            source.paths[path.stem] = path
            if split is not None:
                source.split_of[path.stem] = split
    return source


def _sources(layout: ReleaseLayout, encoders: Sequence[str], aggregate: str) -> list[EncoderSource]:
    static, series = find_encoders(layout)
    names = list(encoders) or sorted(set(static) | set(series))
    if not names:
        raise DataError(f"{layout.root}: no encoders found: no <encoder>{STATIC_SUFFIX} in {layout.static_dir}/ or the "
                        "root, and no folder of .npy time series")
    out = []
    for name in names:
        if aggregate == "stats7" and name in static:
            out.append(_open_static(name, static[name]))
        elif name in series:
            out.append(_open_series(name, *series[name], layout.splits))
        elif name in static:
            raise DataError(f"{static[name]}: encoder {name!r} has only aggregated features here; aggregate: sequences "
                            f"needs its time series (a folder {name}/ of .npy files)")
        else:
            raise DataError(f"{layout.root}: no encoder {name!r} (neither {name}{STATIC_SUFFIX} nor a folder {name}/ of "
                            f".npy files); found: {sorted(set(static) | set(series))}")
    return out


def _listed(ids: Sequence[str] | set[str], n: int = 5) -> str:
    ids = sorted(ids)
    return ", ".join(ids[:n]) + (f" and {len(ids) - n} more" if len(ids) > n else "")


def read_release(layout: ReleaseLayout, encoders: Sequence[str] = (), aggregate: str = "stats7"
                 ) -> tuple[list[Sample], dict[str, list[np.ndarray] | np.ndarray]]:
    """The samples (training clips labelled with their folds, test clips as the target domain) and each encoder's
    features (stats7 vectors, or time series with ``aggregate="sequences"``)."""
    meta_path = layout.root / layout.metadata
    if not meta_path.is_file():
        raise DataError(f"{meta_path}: missing BlEmoRE metadata CSV (train_metadata.csv of the release)")
    train_rows = read_metadata(meta_path)
    test_path = layout.root / layout.test_metadata
    test_rows = read_metadata(test_path, ("filename",)) if test_path.exists() else None
    if test_rows is not None:
        both = set(test_rows) & set(train_rows)
        if both:
            raise DataError(f"{test_path}: {len(both)} test clip(s) are also in {meta_path.name}: {_listed(both)}; a "
                            "test clip must never be trained on")
    sources = _sources(layout, encoders, aggregate)
    for source in sources:  # the folders layout says which split a clip is in: it must agree with the metadata
        wrong = {c for c, s in source.split_of.items() if (s == "train") != (c in train_rows)}
        if wrong:
            raise DataError(f"{source.where}: clip(s) in a split folder that the metadata contradicts (in train/ but "
                            f"not in {meta_path.name}, or in another split but listed there): {_listed(wrong)}")
    if test_rows is not None:
        test_ids = set(test_rows)
    else:  # the clips with features that the training metadata does not list
        test_ids = sources[0].ids - set(train_rows)
    expected = set(train_rows) | test_ids
    problems = []
    for source in sources:
        missing, extra = expected - source.ids, source.ids - expected
        if missing:
            problems.append(f"encoder {source.name!r} ({source.where}) lacks {len(missing)} clip(s): {_listed(missing)}")
        if extra:
            problems.append(f"encoder {source.name!r} ({source.where}) has {len(extra)} clip(s) that no metadata lists: "
                            f"{_listed(extra)}")
    if problems:
        raise DataError(f"{layout.root}: the clip ids of the encoders and the metadata differ:\n  " + "\n  ".join(problems))
    samples = []
    for clip, (line, row) in train_rows.items():
        where = f"{meta_path}:{line}"
        try:
            fold = int(str(row["fold"]).strip())
        except ValueError:
            raise DataError(f"{where}: fold {row['fold']!r} is not an integer") from None
        samples.append(Sample(id=clip, labels=_truth(clip, row, where), group=clip.split("_")[0], fold=fold,
                              domain="source"))
    for clip in sorted(test_ids):
        labels = None
        if test_rows is not None:
            line, row = test_rows[clip]
            labels = metadata_labels(row, f"{test_path}:{line}")
        samples.append(Sample(id=clip, labels=labels, group="", fold=-1, domain="target"))
    features: dict[str, Any] = {}
    for source in sources:
        rows = [source.load(s.id, aggregate) for s in samples]
        _check_widths(source, [s.id for s in samples], rows)
        features[source.name] = np.stack(rows) if aggregate == "stats7" else rows
    return samples, features


def _check_widths(source: EncoderSource, clips: Sequence[str], rows: Sequence[np.ndarray]) -> None:
    """Every clip of an encoder must have as many features as its first; the first that differs is named."""
    width = rows[0].shape[-1] if rows else 0
    for clip, row in zip(clips, rows):
        if row.shape[-1] != width:
            raise DataError(f"{source.paths.get(clip, source.where)}: {row.shape[-1]} features, where encoder "
                            f"{source.name!r} has {width} (clip {clips[0]!r}); every clip of an encoder needs the same "
                            "width")


def _truth(clip: str, row: dict[str, str], where: str) -> Prediction:
    """A training clip's truth: the metadata's emotion columns, checked against the file name when both exist."""
    from_row = metadata_labels(row, where)
    try:
        from_name = parse_blemore_name(clip)
    except DataError:
        from_name = None
    if from_row is None and from_name is None:
        raise DataError(f"{where}: clip {clip!r} has neither emotion columns nor a BlEmoRE file name to read its labels "
                        "from")
    if from_row is not None and from_name is not None:
        as_dict = lambda p: {e["emotion"]: float(e["salience"]) for e in p}  # noqa: E731
        if as_dict(from_row) != as_dict(from_name):
            raise DataError(f"{where}: the emotion columns say {from_row} but the file name {clip!r} says {from_name}")
    return from_name if from_name is not None else from_row
