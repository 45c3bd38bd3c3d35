"""An export's inputs read with numpy and safetensors alone: a feature store (docs/feature-store.md), and for live
image encoders a raw manifest (docs/live-encoders.md) whose image paths are read only for the rows that run them."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fusionkit.data.format import feature_file, read_features, read_index
from fusionkit.data.tables import manifest_is_the_data, manifest_records
from fusionkit.errors import DataError

__all__ = ["StoreRows", "read_store", "read_manifest_rows", "read_inputs", "select_rows"]


@dataclass
class StoreRows:
    """The rows of a store that an export reads: ``ids``, each encoder's ``inputs`` (``[N, D]`` vectors, frames
    padded to ``[N, T, D]`` with ``lengths``, or a live encoder's ``[N]`` file paths), and per sample whether it is
    labelled and its domain."""

    ids: list[str]
    inputs: dict[str, np.ndarray]
    lengths: dict[str, np.ndarray]
    labelled: np.ndarray
    domains: np.ndarray

    def take(self, rows: np.ndarray) -> StoreRows:
        """The same for the samples ``rows`` only."""
        return StoreRows([self.ids[i] for i in rows], {n: v[rows] for n, v in self.inputs.items()},
                         {n: v[rows] for n, v in self.lengths.items()}, self.labelled[rows], self.domains[rows])


def read_store(path: str | Path, encoders: Sequence[str]) -> StoreRows:
    """The samples of the store at ``path`` with the features of ``encoders`` (through safetensors; nothing is
    unpickled), read and checked as :func:`fusionkit.data.store.open_store` reads them
    (:mod:`fusionkit.data.format`). Errors name the file at fault."""
    root = Path(path)
    index = read_index(root)
    samples = index["samples"]
    ids = [s["id"] for s in samples]
    inputs, lengths = {}, {}
    for name in encoders:
        data, offsets = read_features(feature_file(root, index, name), name, ids)
        if offsets is None:
            inputs[name] = data
            continue
        steps = np.diff(offsets)
        frames = np.zeros((len(ids), max(int(steps.max(initial=1)), 1), data.shape[1]), dtype=np.float32)
        for i, (start, count) in enumerate(zip(offsets[:-1], steps)):
            frames[i, :count] = data[start:start + count]
        inputs[name], lengths[name] = frames, steps
    labelled = np.array([s.get("labels") is not None for s in samples], dtype=bool)
    domains = np.array([str(s.get("domain", "source")) for s in samples])
    return StoreRows(ids, inputs, lengths, labelled, domains)


def read_manifest_rows(path: str | os.PathLike, encoders: Sequence[str],
                       confine: str | os.PathLike | None = None) -> StoreRows:
    """The samples of the raw manifest at ``path`` with the file paths of the live ``encoders`` (each its own column,
    relative to the manifest's folder, or absolute); the files are read later, by the rows that run them.
    ``confine``: a folder every path must resolve into (after ``..`` and symbolic links), for a manifest you did not
    write."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such manifest file (a .csv or .jsonl file; see docs/live-encoders.md)")
    records = manifest_records(path)
    missing = [name for name in encoders if name not in records[0]]
    if missing:
        raise DataError(f"{path}: no column for the live encoder(s) {missing}; its columns are {sorted(records[0])}")
    ids, seen = [], set()
    for n, rec in enumerate(records):
        sid = rec.get("id")
        if sid in (None, ""):
            raise DataError(f"{path}: record #{n} has no id")
        if str(sid) in seen:
            raise DataError(f"{path}: sample id {sid!r} appears twice")
        seen.add(str(sid))
        ids.append(str(sid))
    inputs = {}
    for name in encoders:
        values = [rec.get(name) for rec in records]
        bad = [ids[n] for n, value in enumerate(values) if not isinstance(value, str) or not value]
        if bad:
            raise DataError(f"{path}: column {name!r} holds no path for sample(s) {bad[:5]}")
        inputs[name] = np.array([str(path.parent / value) for value in values], dtype=object)
        if confine is not None:
            outside = [(ids[n], value) for n, value in enumerate(values)
                       if not (path.parent / value).resolve().is_relative_to(Path(confine).resolve())]
            if outside:
                raise DataError(f"{path}: {len(outside)} path(s) of column {name!r} resolve outside --confine "
                                f"{confine}, e.g. sample {outside[0][0]!r} ({outside[0][1]})")
    labelled = np.array([rec.get("labels") not in (None, "", []) for rec in records], dtype=bool)
    domains = np.array([str(rec.get("domain") or "source") for rec in records])
    return StoreRows(ids, inputs, {}, labelled, domains)


def read_inputs(data: str | os.PathLike, stored: Sequence[str], live: Sequence[str] = (),
                raw: str | os.PathLike | None = None, confine: str | os.PathLike | None = None) -> StoreRows:
    """The inputs of an export's encoders: ``data`` a feature store with the ``stored`` encoders' features and
    ``raw`` the manifest of the ``live`` ones (every store sample must be in it), or ``data`` the manifest itself
    when every encoder is live; as ``fusionkit train --data STORE --raw MANIFEST [--confine DIR]`` reads them."""
    if manifest_is_the_data(data, raw, stored):
        return read_manifest_rows(data, live, confine)
    rows = read_store(data, stored)
    if not live:
        if raw is not None:
            raise DataError(f"--raw {raw}: the export has no live encoder to read it")
        return rows
    if raw is None:
        raise DataError(f"encoder(s) {list(live)} read image files: give their manifest with --raw "
                        "(docs/live-encoders.md)")
    manifest = read_manifest_rows(raw, live, confine)
    position = {sid: n for n, sid in enumerate(manifest.ids)}
    absent = [sid for sid in rows.ids if sid not in position]
    if absent:
        raise DataError(f"{raw}: lacks {len(absent)} sample(s) of {data}, e.g. {absent[:5]}; the manifest must list "
                        "every sample of the store")
    take = np.array([position[sid] for sid in rows.ids], dtype=np.int64)
    rows.inputs.update({name: manifest.inputs[name][take] for name in live})
    return rows


def select_rows(rows: StoreRows, split: str) -> np.ndarray:
    """The samples of a ``split``: ``unlabelled``, ``labelled``, ``target`` (the target domain) or ``all``."""
    choices = {"unlabelled": ~rows.labelled, "labelled": rows.labelled, "target": rows.domains == "target",
               "all": np.ones(len(rows.ids), dtype=bool)}
    if split not in choices:
        raise DataError(f"--split {split}: expected one of {', '.join(choices)}")
    chosen = np.flatnonzero(choices[split])
    if len(chosen) == 0:
        raise DataError(f"no {split} samples in the store; choose another --split")
    return chosen
