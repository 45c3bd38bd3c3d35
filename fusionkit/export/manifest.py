"""An export's manifest and files, read and checked in one place, without torch: what the writer
(:mod:`fusionkit.export.graphs`) recognises as its own before replacing a folder, and what the runtime reads
before it runs a graph.

Every key the runtime reads is checked here (its type, its range, and how it agrees with the others), so a tampered
manifest is refused in one line that names the key; and every file the export holds is resolved inside the folder,
never through a symbolic link, and covered by a SHA-256 of the manifest.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from pathlib import Path
from typing import Any

from fusionkit.errors import FusionkitError
from fusionkit.files import describe_contents, sha256_file

__all__ = ["EXPORT_FORMAT", "MANIFEST_FILE", "MANIFEST_LIMIT", "DECODERS", "SCOUTS", "GRAPH_IO", "graph_io",
           "DeploymentError",
           "read_manifest", "check_manifest", "check_files", "graph_bytes", "foreign_entries"]

EXPORT_FORMAT = "fusionkit-export"
MANIFEST_FILE = "manifest.json"
#: The largest manifest read (bytes): a real one is a few kilobytes.
MANIFEST_LIMIT = 16 << 20
#: The decoders a runtime applies (``fusionkit.blemore.decoding``), by type, with the config keys it reads.
DECODERS = {"blemore": ("alpha", "beta"), "presence_salience": ("threshold", "beta")}
#: The rules by which the runtime applies a scout, and the graph each reads: "gate" (the gate scout's scores) and
#: "value" (every staged scout: the built-in value scout and a plugin's, its graph run once per stage). The
#: manifest's ``scout_type`` names the registered scout.
SCOUTS = {"gate": "scout.onnx", "value": "value.onnx"}
#: Each graph's input and output names, declared once for the writer (:mod:`fusionkit.export.graphs`) and the
#: runtime; every axis 0 is the batch. An encoder reading a sequence also takes ``lengths``, and the fusion gives one
#: output per head between ``probs`` and ``kept`` (:func:`graph_io`).
GRAPH_IO: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "encoder": (("x",), ("token",)),
    "fusion": (("tokens", "mask"), ("probs", "kept")),
    "gate": (("tokens", "present"), ("scores", "runs", "candidates")),
    "value": (("tokens", "present", "ran"), ("values",)),
    "tower": (("tokens", "mask"), ("embedding", "kept")),
}


def graph_io(graph: str, heads: tuple[str, ...] = (), sequences: bool = False) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """``(inputs, outputs)`` of a graph of :data:`GRAPH_IO`, with a sequence encoder's ``lengths`` and the fusion's
    ``heads``."""
    inputs, outputs = GRAPH_IO[graph]
    if graph == "encoder" and sequences:
        inputs = (*inputs, "lengths")
    if graph == "fusion":
        outputs = (outputs[0], *heads, outputs[1])
    return inputs, outputs
_HEADS = ("presence", "salience")
_DTYPES = ("float32", "uint8")
_SHA = re.compile(r"^[0-9a-f]{64}$")
_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")
# An ONNX tensor stored outside its graph names its file in a StringStringEntryProto {key: "location", value: ...}.
_LOCATION = re.compile(rb"\x0a\x08location\x12([\x00-\x7f])", re.DOTALL)


class DeploymentError(FusionkitError):
    """An export that cannot be loaded or run: tampered, incomplete, or given inputs it does not take."""


class _Bad(Exception):
    """One problem with the manifest: the key's path and what is wrong."""


def _fail(where: str, message: str) -> None:
    raise _Bad(f"{where}: {message}")


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _mapping(value: Any, where: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        _fail(where, f"expected a mapping, found {type(value).__name__}")
    return value


def _list(value: Any, where: str, item: type = object) -> list[Any]:
    if not isinstance(value, list) or not all(isinstance(v, item) for v in value):
        _fail(where, f"expected a list{'' if item is object else ' of ' + item.__name__}, found {value!r:.80}")
    return value


def _key(manifest: dict[str, Any], key: str, where: str = "") -> Any:
    if key not in manifest:
        _fail(f"{where}{key}", "missing")
    return manifest[key]


def _relative(path: Any, where: str) -> str:
    """A path inside the export: relative, forward slashes, no ``..``, no hidden part."""
    if not isinstance(path, str) or not path or path.startswith("/") or "\\" in path or ":" in path:
        _fail(where, f"expected a path inside the export folder, found {path!r:.80}")
    if any(part in ("", ".", "..") or part.startswith(".") for part in path.split("/")):
        _fail(where, f"{path!r}: a path inside the export folder has no '..', '.' or hidden part")
    return path


def _encoder(entry: Any, n: int) -> dict[str, Any]:
    where = f"encoders[{n}]."
    entry = _mapping(entry, f"encoders[{n}]")
    name = _key(entry, "name", where)
    if not isinstance(name, str) or not _NAME.match(name):
        _fail(f"{where}name", f"expected an encoder name (letters, digits, _ . -), found {name!r:.80}")
    if not isinstance(_key(entry, "type", where), str):
        _fail(f"{where}type", "expected a string")
    if _key(entry, "run", where) not in ("always", "on_demand"):
        _fail(f"{where}run", f"expected 'always' or 'on_demand', found {entry['run']!r:.40}")
    cost = _key(entry, "cost_gflops", where)
    if cost is not None and (not _is_number(cost) or cost < 0):
        _fail(f"{where}cost_gflops", f"expected a finite number >= 0 (or null), found {cost!r:.40}")
    if _key(entry, "graph", where) != f"encoders/{name}.onnx":
        _fail(f"{where}graph", f"expected 'encoders/{name}.onnx', found {entry['graph']!r:.80}")
    inputs = _mapping(_key(entry, "inputs", where), f"{where}inputs")
    x = _mapping(_key(inputs, "x", f"{where}inputs."), f"{where}inputs.x")
    shape = _list(_key(x, "shape", f"{where}inputs.x."), f"{where}inputs.x.shape")
    sequences = "lengths" in inputs
    axes_ok = (len(shape) >= 2 and shape[0] == "batch"
               and all((_is_int(s) and s > 0) or (s == "frames" and i == 1 and sequences)
                       for i, s in enumerate(shape[1:], 1)))
    if not axes_ok or (sequences and shape[1] != "frames"):
        _fail(f"{where}inputs.x.shape", f"expected ['batch', {'frames, ' if sequences else ''}sizes...], found "
              f"{shape!r:.80}")
    if x.get("dtype", "float32") not in _DTYPES:
        _fail(f"{where}inputs.x.dtype", f"expected one of {', '.join(_DTYPES)}, found {x.get('dtype')!r:.40}")
    if sequences and inputs["lengths"] != {"shape": ["batch"], "dtype": "int64"}:
        _fail(f"{where}inputs.lengths", f"expected {{'shape': ['batch'], 'dtype': 'int64'}}, found "
              f"{inputs['lengths']!r:.80}")
    if set(inputs) - {"x", "lengths"}:
        _fail(f"{where}inputs", f"unknown input(s) {sorted(set(inputs) - {'x', 'lengths'})}")
    if "reads" in entry and (x.get("dtype") != "uint8" or sequences):
        _fail(f"{where}reads", "an encoder that reads images takes uint8 pixels [batch, C, H, W]")
    return entry


def _fusion(manifest: dict[str, Any], names: list[str]) -> None:
    labels = manifest["labels"]
    demand = _list(_key(manifest, "on_demand"), "on_demand", str)
    declared = [e["name"] for e in manifest["encoders"] if e["run"] == "on_demand"]
    if sorted(demand) != sorted(declared) or len(set(demand)) != len(demand):
        _fail("on_demand", f"{demand!r:.80} does not name the encoders whose run is on_demand ({declared})")
    if len(demand) == len(names):
        _fail("on_demand", "every encoder is on demand; at least one must always run")
    scout = _key(manifest, "scout")
    if (scout is None) != (not demand) or (scout is not None and (not isinstance(scout, str) or scout not in SCOUTS)):
        _fail("scout", f"expected {'null (no on-demand encoder)' if not demand else ' or '.join(SCOUTS)}, found "
              f"{scout!r:.40}")
    slots = _key(manifest, "slots")
    if not _is_int(slots) or not 1 <= slots <= len(names):
        _fail("slots", f"expected an integer from 1 to {len(names)} (the encoders), found {slots!r:.40}")
    heads = _list(_key(manifest, "heads"), "heads", str)
    if not heads or len(set(heads)) != len(heads) or set(heads) - set(_HEADS):
        _fail("heads", f"expected some of {list(_HEADS)}, found {heads!r:.80}")
    decoder = _mapping(_key(manifest, "decoder"), "decoder")
    kind = _key(decoder, "type", "decoder.")
    if not isinstance(kind, str) or kind not in DECODERS:
        _fail("decoder.type", f"expected one of {', '.join(DECODERS)}, found {kind!r:.40}")
    for key in DECODERS[kind]:
        if not _is_number(_key(decoder, key, "decoder.")):
            _fail(f"decoder.{key}", f"expected a finite number, found {decoder[key]!r:.40}")
    if kind == "presence_salience" and heads != list(_HEADS):
        _fail("decoder.type", "presence_salience decodes the presence and salience heads; heads lacks one")
    neutral = _key(manifest, "neutral")
    if neutral is not None and (not _is_int(neutral) or not 0 <= neutral < len(labels)):
        _fail("neutral", f"expected null or a label's index (0 to {len(labels) - 1}), found {neutral!r:.40}")
    spec = manifest.get("spec")
    if isinstance(spec, dict) and "neutral" in spec:
        expected = labels.index(spec["neutral"]) if spec["neutral"] in labels else None
        if neutral != expected:
            _fail("neutral", f"{neutral!r} is not the spec's neutral label {spec['neutral']!r} (index {expected})")
    stored = _key(manifest, "budget")
    stored = [] if stored is None else [stored]
    if "budgets" in manifest:
        stored = _list(manifest["budgets"], "budgets")
        if manifest["budget"] != (stored[0] if stored else None):
            _fail("budget", "is not the first of budgets (the mean budgets the export stores)")
    for n, budget in enumerate(stored):
        where = "budget" if "budgets" not in manifest else f"budgets[{n}]"
        budget = _mapping(budget, where)
        if not demand:
            _fail(where, "a stored budget needs on-demand encoders")
        threshold = budget.get("threshold")
        if not isinstance(threshold, (int, float)) or isinstance(threshold, bool) or math.isnan(threshold):
            _fail(f"{where}.threshold", f"expected a number, found {threshold!r:.40}")
        for key in ("share", "gflops"):
            if budget.get(key) is not None and (not _is_number(budget[key]) or budget[key] < 0):
                _fail(f"{where}.{key}", f"expected a number >= 0 or null, found {budget[key]!r:.40}")
        if (budget.get("share") is None) == (budget.get("gflops") is None) or (budget.get("share") or 0) > 1:
            _fail(where, "expected a share from 0 to 1 or GFLOPs, one of them")
        if not isinstance(budget.get("describe"), str):
            _fail(f"{where}.describe", "expected a string")
    graphs = ["fusion.onnx", *([SCOUTS[scout]] if demand else [])]
    for graph in graphs:
        if graph not in manifest["sha256"]:
            _fail("sha256", f"names no SHA-256 for {graph}")


def _towers(manifest: dict[str, Any], names: list[str]) -> None:
    towers = _mapping(_key(manifest, "towers"), "towers")
    if not towers:
        _fail("towers", "expected at least one tower")
    for name, tower in towers.items():
        where = f"towers.{name}."
        tower = _mapping(tower, f"towers.{name}")
        if not isinstance(name, str) or not _NAME.match(name):
            _fail(f"towers.{name}", "expected a tower name (letters, digits, _ . -)")
        own = _list(_key(tower, "encoders", where), f"{where}encoders", str)
        if not own or set(own) - set(names):
            _fail(f"{where}encoders", f"expected some of the encoders {names}, found {own!r:.80}")
        if _key(tower, "graph", where) != f"towers/{name}.onnx":
            _fail(f"{where}graph", f"expected 'towers/{name}.onnx', found {tower['graph']!r:.80}")
        if not _is_int(_key(tower, "embed_dim", where)) or tower["embed_dim"] < 1:
            _fail(f"{where}embed_dim", f"expected a positive integer, found {tower['embed_dim']!r:.40}")
    if not _is_number(_key(manifest, "logit_scale")):
        _fail("logit_scale", f"expected a finite number, found {manifest['logit_scale']!r:.40}")


def check_manifest(manifest: Any) -> None:
    """Raise :class:`_Bad` naming the first key of ``manifest`` the runtime cannot trust."""
    manifest = _mapping(manifest, "the manifest")
    if manifest.get("format") != EXPORT_FORMAT:
        _fail("format", f"expected {EXPORT_FORMAT!r}, found {manifest.get('format')!r:.40}")
    kind = _key(manifest, "kind")
    if kind not in ("fusion", "two_tower"):
        _fail("kind", f"expected 'fusion' or 'two_tower', found {kind!r:.40}")
    labels = _list(_key(manifest, "labels"), "labels", str)
    if not labels or len(set(labels)) != len(labels) or not all(labels):
        _fail("labels", f"expected unique non-empty label names, found {labels!r:.80}")
    spec = manifest.get("spec")
    if isinstance(spec, dict) and isinstance(spec.get("labels"), list) and spec["labels"] != labels:
        _fail("labels", f"{labels!r:.80} are not the spec's labels {spec['labels']!r:.80}")
    latent = _key(manifest, "latent_dim")
    if not _is_int(latent) or latent < 1:
        _fail("latent_dim", f"expected a positive integer, found {latent!r:.40}")
    if _key(manifest, "nan_policy") not in ("error", "mask"):
        _fail("nan_policy", f"expected 'error' or 'mask', found {manifest['nan_policy']!r:.40}")
    sha = _mapping(_key(manifest, "sha256"), "sha256")
    for path, digest in sha.items():
        _relative(path, f"sha256[{path!r:.80}]")
        if not isinstance(digest, str) or not _SHA.match(digest):
            _fail(f"sha256[{path!r}]", f"expected 64 hexadecimal digits, found {digest!r:.80}")
    encoders = [_encoder(e, n) for n, e in enumerate(_list(_key(manifest, "encoders"), "encoders"))]
    names = [e["name"] for e in encoders]
    if not names or len(set(names)) != len(names):
        _fail("encoders", f"expected encoders with unique names, found {names!r:.80}")
    for entry in encoders:
        if entry["graph"] not in sha:
            _fail("sha256", f"names no SHA-256 for {entry['graph']}")
    _towers(manifest, names) if kind == "two_tower" else _fusion(manifest, names)


def read_manifest(folder: str | os.PathLike) -> dict[str, Any]:
    """The manifest of the export in ``folder``, checked key by key (:func:`check_manifest`); errors name the file
    and the key, in one line."""
    folder = Path(folder)
    path = folder / MANIFEST_FILE
    if path.is_symlink() or folder.is_symlink():
        raise DeploymentError(f"{path}: a symbolic link; an export is read from its own folder only")
    try:
        with open(path, "rb") as fh:
            data = fh.read(MANIFEST_LIMIT + 1)
    except FileNotFoundError:
        raise DeploymentError(f"{path}: missing; is {folder} a fusionkit export (fusionkit export RUN --out DIR)?") from None
    except OSError as exc:
        raise DeploymentError(f"{path}: unreadable ({exc.strerror or exc}); export the model again") from None
    if len(data) > MANIFEST_LIMIT:
        raise DeploymentError(f"{path}: over {MANIFEST_LIMIT >> 20} MiB, which no export writes; refused")
    try:
        manifest = json.loads(data.decode("utf-8"))
    except (ValueError, RecursionError) as exc:
        raise DeploymentError(f"{path}: not valid JSON ({str(exc)[:120] or type(exc).__name__}); export the model "
                              "again") from None
    if not isinstance(manifest, dict) or manifest.get("format") != EXPORT_FORMAT:
        raise DeploymentError(f"{path}: not a fusionkit export's manifest (format {EXPORT_FORMAT!r})")
    try:
        check_manifest(manifest)
    except _Bad as exc:
        raise DeploymentError(f"{path}: {exc}; the manifest was changed after export: export the model again") from None
    except (TypeError, ValueError, KeyError, AttributeError, IndexError) as exc:  # a shape no check foresaw
        raise DeploymentError(f"{path}: malformed ({type(exc).__name__}: {str(exc)[:120]}); the manifest was changed "
                              "after export: export the model again") from None
    return manifest


def _inside(folder: Path, relative: str) -> Path:
    """``folder/relative``, refused when any part of it is a symbolic link or it resolves outside ``folder``."""
    path = folder
    for part in relative.split("/"):
        path = path / part
        if path.is_symlink():
            raise DeploymentError(f"{path}: a symbolic link; an export's files are its own (refused)")
    if not path.resolve().is_relative_to(folder.resolve()):
        raise DeploymentError(f"{path}: resolves outside the export folder {folder}; refused")
    return path


def graph_bytes(folder: Path, manifest: dict[str, Any], relative: str) -> bytes:
    """The graph ``relative`` read once and checked against its SHA-256, so that what runs is what was hashed; any
    file it reads beside it (ONNX external data) must be covered by a SHA-256 too."""
    if relative not in manifest["sha256"]:
        raise DeploymentError(f"{folder}: the manifest names {relative} without its SHA-256; refused")
    path = _inside(folder, relative)
    if not path.is_file():
        raise DeploymentError(f"{path}: missing graph named by the manifest; export the model again")
    data = path.read_bytes()
    if hashlib.sha256(data).hexdigest() != manifest["sha256"][relative]:
        raise DeploymentError(f"{path}: its SHA-256 does not match the manifest's (the graph was changed or replaced "
                              "after export); refused. Export the model again")
    base = relative.rpartition("/")[0]
    for match in _LOCATION.finditer(data):
        size = match.group(1)[0]
        name = data[match.end():match.end() + size].decode("utf-8", "replace")
        data_file = f"{base}/{name}" if base else name
        if data_file not in manifest["sha256"]:
            raise DeploymentError(f"{path}: reads the file {name!r} beside it, which no SHA-256 of the manifest "
                                  "covers; refused. Export the model again")
        check_files(folder, {"sha256": {data_file: manifest["sha256"][data_file]}})
    return data


def check_files(folder: str | os.PathLike, manifest: dict[str, Any]) -> None:
    """Every file the manifest hashes is inside ``folder`` (no symbolic link, nothing outside) and matches."""
    folder = Path(folder)
    for relative, expected in manifest["sha256"].items():
        path = _inside(folder, relative)
        if not path.is_file():
            raise DeploymentError(f"{path}: missing file named by the manifest; export the model again")
        if sha256_file(path) != expected:
            raise DeploymentError(f"{path}: its SHA-256 does not match the manifest's; refused")


def foreign_entries(folder: str | os.PathLike) -> str | None:
    """Why ``folder`` is not wholly an export fusionkit wrote (None when it is): its manifest reads and every file
    it hashes matches, and it holds nothing else (no file, folder or link the export did not write)."""
    folder = Path(folder)
    try:
        manifest = read_manifest(folder)
        check_files(folder, manifest)
    except DeploymentError as exc:
        if not (folder / MANIFEST_FILE).exists():
            return f"it is not a model export made by fusionkit, and it holds {describe_contents(folder)}"
        return f"it is not an intact fusionkit export ({exc})"
    ours = {MANIFEST_FILE, *manifest["sha256"]}
    parents = {p.rpartition("/")[0] for p in ours} - {""}
    unknown = []
    for root, dirs, files in os.walk(folder):
        at = Path(root).relative_to(folder).as_posix()
        prefix = "" if at == "." else f"{at}/"
        for name in dirs:
            if f"{prefix}{name}" not in parents or (Path(root) / name).is_symlink():
                unknown.append(f"{prefix}{name}/")
        dirs[:] = [d for d in dirs if f"{prefix}{d}" in parents and not (Path(root) / d).is_symlink()]
        unknown += [f"{prefix}{name}" for name in files if f"{prefix}{name}" not in ours]
    if unknown:
        shown = ", ".join(sorted(unknown)[:5]) + (f" and {len(unknown) - 5} more" if len(unknown) > 5 else "")
        return f"it holds what the export did not write: {shown}"
    return None
