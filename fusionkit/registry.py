"""The one registry of components: kind -> name -> Registration.

A registry is filled by :mod:`fusionkit.plugins`, which calls every plugin's
``register_*`` hooks. Lookups of unknown names fail with close matches and the
list of installed plugins, so a typo in a spec is a one-line fix.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Iterator
from typing import Any

import attrs

from fusionkit.errors import DuplicateComponentError, UnknownComponentError
from fusionkit.hookspecs import KIND_HOOKS


@attrs.frozen
class Provider:
    """Who provided a component: the pluggy plugin name, its distribution and version."""

    plugin: str
    distribution: str | None = None
    version: str | None = None

    def describe(self) -> str:
        if self.distribution:
            return f"plugin {self.plugin!r} from distribution {self.distribution} {self.version or ''}".rstrip()
        return f"plugin {self.plugin!r}"


@attrs.frozen
class Registration:
    """One registered component.

    ``factory(config, context)`` builds it; ``config`` is the attrs class of its
    parameters; ``description`` is one line for listings.
    """

    kind: str
    name: str
    factory: Callable[..., Any]
    config: type
    description: str
    provider: Provider


class Registry:
    """Components by kind and name, with the provider of each."""

    def __init__(self) -> None:
        self._entries: dict[str, dict[str, Registration]] = {kind: {} for kind in KIND_HOOKS}

    def add(self, registration: Registration) -> None:
        table = self._entries[registration.kind]
        existing = table.get(registration.name)
        if existing is not None:
            raise DuplicateComponentError(
                f"{registration.kind} {registration.name!r} is provided twice: by "
                f"{existing.provider.describe()} and by {registration.provider.describe()}. "
                "Uninstall one, or block one with FUSIONKIT_DISABLE_PLUGINS=<distribution>."
            )
        table[registration.name] = registration

    def remove_provider(self, plugin: str) -> None:
        """Drop everything one plugin registered (used when its registration fails half-way)."""
        for table in self._entries.values():
            for name in [n for n, r in table.items() if r.provider.plugin == plugin]:
                del table[name]

    def get(self, kind: str, name: str) -> Registration:
        if kind not in self._entries:
            raise KeyError(f"unknown component kind {kind!r}; kinds are {sorted(self._entries)}")
        try:
            return self._entries[kind][name]
        except KeyError:
            raise UnknownComponentError(self.unknown_message(kind, name)) from None

    def unknown_message(self, kind: str, name: str) -> str:
        known = sorted(self._entries[kind])
        close = difflib.get_close_matches(str(name), known, n=3, cutoff=0.5)
        hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
        providers = sorted({r.provider.distribution or r.provider.plugin for t in self._entries.values() for r in t.values()})
        return (
            f"unknown {kind} {name!r}.{hint} Known {kind}s: {', '.join(known) or 'none'}. "
            f"Installed plugins: {', '.join(providers) or 'none'}; "
            "install a plugin that provides it, and check `fusionkit plugins`."
        )

    def names(self, kind: str) -> list[str]:
        return sorted(self._entries[kind])

    def __contains__(self, key: tuple[str, str]) -> bool:
        kind, name = key
        return name in self._entries.get(kind, {})

    def __iter__(self) -> Iterator[Registration]:
        for kind in KIND_HOOKS:
            yield from (self._entries[kind][n] for n in sorted(self._entries[kind]))

    def by_plugin(self, plugin: str) -> dict[str, list[str]]:
        """kind -> sorted names that ``plugin`` provides (kinds it provides nothing of are left out)."""
        out: dict[str, list[str]] = {}
        for reg in self:
            if reg.provider.plugin == plugin:
                out.setdefault(reg.kind, []).append(reg.name)
        return out
