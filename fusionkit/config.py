"""Component configs: attrs classes with documented, validated fields.

A plugin describes its parameters with an attrs class whose fields are made with
:func:`option`::

    @attrs.frozen(kw_only=True)
    class MyEncoderConfig:
        dim: int = option(doc="Input feature size.", validator=positive)
        dropout: float = option(0.1, doc="Dropout rate.", validator=unit_interval)

:func:`structure` turns a plain mapping (from YAML, TOML, JSON or a dict) into
such a class strictly — unknown keys, wrong types and failed validators are all
reported, each with its path — and :func:`unstructure` turns it back.

A converter may carry structure hooks that know where they are: inside :func:`structure`,
:func:`where` gives a hook the path of its value and the problem list, so a hook can report
several problems, each at its own path, and raise :class:`Reported`. :func:`nest_attrs`
makes a converter structure nested attrs classes this way (the spec is built like this).
"""

from __future__ import annotations

import collections.abc
import contextvars
import difflib
import math
import reprlib
import types
import typing
from collections.abc import Mapping
from typing import Any, Literal

import attrs
import cattrs

__all__ = ["NOTHING", "FAILED", "Reported", "where", "nest_attrs", "structure_fields", "option", "MAX_INT_OPTION", "MAX_SEED", "positive", "non_negative", "unit_interval",
           "seed_range", "converter", "type_name", "short_repr", "key_text", "structure", "unstructure",
           "describe_options", "field_docs", "json_schema"]

NOTHING = attrs.NOTHING


class _Failed:
    def __repr__(self) -> str:
        return "FAILED"


#: In the values a ``data_default`` callable is given: a field that was written but did not structure.
FAILED: Any = _Failed()


class Reported(Exception):
    """Raised by a structure hook once it has appended its problems to :func:`where`'s list."""


_WHERE: contextvars.ContextVar[tuple[str, list[str]] | None] = contextvars.ContextVar("fusionkit_where", default=None)


def where() -> tuple[str, list[str]]:
    """For a structure hook run by :func:`structure`: its value's path, and the list to append problems to."""
    at = _WHERE.get()
    if at is None:
        raise RuntimeError("this structure hook reports problems by path; call it through fusionkit.config.structure")
    return at


def option(default: Any = NOTHING, *, doc: str, validator: Any = None, factory: Any = None,
           data_default: Any = NOTHING) -> Any:
    """An attrs field with a docstring (shown by ``fusionkit spec schema`` and the docs).

    ``data_default`` is plain data that :func:`structure` structures as if it were written when the key
    is absent (a component block such as ``{"type": "attention"}``), so a default is checked like a value.
    It may be a callable of the fields structured so far (``FAILED`` for one that did not structure),
    returning the data, or ``NOTHING`` to leave the field out.
    """
    metadata = {"doc": doc, **({"data_default": data_default} if data_default is not NOTHING else {})}
    if factory is not None:
        return attrs.field(factory=factory, validator=validator, metadata=metadata)
    return attrs.field(default=default, validator=validator, metadata=metadata)


#: The largest value an integer option may take (sizes, counts, epochs): far above any real
#: model, low enough that a typo such as ``latent_dim: 1e9`` is caught before allocating.
MAX_INT_OPTION = 1 << 20
#: Seeds lie in [0, MAX_SEED], the range NumPy's and torch's generators both accept.
MAX_SEED = (1 << 63) - 1


def _check_number(value: Any) -> None:
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"must be a finite number, found {value!r}")
    if isinstance(value, int) and not isinstance(value, bool) and value > MAX_INT_OPTION:
        raise ValueError(f"must be at most {MAX_INT_OPTION:,}, found {value!r}")


def positive(instance: Any, attribute: attrs.Attribute, value: Any) -> None:
    """Validator: the value must be finite and > 0 (integers at most :data:`MAX_INT_OPTION`)."""
    if value is not None:
        _check_number(value)
        if not value > 0:
            raise ValueError(f"must be > 0, found {value!r}")


def non_negative(instance: Any, attribute: attrs.Attribute, value: Any) -> None:
    """Validator: the value must be finite and >= 0 (integers at most :data:`MAX_INT_OPTION`)."""
    if value is not None:
        _check_number(value)
        if not value >= 0:
            raise ValueError(f"must be >= 0, found {value!r}")


def unit_interval(instance: Any, attribute: attrs.Attribute, value: Any) -> None:
    """Validator: the value must lie in [0, 1] (NaN does not)."""
    if value is not None and not 0.0 <= value <= 1.0:
        raise ValueError(f"must lie in [0, 1], found {value!r}")


def seed_range(instance: Any, attribute: attrs.Attribute, value: Any) -> None:
    """Validator: a seed in [0, 2**63 - 1]."""
    if value is not None and not 0 <= value <= MAX_SEED:
        raise ValueError(f"must lie in [0, {MAX_SEED}], found {value!r}")


def _strict(expected: tuple[type, ...], name: str):
    def hook(value: Any, _type: Any) -> Any:
        if isinstance(value, bool) and bool not in expected:
            raise TypeError(f"expected {name}, found {value!r} (bool)")
        if not isinstance(value, expected):
            raise TypeError(f"expected {name}, found {value!r} ({type(value).__name__})")
        return float(value) if name == "float" else value

    return hook


def _is_sequence(tp: Any) -> bool:
    return typing.get_origin(tp) in (list, tuple, collections.abc.Sequence)


def _strict_sequence(conv: cattrs.Converter):
    """Lists and tuples from lists only: a string is not split into its characters, and an element of the
    wrong type is named by its position and value."""

    def hook(value: Any, tp: Any) -> Any:
        origin, args = typing.get_origin(tp), typing.get_args(tp)
        if not isinstance(value, (list, tuple)):
            raise TypeError(f"expected a list ({type_name(tp)}), found {_found(value)}; write [a, b] for a list "
                            "(one item: [a])")
        fixed = origin is tuple and args and args[-1] is not Ellipsis
        if fixed and len(value) != len(args):
            raise TypeError(f"expected a list of {len(args)} ({type_name(tp)}), found {_found(value)}")
        items = []
        for i, item in enumerate(value):
            expected = (args[i] if fixed else args[0]) if args else Any
            try:
                items.append(item if expected is Any else conv.structure(item, expected))
            except Exception:  # noqa: BLE001 - reworded with the element's position and value
                raise TypeError(f"expected {type_name(tp)}, but item [{i}] is {_found(item)}, not "
                                f"{type_name(expected)}") from None
        return tuple(items) if origin is tuple else items

    return hook


def _is_string_literal(tp: Any) -> bool:
    return typing.get_origin(tp) is Literal and all(isinstance(a, str) for a in typing.get_args(tp))


def _string_literal(value: Any, tp: Any) -> str:
    """A choice among strings; an integer that YAML read from digits (``precision: 16``) counts as its digits."""
    text = str(value) if isinstance(value, int) and not isinstance(value, bool) else value
    if not isinstance(text, str) or text not in typing.get_args(tp):
        raise ValueError(f"expected {type_name(tp)}, found {_found(value)}")
    return text


def _make_converter() -> cattrs.Converter:
    conv = cattrs.Converter(forbid_extra_keys=True)
    conv.register_structure_hook_func(_is_string_literal, _string_literal)
    conv.register_structure_hook_func(_is_sequence, _strict_sequence(conv))
    conv.register_structure_hook(int, _strict((int,), "int"))
    conv.register_structure_hook(float, _strict((int, float), "float"))
    conv.register_structure_hook(bool, _strict((bool,), "bool"))
    conv.register_structure_hook(str, _strict((str,), "str"))
    conv.register_structure_hook(bool | str, _strict((bool, str), "bool or str"))  # e.g. pretrained: false | a path
    conv.register_structure_hook(int | str, _strict((int, str), "int or str"))  # e.g. layer: -1 | weighted
    return conv


converter = _make_converter()


def type_name(tp: Any) -> str:
    """A readable name of a field type, as error messages show it."""
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(type_name(a) for a in typing.get_args(tp))
    if origin is not None:
        args = ", ".join(type_name(a) for a in typing.get_args(tp) if a is not Ellipsis)
        return f"{getattr(origin, '__name__', str(origin))}[{args}]"
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


_short = reprlib.Repr()
_short.maxstring = _short.maxother = 80
_short.maxlist = _short.maxtuple = _short.maxdict = _short.maxset = 6
_short.maxlevel = 3


def short_repr(value: Any) -> str:
    """A repr bounded in size, for error messages about values that may be huge."""
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 256:
        return f"an integer of about {int(value.bit_length() * 0.30103) + 1} digits"
    return _short.repr(value)


def key_text(key: Any) -> str:
    """A mapping key as a path element: strings as they are (bounded), anything else by its repr."""
    return (key if len(key) <= 80 else key[:80] + "...") if isinstance(key, str) else short_repr(key)


def _found(value: Any) -> str:
    return f"{short_repr(value)} ({type(value).__name__})"


def _describe(exc: BaseException, path: str, expected: Any, value: Any) -> list[str]:
    if isinstance(exc, cattrs.BaseValidationError):
        return [_reword(m) for m in cattrs.transform_error(exc, path=path)]
    if isinstance(exc, (TypeError, ValueError)) and str(exc).startswith("expected "):
        return [f"{path}: {exc}"]
    return [f"{path}: expected {type_name(expected)}, found {_found(value)}"]


def _reword(message: str) -> str:
    text, _, where = message.rpartition(" @ ")
    return f"{where}: {text}" if where else message


def structure(cls: type, data: Any, path: str, problems: list[str], conv: cattrs.Converter | None = None) -> Any:
    """Structure ``data`` into the attrs class ``cls``; append every problem to ``problems``.

    Returns the instance, or None when there were problems.
    """
    start = len(problems)
    values = structure_fields(cls, data, path, problems, conv)
    if values is None or len(problems) > start:
        return None
    try:
        return cls(**values)
    except (TypeError, ValueError) as exc:
        problems.append(f"{path}: {exc}")
        return None


def structure_fields(cls: type, data: Any, path: str, problems: list[str],
                     conv: cattrs.Converter | None = None) -> dict[str, Any] | None:
    """The fields of ``cls`` that ``data`` gives and that structure, by name; every problem goes to ``problems``.

    Unknown keys are reported with close matches (a class may name its options in messages with
    ``__option_noun__``, e.g. "unknown tower option"). A field path is ``path.name`` (``name`` at the top).
    Returns None when ``data`` is not a mapping.
    """
    conv = converter if conv is None else conv
    if not isinstance(data, Mapping):
        problems.append(f"{path}: expected a mapping of {cls.__name__} options, found {_found(data)}")
        return None
    attrs.resolve_types(cls)
    fields = {f.name: f for f in attrs.fields(cls)}
    noun = getattr(cls, "__option_noun__", None)
    for key in data:
        if key not in fields:
            close = difflib.get_close_matches(str(key), list(fields), n=2, cutoff=0.6)
            hint = f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
            listing = f"Options: {', '.join(fields)}" if noun else f"Options of {cls.__name__}: {', '.join(fields) or 'none'}"
            problems.append(f"{path}.{key_text(key)}: unknown {noun + ' ' if noun else ''}option{hint}"
                            f"{' ' if hint else '. '}{listing}")
    values: dict[str, Any] = {}
    for name, field in fields.items():
        fpath = f"{path}.{name}" if path else name
        if name in data:
            raw = data[name]
        elif "data_default" in field.metadata:
            raw = field.metadata["data_default"]
            raw = raw(values) if callable(raw) else raw
            if raw is NOTHING:
                continue
        else:
            if field.default is NOTHING:
                problems.append(f"{fpath}: required ({type_name(field.type)}), but missing")
            continue
        token = _WHERE.set((fpath, problems))
        try:
            value = conv.structure(raw, field.type)
        except Reported:
            values[name] = FAILED
            continue
        except Exception as exc:
            problems.extend(_describe(exc, fpath, field.type, raw))
            values[name] = FAILED
            continue
        finally:
            _WHERE.reset(token)
        if field.validator is not None:
            try:
                field.validator(None, field, value)
            except (TypeError, ValueError) as exc:
                problems.append(f"{fpath}: {_validator_text(exc, value)}")
                values[name] = FAILED
                continue
        values[name] = value
    return {k: v for k, v in values.items() if v is not FAILED}


def nest_attrs(conv: cattrs.Converter) -> cattrs.Converter:
    """Make ``conv`` structure nested attrs classes with :func:`structure`, each problem at its own path."""

    def hook(value: Any, cls: type) -> Any:
        path, problems = where()
        made = structure(cls, value, path, problems, conv)
        if made is None:
            raise Reported
        return made

    conv.register_structure_hook_func(attrs.has, hook)
    return conv


def _validator_text(exc: BaseException, value: Any) -> str:
    text = str(exc.args[0]) if exc.args and isinstance(exc.args[0], str) else str(exc)
    if "found" not in text:
        text = f"{text}; found {_found(value)}"
    return text


def unstructure(instance: Any) -> Any:
    """The plain-data form of a config (for writing specs and checkpoints)."""
    return converter.unstructure(instance)


def describe_options(cls: type) -> list[str]:
    """One line per option of an attrs config class: ``name (type, default ...): doc``."""
    attrs.resolve_types(cls)
    lines = []
    for f in attrs.fields(cls):
        if f.default is NOTHING:
            default = "required"
        elif isinstance(f.default, attrs.Factory):  # type: ignore[arg-type]
            default = f"default {unstructure(f.default.factory())!r}"
        else:
            default = f"default {unstructure(f.default)!r}"
        lines.append(f"{f.name} ({type_name(f.type)}, {default}): {f.metadata.get('doc', '')}")
    return lines


def field_docs(cls: type) -> dict[str, str]:
    return {f.name: f.metadata.get("doc", "") for f in attrs.fields(cls)}


def json_schema(cls: type) -> dict[str, Any]:
    """A JSON Schema object for an attrs config class (fields, types, defaults, docs)."""
    attrs.resolve_types(cls)
    props: dict[str, Any] = {}
    required: list[str] = []
    for f in attrs.fields(cls):
        prop = _type_schema(f.type)
        _add_ranges(prop, f.validator)
        doc = f.metadata.get("doc")
        if doc:
            prop["description"] = doc
        if f.default is NOTHING:
            required.append(f.name)
        elif isinstance(f.default, attrs.Factory):  # type: ignore[arg-type]
            prop["default"] = unstructure(f.default.factory())
        else:
            prop["default"] = unstructure(f.default)
        props[f.name] = prop
    schema: dict[str, Any] = {"type": "object", "properties": props, "additionalProperties": False}
    if cls.__doc__:
        schema["description"] = cls.__doc__.strip().splitlines()[0]
    if required:
        schema["required"] = required
    return schema


def _validators(validator: Any) -> list[Any]:
    """The validators an attrs field runs (an ``and_`` of several, or one)."""
    if validator is None:
        return []
    return [v for part in getattr(validator, "_validators", (validator,)) for v in _validators(part)] \
        if hasattr(validator, "_validators") else [validator]


def _add_ranges(prop: dict[str, Any], validator: Any) -> None:
    """Put the bounds of fusionkit's range validators (:func:`positive`, :func:`non_negative`, :func:`unit_interval`,
    :func:`seed_range`) into a number's schema, or into the number variants of an optional one."""
    found = _validators(validator)
    for variant in prop.get("anyOf", [prop]):
        kind = variant.get("type")
        if kind not in ("integer", "number"):
            continue
        if positive in found:
            variant["exclusiveMinimum"] = 0
        if non_negative in found:
            variant["minimum"] = 0
        if (positive in found or non_negative in found) and kind == "integer":
            variant["maximum"] = MAX_INT_OPTION
        if unit_interval in found:
            variant.update(minimum=0, maximum=1)
        if seed_range in found:
            variant.update(minimum=0, maximum=MAX_SEED)


def _type_schema(tp: Any) -> dict[str, Any]:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is int:
        return {"type": "integer"}
    if tp is float:
        return {"type": "number"}
    if tp is bool:
        return {"type": "boolean"}
    if tp is str:
        return {"type": "string"}
    if tp is type(None):
        return {"type": "null"}
    if origin is Literal:
        return {"enum": list(args)}
    if origin in (typing.Union, types.UnionType):
        return {"anyOf": [_type_schema(a) for a in args]}
    if origin in (list, tuple) or origin is typing.Sequence:
        item = args[0] if args else Any
        return {"type": "array", "items": _type_schema(item)}
    if origin is dict:
        return {"type": "object", "additionalProperties": _type_schema(args[1]) if len(args) > 1 else {}}
    if attrs.has(tp):
        return json_schema(tp)
    return {}
