"""JSON Schema of the spec, covering every installed component (for editor completion)."""

from __future__ import annotations

from typing import Any

from fusionkit import config as cfg
from fusionkit.registry import Registry
from fusionkit.spec import HEAD_ROLES, DataConfig, ProjectorConfig, TrainConfig

__all__ = ["spec_schema"]


def _component_schema(registry: Registry, kind: str, with_name: bool = False) -> dict[str, Any]:
    variants = []
    for name in registry.names(kind):
        reg = registry.get(kind, name)
        schema = cfg.json_schema(reg.config)
        schema["properties"] = {"type": {"const": name, "description": reg.description}, **schema["properties"]}
        schema["required"] = ["type", *schema.get("required", [])]
        if with_name:
            schema["properties"] = {"name": {"type": "string", "description": "The key inputs use for this encoder."}, **schema["properties"]}
            schema["required"] = ["name", *schema["required"]]
        schema["title"] = f"{kind} {name} ({reg.provider.distribution or reg.provider.plugin})"
        variants.append(schema)
    if not variants:
        return {"not": {}, "description": f"no installed plugin provides a {kind}"}
    return {"oneOf": variants}


def spec_schema(registry: Registry) -> dict[str, Any]:
    """The JSON Schema (draft 2020-12) of a fusionkit spec with the installed plugins."""
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "title": "fusionkit spec",
        "type": "object",
        "additionalProperties": False,
        "required": ["encoders"],
        "properties": {
            "spec_version": {"const": 1},
            "labels": {"type": "array", "items": {"type": "string"}, "minItems": 1, "uniqueItems": True},
            "neutral": {"type": ["string", "null"], "description": "The label that never appears in a blend."},
            "latent_dim": {"type": "integer", "minimum": 1},
            "encoders": {"type": "array", "minItems": 1, "items": _component_schema(registry, "encoder", with_name=True)},
            "projector": cfg.json_schema(ProjectorConfig),
            "gate": _component_schema(registry, "gate"),
            "fusion": _component_schema(registry, "fusion"),
            "heads": {
                "type": "object", "additionalProperties": False, "minProperties": 1,
                "properties": {role: _component_schema(registry, "head") for role in HEAD_ROLES},
            },
            "combiner": _component_schema(registry, "combiner"),
            "decoder": _component_schema(registry, "decoder"),
            "adaptation": {"type": "array", "items": _component_schema(registry, "adaptation_loss")},
            "data": cfg.json_schema(DataConfig),
            "train": cfg.json_schema(TrainConfig),
        },
    }
