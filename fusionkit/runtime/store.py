"""A feature store (docs/feature-store.md) read with numpy and safetensors alone, as an export's inputs."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from safetensors import SafetensorError, safe_open

from fusionkit.errors import DataError

__all__ = ["StoreRows", "read_store", "select_rows"]


@dataclass
class StoreRows:
    """The rows of a store that an export reads: ``ids``, each encoder's ``inputs`` (``[N, D]`` vectors, or frames
    padded to ``[N, T, D]`` with ``lengths``), and per sample whether it is labelled and its domain."""

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
    """The samples of the store at ``path`` with the features of ``encoders`` (memory-mapped through safetensors;
    nothing is unpickled). Errors name the file at fault."""
    root = Path(path)
    index_path = root / "index.json"
    try:
        index = json.loads(index_path.read_text(encoding="utf-8"))
        samples = index["samples"]
        ids = [str(s["id"]) for s in samples]
    except FileNotFoundError:
        raise DataError(f"{index_path}: missing; is {root} a feature store (docs/feature-store.md)?") from None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise DataError(f"{index_path}: not a readable store index ({str(exc)[:200]})") from None
    inputs, lengths = {}, {}
    for name in encoders:
        meta = index.get("encoders", {}).get(name)
        if meta is None:
            raise DataError(f"{root}: no encoder {name!r} in index.json; the store has {sorted(index.get('encoders', {}))}")
        file = root / meta["file"]
        try:
            with safe_open(str(file), framework="numpy") as fh:
                if json.loads((fh.metadata() or {}).get("ids", "null")) not in (None, ids):
                    raise DataError(f"{file}: its sample ids differ from index.json's; the files come from different "
                                    "builds")
                data = fh.get_tensor("features").astype(np.float32)
                offsets = fh.get_tensor("offsets") if "offsets" in fh.keys() else None
        except (SafetensorError, OSError, KeyError, ValueError) as exc:
            raise DataError(f"{file}: not a readable feature file of encoder {name!r} ({str(exc)[:200]})") from None
        if offsets is None:
            if len(data) != len(ids):
                raise DataError(f"{file}: {len(data)} rows for {len(ids)} samples")
            inputs[name] = data
            continue
        steps = np.diff(offsets).astype(np.int64)
        if len(steps) != len(ids) or (steps < 0).any():
            raise DataError(f"{file}: offsets do not describe {len(ids)} sequences")
        frames = np.zeros((len(ids), max(int(steps.max(initial=1)), 1), data.shape[1]), dtype=np.float32)
        for i, (start, count) in enumerate(zip(offsets[:-1], steps)):
            frames[i, :count] = data[start:start + count]
        inputs[name], lengths[name] = frames, steps
    labelled = np.array([s.get("labels") is not None for s in samples], dtype=bool)
    domains = np.array([str(s.get("domain", "source")) for s in samples])
    return StoreRows(ids, inputs, lengths, labelled, domains)


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
