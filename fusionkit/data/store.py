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

import collections
import json
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, Protocol

import attrs
import numpy as np
import torch

from fusionkit.blemore.answers import to_matrix
from fusionkit.data.format import INDEX_FILE, STORE_FORMAT, STORE_VERSION, feature_file, read_features, read_index
from fusionkit.errors import DataError, FusionkitError
from fusionkit.files import apply_umask, check_replaceable, json_marker, write_directory
from fusionkit.hardware.devices import device_of, to_device
from fusionkit.interfaces import DOMAINS, DeferredInput, Sample  # noqa: F401 - DOMAINS, Sample: their public home is interfaces
from fusionkit.pooling import stats7
from fusionkit.spec import encoder_name_problem

__all__ = ["INDEX_FILE", "STORE_FORMAT", "STORE_VERSION", "is_store", "ModelInputs", "EncoderFeatures", "FeatureStore",
           "open_store", "check_samples", "sample_from_record", "check_store_target", "target_rows", "write_store"]

#: A directory is a fusionkit store when its index names the store format.
is_store = json_marker(INDEX_FILE, "format", (STORE_FORMAT,))


class ModelInputs(Protocol):
    """What a store asks of a model to assemble its inputs (fusion and two-tower models have it)."""

    encoder_names: list[str]

    def precomputed_pooling(self) -> dict[str, str]: ...

    def live_encoders(self) -> dict[str, Any]: ...


@attrs.define
class EncoderFeatures:
    """One encoder's features: vectors [N, D], or sequences (flat [sum T, D] + offsets [N + 1])."""

    name: str
    data: torch.Tensor
    offsets: torch.Tensor | None
    available: np.ndarray  # [N] bool
    _pooled: dict[str, torch.Tensor] = attrs.field(factory=dict, repr=False)

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
        starts, lengths = self.offsets[idx], self.offsets[idx + 1] - self.offsets[idx]
        steps = torch.arange(max(int(lengths.max()) if len(idx) else 0, 1))
        frames = starts.unsqueeze(1) + steps  # [n, T]: each sample's frame positions, one gather for all
        valid = steps < lengths.unsqueeze(1)
        if len(self.data) == 0:  # every selected sequence is empty
            return self.data.new_zeros((len(idx), len(steps), self.dim)), lengths
        out = self.data[frames.clamp(max=len(self.data) - 1)]
        return out.masked_fill_(~valid.unsqueeze(-1), 0.0), lengths

    def pooled(self, index: np.ndarray, kind: str) -> torch.Tensor:
        """Each sample's sequence pooled by ``kind`` (``stats7``) of its raw frames: computed once for
        every sample on first use, then read from memory."""
        if kind not in self._pooled:
            parts = []
            with torch.no_grad():
                for start in range(0, len(self.available), 256):
                    x, lengths = self.rows(np.arange(start, min(start + 256, len(self.available))))
                    parts.append(stats7(x, lengths))
            self._pooled[kind] = torch.cat(parts)
        return self._pooled[kind].index_select(0, torch.as_tensor(index, dtype=torch.long))


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
        #: Encoder name -> what made its features (``fusionkit extract`` records it), from the index.
        self.provenance: dict[str, dict[str, Any]] = {}
        #: The raw inputs of live encoders (a :class:`~fusionkit.data.raw.RawManifest`), and each sample's row in it.
        self.raw: Any = None
        self.raw_rows: np.ndarray | None = None

    def attach_raw(self, manifest: Any, rows: np.ndarray) -> None:
        """Give live encoders their raw inputs: ``rows[i]`` is sample i's row in ``manifest``."""
        self.raw, self.raw_rows = manifest, rows

    def check_inputs(self, model: Any) -> None:
        """Every input the model reads is here: its live encoders' manifest columns and files (stored features
        are checked when the store is opened for a spec)."""
        if self.raw is not None:
            self.raw.check_encoders(model.live_encoders())

    def __len__(self) -> int:
        return len(self.samples)

    def truth_matrix(self, index: Sequence[int] | np.ndarray) -> np.ndarray:
        """Salience matrix [n, L] (0-100) of the samples ``index``; they must be labelled."""
        rows = [self.samples[i] for i in index]
        unlabelled = [s.id for s in rows if s.labels is None]
        if unlabelled:
            raise DataError(f"{self.path}: samples without labels where labels are needed: {unlabelled[:5]}")
        return to_matrix([s.labels for s in rows], self.labels)

    def batch(self, index: np.ndarray, names: Iterable[str],
              pooled: Mapping[str, str] | None = None) -> tuple[dict, dict, torch.Tensor]:
        """Model inputs for the samples ``index``: (inputs, lengths, mask [n, K]).

        ``pooled`` maps names of sequence encoders to a pooling computed here once per sample
        (see :meth:`EncoderFeatures.pooled`) instead of in the model every step.
        """
        inputs, lengths, masks = {}, {}, []
        for name in names:
            feats = self.encoders[name]
            if feats.is_sequence and pooled and name in pooled:
                inputs[name] = feats.pooled(index, pooled[name])
            else:
                x, n = feats.rows(index)
                inputs[name] = x
                if n is not None:
                    lengths[name] = n
            masks.append(torch.as_tensor(feats.available[index]))
        mask = torch.stack(masks, dim=1) if masks else torch.ones((len(index), 0), dtype=torch.bool)
        return inputs, lengths, mask

    def inputs_for(self, model: ModelInputs, index: np.ndarray,
                   defer: Sequence[str] = ()) -> tuple[dict, dict, torch.Tensor]:
        """A model's inputs for the samples ``index``, on the model's device, pooling fixed sequences once per
        sample where the model's encoders allow it (``model.precomputed_pooling()``).

        ``defer``: live encoders (on-demand ones, ``model.deferrable_inputs()``) whose inputs are read only when the
        model asks for some rows: each is a :class:`~fusionkit.interfaces.DeferredInput`, and no file of a row the
        model does not run it on is opened."""
        device = device_of(model)
        live = model.live_encoders()
        unknown = [name for name in defer if name not in live]
        if unknown:
            raise DataError(f"defer: {unknown} are not live encoders of the model (live: {sorted(live)})")
        inputs, lengths, mask = to_device(self._cpu_inputs(model, index, set(defer)), device)
        for name in defer:
            inputs[name] = self.deferred_input(model, index, name)
        return inputs, lengths, mask

    def deferred_input(self, model: ModelInputs, index: np.ndarray, name: str) -> DeferredInput:
        """The live encoder ``name``'s input for the samples ``index``, read (on the model's device) only for the
        rows asked for: what :meth:`inputs_for` hands over for a deferred encoder, alone."""
        live = model.live_encoders()
        if name not in live:
            raise DataError(f"{name!r} is not a live encoder of the model (live: {sorted(live)})")
        encoder, device = live[name], device_of(model)

        def load(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
            x, lengths = to_device(self.raw.batch(self.raw_rows[index[rows.cpu().numpy()]], {name: encoder}), device)
            return x[name], lengths.get(name)

        return DeferredInput(load)

    def _cpu_inputs(self, model: ModelInputs, index: np.ndarray, deferred: set[str]) -> tuple[dict, dict, torch.Tensor]:
        pooled, live = model.precomputed_pooling(), model.live_encoders()
        stored = [n for n in model.encoder_names if n not in live]
        inputs, lengths, mask = self.batch(index, stored, pooled)
        if not live:
            return inputs, lengths, mask
        if self.raw is None:
            raise DataError(f"{self.path}: encoder(s) {sorted(live)} are live and read raw inputs: give the "
                            "manifest (--raw MANIFEST, or a manifest as the data)")
        now = {name: encoder for name, encoder in live.items() if name not in deferred}
        if now:
            raw_inputs, raw_lengths = self.raw.batch(self.raw_rows[index], now)
            inputs, lengths = {**inputs, **raw_inputs}, {**lengths, **raw_lengths}
        columns = {name: mask[:, k] for k, name in enumerate(stored)}
        full = torch.ones(len(index), dtype=torch.bool)
        mask = torch.stack([columns.get(name, full) for name in model.encoder_names], dim=1)
        return inputs, lengths, mask

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
    root = Path(path)
    index_path = root / INDEX_FILE
    index = read_index(root)
    labels, samples = _check_index(index, index_path)
    ids = [s.id for s in samples]
    wanted = dict(encoders) if encoders is not None else {n: None for n in index["encoders"]}
    loaded: dict[str, EncoderFeatures] = {}
    for name, dim in wanted.items():
        file = feature_file(root, index, name)
        array, flat_offsets = read_features(file, name, ids)
        data = torch.from_numpy(array)
        offsets = None if flat_offsets is None else torch.from_numpy(flat_offsets)
        if dim is not None and data.shape[1] != dim:
            raise DataError(f"{file}: feature size {data.shape[1]}, but the spec's encoder {name!r} has dim {dim}")
        available = _check_finite(name, file, data, offsets, ids, nan_policy)
        loaded[name] = EncoderFeatures(name, data, offsets, available)
    store = FeatureStore(root, labels, samples, loaded)
    store.provenance = {name: meta["provenance"] for name, meta in index["encoders"].items() if "provenance" in meta}
    return store


def _check_index(index: dict[str, Any], where: Path) -> tuple[tuple[str, ...], list[Sample]]:
    """What a torch store checks of an index beyond its format (:func:`fusionkit.data.format.read_index`): the
    encoders' names and each sample's record; returns the labels and samples."""
    labels = index["labels"]
    for name in index["encoders"]:
        why = encoder_name_problem(name)
        if why:
            raise DataError(f"{where}: encoder {name!r}: {why}")
    samples = [sample_from_record(rec, i, where, tuple(labels)) for i, rec in enumerate(index["samples"])]
    check_samples(samples, where)
    return tuple(labels), samples


def check_samples(samples: Sequence[Sample], where: Any) -> None:
    """Sample ids are unique and folds are group-disjoint (``where`` names the file in errors)."""
    counts = collections.Counter(s.id for s in samples)
    if len(counts) != len(samples):
        dup = sorted(i for i, n in counts.items() if n > 1)
        raise DataError(f"{where}: duplicate sample ids {dup[:5]} ({len(dup)} in all); every id must be unique")
    fold_of: dict[str, int] = {}
    for s in samples:
        if s.fold < 0 or not s.group:
            continue
        if fold_of.setdefault(s.group, s.fold) != s.fold:
            raise DataError(f"{where}: group {s.group!r} lies in folds {fold_of[s.group]} and {s.fold} (e.g. sample "
                            f"{s.id!r}); folds must be group-disjoint so that no group is trained and tested on")


def sample_from_record(rec: Any, i: int, where: Any, labels: tuple[str, ...]) -> Sample:
    """A validated :class:`Sample` from one index or manifest record (``i`` its position, for errors)."""
    if not isinstance(rec, dict):
        raise DataError(f"{where}: sample record #{i} must be a mapping, found {type(rec).__name__}")
    sid, fold = rec.get("id"), rec.get("fold", -1)
    if not isinstance(sid, str) or not sid:
        raise DataError(f"{where}: sample record #{i}: 'id' must be a non-empty string, found {sid!r}")
    if isinstance(fold, bool) or not isinstance(fold, int):
        raise DataError(f"{where}: sample {sid!r}: 'fold' must be an integer (-1: none), found {fold!r}")
    for key in ("group", "domain"):
        if not isinstance(rec.get(key, ""), str):
            raise DataError(f"{where}: sample {sid!r}: '{key}' must be a string, found {rec.get(key)!r}")
    if rec.get("domain", "source") not in DOMAINS:
        raise DataError(f"{where}: sample {sid!r} (record #{i}): domain {rec['domain']!r} is not one of {list(DOMAINS)} "
                        "(lower case); write source for labelled training data, target for the unlabelled domain")
    answer = rec.get("labels")
    if answer is not None:
        why = _prediction_problem(answer, labels)
        if why:
            raise DataError(f"{where}: sample {sid!r}: labels {why}")
    corrupted = rec.get("corrupted", [])
    if not isinstance(corrupted, (list, tuple)) or not all(isinstance(name, str) for name in corrupted):
        raise DataError(f"{where}: sample {sid!r}: 'corrupted' must be a list of encoder names, found {corrupted!r}")
    return Sample(id=sid, labels=answer, group=rec.get("group", ""), fold=fold, domain=rec.get("domain", "source"),
                  corrupted=corrupted)


def _prediction_problem(answer: Any, labels: Sequence[str]) -> str | None:
    """Why ``answer`` is not a valid BlEmoRE answer over ``labels``, or None."""
    if not isinstance(answer, list) or len(answer) not in (1, 2):
        return f"must be a list of one or two {{emotion, salience}} entries, found {answer!r}"
    for entry in answer:
        if not isinstance(entry, dict) or set(entry) != {"emotion", "salience"}:
            return f"entries must be {{emotion, salience}}, found {entry!r}"
        if entry["emotion"] not in labels:
            return f"name {entry['emotion']!r}, which is not one of {list(labels)}"
        sal = entry["salience"]
        if isinstance(sal, bool) or not isinstance(sal, (int, float)) or not math.isfinite(sal) or sal < 0:
            return f"need finite saliences >= 0, found {sal!r}"
    if len(answer) == 2 and answer[0]["emotion"] == answer[1]["emotion"]:
        return f"name {answer[0]['emotion']!r} twice"
    if abs(sum(e["salience"] for e in answer) - 100.0) > 1e-3:
        return f"saliences must sum to 100, found {[e['salience'] for e in answer]}"
    return None


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
        # masked samples' values are never used; zeros keep arithmetic finite. A sequence with one bad frame is
        # zeroed whole, as the runtime's reader does, so that both give its (unused) token the same input
        data[bad_values if offsets is None else torch.as_tensor(bad)[seq]] = 0.0
    return ~(bad | empty)


def _feature_tensors(name: str, value: np.ndarray | Sequence[np.ndarray], rows: int
                     ) -> tuple[dict[str, torch.Tensor], str]:
    """One encoder's features as the store's file holds them (``features``, and ``offsets`` for sequences), and
    their kind: ``vectors`` from an ``[N, D]`` array, ``sequences`` from N ``[T_i, D]`` arrays."""
    if isinstance(value, np.ndarray) and value.ndim == 2:
        if value.shape[0] != rows:
            raise DataError(f"encoder {name!r}: {value.shape[0]} rows for {rows} samples")
        return {"features": torch.from_numpy(np.ascontiguousarray(value, dtype=np.float32))}, "vectors"
    seqs = [np.asarray(v, dtype=np.float32) for v in value]
    if len(seqs) != rows:
        raise DataError(f"encoder {name!r}: {len(seqs)} sequences for {rows} samples")
    offsets = np.concatenate([[0], np.cumsum([len(s) for s in seqs])]).astype(np.int64)
    dims = {s.shape[1] for s in seqs if s.ndim == 2 and len(s)}
    if len(dims) != 1:
        raise DataError(f"encoder {name!r}: sequences must be [T, D] with one D, found sizes {sorted(dims)}")
    flat = np.concatenate([s.reshape(-1, next(iter(dims))) for s in seqs])
    return {"features": torch.from_numpy(flat), "offsets": torch.from_numpy(offsets)}, "sequences"


def check_store_target(target: Path, overwrite: bool) -> None:
    """A store may be written at ``target``: it is new or an empty directory, or (``overwrite``) a fusionkit store."""
    if target.exists() and not overwrite and not (target.is_dir() and not any(target.iterdir())):
        raise DataError(f"{target}: already exists; pass overwrite=True (or --overwrite) to replace it")
    try:
        check_replaceable(target, "feature store", is_store)
    except FusionkitError as exc:
        raise DataError(str(exc)) from None


def target_rows(store: FeatureStore, target_store: FeatureStore | None = None) -> tuple[FeatureStore, np.ndarray]:
    """The unlabelled target rows for adaptation and per-domain statistics: every row of a separate target
    store, or the rows of ``store`` whose domain is "target" (labels are not read)."""
    if target_store is not None:
        return target_store, np.arange(len(target_store))
    return store, store.select(domain="target")


def write_store(
    path: str | os.PathLike,
    labels: Sequence[str],
    samples: Sequence[Sample],
    features: Mapping[str, np.ndarray | Sequence[np.ndarray]],
    overwrite: bool = False,
    provenance: Mapping[str, Mapping[str, Any]] | None = None,
) -> Path:
    """Write a store atomically: a [N, D] array per encoder, or a list of N [T_i, D] arrays.

    ``provenance`` maps encoder names to a JSON record of what made their features (``fusionkit
    extract`` writes one per live encoder); the index keeps it.

    An existing store at ``path`` is replaced only with ``overwrite=True``, and only when it
    is a fusionkit store (or an empty directory): nothing else is ever deleted.
    """
    from safetensors.torch import save_file

    target = Path(path)
    check_store_target(target, overwrite)
    ids = [s.id for s in samples]
    if len(set(ids)) != len(ids):
        raise DataError("sample ids must be unique")
    for name in features:
        why = encoder_name_problem(name)
        if why:
            raise DataError(f"encoder {name!r}: {why} (it names a file in the store)")
    for s in samples:
        why = None if s.labels is None else _prediction_problem(s.labels, labels)
        if why:
            raise DataError(f"sample {s.id!r}: labels {why}")

    def fill(tmp: Path) -> None:
        enc_index = {}
        for name, value in features.items():
            file = f"{name}.safetensors"
            meta = {"ids": json.dumps(ids)}
            tensors, kind = _feature_tensors(name, value, len(ids))
            save_file(tensors, str(tmp / file), metadata=meta)
            apply_umask(tmp / file)
            enc_index[name] = {"file": file, "kind": kind, "dim": int(tensors["features"].shape[1])}
            if provenance and name in provenance:
                enc_index[name]["provenance"] = dict(provenance[name])
        index = {
            "format": STORE_FORMAT, "version": STORE_VERSION, "labels": list(labels), "encoders": enc_index,
            "samples": [attrs.asdict(s, filter=lambda a, v: a.name != "corrupted" or bool(v)) for s in samples],
        }
        (tmp / INDEX_FILE).write_text(json.dumps(index, indent=1) + "\n", encoding="utf-8")
        _check_index(index, tmp / INDEX_FILE)

    return write_directory(target, fill)
