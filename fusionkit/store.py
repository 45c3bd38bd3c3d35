"""The feature store: pre-extracted features of many encoders for one set of samples.

On disk (see docs/feature-store.md)::

    STORE/
      index.json                 labels, and one record per sample: id, labels, group, fold, domain
      <encoder>.safetensors      "features" [N, D] (vectors), or
                                 "features" [sum T, D] + "offsets" [N + 1] (sequences)

Opening a store checks it: every encoder file present, row counts and sample ids
aligned, feature sizes as the spec says, and no NaN/inf (reported with the sample
ids, or masked when ``nan_policy="mask"``). Feature files are memory-mapped
safetensors; nothing is unpickled.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import attrs
import numpy as np
import torch

from fusionkit.answers import Prediction, to_matrix
from fusionkit.errors import DataError

INDEX_FILE = "index.json"
STORE_FORMAT = "fusionkit-store"
STORE_VERSION = 1


@attrs.frozen
class Sample:
    """One sample's record in the index. ``labels`` is None for unlabelled samples."""

    id: str
    labels: Prediction | None = None
    group: str = ""
    fold: int = -1
    domain: str = "source"


@attrs.define
class EncoderFeatures:
    """One encoder's features: vectors [N, D], or sequences (flat [sum T, D] + offsets [N + 1])."""

    name: str
    data: torch.Tensor
    offsets: torch.Tensor | None
    available: np.ndarray  # [N] bool

    @property
    def is_sequence(self) -> bool:
        return self.offsets is not None

    @property
    def dim(self) -> int:
        return int(self.data.shape[1])

    def rows(self, index: np.ndarray) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The features of the samples ``index``: vectors, or zero-padded sequences and lengths."""
        idx = torch.as_tensor(index, dtype=torch.long)
        if self.offsets is None:
            return self.data.index_select(0, idx), None
        starts, ends = self.offsets[idx], self.offsets[idx + 1]
        lengths = ends - starts
        out = self.data.new_zeros((len(idx), max(int(lengths.max()) if len(idx) else 0, 1), self.dim))
        for row, (s, e) in enumerate(zip(starts.tolist(), ends.tolist())):
            out[row, : e - s] = self.data[s:e]
        return out, lengths


class FeatureStore:
    """An opened, validated feature store."""

    def __init__(self, path: Path, labels: tuple[str, ...], samples: list[Sample], encoders: dict[str, EncoderFeatures]):
        self.path = path
        self.labels = labels
        self.samples = samples
        self.encoders = encoders
        self.ids = [s.id for s in samples]
        self.folds = np.array([s.fold for s in samples], dtype=np.int64)
        self.domains = np.array([s.domain for s in samples])
        self.groups = np.array([s.group for s in samples])
        self.labelled = np.array([s.labels is not None for s in samples])

    def __len__(self) -> int:
        return len(self.samples)

    def truth_matrix(self, index: Sequence[int] | np.ndarray) -> np.ndarray:
        """Salience matrix [n, L] (0-100) of the samples ``index``; they must be labelled."""
        rows = [self.samples[i] for i in index]
        unlabelled = [s.id for s in rows if s.labels is None]
        if unlabelled:
            raise DataError(f"{self.path}: samples without labels where labels are needed: {unlabelled[:5]}")
        return to_matrix([s.labels for s in rows], self.labels)

    def batch(self, index: np.ndarray, names: Iterable[str]) -> tuple[dict, dict, torch.Tensor]:
        """Model inputs for the samples ``index``: (inputs, lengths, mask [n, K])."""
        inputs, lengths, masks = {}, {}, []
        for name in names:
            feats = self.encoders[name]
            x, n = feats.rows(index)
            inputs[name] = x
            if n is not None:
                lengths[name] = n
            masks.append(torch.as_tensor(feats.available[index]))
        return inputs, lengths, torch.stack(masks, dim=1)

    def select(self, *, folds: Iterable[int] | None = None, domain: str | None = None, labelled: bool | None = None) -> np.ndarray:
        """Indices of samples matching every given condition."""
        keep = np.ones(len(self), dtype=bool)
        if folds is not None:
            keep &= np.isin(self.folds, list(folds))
        if domain is not None:
            keep &= self.domains == domain
        if labelled is not None:
            keep &= self.labelled == labelled
        return np.flatnonzero(keep)


def open_store(
    path: str | os.PathLike,
    encoders: Mapping[str, int] | None = None,
    nan_policy: Literal["error", "mask"] = "error",
) -> FeatureStore:
    """Open and validate a store. ``encoders`` maps the names a spec needs to their feature sizes."""
    from safetensors import SafetensorError, safe_open

    root = Path(path)
    index_path = root / INDEX_FILE
    if not index_path.is_file():
        raise DataError(f"{index_path}: missing; is {root} a feature store? (see docs/feature-store.md)")
    try:
        index = json.loads(index_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise DataError(f"{index_path}: not valid JSON ({exc})") from None
    if index.get("format") != STORE_FORMAT or index.get("version") != STORE_VERSION:
        raise DataError(f"{index_path}: not a {STORE_FORMAT} v{STORE_VERSION} index")
    labels = tuple(index["labels"])
    samples = [_sample(rec, i, index_path) for i, rec in enumerate(index["samples"])]
    ids = [s.id for s in samples]
    if len(set(ids)) != len(ids):
        dup = sorted({i for i in ids if ids.count(i) > 1})[:5]
        raise DataError(f"{index_path}: duplicate sample ids {dup}")
    wanted = dict(encoders) if encoders is not None else {n: None for n in index["encoders"]}
    loaded: dict[str, EncoderFeatures] = {}
    for name, dim in wanted.items():
        meta = index["encoders"].get(name)
        if meta is None:
            raise DataError(f"{root}: no encoder {name!r} in {INDEX_FILE}; the store has {sorted(index['encoders'])}")
        file = root / meta["file"]
        if not file.is_file():
            raise DataError(f"{file}: missing feature file of encoder {name!r}")
        try:
            with safe_open(str(file), framework="pt") as fh:
                stored_ids = json.loads((fh.metadata() or {}).get("ids", "null"))
                data = fh.get_tensor("features").float()
                offsets = fh.get_tensor("offsets").long() if "offsets" in fh.keys() else None
        except (SafetensorError, OSError, KeyError) as exc:
            raise DataError(f"{file}: not a readable feature file ({exc})") from None
        if stored_ids is not None and stored_ids != ids:
            raise DataError(f"{file}: its sample ids do not match {INDEX_FILE} (order or content differ); rebuild the store")
        rows = len(offsets) - 1 if offsets is not None else data.shape[0]
        if rows != len(samples):
            raise DataError(f"{file}: {rows} samples, but {INDEX_FILE} lists {len(samples)}")
        if dim is not None and data.shape[1] != dim:
            raise DataError(f"{file}: feature size {data.shape[1]}, but the spec's encoder {name!r} has dim {dim}")
        available = _check_finite(name, file, data, offsets, ids, nan_policy)
        loaded[name] = EncoderFeatures(name, data, offsets, available)
    return FeatureStore(root, labels, samples, loaded)


def _sample(rec: Any, i: int, where: Path) -> Sample:
    try:
        return Sample(id=str(rec["id"]), labels=rec.get("labels"), group=str(rec.get("group", "")),
                      fold=int(rec.get("fold", -1)), domain=str(rec.get("domain", "source")))
    except (TypeError, KeyError, ValueError) as exc:
        raise DataError(f"{where}: sample record #{i} is malformed ({exc}): {rec!r}") from None


def _check_finite(name, file, data, offsets, ids, nan_policy) -> np.ndarray:
    bad_values = ~torch.isfinite(data).all(dim=1)
    if offsets is None:
        bad = bad_values.numpy()
        empty = np.zeros(len(ids), dtype=bool)
    else:
        seq = torch.repeat_interleave(torch.arange(len(ids)), offsets[1:] - offsets[:-1])
        bad = np.zeros(len(ids), dtype=bool)
        bad[seq[bad_values].numpy()] = True
        empty = (offsets[1:] == offsets[:-1]).numpy()
    if bad.any():
        if nan_policy != "mask":
            shown = [ids[i] for i in np.flatnonzero(bad)[:10]]
            raise DataError(
                f"{file}: NaN or inf in the features of {int(bad.sum())} sample(s) of encoder {name!r}, e.g. {shown}. "
                "Fix the features, or set data.nan_policy: mask in the spec to treat them as missing."
            )
        data[bad_values] = 0.0  # masked samples' values are never used; zeros keep arithmetic finite
    return ~(bad | empty)


def write_store(
    path: str | os.PathLike,
    labels: Sequence[str],
    samples: Sequence[Sample],
    features: Mapping[str, np.ndarray | Sequence[np.ndarray]],
    overwrite: bool = False,
) -> Path:
    """Write a store atomically: a [N, D] array per encoder, or a list of N [T_i, D] arrays.

    An existing store at ``path`` is replaced only with ``overwrite=True``.
    """
    from safetensors.torch import save_file

    target = Path(path)
    if target.exists() and not overwrite:
        raise DataError(f"{target}: already exists; pass overwrite=True (or --overwrite) to replace it")
    ids = [s.id for s in samples]
    if len(set(ids)) != len(ids):
        raise DataError("sample ids must be unique")
    for s in samples:
        for entry in s.labels or []:
            if entry["emotion"] not in labels:
                raise DataError(f"sample {s.id!r}: label {entry['emotion']!r} is not one of {list(labels)}")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        enc_index = {}
        for name, value in features.items():
            file = f"{name}.safetensors"
            meta = {"ids": json.dumps(ids)}
            if isinstance(value, np.ndarray) and value.ndim == 2:
                if value.shape[0] != len(ids):
                    raise DataError(f"encoder {name!r}: {value.shape[0]} rows for {len(ids)} samples")
                tensors = {"features": torch.from_numpy(np.ascontiguousarray(value, dtype=np.float32))}
                kind = "vectors"
            else:
                seqs = [np.asarray(v, dtype=np.float32) for v in value]
                if len(seqs) != len(ids):
                    raise DataError(f"encoder {name!r}: {len(seqs)} sequences for {len(ids)} samples")
                lengths = [len(s) for s in seqs]
                offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
                dims = {s.shape[1] for s in seqs if s.ndim == 2 and len(s)}
                if len(dims) != 1:
                    raise DataError(f"encoder {name!r}: sequences must be [T, D] with one D, found sizes {sorted(dims)}")
                flat = np.concatenate([s.reshape(-1, next(iter(dims))) for s in seqs])
                tensors = {"features": torch.from_numpy(flat), "offsets": torch.from_numpy(offsets)}
                kind = "sequences"
            save_file(tensors, str(tmp / file), metadata=meta)
            enc_index[name] = {"file": file, "kind": kind, "dim": int(tensors["features"].shape[1])}
        index = {
            "format": STORE_FORMAT, "version": STORE_VERSION, "labels": list(labels), "encoders": enc_index,
            "samples": [attrs.asdict(s) for s in samples],
        }
        (tmp / INDEX_FILE).write_text(json.dumps(index, indent=1) + "\n", encoding="utf-8")
        if target.exists():
            shutil.rmtree(target)
        os.rename(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target
