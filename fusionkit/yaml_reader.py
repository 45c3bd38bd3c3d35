"""Reading YAML written by people: safe, strict and bounded.

:func:`load_yaml` differs from ``yaml.safe_load`` in three ways, each a trap we met:

- **Booleans are ``true``/``false`` only** (YAML 1.2). YAML 1.1 also reads ``on``, ``off``,
  ``yes``, ``no`` as booleans, which turned the option ``on: encoders`` into ``True: encoders``.
- **A key written twice is an error**, not a silent last-wins. Keys brought in by a merge
  (``<<: *base``) may still be overridden, as merges intend.
- **Alias expansion is bounded**: a document whose nodes, with every alias expanded, number
  more than :data:`MAX_NODES` is refused before it is built (a 300-byte "billion laughs"
  document expands to billions of nodes).
"""

from __future__ import annotations

import re
from typing import Any

import yaml

__all__ = ["MAX_NODES", "StrictLoader", "load_yaml"]

MAX_NODES = 100_000

_BOOL = re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$")


class StrictLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` with YAML 1.2 booleans, duplicate-key errors and bounded aliases."""

    def compose_document(self) -> yaml.Node:
        node = super().compose_document()
        _check_expanded_size(node)
        return node

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

    if root is not None and size(root) > MAX_NODES:
        raise yaml.YAMLError(
            f"the document expands to more than {MAX_NODES:,} nodes once its aliases (*name) are resolved; "
            "a spec is far smaller, so this looks like an alias bomb"
        )


def load_yaml(text: str) -> Any:
    """Parse one YAML document (see the module docstring); raises ``yaml.YAMLError``."""
    return yaml.load(text, Loader=StrictLoader)  # noqa: S506 - a SafeLoader subclass
