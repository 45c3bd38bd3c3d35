"""``fusionkit plugins`` (what is installed) and ``fusionkit plugin new`` (start a plugin)."""

from __future__ import annotations

import argparse
import json

from fusionkit.hookspecs import KIND_HOOKS

__all__ = ["add_commands"]


def _cmd_plugins(args: argparse.Namespace) -> int:
    from fusionkit.plugins import loaded

    state = loaded()
    rows = []
    for info in state.plugins:
        regs = state.registry.registrations_of(info.name) if info.ok else []
        provides: dict[str, list[str]] = {}
        descriptions: dict[str, dict[str, str]] = {}
        for reg in regs:
            provides.setdefault(reg.kind, []).append(reg.name)
            descriptions.setdefault(reg.kind, {})[reg.name] = reg.description
        for preset in state.registry.presets_of(info.name) if info.ok else []:
            provides.setdefault("distill_preset", []).append(preset.name)
            descriptions.setdefault("distill_preset", {})[preset.name] = preset.description
        rows.append({"name": info.name, "distribution": info.distribution, "version": info.version,
                     "provides": provides, "descriptions": descriptions, "error": info.error})
    conflicts = [{"kind": kind, "name": name,
                  "providers": [r.provider.distribution or r.provider.plugin for r in regs]}
                 for (kind, name), regs in sorted(state.registry.contested().items())]
    if args.json:
        print(json.dumps(rows if not conflicts else {"plugins": rows, "conflicts": conflicts}, indent=2))
        return 0
    for row in rows:
        print(f"{row['name']} ({row['distribution'] or '-'} {row['version'] or ''})".replace(" )", ")"))
        if row["error"]:
            print(f"  FAILED: {row['error']}")
        for kind, described in row["descriptions"].items():
            print(f"  {kind}:")
            width = max(len(name) for name in described)
            for name, description in described.items():
                print(f"    {name:<{width}}  {description}".rstrip())
    for c in conflicts:
        print(f"CONFLICT: {c['kind']} {c['name']!r} is provided by {' and '.join(c['providers'])}; a spec that uses it "
              f"fails until one is blocked, e.g. FUSIONKIT_DISABLE_PLUGINS={c['providers'][-1]}")
    return 0


def _cmd_plugin_new(args: argparse.Namespace) -> int:
    from fusionkit.cli.scaffold import new_plugin

    path = new_plugin(args.name, args.out, component=args.component, kind=args.kind)
    # the local folder, not a bare name (which pip would look up on the package index)
    print(f"plugin written to {path}; install it with: pip install {path.resolve()}")
    return 0


def add_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("plugins", help="list installed plugins and the components they provide")
    p.add_argument("--json", action="store_true", help="print a JSON array, one object per plugin")
    p.set_defaults(func=_cmd_plugins)

    plugin = sub.add_parser("plugin", help="start a new plugin distribution").add_subparsers(
        dest="plugin_command", metavar="ACTION", required=True)
    p = plugin.add_parser("new", help="write fusionkit-NAME/, a clean plugin package registering one component")
    p.add_argument("name", metavar="NAME", help="lower-case words joined by '-', e.g. my-encoder")
    p.add_argument("--out", default=".", metavar="DIR", help="where to create fusionkit-NAME/ (default: here)")
    p.add_argument("--component", help="the name specs write in type: (default: NAME with '_')")
    p.add_argument("--kind", default="encoder", choices=tuple(KIND_HOOKS),
                   help="the kind of component it registers (default: encoder)")
    p.set_defaults(func=_cmd_plugin_new)
