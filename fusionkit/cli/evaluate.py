"""``fusionkit evaluate`` and ``fusionkit predict``: a trained run, or a fold ensemble of runs, on a store."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from fusionkit.cli.options import SPLITS, add_budget, add_data, add_runs, data_source
from fusionkit.moved import moved_names

__all__ = ["add_commands", "EVALUATION_FORMAT"]

#: The ``format`` of the JSON files ``evaluate`` writes into a run: what marks them as fusionkit's to replace.
EVALUATION_FORMAT = "fusionkit-evaluation"


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
    from fusionkit.hardware.devices import resolve_device
    from fusionkit.models.factory import load_model

    model = load_model(Path(args.run[0]) / "best", device=resolve_device(args.device or "auto"))
    return model, data_source(args).open(model.spec)


def _open_ensemble(args: argparse.Namespace):
    """The runs of ``args.run`` as a fold ensemble with its thresholds fitted out of fold, or None for one run."""
    from fusionkit.errors import FusionkitError
    from fusionkit.evaluation.ensemble import FoldEnsemble, expand_runs
    from fusionkit.hardware.devices import resolve_device

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
    store = data_source(args).open(ensemble.spec)
    ensemble.fit_decoder(store)
    print(f"ensemble of {len(runs)} runs; decoder thresholds fitted on their pooled out-of-fold validation predictions")
    return ensemble, store


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from fusionkit.errors import DataError, FusionkitError
    from fusionkit.files import atomic_write_text, check_file_replaceable, json_file_marker
    from fusionkit.training.tasks import task_class

    if args.budget_curve and args.budget is not None:
        raise FusionkitError(f"--budget {args.budget} --budget-curve: the curve scores every budget from 0% to 100%; "
                             "give one or the other")
    suffix = _budget_suffix(args)
    opened = _open_ensemble(args)
    if opened is not None and args.budget_curve:
        raise FusionkitError("--budget-curve: it draws one model's curve; a fold ensemble has none. Give one fold's "
                             "run (e.g. RUN/fold0), or leave --budget-curve out")
    kind = "ensemble_" if opened is not None else ""
    out = Path(args.run[0]) / f"evaluation_{kind}{args.split}{suffix}.json" if len(args.run) == 1 else None
    if out is not None and not args.budget_curve:  # before anything is scored for a file that cannot be written
        check_file_replaceable(out, "an evaluation", json_file_marker("format", (EVALUATION_FORMAT,)))
    if opened is not None:
        ensemble, store = opened
        index = _run_index(Path(args.run[0]), store, args.split)
        if not store.labelled[index].all():
            raise DataError(f"{store.path}: the {args.split} samples are not all labelled; evaluate needs labels")
        metrics = ensemble.evaluate(store, index, budget=_ensemble_budget(args, ensemble, store, index))
        task = task_class(ensemble.spec)
    else:
        model, store = _open_run(args)
        task = task_class(model.spec)
        index = _run_index(Path(args.run[0]), store, args.split)
        if args.budget_curve:
            return _budget_curve(args, model, store, index)
        metrics = task.evaluate_model(model, store, index, **_budget_option(args, model, store, index))
    print(f"{args.split}: {task.summary(metrics)}")
    if "compute" in metrics:
        compute = metrics["compute"]
        rates = ", ".join(f"{n} {r:.0%}" for n, r in compute["run_rate"].items())
        print(f"  compute: {compute['mean_gflops']:.4g} of {compute['full_gflops']:.4g} GFLOPs per sample; ran: {rates}")
        if "unused_runs" in compute:
            print(f"  unused: {compute['unused_runs']:.0%} of the on-demand runs were not kept by the gate's top-n")
        if "mean_encoder_seconds" in compute:
            print(f"  encoder time: {1e3 * compute['mean_encoder_seconds']:.3g} of "
                  f"{1e3 * compute['full_encoder_seconds']:.3g} ms per sample, as measured")
    if out is not None:
        record = {"format": EVALUATION_FORMAT, "split": args.split, "budget": args.budget,
                  "budget_costs": args.budget_costs if args.budget is not None else None}
        atomic_write_text(out, json.dumps(record | metrics, indent=2) + "\n")
    return 0


def _budget_suffix(args: argparse.Namespace) -> str:
    """The file-name part of ``--budget``, from the parsed budget: two budgets share a name only when they are
    equal (``10`` and ``1e+1``), never when they differ (``1e-1`` and ``1e+1``)."""
    if args.budget is None:
        return ""
    from fusionkit.conditional.budget import Budget

    budget = Budget.parse(args.budget)
    amount = _exact(100 * budget.share) + "pct" if budget.share is not None else _exact(budget.gflops)
    return f"_budget-{'mean-' if budget.mean else ''}{amount}{'-time' if args.budget_costs == 'time' else ''}"


def _exact(value: float) -> str:
    """A number as its shortest exact text (``25``, ``0.1``, ``1e+20``): distinct numbers, distinct texts."""
    text = repr(float(value))
    return text[:-2] if text.endswith(".0") else text


def _check_budget_costs(args: argparse.Namespace) -> None:
    """``--budget-costs time`` counts a budget: refuse it alone, or with GFLOPs, before anything is measured."""
    from fusionkit.conditional.budget import Budget
    from fusionkit.errors import FusionkitError

    if args.budget_costs != "time":
        return
    if args.budget is None and not getattr(args, "budget_curve", False):
        raise FusionkitError("--budget-costs time: it says what a --budget counts; give a --budget such as 40% or "
                             "mean:40%" + (" (or --budget-curve)" if hasattr(args, "budget_curve") else ""))
    if args.budget is not None and Budget.parse(args.budget).gflops is not None:
        raise FusionkitError(f"--budget {args.budget} --budget-costs time: GFLOPs count FLOPs; a budget over measured "
                             "time is a share of the full time, e.g. --budget 40% or --budget mean:40%")


def _measured_seconds(args: argparse.Namespace, model, store, index) -> dict[str, float] | None:
    """With ``--budget-costs time``: each on-demand encoder's seconds per sample, measured on the rows to score."""
    if args.budget_costs != "time":
        return None
    from fusionkit.inference import TIMED_SAMPLES, measure_encoder_seconds

    seconds = measure_encoder_seconds(model, store, index)
    print(f"encoder time measured on {min(len(index), TIMED_SAMPLES)} samples: "
          + ", ".join(f"{name} {1e3 * value:.3g} ms" for name, value in seconds.items()) + " per sample")
    return seconds


def _budget_option(args: argparse.Namespace, model, store, index) -> dict:
    """``budget=`` for a model with on-demand encoders; a budget for a model without them is refused."""
    _check_budget_costs(args)
    if args.budget is None:
        return {}
    from fusionkit.conditional.budget import Budget
    from fusionkit.errors import FusionkitError

    if not model.spec.on_demand:
        raise FusionkitError(f"--budget {args.budget}: {args.run[0]} runs every encoder always (no encoder has run: "
                             "on_demand), so there is no compute to budget")
    budget = Budget.parse(args.budget)
    seconds = _measured_seconds(args, model, store, index)
    if seconds is not None:
        budget = budget.timed(seconds)
    _warn_over_cap(model, budget)
    if budget.mean:  # its threshold comes from the run's validation fold
        from fusionkit.evaluation.budgets import fit_run_budget

        budget = fit_run_budget(args.run[0], model, store, budget)
        print(f"mean budget {budget.describe()}: threshold {budget.threshold:.4g} fitted on the validation fold")
    return {"budget": budget}


def _warn_over_cap(model, budget) -> None:
    """A cap below what the always-run encoders cost cannot hold (they run whatever the budget): say so."""
    over = model.over_cap(budget)
    if over is not None:
        limit, always = over
        print(f"warning: --budget {budget.describe()} ({limit:.4g} GFLOPs per sample) is below what the always-run "
              f"encoders cost ({always:.4g}); they run anyway, so every sample spends {always:.4g} and nothing on "
              "demand runs", file=sys.stderr)


def _ensemble_budget(args: argparse.Namespace, ensemble, store, index):
    """A fold ensemble's ``--budget``, for models with on-demand encoders: a cap applies to each model; a mean
    budget is fitted per model on its own validation fold. Measured time is measured on the first model (the
    models share one spec, so their encoders cost the same)."""
    _check_budget_costs(args)
    if args.budget is None:
        return None
    from fusionkit.conditional.budget import Budget
    from fusionkit.errors import FusionkitError

    budget = Budget.parse(args.budget)
    if not ensemble.spec.on_demand:
        raise FusionkitError(f"--budget {args.budget}: the ensemble's models run every encoder always (no encoder has "
                             "run: on_demand), so there is no compute to budget")
    seconds = _measured_seconds(args, ensemble.models[0], store, index)
    if seconds is not None:
        budget = budget.timed(seconds)
    _warn_over_cap(ensemble.models[0], budget)
    if budget.mean:
        fitted = ensemble.model_budgets(store, budget)
        print(f"mean budget {budget.describe()}: each model's threshold fitted on its own validation fold "
              f"({', '.join(f'{b.threshold:.4g}' for b in fitted)})")
        return fitted
    return budget


def _budget_curve(args: argparse.Namespace, model, store, index) -> int:
    """Score against mean GFLOPs per sample and wall seconds, for budgets from nothing on demand to everything: at
    mean budgets fitted on the run's validation fold (the default), at caps, or both."""
    from fusionkit.evaluation.budgets import run_validation_rows
    from fusionkit.evaluation.controls import frontier_at
    from fusionkit.evaluation.curves import CURVE_FORMAT, curve_document
    from fusionkit.files import atomic_write_text, check_file_replaceable, json_file_marker

    if not model.spec.on_demand:
        from fusionkit.errors import FusionkitError

        raise FusionkitError(f"--budget-curve: {args.run[0]} has no on-demand encoder (run: on_demand); every budget "
                             "would run the same encoders")
    out = Path(args.run[0]) / f"budget_curve_{args.split}{'_time' if args.budget_costs == 'time' else ''}.json"
    check_file_replaceable(out, "a budget curve", json_file_marker("format", (CURVE_FORMAT,)))
    val = run_validation_rows(args.run[0], store, "mean budgets and the cascade are fitted on the run's validation "
                              "fold, which another store's folds would fill with rows it trained on")
    seconds = _measured_seconds(args, model, store, index)
    kinds = {"mean": ("mean",), "cap": ("cap",), "both": ("mean", "cap")}[args.budget_curve]
    document = curve_document(model, store, index, val, kinds, args.split, seconds, progress=True)
    points, axis, frontier = document["points"], document["axis"], document["frontier"]
    print(f"  {kinds[0]:>6}  {'scout':>6}  {'static':>6}  {'random':>6}  {'cascade':>7}  GFLOPs per sample")
    for p, r, c in zip(points, document["random"], document["cascade"]):
        print(f"  {p['budget_share']:>6.0%}  {p['score']:>6.3f}  {frontier_at(frontier, p[axis], axis):>6.3f}  "
              f"{r['score']:>6.3f}  {c['score']:>7.3f}  {p['mean_gflops']:.4g}")
    for p in document.get("cap_points", []):
        print(f"  cap {p['budget_share']:>4.0%}  {p['score']:>6.3f}  {p['mean_gflops']:.4g} GFLOPs per sample")
    print("  static choices: " + "; ".join(f"{'+'.join(s['encoders']) or 'none'} {s['score']:.3f} at "
                                            f"{s['mean_gflops']:.4g}" for s in document["static"]))
    print(f"at {kinds[0]} budgets: {document['verdict']['summary']}")
    atomic_write_text(out, json.dumps(document, indent=2) + "\n")
    print(f"budget curve written to {out}")
    return 0


def _cmd_predict(args: argparse.Namespace) -> int:
    from fusionkit.blemore.submission import check_submission_replaceable, submission_paths, write_submission
    from fusionkit.errors import FusionkitError
    from fusionkit.inference import predictions_for
    from fusionkit.training.tasks import task_class

    check_submission_replaceable(*submission_paths(Path(args.out)))
    opened = _open_ensemble(args)
    if opened is not None:
        ensemble, store = opened
        index = _run_index(Path(args.run[0]), store, args.split)
        preds = ensemble.predictions(store, index, budget=_ensemble_budget(args, ensemble, store, index))
    else:
        model, store = _open_run(args)
        if not task_class(model.spec).predicts:
            raise FusionkitError(f"{args.run[0]}: a two-tower model embeds and retrieves; it predicts no answers, so "
                                 "there is no submission to write. `fusionkit evaluate` gives its retrieval metrics.")
        index = _run_index(Path(args.run[0]), store, args.split)
        preds = predictions_for(model, store, index, **_budget_option(args, model, store, index))
    json_path, zip_path = write_submission(Path(args.out), {f"{k}{args.id_suffix}": v for k, v in preds.items()})
    print(f"{len(preds)} predictions written to {json_path} and {zip_path}")
    return 0


def add_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("evaluate", help="BlEmoRE metrics of a trained run (or a fold ensemble) on a store")
    add_runs(p)
    add_data(p)
    p.add_argument("--split", choices=SPLITS, default="test", help="which samples (default: the run's test fold; "
                   "target: the target-domain rows, e.g. a release's test clips)")
    add_budget(p)
    p.add_argument("--budget-curve", nargs="?", const="mean", choices=["mean", "cap", "both"], help="Score against "
                   "mean GFLOPs per sample and wall seconds at budgets from 0%% to 100%% of the full cost, beside the "
                   "static choices, random rows and a cascade (RUN/budget_curve_SPLIT.json; `fusionkit report` draws "
                   "it): at mean budgets fitted on the run's validation fold (the default, and the verdict's), at "
                   "caps per sample, or both")
    p.set_defaults(func=_cmd_evaluate)

    p = sub.add_parser("predict", help="write a challenge submission (JSON, and a zip beside it)")
    add_runs(p)
    add_data(p)
    p.add_argument("--out", required=True, metavar="FILE.json", help="FILE.json and FILE.zip are written "
                   "(FILE.zip names the same pair)")
    p.add_argument("--split", choices=SPLITS, default="unlabelled", help="which samples (default: the unlabelled ones)")
    add_budget(p)
    p.add_argument("--id-suffix", default="", help="appended to sample ids, e.g. .mov for BlEmoRE test clips")
    p.set_defaults(func=_cmd_predict)


__getattr__ = moved_names(__name__, {"CURVE_FORMAT": "fusionkit.evaluation.curves"})
