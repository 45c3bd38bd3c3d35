"""Reading YAML written by people: safe, strict and bounded.

:func:`load_yaml` differs from ``yaml.safe_load`` in three ways, each a trap we met:

- **Booleans are ``true``/``false`` only** (YAML 1.2). YAML 1.1 also reads ``on``, ``off``,
  ``yes``, ``no`` as booleans, which turned the option ``on: encoders`` into ``True: encoders``.
- **A key written twice is an error**, not a silent last-wins. Keys brought in by a merge
  (``<<: *base``) may still be overridden, as merges intend.
- **Size is bounded**: a document of more than :data:`MAX_NODES` nodes, or whose nodes with
  every alias expanded number more (a 300-byte "billion laughs" document expands to billions
  of nodes), is refused before it is built, and so is nesting deeper than :data:`MAX_DEPTH`
  (named by its line) and an integer longer than :data:`MAX_INT_DIGITS` digits.
"""

from __future__ import annotations

import re
from typing import Any

import yaml

__all__ = ["MAX_NODES", "MAX_DEPTH", "MAX_INT_DIGITS", "StrictLoader", "load_yaml", "check_bounds"]

MAX_NODES = 100_000
#: How deep mappings and lists may nest; a spec nests a few levels.
MAX_DEPTH = 64
#: The longest integer a spec may write (Python refuses to convert more than 4,300 digits); no option is that large.
MAX_INT_DIGITS = 100

_BOOL = re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$")


class StrictLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` with YAML 1.2 booleans, duplicate-key errors and bounded aliases."""

    def compose_document(self) -> yaml.Node:
        self._depth = 0
        node = super().compose_document()
        _check_expanded_size(node)
        return node

    def compose_node(self, parent: yaml.Node | None, index: Any) -> yaml.Node:
        self._depth = getattr(self, "_depth", 0) + 1
        try:
            if self._depth > MAX_DEPTH:
                raise yaml.composer.ComposerError(
                    None, None, f"mappings and lists nest more than {MAX_DEPTH} deep here; a spec nests a few levels",
                    self.peek_event().start_mark)
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def construct_yaml_int(self, node: yaml.ScalarNode) -> int:
        digits = sum(c.isdigit() for c in node.value)
        if digits > MAX_INT_DIGITS:
            raise yaml.constructor.ConstructorError(
                None, None, f"an integer of {digits} digits; no spec value is longer than {MAX_INT_DIGITS}",
                node.start_mark)
        return super().construct_yaml_int(node)

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, yaml.Mark] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=True)
            try:
                first = seen.get(key)
            except TypeError:  # an unhashable key: SafeLoader reports it below
                continue
            if first is not None:
                raise yaml.constructor.ConstructorError(
                    "while constructing a mapping", node.start_mark,
                    f"found duplicate key {key!r} (first at line {first.line + 1}); write each key once",
                    key_node.start_mark,
                )
            seen[key] = key_node.start_mark
        return super().construct_mapping(node, deep=deep)


StrictLoader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
StrictLoader.add_implicit_resolver("tag:yaml.org,2002:bool", _BOOL, list("tTfF"))
StrictLoader.add_constructor("tag:yaml.org,2002:int", StrictLoader.construct_yaml_int)


def _check_expanded_size(root: yaml.Node | None) -> None:
    """Count nodes as if every alias were expanded (memoised, so linear in the document)."""
    sizes: dict[int, int] = {}

    def size(node: yaml.Node) -> int:
        known = sizes.get(id(node))
        if known is not None:
            return known
        sizes[id(node)] = 1  # a recursive alias counts once instead of looping
        if isinstance(node, yaml.MappingNode):
            total = 1 + sum(size(k) + size(v) for k, v in node.value)
        elif isinstance(node, yaml.SequenceNode):
            total = 1 + sum(size(v) for v in node.value)
        else:
            total = 1
        total = min(total, MAX_NODES + 1)
        sizes[id(node)] = total
        return total

    if root is None or size(root) <= MAX_NODES:
        return
    written: set[int] = set()
    stack = [root]
    while stack and len(written) <= MAX_NODES:  # the nodes as written, each once
        node = stack.pop()
        if id(node) in written:
            continue
        written.add(id(node))
        if isinstance(node, yaml.MappingNode):
            stack += [n for pair in node.value for n in pair]
        elif isinstance(node, yaml.SequenceNode):
            stack += node.value
    if len(written) > MAX_NODES:
        raise yaml.YAMLError(f"the document has more than {MAX_NODES:,} nodes (values, keys, lists and mappings); "
                             "a spec is far smaller: split it, or keep large data out of the spec")
    raise yaml.YAMLError(
        f"the document expands to more than {MAX_NODES:,} nodes once its aliases (*name) are resolved, though it "
        "has fewer as written; a spec is far smaller, so this looks like an alias bomb"
    )


def check_bounds(data: Any, limit: int = MAX_DEPTH) -> None:
    """Raise ``ValueError`` naming the path where parsed data (a JSON or TOML document) nests deeper than ``limit``
    or holds an integer of more than :data:`MAX_INT_DIGITS` digits."""
    stack: list[tuple[Any, str, int]] = [(data, "", 1)]
    while stack:
        value, path, depth = stack.pop()
        if depth > limit:
            raise ValueError(f"mappings and lists nest more than {limit} deep at {path or 'the top'}; a spec nests "
                             "a few levels")
        if isinstance(value, int) and not isinstance(value, bool) and len(str(abs(value))) > MAX_INT_DIGITS:
            raise ValueError(f"an integer of {len(str(abs(value)))} digits at {path or 'the top'}; no spec value has "
                             f"more than {MAX_INT_DIGITS} digits")
        if isinstance(value, dict):
            stack += [(v, f"{path}.{k}" if path else str(k), depth + 1) for k, v in value.items()]
        elif isinstance(value, list):
            stack += [(v, f"{path}[{i}]", depth + 1) for i, v in enumerate(value)]


def load_yaml(text: str) -> Any:
    """Parse one YAML document (see the module docstring); raises ``yaml.YAMLError``."""
    return yaml.load(text, Loader=StrictLoader)  # noqa: S506 - a SafeLoader subclass
