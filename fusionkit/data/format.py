"""The feature store's files read and checked with numpy and safetensors alone (docs/feature-store.md): its
``index.json`` and each encoder's feature file. :func:`fusionkit.data.store.open_store` builds its torch store on
them, and the torch-free runtime (:mod:`fusionkit.runtime.store`) reads through them, so both refuse the same
stores with the same words.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from fusionkit.errors import DataError

__all__ = ["INDEX_FILE", "STORE_FORMAT", "STORE_VERSION", "read_index", "feature_file", "read_features"]

INDEX_FILE = "index.json"
STORE_FORMAT = "fusionkit-store"
STORE_VERSION = 1


def read_index(root: str | os.PathLike) -> dict[str, Any]:
    """The store's ``index.json``, checked as a whole: its format and version, labels, encoders (each a plain file
    name inside the store) and sample records (each a mapping with a unique, non-empty string id)."""
    root = Path(root)
    where = root / INDEX_FILE
    if not where.is_file():
        raise DataError(f"{where}: missing; is {root} a feature store? (see docs/feature-store.md)")
    try:
        index = json.loads(where.read_text(encoding="utf-8"))
    except (ValueError, RecursionError) as exc:
        raise DataError(f"{where}: not valid JSON ({str(exc)[:200] or type(exc).__name__})") from None
    except OSError as exc:
        raise DataError(f"{where}: unreadable ({exc.strerror or exc})") from None
    if not isinstance(index, dict) or index.get("format") != STORE_FORMAT or index.get("version") != STORE_VERSION:
        raise DataError(f"{where}: not a {STORE_FORMAT} v{STORE_VERSION} index (its 'format' and 'version' keys)")
    for key, kind in (("labels", list), ("encoders", dict), ("samples", list)):
        if not isinstance(index.get(key), kind):
            raise DataError(f"{where}: '{key}' must be a {'list' if kind is list else 'mapping'}, "
                            f"found {type(index.get(key)).__name__}")
    labels = index["labels"]
    if not labels or not all(isinstance(x, str) and x for x in labels) or len(set(labels)) != len(labels):
        raise DataError(f"{where}: 'labels' must be unique non-empty strings, found {labels[:10]!r}")
    for name, meta in index["encoders"].items():
        file = meta.get("file") if isinstance(meta, dict) else None
        if not isinstance(file, str) or file != Path(file).name or file.startswith(".") or "\\" in file:
            raise DataError(f"{where}: encoder {name!r}: 'file' must be a plain file name inside the store, "
                            f"found {file!r}")
        if not isinstance(meta.get("provenance", {}), dict):
            raise DataError(f"{where}: encoder {name!r}: 'provenance' must be a mapping (what made the features), "
                            f"found {type(meta['provenance']).__name__}")
    seen: set[str] = set()
    for i, rec in enumerate(index["samples"]):
        if not isinstance(rec, dict):
            raise DataError(f"{where}: sample record #{i} must be a mapping, found {type(rec).__name__}")
        sid = rec.get("id")
        if not isinstance(sid, str) or not sid:
            raise DataError(f"{where}: sample record #{i}: 'id' must be a non-empty string, found {sid!r}")
        if sid in seen:
            raise DataError(f"{where}: duplicate sample id {sid!r}; every id must be unique")
        seen.add(sid)
    return index


def feature_file(root: str | os.PathLike, index: dict[str, Any], name: str) -> Path:
    """The feature file of encoder ``name`` (from :func:`read_index`), which must exist."""
    root = Path(root)
    meta = index["encoders"].get(name)
    if meta is None:
        raise DataError(f"{root}: no encoder {name!r} in {INDEX_FILE}; the store has {sorted(index['encoders'])}")
    file = root / meta["file"]
    if not file.is_file():
        raise DataError(f"{file}: missing feature file of encoder {name!r}")
    return file


def read_features(file: Path, name: str, ids: list[str]) -> tuple[np.ndarray, np.ndarray | None]:
    """Encoder ``name``'s ``features`` (float32, ``[N, D]`` or ``[sum T, D]``) and ``offsets`` (int64 ``[N + 1]``,
    or None) from ``file``, checked against the index's sample ``ids``: the ids in its metadata, a 2-D feature
    matrix, offsets that start at 0, never decrease and end at its frames, a row or a sequence per sample."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(file), framework="numpy") as fh:
            raw_ids = (fh.metadata() or {}).get("ids")
            data = fh.get_tensor("features")
            offsets = fh.get_tensor("offsets") if "offsets" in fh.keys() else None
    except (SafetensorError, OSError, KeyError, ValueError, TypeError) as exc:
        raise DataError(f"{file}: not a readable feature file of encoder {name!r} ({str(exc)[:200]})") from None
    try:
        stored_ids = json.loads(raw_ids) if raw_ids is not None else None
    except (ValueError, RecursionError):
        stored_ids = None
    if stored_ids is None:
        raise DataError(f"{file}: no sample ids in its metadata ('ids'); rebuild the store with write_store")
    if stored_ids != ids:
        raise DataError(f"{file}: its sample ids do not match {INDEX_FILE} (order or content differ); rebuild the store")
    if data.ndim != 2 or data.dtype.kind not in "fiu":
        raise DataError(f"{file}: 'features' must be 2-D numbers ([N, D] or [sum T, D]), found "
                        f"{data.dtype} {tuple(data.shape)}")
    data = data.astype(np.float32, copy=False)
    if offsets is not None:
        if offsets.ndim != 1 or offsets.dtype.kind not in "iu" or len(offsets) < 1:
            raise DataError(f"{file}: 'offsets' must be a 1-D integer tensor [N + 1], found {offsets.dtype} "
                            f"{tuple(offsets.shape)}")
        offsets = offsets.astype(np.int64)
        if int(offsets[0]) != 0 or int(offsets[-1]) != len(data) or bool((np.diff(offsets) < 0).any()):
            raise DataError(f"{file}: 'offsets' must start at 0, never decrease and end at the {len(data)} frames of "
                            f"'features'; found {offsets[:3].tolist()} ... {offsets[-1:].tolist()}")
    rows = len(offsets) - 1 if offsets is not None else len(data)
    if rows != len(ids):
        raise DataError(f"{file}: {rows} samples, but {INDEX_FILE} lists {len(ids)}")
    return data, offsets
