"""``fusionkit sweep``: a recipe search on Optuna (the search itself is :mod:`fusionkit.training.sweep`)."""

from __future__ import annotations

import argparse
from pathlib import Path

__all__ = ["add_commands"]


def _cmd_sweep(args: argparse.Namespace) -> int:
    from fusionkit.training.sweep import sweep

    args.interrupt_hint = f"the sweep is resumable: run the same command again (sweep: {args.out})"

    summary = sweep(args.spec, args.data, args.space, args.trials, args.out, storage=args.storage,
                    study_name=args.study, jobs=args.jobs, fold=args.fold, cv=args.cv, seed=args.seed,
                    heartbeat=args.heartbeat)
    print(f"{summary['complete']} complete, {summary['pruned']} pruned, {summary['failed']} failed trial(s)")
    if "best_trial" in summary:
        print(f"best: trial {summary['best_trial']}, Score {summary['best_score']:.4f}, {summary['best_params']}")
        print(f"best spec written to {Path(args.out) / 'best.yaml'}; table: {Path(args.out) / 'trials.md'}")
    return 0


def add_commands(sub: argparse._SubParsersAction) -> None:
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
