"""Checkpoints: a directory with ``spec.yaml``, ``model.safetensors`` and ``metadata.json``.

Loading never unpickles: weights are safetensors, the spec names registered
components only. A save writes a fresh directory beside the target and swaps it
in, so a crash mid-save leaves the previous checkpoint intact.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import attrs
import yaml

from fusionkit.errors import CheckpointError, SpecError
from fusionkit.files import (
    apply_umask,
    backups_of,
    check_replaceable,
    json_marker,
    sha256_file,
    write_directory,
)
from fusionkit.hookspecs import KIND_HOOKS
from fusionkit.moved import moved_names
from fusionkit.plugins import get_registry, loaded
from fusionkit.registry import Registry
from fusionkit.spec import Spec, read_spec_file, spec_from_dict

if TYPE_CHECKING:
    import torch

FORMAT_VERSION = 1
SPEC_FILE = "spec.yaml"
WEIGHTS_FILE = "model.safetensors"
METADATA_FILE = "metadata.json"
#: A directory is a fusionkit checkpoint when its metadata.json carries the format version.
is_checkpoint = json_marker(METADATA_FILE, "format_version", (FORMAT_VERSION,))


def _components(model: torch.nn.Module) -> list[dict[str, Any]]:
    registry = get_registry()
    spec = model.spec
    blocks = [(f"encoders[{i}]", "encoder", e.type) for i, e in enumerate(spec.encoders)]
    if spec.towers:
        for name, tower in spec.towers.items():
            blocks += [(f"towers.{name}.gate", "gate", tower.gate.type), (f"towers.{name}.fusion", "fusion", tower.fusion.type)]
    else:
        blocks += [("gate", "gate", spec.gate.type), ("fusion", "fusion", spec.fusion.type)]
        blocks += [(f"heads.{r}", "head", c.type) for r, c in spec.heads.items()]
        blocks += [("combiner", "combiner", spec.combiner.type), ("decoder", "decoder", spec.decoder.type)]
    blocks += [(f"adaptation[{i}]", "adaptation_loss", c.type) for i, c in enumerate(spec.adaptation)]
    if spec.distill:
        blocks += [(f"distill.losses[{i}]", "distill_loss", c.type) for i, c in enumerate(spec.distill.losses)]
    out = []
    for path, kind, name in blocks:
        provider = registry.get(kind, name).provider
        out.append({"path": path, "kind": kind, "type": name, "plugin": provider.plugin,
                    "distribution": provider.distribution, "version": provider.version})
    return out


def _missing_components(root: Path, missing: list[dict[str, Any]], registry: Registry) -> str:
    """What a checkpoint's absent components need: a disabled plugin enabled, or distributions installed."""
    lines, install = [], set()
    for comp in missing:
        made_by = f"{comp.get('distribution') or comp.get('plugin') or 'an unknown distribution'} {comp.get('version') or ''}"
        where = f"{comp['path']} is {comp['kind']} {comp['type']!r}, saved with {made_by.rstrip()}"
        disabled = registry.disabled_provider(comp["kind"], comp["type"])
        if disabled:
            lines.append(f"{where}: {disabled} provides it and is installed but disabled; enable it (remove it from "
                         "FUSIONKIT_DISABLE_PLUGINS, or add it to FUSIONKIT_PLUGINS)")
        else:
            lines.append(where)
            install.add(str(comp.get("distribution") or comp.get("plugin")))
    hint = f". Install {', '.join(sorted(install))} (and check `fusionkit plugins`)." if install else "."
    return f"{root}: needs {len(missing)} component(s) that no enabled plugin provides: {'; '.join(lines)}{hint}"


def save_checkpoint(
    model: torch.nn.Module, directory: str | os.PathLike, extra_tensors: dict[str, torch.Tensor] | None = None,
    extra_metadata: dict[str, Any] | None = None,
) -> Path:
    """Save ``model`` (and optional extra tensors, e.g. feature scalers) to ``directory``."""
    from safetensors.torch import save_file

    target = Path(directory)
    check_replaceable(target, "checkpoint", is_checkpoint, flag="saving")

    def fill(tmp: Path) -> None:
        (tmp / SPEC_FILE).write_text(yaml.safe_dump(model.spec.to_dict(), sort_keys=False), encoding="utf-8")
        tensors = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
        for key, value in (extra_tensors or {}).items():
            tensors[f"extra.{key}"] = value.detach().contiguous().cpu()
        save_file(tensors, str(tmp / WEIGHTS_FILE), metadata={"format": "fusionkit"})
        apply_umask(tmp / WEIGHTS_FILE)
        loaded_plugins = loaded()
        metadata = {
            "format_version": FORMAT_VERSION,
            "fusionkit_version": loaded_plugins.versions().get("fusionkit"),
            "plugins": loaded_plugins.versions(),
            "components": _components(model),
            "weights_sha256": sha256_file(tmp / WEIGHTS_FILE),
            "extra": extra_metadata or {},
        }
        (tmp / METADATA_FILE).write_text(json.dumps(metadata, indent=2) + "\n", encoding="utf-8")

    return write_directory(target, fill)


def _resolve(directory: Path) -> Path:
    if directory.is_dir():
        return directory
    backups = backups_of(directory)
    if backups:  # a save was interrupted between its two renames: the previous checkpoint survives here
        return backups[-1]
    raise CheckpointError(f"{directory}: no such checkpoint directory")


def read_metadata(directory: str | os.PathLike) -> dict[str, Any]:
    path = _resolve(Path(directory)) / METADATA_FILE
    if not path.is_file():
        raise CheckpointError(f"{path}: missing; is {directory} a fusionkit checkpoint (written by save_pretrained)?")
    try:
        metadata = json.loads(_read_text(path))
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path}: not valid JSON ({exc}); the checkpoint is damaged") from None
    if not isinstance(metadata, dict):
        raise CheckpointError(f"{path}: expected a JSON object, found {type(metadata).__name__}; the checkpoint is damaged")
    components = metadata.get("components", [])
    fields = ("path", "kind", "type")
    if not isinstance(components, list) or not all(
        isinstance(c, dict) and all(isinstance(c.get(f), str) for f in fields) for c in components
    ):
        raise CheckpointError(f"{path}: 'components' must be a list of objects with string {', '.join(fields)}; "
                              "the checkpoint is damaged")
    if not isinstance(metadata.get("extra", {}), dict):
        raise CheckpointError(f"{path}: 'extra' must be an object; the checkpoint is damaged")
    return metadata


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise CheckpointError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start}); the checkpoint is damaged") from None


@attrs.frozen
class CheckpointFiles:
    """A checkpoint read and validated: its spec, the model's tensors, the extra tensors saved beside them
    (optimizer, scalers: ``extra.`` stripped) and its metadata. Building the model is the factory's
    (:func:`fusionkit.models.factory.load_checkpoint`)."""

    root: Path
    spec: Spec
    state: dict[str, Any]
    extra: dict[str, Any]
    metadata: dict[str, Any]

    @property
    def weights(self) -> Path:
        return self.root / WEIGHTS_FILE


def read_checkpoint(directory: str | os.PathLike, registry: Registry | None = None) -> CheckpointFiles:
    """Read a checkpoint directory and check it: format, the plugins its components need, the stored
    spec, the weights' SHA-256 and finiteness. Never unpickles, never builds a model."""
    import torch
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    registry = registry or get_registry()
    root = _resolve(Path(directory))
    metadata = read_metadata(root)
    if metadata.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{root}: checkpoint format {metadata.get('format_version')!r}, this fusionkit reads {FORMAT_VERSION}")
    missing = [comp for comp in metadata.get("components", []) if (comp["kind"], comp["type"]) not in registry
               and comp["kind"] in KIND_HOOKS]
    if missing:
        raise CheckpointError(_missing_components(root, missing, registry))
    try:
        spec = spec_from_dict(read_spec_file(root / SPEC_FILE), registry=registry, source=str(root / SPEC_FILE))
    except SpecError as exc:
        raise CheckpointError(f"{root}: the stored spec is invalid: {exc}") from exc
    weights = root / WEIGHTS_FILE
    if not weights.is_file():
        raise CheckpointError(f"{weights}: missing; the checkpoint is incomplete")
    if sha256_file(weights) != metadata.get("weights_sha256"):
        raise CheckpointError(
            f"{weights}: its SHA-256 does not match metadata.json: the file is truncated or was modified. "
            "Restore it from the run that wrote it."
        )
    try:
        tensors = load_file(str(weights))
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{weights}: not a readable safetensors file ({exc})") from None
    extra = {k[len("extra."):]: v for k, v in tensors.items() if k.startswith("extra.")}
    state = {k: v for k, v in tensors.items() if not k.startswith("extra.")}
    bad = [k for k, v in state.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        raise CheckpointError(f"{weights}: weights with NaN or inf in {bad[:5]}; the model diverged or the file was "
                              "modified. Use an earlier checkpoint or retrain with a lower train.lr.")
    return CheckpointFiles(root, spec, state, extra, metadata)


__getattr__ = moved_names(__name__, {"load_checkpoint": "fusionkit.models.factory", "load_model": "fusionkit.models.factory"})
