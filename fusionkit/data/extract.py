"""``fusionkit extract``: run a spec's live encoders, frozen and in eval mode, over a raw dataset and
write a feature store.

Work happens in ``OUT.partial/`` beside the store: samples are cut into shards of whole
batches, and each finished shard is one safetensors file written atomically (temporary file,
then rename). A killed extraction therefore resumes at the first missing shard; the store itself
appears at ``OUT`` only at the end, in one directory rename, and the partial folder is removed
after. Batches are the same on every run (fixed shard boundaries), so a repeated extraction gives
byte-identical files.

The store's index records each encoder's provenance: plugin, distribution and version, its
options, the model, the SHA-256 of its weights (as loaded) and its preprocessing.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fusionkit.data.raw import RawManifest, load_batches, read_manifest
from fusionkit.data.store import check_store_target, write_store
from fusionkit.errors import DataError, FusionkitError
from fusionkit.files import (
    atomic_write,
    atomic_write_text,
    exclusive_lock,
    json_marker,
    make_temp_dir,
    remove_temporaries,
)
from fusionkit.hardware.devices import resolve_device
from fusionkit.hardware.distributed import Dist, setup
from fusionkit.interfaces import LiveEncoder
from fusionkit.models.factory import build_model
from fusionkit.plugins import get_registry
from fusionkit.progress import progress_bar
from fusionkit.spec import Spec, load_spec, spec_differences

__all__ = ["PARTIAL_FORMAT", "PARTIAL_MARKER", "is_partial", "weights_sha256", "provenance", "extract"]

PARTIAL_FORMAT = "fusionkit-extract"
PARTIAL_MARKER = "extract.json"
is_partial = json_marker(PARTIAL_MARKER, "format", (PARTIAL_FORMAT,))


def weights_sha256(module: torch.nn.Module) -> str:
    """SHA-256 of a module's weights and buffers as loaded (names, shapes, dtypes and bytes, in name order)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        value = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{tuple(value.shape)}:{value.dtype}".encode())
        digest.update(value.reshape(-1).view(torch.uint8).numpy().tobytes() if value.numel() else b"")
    return digest.hexdigest()


def provenance(spec: Spec, encoders: Mapping[str, LiveEncoder]) -> dict[str, dict[str, Any]]:
    """Each live encoder's provenance record, as the store's index keeps it."""
    registry = get_registry()
    blocks = {e.name: e for e in spec.encoders}
    out = {}
    for name, encoder in encoders.items():
        block = blocks[name]
        provider = registry.get("encoder", block.type).provider
        record = {"type": block.type, "plugin": provider.plugin, "distribution": provider.distribution,
                  "version": provider.version, "options": spec.to_dict()["encoders"][spec.encoders.index(block)],
                  **encoder.provenance(), "weights_sha256": weights_sha256(encoder)}
        out[name] = json.loads(json.dumps(record, default=str))  # plain JSON, as the index stores it
    return out


def extract(spec: Spec | Mapping[str, Any] | str, data: str | os.PathLike, out: str | os.PathLike, *,
            batch_size: int = 32, device: str = "auto", workers: int = 2, shard_batches: int = 8,
            overwrite: bool = False, progress: bool = True, confine: str | os.PathLike | None = None) -> Path:
    """Extract the spec's live encoders over the manifest ``data`` into a feature store at ``out``.

    ``out`` must be new, empty, or (with ``overwrite``) a fusionkit store. An interrupted
    extraction into the same ``out`` with the same spec, manifest, batch size and device resumes.
    With ``confine``, every input path of the manifest must resolve inside that folder.
    Returns the store's path.
    """
    spec = load_spec(spec)
    target = Path(out)
    check_store_target(target, overwrite)  # before any work: nothing is computed for an output we may not write
    if batch_size < 1 or shard_batches < 1 or workers < 0:
        raise FusionkitError(f"--batch-size and shard_batches must be >= 1 and --workers >= 0, found {batch_size}, "
                             f"{shard_batches} and {workers}")
    dist = setup()  # under torchrun: every rank extracts its share of the shards, rank 0 assembles the store
    device = resolve_device(device, "--device", dist.local_rank if dist.enabled else None)
    manifest = read_manifest(data, spec.labels, confine)
    with torch.random.fork_rng(devices=[]):  # random initial weights follow train.seed; the caller's RNG is untouched
        torch.manual_seed(spec.train.seed)
        model = build_model(spec)
    encoders = model.live_encoders()
    if not encoders:
        raise FusionkitError("the spec has no live encoders to extract (an encoder of a type such as timm or hf)")
    manifest.check_encoders(encoders)
    for encoder in encoders.values():
        encoder.eval().requires_grad_(False).to(device)
    identity = {"manifest": str(Path(data).resolve()), "manifest_sha256": manifest.fingerprint(),
                "batch_size": batch_size, "shard_batches": shard_batches, "device": device.type,
                "provenance": provenance(spec, encoders)}
    partial = _partial_dir(target, identity) if dist.is_main else target.parent / f"{target.name}.partial"
    busy = f"Wait for that extraction into {target} to end, or choose another --out."
    with exclusive_lock(partial, "extraction", busy) if dist.is_main else contextlib.nullcontext():
        if dist.is_main:
            remove_temporaries(partial)
            try:  # again: an extraction that held the lock may have written the store meanwhile
                check_store_target(target, overwrite)
            except FusionkitError:
                if not any(partial.glob("shard-*")):
                    shutil.rmtree(partial)  # made by this call a moment ago, and empty
                raise
        dist.barrier()  # rank 0 holds the partial folder's lock and has cleaned it
        _extract_shards(manifest, encoders, partial, batch_size, shard_batches, device, workers,
                        progress and dist.is_main, dist)
        dist.barrier()  # every shard is written
        if dist.is_main:
            features = _assemble(partial, _shards(len(manifest), batch_size * shard_batches), list(encoders), manifest)
            write_store(target, spec.labels, manifest.samples, features, overwrite=True,
                        provenance=identity["provenance"])
            if is_partial(partial):
                shutil.rmtree(partial)
    dist.close()
    return target


def _shards(n: int, shard_rows: int) -> list[np.ndarray]:
    """The manifest rows of each shard: fixed boundaries, the same on every run."""
    return [np.arange(start, min(start + shard_rows, n)) for start in range(0, n, shard_rows)]


def _extract_shards(manifest: RawManifest, encoders: Mapping[str, LiveEncoder], partial: Path, batch_size: int,
                    shard_batches: int, device: torch.device, workers: int, progress: bool, dist: Dist) -> None:
    """Write every shard of this rank (shard k belongs to rank k mod world size) not yet in ``partial``."""
    shards = _shards(len(manifest), batch_size * shard_batches)
    todo = [k for k in range(len(shards)) if k % dist.world_size == dist.rank and not (partial / _shard_name(k)).is_file()]
    mine = sum(len(rows) for k, rows in enumerate(shards) if k % dist.world_size == dist.rank)
    bar = progress_bar(enabled=progress, desc="extract", unit="sample", total=mine,
                       initial=mine - sum(len(shards[k]) for k in todo))
    batches = [rows[i: i + batch_size] for k in todo for rows in [shards[k]] for i in range(0, len(rows), batch_size)]
    pending: dict[int, list] = {}
    shard_of = {int(r): k for k in todo for r in shards[k]}
    with torch.inference_mode():  # frozen backbones: no autograd bookkeeping at all
        for rows, inputs, lengths in load_batches(manifest, encoders, batches, workers):
            k = shard_of[rows[0]]
            pending.setdefault(k, []).append(_embed(encoders, inputs, lengths, device, manifest, rows))
            if sum(len(b["rows"]) for b in pending[k]) == len(shards[k]):
                _write_shard(partial / _shard_name(k), pending.pop(k), manifest)
            bar.update(len(rows))
    bar.close()


def _partial_dir(target: Path, identity: dict[str, Any]) -> Path:
    """The folder of finished shards: new, or an interrupted extraction of the same identity (resumed)."""
    partial = target.parent / f"{target.name}.partial"
    if not partial.exists() or (partial.is_dir() and not partial.is_symlink() and not any(partial.iterdir())):
        # Made complete beside it, then renamed into place: of two extractions starting together one creates it,
        # and no half-made folder is ever left (an empty one, left by an older fusionkit, is replaced).
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = make_temp_dir(target.parent, partial.name)
        atomic_write_text(tmp / PARTIAL_MARKER, json.dumps({"format": PARTIAL_FORMAT, "identity": identity}, indent=1))
        try:
            os.rename(tmp, partial)
        except OSError:
            shutil.rmtree(tmp, ignore_errors=True)  # another extraction made it first: checked below
    if partial.exists():
        if not is_partial(partial):
            raise FusionkitError(f"{partial}: exists and is not an extraction in progress made by fusionkit; "
                                 "move it away or choose another output path")
        started = json.loads((partial / PARTIAL_MARKER).read_text(encoding="utf-8"))["identity"]
        diffs = spec_differences(started, identity)
        if diffs:
            raise FusionkitError(f"{partial}: an interrupted extraction of other inputs ({'; '.join(diffs[:5])}); "
                                 f"rerun it as it was to resume, or remove {partial} to start over")
    return partial


def _shard_name(k: int) -> str:
    return f"shard-{k:05d}.safetensors"


def _to(x: Any, device: torch.device) -> Any:
    if torch.is_tensor(x):
        return x.to(device)
    if isinstance(x, Mapping):
        return {k: _to(v, device) for k, v in x.items()}
    return x


def _embed(encoders, inputs, lengths, device, manifest: RawManifest, rows) -> dict[str, Any]:
    out: dict[str, Any] = {"rows": rows}
    for name, encoder in encoders.items():
        y, n = encoder.embed(_to(inputs[name], device), _to(lengths.get(name), device))
        y = y.float().cpu()
        if not bool(torch.isfinite(y).all()):
            bad = [manifest.ids[r] for r, ok in zip(rows, torch.isfinite(y).flatten(1).all(1).tolist()) if not ok]
            raise DataError(f"encoder {name!r} gave NaN or inf features for sample(s) {bad[:5]}; nothing was written "
                            "for their shard")
        out[name] = y if n is None else [y[i, : int(t)] for i, t in enumerate(n.cpu())]
    return out


def _write_shard(path: Path, batches: list[dict[str, Any]], manifest: RawManifest) -> None:
    from safetensors.torch import save_file

    rows = [r for b in batches for r in b["rows"]]
    tensors = {}
    for name in [k for k in batches[0] if k != "rows"]:
        parts = [b[name] for b in batches]
        if isinstance(parts[0], torch.Tensor):
            tensors[f"{name}.features"] = torch.cat(parts).contiguous()
        else:
            frames = [f for part in parts for f in part]
            tensors[f"{name}.features"] = torch.cat(frames).contiguous()
            tensors[f"{name}.offsets"] = torch.tensor(np.concatenate([[0], np.cumsum([len(f) for f in frames])]))
    meta = {"ids": json.dumps([manifest.ids[r] for r in rows])}
    atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=meta))


def _assemble(partial: Path, shards: list[np.ndarray], names: list[str], manifest: RawManifest) -> dict[str, Any]:
    """Every shard's features joined: ``[N, D]`` per vector encoder, N ``[T, D]`` arrays per sequence encoder.

    Each shard is checked before it is used: readable, holding the sample ids of its rows in order, and one
    feature row (or one offset span) per sample for every encoder. A damaged or foreign shard is refused by
    name; removing it makes the next run extract it again.
    """
    from safetensors import SafetensorError, safe_open

    parts: dict[str, list] = {name: [] for name in names}
    for k, rows in enumerate(shards):
        file = partial / _shard_name(k)
        fix = f"remove {file} and run the same command again to extract it anew"
        try:
            with safe_open(str(file), framework="pt") as fh:
                ids = json.loads((fh.metadata() or {}).get("ids", "null"))
                expected = [manifest.ids[int(r)] for r in rows]
                if ids != expected:
                    raise DataError(f"{file}: holds other samples than shard {k} of this manifest (its ids "
                                    f"{str(ids)[:80]}, expected {str(expected)[:80]}); {fix}")
                for name in names:
                    data = fh.get_tensor(f"{name}.features").numpy()
                    if f"{name}.offsets" in fh.keys():
                        offsets = fh.get_tensor(f"{name}.offsets").numpy()
                        if len(offsets) != len(rows) + 1 or offsets[0] != 0 or offsets[-1] != len(data) or (
                                np.diff(offsets) < 0).any():
                            raise DataError(f"{file}: encoder {name!r}: offsets do not span {len(rows)} samples "
                                            f"over {len(data)} frames; {fix}")
                        parts[name].append([data[a:b] for a, b in zip(offsets[:-1], offsets[1:])])
                    else:
                        if len(data) != len(rows):
                            raise DataError(f"{file}: encoder {name!r}: {len(data)} feature rows for {len(rows)} "
                                            f"samples; {fix}")
                        parts[name].append(data)
        except (SafetensorError, OSError, ValueError, KeyError) as exc:
            raise DataError(f"{file}: unreadable or incomplete shard ({type(exc).__name__}: {exc}); {fix}") from None
    return {name: (np.concatenate(p) if isinstance(p[0], np.ndarray) else [s for chunk in p for s in chunk])
            for name, p in parts.items()}
