"""The ``fusionkit`` command line.

Only argparse is imported at start-up; each command imports what it needs, so
``fusionkit --help`` stays fast whatever plugins are installed.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

EXAMPLES = Path(__file__).parent / "examples"


def _cmd_plugins(args: argparse.Namespace) -> int:
    from fusionkit.plugins import loaded

    state = loaded()
    rows = []
    for info in state.plugins:
        provides = state.registry.by_plugin(info.name) if info.ok else {}
        rows.append({"name": info.name, "distribution": info.distribution, "version": info.version,
                     "provides": provides, "error": info.error})
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    for row in rows:
        print(f"{row['name']} ({row['distribution'] or '-'} {row['version'] or ''})".replace(" )", ")"))
        if row["error"]:
            print(f"  FAILED: {row['error']}")
        for kind, names in row["provides"].items():
            print(f"  {kind}: {', '.join(names)}")
    return 0


def _cmd_spec_validate(args: argparse.Namespace) -> int:
    from fusionkit.errors import SpecError
    from fusionkit.spec import load_spec

    status = 0
    for path in args.files:
        try:
            spec = load_spec(path)
        except SpecError as exc:
            print(f"{path}: INVALID", file=sys.stderr)
            for problem in exc.problems:
                print(f"  - {problem}", file=sys.stderr)
            status = 1
            continue
        print(f"{path}: valid ({len(spec.encoders)} encoders, gate {spec.gate.type} top_n={spec.gate.config.top_n}, fusion {spec.fusion.type})")
    return status


def _cmd_spec_resolve(args: argparse.Namespace) -> int:
    import yaml

    from fusionkit.spec import load_spec

    print(yaml.safe_dump(load_spec(args.file).to_dict(), sort_keys=False), end="")
    return 0


def _cmd_spec_schema(args: argparse.Namespace) -> int:
    from fusionkit.plugins import get_registry
    from fusionkit.schema import spec_schema

    print(json.dumps(spec_schema(get_registry()), indent=2))
    return 0


def _cmd_build(args: argparse.Namespace) -> int:
    from fusionkit.model import build_model

    model = build_model(args.spec)
    print(model_summary(model))
    if args.out:
        model.save_pretrained(args.out)
        print(f"saved to {args.out}")
    return 0


def model_summary(model) -> str:
    spec = model.spec
    lines = [f"FusionModel: {len(model.encoder_names)} encoders -> latent {spec.latent_dim}, "
             f"gate {spec.gate.type} (top_n={model.top_n}), fusion {spec.fusion.type}, "
             f"heads {', '.join(f'{r}={c.type}' for r, c in spec.heads.items())}, combiner {spec.combiner.type}, "
             f"decoder {spec.decoder.type}", "parameters:"]
    counts = model.parameter_counts()
    width = max(len(k) for k in counts)
    for part, n in counts.items():
        lines.append(f"  {part:<{width}}  {n:>10,}")
    lines.append(f"  {'total':<{width}}  {sum(counts.values()):>10,}")
    return "\n".join(lines)


def _cmd_demo(args: argparse.Namespace) -> int:
    from fusionkit.demo import run_demo

    return run_demo(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fusionkit", description="Build, train and evaluate rank-aware top-n multi-encoder fusion models."
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("plugins", help="list installed plugins and the components they provide")
    p.add_argument("--json", action="store_true", help="print a JSON array, one object per plugin")
    p.set_defaults(func=_cmd_plugins)

    spec = sub.add_parser("spec", help="validate, resolve or describe specs").add_subparsers(dest="spec_command", metavar="ACTION", required=True)
    p = spec.add_parser("validate", help="check spec files; exit 1 listing every problem")
    p.add_argument("files", nargs="+", metavar="FILE")
    p.set_defaults(func=_cmd_spec_validate)
    p = spec.add_parser("resolve", help="print a spec with every default filled in (YAML)")
    p.add_argument("file", metavar="FILE")
    p.set_defaults(func=_cmd_spec_resolve)
    p = spec.add_parser("schema", help="print the JSON Schema of specs with the installed plugins")
    p.set_defaults(func=_cmd_spec_schema)

    p = sub.add_parser("build", help="build a model from a spec and print a summary")
    p.add_argument("spec", metavar="SPEC")
    p.add_argument("--out", help="save the untrained model (a checkpoint directory)")
    p.set_defaults(func=_cmd_build)

    p = sub.add_parser("demo", help="the end-to-end demonstration (the README's main command)")
    p.add_argument("--out", default="runs/demo", help="where to write the demo's outputs (default: runs/demo)")
    p.set_defaults(func=_cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from fusionkit.errors import FusionkitError

    try:
        return int(args.func(args) or 0)
    except FusionkitError as exc:
        print(f"fusionkit: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
