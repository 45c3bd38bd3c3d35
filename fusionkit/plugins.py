"""Loading plugins: the built-in components and every ``fusionkit`` entry point.

This is the one place plugins are loaded. The built-in components register
through the very same hooks as a third-party distribution does.

Environment:

- ``FUSIONKIT_PLUGINS=dist1,dist2`` loads only these distributions' entry points;
- ``FUSIONKIT_DISABLE_PLUGINS=dist1`` skips these;
- ``FUSIONKIT_STRICT_PLUGINS=1`` turns a plugin that fails to import or to
  register into an error instead of a report.
"""

from __future__ import annotations

import copy
import importlib
import importlib.metadata as metadata
import os
import re
import warnings
from collections.abc import Callable
from typing import Any

import attrs
import pluggy

from fusionkit import config as cfg
from fusionkit import hookspecs
from fusionkit.errors import DuplicateComponentError, FusionkitWarning, PluginError
from fusionkit.registry import Preset, Provider, Registration, Registry

__all__ = ["ENTRY_POINT_GROUP", "BUILTIN_MODULE", "BUILTIN_PLUGIN", "PluginInfo", "LoadedPlugins", "normalize",
           "strict_mode", "load_plugins", "check_presets", "register_plugin", "loaded", "get_registry", "reset"]

ENTRY_POINT_GROUP = "fusionkit"
BUILTIN_MODULE = "fusionkit.components"
BUILTIN_PLUGIN = "fusionkit"


@attrs.frozen
class PluginInfo:
    """One plugin as loaded (or as it failed to load)."""

    name: str
    distribution: str | None
    version: str | None
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


@attrs.define
class LoadedPlugins:
    """The plugin manager, the registry it filled, and what happened to each plugin."""

    manager: pluggy.PluginManager
    registry: Registry
    plugins: list[PluginInfo]

    @property
    def failed(self) -> list[PluginInfo]:
        return [p for p in self.plugins if not p.ok]

    def versions(self) -> dict[str, str | None]:
        """Distribution -> version of every loaded plugin (stored in checkpoints)."""
        return {p.distribution or p.name: p.version for p in self.plugins if p.ok}


def normalize(name: str) -> str:
    """PEP 503 normalised distribution name, so ``My_Plugin`` matches ``my-plugin``."""
    return re.sub(r"[-_.]+", "-", name).lower()


def _env_list(var: str) -> set[str] | None:
    raw = os.environ.get(var)
    if raw is None or not raw.strip():
        return None
    return {normalize(x) for x in raw.split(",") if x.strip()}


def strict_mode() -> bool:
    return os.environ.get("FUSIONKIT_STRICT_PLUGINS", "").strip().lower() in {"1", "true", "yes", "on"}


def _registrar(registry: Registry, kind: str, provider: Provider) -> Callable[..., None]:
    def register(name: str, factory: Callable[..., Any], *, config: type, description: str = "") -> None:
        if not isinstance(name, str) or not name:
            raise TypeError(f"a {kind} name must be a non-empty string, got {name!r}")
        if not attrs.has(config):
            raise TypeError(f"{kind} {name!r}: config must be an attrs class, got {config!r}")
        if not callable(factory):
            raise TypeError(f"{kind} {name!r}: factory must be callable, got {factory!r}")
        registry.add(Registration(kind, name, factory, config, description.strip(), provider))

    return register


def _preset_registrar(registry: Registry, provider: Provider) -> Callable[..., None]:
    def register(name: str, losses: Any, *, description: str | None = "") -> None:
        if not isinstance(name, str) or not name.strip():
            raise TypeError(f"a distillation preset name must be a non-blank string, got {name!r}")
        if name.strip() != name:
            raise TypeError(f"distillation preset {name!r}: a name has no leading or trailing spaces")
        if name.casefold() in {n.casefold() for n in registry.names("distill_loss")}:
            raise TypeError(f"distillation preset {name!r}: the name of a distillation loss; a spec could not tell "
                            "them apart, so give the preset a name of its own")
        if description is not None and not isinstance(description, str):
            raise TypeError(f"distillation preset {name!r}: description must be a string, got {description!r}")
        if isinstance(losses, (list, tuple)):  # bare names, as a spec writes them: ["kd", "fd"]
            losses = [{"type": b} if isinstance(b, str) else b for b in losses]
        if not isinstance(losses, (list, tuple)) or not losses or not all(
                isinstance(b, dict) and isinstance(b.get("type"), str) for b in losses):
            raise TypeError(f"distillation preset {name!r}: losses must be a non-empty list of loss blocks, each a "
                            f"dict with a 'type' string (or a loss name), got {losses!r}")
        blocks = tuple(copy.deepcopy(dict(b)) for b in losses)
        registry.add_preset(Preset(name, blocks, (description or "").strip(), provider))

    return register


def check_presets(registry: Registry, plugin: str) -> None:
    """Raise ``TypeError`` unless each preset ``plugin`` registered names installed losses with valid options (run
    once every plugin has registered, so that a preset may use another plugin's loss)."""
    for preset in registry.presets_of(plugin):
        problems: list[str] = []
        for i, block in enumerate(preset.losses):
            where = f"distillation preset {preset.name!r} [{i}]"
            if ("distill_loss", block["type"]) not in registry:
                refers = " (the preset itself)" if block["type"].casefold() == preset.name.casefold() else ""
                problems.append(f"{where}: unknown distillation loss {block['type']!r}{refers}; known: "
                                f"{', '.join(registry.names('distill_loss'))}")
                continue
            try:
                config = registry.get("distill_loss", block["type"]).config
            except DuplicateComponentError as exc:  # two other plugins provide the loss: the spec must choose
                problems.append(f"{where}: {exc}")
                continue
            cfg.structure(config, {k: v for k, v in block.items() if k != "type"}, where, problems)
        if problems:
            raise TypeError("; ".join(problems))


def load_plugins() -> LoadedPlugins:
    """Create a plugin manager, load built-ins and entry points, and fill a registry."""
    strict = strict_mode()
    manager = pluggy.PluginManager(hookspecs.PROJECT_NAME)
    manager.add_hookspecs(hookspecs)
    registry = Registry(protected=BUILTIN_PLUGIN)
    infos: list[PluginInfo] = []

    version = _own_version()
    manager.register(importlib.import_module(BUILTIN_MODULE), name=BUILTIN_PLUGIN)
    _register_all(manager, registry, BUILTIN_PLUGIN, Provider(BUILTIN_PLUGIN, "fusionkit", version))
    infos.append(PluginInfo(BUILTIN_PLUGIN, "fusionkit", version))

    allow = _env_list("FUSIONKIT_PLUGINS")
    block = _env_list("FUSIONKIT_DISABLE_PLUGINS") or set()
    entry_points = sorted(metadata.entry_points(group=ENTRY_POINT_GROUP), key=lambda e: e.name)
    _warn_unknown_names(allow, block, {normalize(ep.dist.name if ep.dist else ep.name) for ep in entry_points})
    skipped = []
    for ep in entry_points:
        dist = ep.dist.name if ep.dist is not None else None
        dist_version = ep.dist.version if ep.dist is not None else None
        key = normalize(dist or ep.name)
        if key == "fusionkit" and ep.value == BUILTIN_MODULE:
            continue
        if (allow is not None and key not in allow) or key in block:
            skipped.append(ep)
            continue
        provider = Provider(ep.name, dist, dist_version)
        try:
            module = ep.load()
        except Exception as exc:  # a broken plugin must not take the others down
            info = PluginInfo(ep.name, dist, dist_version, f"import failed: {type(exc).__name__}: {exc}")
            _fail(info, strict, exc)
            infos.append(info)
            continue
        try:
            manager.register(module, name=ep.name)
            _register_all(manager, registry, ep.name, provider)
        except Exception as exc:  # a built-in name taken, or a failing hook: this plugin only is skipped
            registry.remove_provider(ep.name)
            if manager.get_plugin(ep.name) is not None:
                manager.unregister(name=ep.name)
            info = PluginInfo(ep.name, dist, dist_version, f"registration failed: {type(exc).__name__}: {exc}")
            _fail(info, strict, exc)
            infos.append(info)
            continue
        infos.append(PluginInfo(ep.name, dist, dist_version))
    for i, info in enumerate(infos):
        if not info.ok or info.name == BUILTIN_PLUGIN:
            continue
        try:
            check_presets(registry, info.name)
        except TypeError as exc:
            registry.remove_provider(info.name)
            manager.unregister(name=info.name)
            infos[i] = attrs.evolve(info, error=f"registration failed: TypeError: {exc}")
            _fail(infos[i], strict, exc)
    registry.disabled_provider = _disabled_lookup(skipped)
    registry.failed_plugins = tuple(f"{p.name} ({p.error})" for p in infos if not p.ok)
    return LoadedPlugins(manager, registry, infos)


def _warn_unknown_names(allow: set[str] | None, block: set[str], installed: set[str]) -> None:
    known = installed | {"fusionkit"}
    for var, names in (("FUSIONKIT_PLUGINS", allow or set()), ("FUSIONKIT_DISABLE_PLUGINS", block)):
        for name in sorted(names - known):
            warnings.warn(f"{var} names {name!r}, but no installed distribution of that name has fusionkit plugins "
                          f"(installed: {', '.join(sorted(known))})", FusionkitWarning, stacklevel=3)


def _disabled_lookup(skipped: list[metadata.EntryPoint]) -> Callable[[str, str], str | None]:
    """A lookup that says which disabled distribution would provide a name.

    It loads the disabled plugins, into a scratch registry, only when a lookup has failed,
    so that disabling a plugin still keeps it out of every ordinary command.
    """
    cache: dict[tuple[str, str], str] | None = None

    def lookup(kind: str, name: str) -> str | None:
        nonlocal cache
        if cache is None:
            cache = {}
            for ep in skipped:
                scratch_manager = pluggy.PluginManager(hookspecs.PROJECT_NAME)
                scratch_manager.add_hookspecs(hookspecs)
                scratch = Registry()
                dist = ep.dist.name if ep.dist is not None else ep.name
                try:
                    scratch_manager.register(ep.load(), name=ep.name)
                    _register_all(scratch_manager, scratch, ep.name, Provider(ep.name, dist))
                except Exception:
                    continue
                for reg in scratch:
                    cache.setdefault((reg.kind, reg.name), f"distribution {dist}")
        return cache.get((kind, name))

    return lookup


def _fail(info: PluginInfo, strict: bool, exc: BaseException) -> None:
    if strict:
        raise PluginError(
            f"plugin {info.name!r} (distribution {info.distribution}) failed: {info.error}. "
            "Fix or uninstall it, or unset FUSIONKIT_STRICT_PLUGINS to skip it."
        ) from exc


def _register_all(manager: pluggy.PluginManager, registry: Registry, plugin: str, provider: Provider) -> None:
    """Call one plugin's hook implementations, so each registration knows its provider."""
    for kind, hook_name in hookspecs.KIND_HOOKS.items():
        hook = getattr(manager.hook, hook_name)
        for impl in hook.get_hookimpls():
            if impl.plugin_name == plugin:
                impl.function(register=_registrar(registry, kind, provider))
    for impl in manager.hook.register_distill_presets.get_hookimpls():
        if impl.plugin_name == plugin:
            impl.function(register=_preset_registrar(registry, provider))


def _own_version() -> str | None:
    try:
        return metadata.version("fusionkit")
    except metadata.PackageNotFoundError:
        return None


_loaded: LoadedPlugins | None = None


def register_plugin(plugin: object, name: str) -> None:
    """Register an in-process plugin: a module or object with ``@fusionkit.hookimpl`` functions.

    For notebooks, tests and experiments before packaging: it goes through the same hooks and
    registry as an installed distribution, and lasts until the process ends (or :func:`reset`).
    A name clash is an error here, since there is no other way to choose.
    """
    state = loaded()
    if state.manager.get_plugin(name) is not None:
        raise PluginError(f"a plugin named {name!r} is already registered; choose another name")
    state.manager.register(plugin, name=name)
    before = set(state.registry.contested())
    try:
        _register_all(state.manager, state.registry, name, Provider(name))
        check_presets(state.registry, name)
        clashes = sorted(set(state.registry.contested()) - before)
        if clashes:
            raise PluginError(f"it registers names other plugins provide: {clashes}")
    except Exception as exc:
        state.registry.remove_provider(name)
        state.manager.unregister(name=name)
        raise PluginError(f"plugin {name!r} failed to register: {type(exc).__name__}: {exc}") from exc
    state.plugins.append(PluginInfo(name, None, None))


def loaded() -> LoadedPlugins:
    """The process-wide plugins, loaded on first use."""
    global _loaded
    if _loaded is None:
        _loaded = load_plugins()
    return _loaded


def get_registry() -> Registry:
    """The process-wide registry of every installed component."""
    return loaded().registry


def reset() -> None:
    """Forget loaded plugins (the next lookup loads them again, e.g. after env changes)."""
    global _loaded
    _loaded = None
