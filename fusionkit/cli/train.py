"""``fusionkit train``: one run, or a cross-validation over every fold."""

from __future__ import annotations

import argparse
import os

from fusionkit.cli.options import add_data, data_source

__all__ = ["add_commands"]


def _cmd_train(args: argparse.Namespace) -> int:
    from fusionkit.blemore.metrics import format_metric
    from fusionkit.training.train import cross_validate, train

    progress, reports = not args.quiet, os.environ.get("RANK", "0") == "0"  # under torchrun, rank 0 reports
    args.interrupt_hint = f"the run is resumable: add --resume to the same command (run: {args.out})"
    if args.cv:
        summary = cross_validate(args.spec, data_source(args, args.target), args.out, resume=args.resume, progress=progress,
                                 overwrite=args.overwrite, jobs=args.jobs, device=args.device)
        if not reports:
            return 0
        print(f"cross-validation over {len(summary['score']['values'])} folds (test folds):")
        for key, value in summary.items():
            print(f"  {key:<13} {format_metric(value['mean'])} ± {format_metric(value['std'])}")
        print(f"written to {args.out}/cv.json")
        return 0
    metrics = train(args.spec, data_source(args, args.target), args.out, fold=args.fold, resume=args.resume, progress=progress,
                    overwrite=args.overwrite, device=args.device)
    if not reports:
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


def add_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train a model on a feature store (and raw inputs for live encoders)")
    p.add_argument("spec", metavar="SPEC")
    add_data(p)
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
