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
from fusionkit.hookspecs import KIND_HOOKS, kind_plural

__all__ = ["Provider", "Registration", "Preset", "Registry"]


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


@attrs.frozen
class Preset:
    """A named set of distillation loss blocks (``distill.preset``), as a spec would write them."""

    name: str
    losses: tuple[dict[str, Any], ...]
    description: str
    provider: Provider


class Registry:
    """Components by kind and name, with the provider of each.

    ``protected`` names the plugin whose names nobody else may take (the built-ins). When two
    other plugins register one name, the name is *contested*: both are recorded, and only a
    lookup of that name fails, naming both distributions and how to choose.
    """

    def __init__(self, protected: str | None = None) -> None:
        self._entries: dict[str, dict[str, Registration]] = {kind: {} for kind in KIND_HOOKS}
        self._contested: dict[tuple[str, str], list[Registration]] = {}
        self._presets: dict[str, Preset] = {}
        self.protected = protected
        #: ``(kind, name) -> description`` of an installed-but-disabled provider, or None (set by the loader).
        self.disabled_provider: Callable[[str, str], str | None] = lambda kind, name: None
        #: The plugins that failed to load, each ``"name (error)"`` (set by the loader): an unknown name may be theirs.
        self.failed_plugins: tuple[str, ...] = ()

    def add(self, registration: Registration) -> None:
        table = self._entries[registration.kind]
        key = (registration.kind, registration.name)
        existing = table.get(registration.name) or next(iter(self._contested.get(key, [])), None)
        if existing is None:
            table[registration.name] = registration
            return
        if self.protected in (existing.provider.plugin, registration.provider.plugin):
            raise DuplicateComponentError(
                f"{registration.kind} {registration.name!r} is a built-in name of fusionkit; "
                f"{registration.provider.describe()} cannot take it. Rename the component in that plugin."
            )
        self._contested.setdefault(key, [existing]).append(registration)
        table.pop(registration.name, None)

    def add_preset(self, preset: Preset) -> None:
        """Record a distillation preset; one name, compared without case, has one provider (a second is refused,
        naming both)."""
        existing = self._presets.get(preset.name.casefold())
        if existing is not None:
            builtin = self.protected in (existing.provider.plugin, preset.provider.plugin)
            owner = "a built-in name of fusionkit" if builtin else f"taken by {existing.provider.describe()}"
            raise DuplicateComponentError(f"distillation preset {preset.name!r} is {owner}; {preset.provider.describe()} "
                                          "cannot take it. Rename the preset in that plugin.")
        self._presets[preset.name.casefold()] = preset

    def preset(self, name: str) -> Preset | None:
        """The distillation preset of that name (compared without case), or None."""
        return self._presets.get(name.casefold()) if isinstance(name, str) else None

    def preset_names(self) -> list[str]:
        return sorted(p.name for p in self._presets.values())

    def failure_note(self) -> str:
        """A sentence naming the plugins that failed to load ("" when none did), for unknown-name messages."""
        if not self.failed_plugins:
            return ""
        return (f" Plugins that failed to load (a name may be theirs): {'; '.join(self.failed_plugins)[:600]}; "
                "see `fusionkit plugins`.")

    def presets_of(self, plugin: str) -> list[Preset]:
        """The distillation presets ``plugin`` registered, by name."""
        return [p for p in sorted(self._presets.values(), key=lambda p: p.name) if p.provider.plugin == plugin]

    def contested(self) -> dict[tuple[str, str], list[Registration]]:
        """(kind, name) -> the registrations that claim it."""
        return dict(self._contested)

    def remove_provider(self, plugin: str) -> None:
        """Drop everything one plugin registered (used when its registration fails half-way)."""
        self._presets = {n: p for n, p in self._presets.items() if p.provider.plugin != plugin}
        for table in self._entries.values():
            for name in [n for n, r in table.items() if r.provider.plugin == plugin]:
                del table[name]
        for key, regs in list(self._contested.items()):
            rest = [r for r in regs if r.provider.plugin != plugin]
            if len(rest) < 2:
                del self._contested[key]
                if rest:
                    self._entries[key[0]][key[1]] = rest[0]
            else:
                self._contested[key] = rest

    def get(self, kind: str, name: str) -> Registration:
        if kind not in self._entries:
            raise KeyError(f"unknown component kind {kind!r}; kinds are {sorted(self._entries)}")
        if (kind, name) in self._contested:
            regs = self._contested[(kind, name)]
            dists = [r.provider.distribution or r.provider.plugin for r in regs]
            raise DuplicateComponentError(
                f"{kind} {name!r} is provided by several plugins: {'; '.join(r.provider.describe() for r in regs)}. "
                f"Choose one by blocking the others, e.g. FUSIONKIT_DISABLE_PLUGINS={dists[-1]}, or uninstall one."
            )
        try:
            return self._entries[kind][name]
        except KeyError:
            raise UnknownComponentError(self.unknown_message(kind, name)) from None

    def unknown_message(self, kind: str, name: str) -> str:
        plural = kind_plural(kind)
        disabled = self.disabled_provider(kind, name)
        if disabled:
            return (f"{kind} {name!r} is provided by {disabled}, which is installed but disabled "
                    "(FUSIONKIT_PLUGINS / FUSIONKIT_DISABLE_PLUGINS); enable it to use this name.")
        known = sorted(self._entries[kind])
        close = difflib.get_close_matches(str(name), known, n=3, cutoff=0.5)
        hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
        providers = sorted({r.provider.distribution or r.provider.plugin for t in self._entries.values() for r in t.values()})
        return (
            f"unknown {kind} {name!r}.{hint} Known {plural}: {', '.join(known) or 'none'}. "
            f"Installed plugins: {', '.join(providers) or 'none'}; "
            "install a plugin that provides it, and check `fusionkit plugins`." + self.failure_note()
        )

    def names(self, kind: str) -> list[str]:
        return sorted(self._entries[kind])

    def __contains__(self, key: tuple[str, str]) -> bool:
        kind, name = key
        return name in self._entries.get(kind, {}) or key in self._contested

    def __iter__(self) -> Iterator[Registration]:
        for kind in KIND_HOOKS:
            yield from (self._entries[kind][n] for n in sorted(self._entries[kind]))

    def by_plugin(self, plugin: str) -> dict[str, list[str]]:
        """kind -> sorted names that ``plugin`` provides (kinds it provides nothing of are left out)."""
        out: dict[str, list[str]] = {}
        for reg in self.registrations_of(plugin):
            out.setdefault(reg.kind, []).append(reg.name)
        return out

    def registrations_of(self, plugin: str) -> list[Registration]:
        """Every registration ``plugin`` made (contested ones included), by kind, then name."""
        regs = [*self, *(r for rs in self._contested.values() for r in rs)]
        return [r for r in sorted(regs, key=lambda r: (list(KIND_HOOKS).index(r.kind), r.name)) if r.provider.plugin == plugin]
