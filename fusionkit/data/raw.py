"""Raw datasets: a manifest of samples whose inputs are files (images, audio, clips) or texts.

A manifest is a CSV file (with a header) or a JSONL file (one object per line); see
docs/live-encoders.md. Its columns::

    id        the sample id (unique)
    labels    the BlEmoRE answer: "hap", "hap:70;sad:30", or a JSON list of {emotion, salience};
              empty for an unlabelled sample
    group     optional; folds must be group-disjoint
    fold      optional integer (-1: none)
    domain    optional: source (default) or target
    <name>    one column per live encoder of the spec: a path relative to the manifest's
              folder (an image, an audio file, or a folder of a clip's frames), or a text

Live encoders read their column themselves (:meth:`~fusionkit.interfaces.LiveEncoder.load`),
lazily, one sample at a time: in a ``DataLoader``'s worker processes for ``fusionkit extract``,
on the trainer's background thread for end-to-end training.
"""

from __future__ import annotations

import json
import os
import stat
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fusionkit.data.store import FeatureStore, Sample, check_samples, sample_from_record
from fusionkit.data.tables import MANIFEST_SUFFIXES, MAX_CSV_CELL, is_manifest, manifest_records
from fusionkit.errors import DataError
from fusionkit.files import sha256_file
from fusionkit.interfaces import LiveEncoder, LiveEncoderConfig
from fusionkit.plugins import get_registry

__all__ = ["MANIFEST_SUFFIXES", "RECORD_COLUMNS", "live_encoder_names", "is_manifest", "RawManifest",
           "read_manifest", "MAX_CSV_CELL", "collate", "manifest_store", "LoadFailure", "ManifestItems",
           "load_batches"]

#: Columns with a fixed meaning; every other column holds one encoder's inputs.
RECORD_COLUMNS = ("id", "labels", "group", "fold", "domain")


def live_encoder_names(spec: Any, registry: Any = None) -> set[str]:
    """Names of the spec's encoders that read raw inputs: those whose config class is a
    :class:`~fusionkit.interfaces.LiveEncoderConfig`."""
    registry = registry or get_registry()
    return {e.name for e in spec.encoders
            if (("encoder", e.type) in registry and issubclass(registry.get("encoder", e.type).config, LiveEncoderConfig))}


class RawManifest:
    """A read and validated manifest: its samples, and each encoder column's values."""

    def __init__(self, path: Path, labels: tuple[str, ...], samples: list[Sample], columns: dict[str, list[str]],
                 confine: Path | None = None) -> None:
        self.path = path
        self.base = path.parent
        self.confine = confine
        self.labels = labels
        self.samples = samples
        self.columns = columns
        self.ids = [s.id for s in samples]

    def __len__(self) -> int:
        return len(self.samples)

    def fingerprint(self) -> str:
        """SHA-256 of the manifest file (the files it points to are not hashed)."""
        return sha256_file(self.path)

    def check_encoders(self, encoders: Mapping[str, LiveEncoder]) -> None:
        """Every live encoder has a column, and every file input exists (named by sample id)."""
        missing = [name for name in encoders if name not in self.columns]
        if missing:
            raise DataError(f"{self.path}: no column for the live encoder(s) {missing}; its encoder columns are "
                            f"{sorted(self.columns)} (a live encoder reads the column of its own name)")
        for name, encoder in encoders.items():
            values = self.columns[name]
            empty = [self.ids[i] for i, v in enumerate(values) if not v]
            if empty:
                raise DataError(f"{self.path}: column {name!r} is empty for sample(s) {empty[:5]}")
            if encoder.modality == "text":
                continue
            problems = [(self.ids[i], v, why) for i, v in enumerate(values) for why in [self.input_problem(v)] if why]
            if problems:
                shown = ", ".join(f"{sid!r} ({self.base / v}: {why})" for sid, v, why in problems[:5])
                raise DataError(f"{self.path}: {len(problems)} unusable input path(s) of encoder {name!r}, e.g. sample "
                                f"{shown}")

    def input_problem(self, value: str) -> str | None:
        """Why the input path ``value`` cannot be read, or None. Only regular files and folders are read (a FIFO
        or a device would block forever); with ``confine``, only paths that resolve inside that folder."""
        target = self.base / value
        try:
            mode = target.stat().st_mode
        except OSError:
            return "no such file"
        if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
            return "not a regular file or a folder"
        if self.confine is not None and not target.resolve().is_relative_to(self.confine.resolve()):
            return f"resolves outside --confine {self.confine}"
        return None

    def load(self, row: int, encoders: Mapping[str, LiveEncoder]) -> dict[str, Any]:
        """One sample's preprocessed inputs, by encoder; an unreadable input names the sample."""
        out = {}
        for name, encoder in encoders.items():
            value = self.columns[name][row]
            why = None if encoder.modality == "text" else self.input_problem(value)
            if why:
                raise DataError(f"{self.path}: sample {self.ids[row]!r}: encoder {name!r} cannot read {value!r} ({why})")
            try:
                out[name] = encoder.load(value, self.base)
            except Exception as exc:  # noqa: BLE001 - any decoder's failure (e.g. PIL's DecompressionBombError) names the sample
                raise DataError(f"{self.path}: sample {self.ids[row]!r}: encoder {name!r} cannot read {value!r} "
                                f"({type(exc).__name__}: {exc})") from None
        return out

    def batch(self, rows: Sequence[int], encoders: Mapping[str, LiveEncoder]) -> tuple[dict, dict]:
        """``(inputs, lengths)`` of the samples ``rows`` for the encoders: each loaded, then collated."""
        return collate(encoders, [self.load(int(r), encoders) for r in rows])

    def rows_for(self, ids: Sequence[str], where: Any) -> np.ndarray:
        """The manifest rows of the sample ``ids`` (every one must be in the manifest)."""
        position = {sid: i for i, sid in enumerate(self.ids)}
        absent = [sid for sid in ids if sid not in position]
        if absent:
            raise DataError(f"{self.path}: lacks {len(absent)} sample(s) of {where}, e.g. {absent[:5]}; the manifest "
                            "must list every sample of the store")
        return np.array([position[sid] for sid in ids], dtype=np.int64)


def read_manifest(path: str | os.PathLike, labels: Sequence[str], confine: str | os.PathLike | None = None) -> RawManifest:
    """Read and validate a CSV or JSONL manifest whose answers use ``labels``.

    ``confine``: a folder that every input path must resolve into (after ``..`` and symlinks);
    without it, paths may point anywhere, e.g. at a shared data disk.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such manifest file (a .csv or .jsonl file; see docs/live-encoders.md)")
    records = manifest_records(path)
    samples, columns = [], {}
    names = [k for k in records[0] if k not in RECORD_COLUMNS]
    known = set(names)
    for i, rec in enumerate(records):
        extra = [k for k in rec if k not in RECORD_COLUMNS and k not in known]
        if extra:
            raise DataError(f"{path}: record #{i} has column(s) {extra} that the first record lacks")
        rec = dict(rec)
        rec["labels"] = _answer(rec.get("labels"), path, rec.get("id", f"#{i}"))
        samples.append(sample_from_record({k: v for k, v in rec.items() if k in RECORD_COLUMNS}, i, path, tuple(labels)))
        for name in names:
            value = rec.get(name, "")
            if not isinstance(value, str):
                raise DataError(f"{path}: sample {rec['id']!r}: column {name!r} must be a path or a text, found {value!r}")
            columns.setdefault(name, []).append(value)
    check_samples(samples, path)
    return RawManifest(path, tuple(labels), samples, columns, confine=None if confine is None else Path(confine))


def _answer(value: Any, path: Path, sid: Any) -> Any:
    """A manifest's ``labels`` cell as a BlEmoRE answer: "hap", "hap:70;sad:30", a JSON list, or empty."""
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        return value
    text = value.strip()
    if text.startswith("["):
        try:
            return json.loads(text)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}: sample {sid!r}: labels {text!r} is not valid JSON ({exc})") from None
    answer = []
    for part in text.split(";"):
        emotion, _, salience = part.strip().partition(":")
        try:
            answer.append({"emotion": emotion.strip(), "salience": float(salience) if salience else 100.0})
        except ValueError:
            raise DataError(f"{path}: sample {sid!r}: labels {text!r}: write 'hap' or 'hap:70;sad:30'") from None
    return answer


def collate(encoders: Mapping[str, LiveEncoder], items: Sequence[Mapping[str, Any]]) -> tuple[dict, dict]:
    """Loaded samples (encoder -> item) -> model ``(inputs, lengths)``, each encoder collating its own."""
    inputs, lengths = {}, {}
    for name, encoder in encoders.items():
        x, n = encoder.collate([item[name] for item in items])
        inputs[name] = x
        if n is not None:
            lengths[name] = n
    return inputs, lengths


def manifest_store(manifest: RawManifest) -> FeatureStore:
    """A store with the manifest's samples and no stored features: the data of a spec whose encoders are all live."""
    store = FeatureStore(manifest.path, manifest.labels, manifest.samples, {})
    store.attach_raw(manifest, np.arange(len(manifest)))
    return store


class LoadFailure:
    """A sample that a loader worker could not read: raised as a DataError in the main process, where the
    message stays one clear line (an exception raised inside a worker comes back wrapped in its traceback)."""

    def __init__(self, message: str) -> None:
        self.message = message


class ManifestItems(torch.utils.data.Dataset):
    """Manifest rows as a map-style dataset of ``(row, {encoder: item})``, for a ``DataLoader``."""

    def __init__(self, manifest: RawManifest, encoders: Mapping[str, LiveEncoder]) -> None:
        self.manifest = manifest
        self.encoders = dict(encoders)

    def __len__(self) -> int:
        return len(self.manifest)

    def __getitem__(self, row: int) -> Any:
        try:
            return row, self.manifest.load(row, self.encoders)
        except DataError as exc:
            return LoadFailure(str(exc))

    def collate(self, items: list[Any]) -> Any:
        failed = next((item for item in items if isinstance(item, LoadFailure)), None)
        if failed is not None:
            return failed
        return [row for row, _ in items], *collate(self.encoders, [item for _, item in items])


def load_batches(manifest: RawManifest, encoders: Mapping[str, LiveEncoder], batches: Sequence[Sequence[int]],
                 workers: int = 2):
    """Yield ``(rows, inputs, lengths)`` for each batch of manifest rows, read and preprocessed by
    ``workers`` loader processes (0: in this process), in order."""
    items = ManifestItems(manifest, encoders)
    loader = torch.utils.data.DataLoader(
        items, batch_sampler=[list(map(int, b)) for b in batches], num_workers=workers, collate_fn=items.collate,
        prefetch_factor=4 if workers else None, persistent_workers=False,
    )
    for batch in loader:
        if isinstance(batch, LoadFailure):
            raise DataError(batch.message)
        yield batch
