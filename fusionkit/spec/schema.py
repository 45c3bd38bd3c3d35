"""JSON Schema of the spec, covering every installed component (for editor completion).

It is read from the spec's declaration: each field of :class:`fusionkit.spec.Spec` (and of the
tower and distill blocks) gives a property, described by its doc, and each component block gives
one variant per installed component of its kind.
"""

from __future__ import annotations

import re
import typing
from typing import Any

import attrs

from fusionkit import config as cfg
from fusionkit.registry import Registry
from fusionkit.spec import HEAD_ROLES, Block, Blocks, Checked, DistillBlock, EncoderRun, Keyed, Spec, TowerSpec

__all__ = ["spec_schema"]


def _component_schema(registry: Registry, kind: str, with_name: bool = False) -> dict[str, Any]:
    variants = []
    for name in registry.names(kind):
        reg = registry.get(kind, name)
        schema = cfg.json_schema(reg.config)
        schema["properties"] = {"type": {"const": name, "description": reg.description}, **schema["properties"]}
        schema["required"] = ["type", *schema.get("required", [])]
        if with_name:
            schema["properties"] = {"name": {"type": "string", "description": "The key inputs use for this encoder."},
                                    **schema["properties"], **cfg.json_schema(EncoderRun)["properties"]}
            schema["required"] = ["name", *schema["required"]]
        schema["title"] = f"{kind} {name} ({reg.provider.distribution or reg.provider.plugin})"
        variants.append(schema)
    if not variants:
        return {"not": {}, "description": f"no installed plugin provides a {kind}"}
    if not with_name:  # a block may be written as its type's name alone (gate: attention)
        variants.append({"enum": registry.names(kind), "description": f"a {kind}'s name, with its defaults"})
    return {"oneOf": variants}


def _field_schema(registry: Registry, field: attrs.Attribute) -> dict[str, Any]:
    tp = field.type
    marker = typing.get_args(tp)[1] if typing.get_origin(tp) is typing.Annotated else None
    if isinstance(marker, Checked):
        schema = dict(marker.schema)
    elif isinstance(marker, Block):
        schema = _component_schema(registry, marker.kind)
    elif isinstance(marker, Blocks):
        schema = {"type": "array", "items": _component_schema(registry, marker.kind)}
    elif isinstance(marker, Keyed):
        schema = _keyed_schema(registry, marker.name)
    elif attrs.has(tp):
        schema = cfg.json_schema(tp)
    else:
        schema = {"type": ["string", "null"]}
    doc = field.metadata.get("doc")
    return {**schema, "description": doc} if doc else schema


def _object_schema(registry: Registry, cls: type, required: list[str]) -> dict[str, Any]:
    attrs.resolve_types(cls)
    return {"type": "object", "additionalProperties": False, "required": required,
            "properties": {f.name: _field_schema(registry, f) for f in attrs.fields(cls)}}


def _keyed_schema(registry: Registry, name: str) -> dict[str, Any]:
    if name == "encoders":
        return {"type": "array", "minItems": 1, "items": _component_schema(registry, "encoder", with_name=True)}
    if name == "heads":
        return {"type": "object", "additionalProperties": False, "minProperties": 1,
                "properties": {role: _component_schema(registry, "head") for role in HEAD_ROLES}}
    if name == "towers":  # two towers, or none (null or {}: a fusion model)
        return {"anyOf": [{"type": "null"}, {"type": "object", "maxProperties": 0},
                          {"type": "object", "minProperties": 2, "maxProperties": 2,
                           "additionalProperties": _object_schema(registry, TowerSpec, ["encoders"])}]}
    if name == "distill":
        return {"anyOf": [{"type": "null"}, _object_schema(registry, DistillBlock, ["teacher"])]}
    # a preset, its name compared without case
    names = "|".join("".join(f"[{c.lower()}{c.upper()}]" if c.isalpha() else re.escape(c) for c in n)
                     for n in registry.preset_names())
    return {"anyOf": [{"type": "null"}, {"type": "string", "pattern": f"^({names})$"}],
            "examples": registry.preset_names()}


def spec_schema(registry: Registry) -> dict[str, Any]:
    """The JSON Schema (draft 2020-12) of a fusionkit spec with the installed plugins."""
    attrs.resolve_types(Spec)
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "title": "fusionkit spec",
        **_object_schema(registry, Spec, ["encoders"]),
    }
