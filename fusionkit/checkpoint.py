"""Checkpoints: a directory with ``spec.yaml``, ``model.safetensors`` and ``metadata.json``.

Loading never unpickles: weights are safetensors, the spec names registered
components only. A save writes a fresh directory beside the target and swaps it
in, so a crash mid-save leaves the previous checkpoint intact.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from fusionkit.errors import CheckpointError, SpecError
from fusionkit.registry import Registry

if TYPE_CHECKING:
    import torch

    from fusionkit.model import FusionModel

FORMAT_VERSION = 1
SPEC_FILE = "spec.yaml"
WEIGHTS_FILE = "model.safetensors"
METADATA_FILE = "metadata.json"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _components(model: FusionModel) -> list[dict[str, Any]]:
    from fusionkit.plugins import get_registry

    registry = get_registry()
    spec = model.spec
    blocks = [(f"encoders[{i}]", "encoder", e.type) for i, e in enumerate(spec.encoders)]
    blocks += [("gate", "gate", spec.gate.type), ("fusion", "fusion", spec.fusion.type)]
    blocks += [(f"heads.{r}", "head", c.type) for r, c in spec.heads.items()]
    blocks += [("combiner", "combiner", spec.combiner.type), ("decoder", "decoder", spec.decoder.type)]
    blocks += [(f"adaptation[{i}]", "adaptation_loss", c.type) for i, c in enumerate(spec.adaptation)]
    out = []
    for path, kind, name in blocks:
        provider = registry.get(kind, name).provider
        out.append({"path": path, "kind": kind, "type": name, "plugin": provider.plugin,
                    "distribution": provider.distribution, "version": provider.version})
    return out


def save_checkpoint(
    model: FusionModel, directory: str | os.PathLike, extra_tensors: dict[str, torch.Tensor] | None = None,
    extra_metadata: dict[str, Any] | None = None,
) -> Path:
    """Save ``model`` (and optional extra tensors, e.g. feature scalers) to ``directory``."""
    from safetensors.torch import save_file

    from fusionkit.plugins import loaded

    target = Path(directory)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        (tmp / SPEC_FILE).write_text(yaml.safe_dump(model.spec.to_dict(), sort_keys=False), encoding="utf-8")
        tensors = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
        for key, value in (extra_tensors or {}).items():
            tensors[f"extra.{key}"] = value.detach().contiguous().cpu()
        save_file(tensors, str(tmp / WEIGHTS_FILE), metadata={"format": "fusionkit"})
        loaded_plugins = loaded()
        metadata = {
            "format_version": FORMAT_VERSION,
            "fusionkit_version": loaded_plugins.versions().get("fusionkit"),
            "plugins": loaded_plugins.versions(),
            "components": _components(model),
            "weights_sha256": _sha256(tmp / WEIGHTS_FILE),
            "extra": extra_metadata or {},
        }
        (tmp / METADATA_FILE).write_text(json.dumps(metadata, indent=2) + "\n", encoding="utf-8")
        _swap_in(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def _swap_in(new: Path, target: Path) -> None:
    if not target.exists():
        os.rename(new, target)
        return
    old = target.parent / f".{target.name}.old-{os.getpid()}"
    shutil.rmtree(old, ignore_errors=True)
    os.rename(target, old)
    os.rename(new, target)
    shutil.rmtree(old, ignore_errors=True)


def _resolve(directory: Path) -> Path:
    if directory.is_dir():
        return directory
    backups = sorted(directory.parent.glob(f".{directory.name}.old-*"))
    if backups:  # a save was interrupted between its two renames: the previous checkpoint survives here
        return backups[-1]
    raise CheckpointError(f"{directory}: no such checkpoint directory")


def read_metadata(directory: str | os.PathLike) -> dict[str, Any]:
    path = _resolve(Path(directory)) / METADATA_FILE
    if not path.is_file():
        raise CheckpointError(f"{path}: missing; is {directory} a fusionkit checkpoint (written by save_pretrained)?")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path}: not valid JSON ({exc}); the checkpoint is damaged") from None


def load_checkpoint(directory: str | os.PathLike, registry: Registry | None = None) -> tuple[FusionModel, dict[str, Any], dict]:
    """Load a checkpoint: (model, extra tensors, metadata). Never unpickles."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from fusionkit.model import FusionModel
    from fusionkit.plugins import get_registry
    from fusionkit.spec import read_spec_file, spec_from_dict

    registry = registry or get_registry()
    root = _resolve(Path(directory))
    metadata = read_metadata(root)
    if metadata.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{root}: checkpoint format {metadata.get('format_version')!r}, this fusionkit reads {FORMAT_VERSION}")
    for comp in metadata.get("components", []):
        if (comp["kind"], comp["type"]) not in registry:
            dist = comp.get("distribution") or comp.get("plugin")
            raise CheckpointError(
                f"{root}: {comp['path']} is {comp['kind']} {comp['type']!r}, which no installed plugin provides; "
                f"it was provided by {dist} {comp.get('version') or ''} when saved. Install that distribution "
                "(and check `fusionkit plugins`)."
            )
    try:
        spec = spec_from_dict(read_spec_file(root / SPEC_FILE), registry=registry, source=str(root / SPEC_FILE))
    except SpecError as exc:
        raise CheckpointError(f"{root}: the stored spec is invalid: {exc}") from exc
    weights = root / WEIGHTS_FILE
    if not weights.is_file():
        raise CheckpointError(f"{weights}: missing; the checkpoint is incomplete")
    if _sha256(weights) != metadata.get("weights_sha256"):
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
    model = FusionModel(spec, registry=registry)
    result = model.load_state_dict(state, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise CheckpointError(
            f"{weights}: weights do not fit the spec: missing {result.missing_keys[:5]}, unexpected {result.unexpected_keys[:5]}"
        )
    model.eval()
    return model, extra, metadata


def load_model(directory: str | os.PathLike) -> FusionModel:
    """Load a model saved with ``save_pretrained`` (in eval mode)."""
    return load_checkpoint(directory)[0]
