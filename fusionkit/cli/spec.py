"""``fusionkit spec validate|resolve|schema`` and ``fusionkit build``: specs, and the models they build."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

__all__ = ["add_commands", "model_summary", "cost_table"]


def _cmd_spec_validate(args: argparse.Namespace) -> int:
    from fusionkit.checkpoint import is_checkpoint
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
        if spec.distill is not None and not is_checkpoint(Path(spec.distill.teacher)):
            print(f"{path}: warning: distill.teacher: {spec.distill.teacher} is not a fusionkit checkpoint (yet); "
                  "train the teacher first, or `fusionkit train` will stop with an error", file=sys.stderr)
    return status


def _cmd_spec_resolve(args: argparse.Namespace) -> int:
    import torch
    import yaml

    from fusionkit.errors import FusionkitError
    from fusionkit.models.factory import build_model
    from fusionkit.spec import load_spec

    spec = load_spec(args.file)
    print(yaml.safe_dump(spec.to_dict(), sort_keys=False), end="")
    # The cost table, as YAML comments (the output stays a spec), from a model built on the meta device: shapes
    # and FLOPs without allocating, whatever the sizes a valid spec may declare.
    try:
        with torch.device("meta"):
            table = cost_table(build_model(spec))
    except FusionkitError as exc:
        table = [f"cost per sample: not measured (the model does not build here: {exc})"]
    except Exception as exc:  # a backbone that cannot be built without memory (e.g. it loads weights)
        table = [f"cost per sample: not measured (building the model without memory failed: "
                 f"{type(exc).__name__}: {str(exc)[:200]}); `fusionkit build` builds it for real"]
    print("\n".join(f"# {line}" for line in table))
    return 0


def _cmd_spec_schema(args: argparse.Namespace) -> int:
    from fusionkit.plugins import get_registry
    from fusionkit.spec.schema import spec_schema

    print(json.dumps(spec_schema(get_registry()), indent=2))
    return 0


def _cmd_build(args: argparse.Namespace) -> int:
    from fusionkit.models.factory import build_model

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
    return "\n".join(lines + cost_table(model))


def cost_table(model) -> list[str]:
    """Lines of each encoder's cost per sample (GFLOPs: declared, or measured for a live encoder) and when it runs."""
    from fusionkit.models.fusion import FusionModel

    trunks = [model] if isinstance(model, FusionModel) else list(model.towers.values())
    runs = {e.name: e.run for e in model.spec.encoders}
    declared = {e.name: e.cost_gflops for e in model.spec.encoders}
    lines = ["cost per sample (GFLOPs):"]
    costs = {name: cost for trunk in trunks for name, cost in trunk.encoder_costs().items()}
    width = max(len(n) for n in costs)
    for name, cost in costs.items():
        how = "declared" if declared[name] is not None else "measured" if cost else "stored features"
        shown = "unknown" if cost is None else f"{cost:.4g}"
        lines.append(f"  {name:<{width}}  {shown:>10}  {runs[name]:<9}  ({how})")
    lines.append(f"  {'total':<{width}}  {sum(c or 0.0 for c in costs.values()):>10.4g}")
    return lines


def add_commands(sub: argparse._SubParsersAction) -> None:
    spec = sub.add_parser("spec", help="validate, resolve or describe specs").add_subparsers(
        dest="spec_command", metavar="ACTION", required=True)
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
