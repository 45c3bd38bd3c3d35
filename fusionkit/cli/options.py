"""Arguments that several commands share, declared once: where the data is, which device, which runs."""

from __future__ import annotations

import argparse

__all__ = ["DEVICE_HELP", "CONFINE_HELP", "BUDGET_HELP", "BUDGET_COSTS_HELP", "SPLITS", "add_device", "add_confine",
           "add_data", "data_source", "add_runs", "add_budget"]

DEVICE_HELP = "auto (default: CUDA when present, else the CPU), cpu, cuda or cuda:K"
CONFINE_HELP = ("refuse manifest paths that resolve outside DIR (after .. and symlinks): for manifests you did not "
                "write; without it a path may point anywhere, e.g. at a shared data disk")
BUDGET_HELP = ("a compute cap per sample for a model with on-demand encoders: GFLOPs (e.g. 2.5) or a share of the "
               "full cost (e.g. 40%%); each sample runs its on-demand encoders in the gate's order while they fit. "
               "mean:2.5 or mean:40%%: a mean over the samples instead (a threshold fitted on the run's validation "
               "fold; hard samples may spend more)")
BUDGET_COSTS_HELP = ("what a budget's share counts: flops (default: each encoder's GFLOPs per sample) or time (each "
                     "on-demand live encoder's seconds per sample, reading and decoding included, measured here "
                     "on the first 256 samples to score before they are scored: where FLOPs do not follow time)")
#: What `evaluate --split` and `predict --split` may name.
SPLITS = ("test", "val", "target", "labelled", "unlabelled", "all")


def add_device(p: argparse.ArgumentParser, default: str | None = None) -> None:
    p.add_argument("--device", default=default, help=DEVICE_HELP)


def add_confine(p: argparse.ArgumentParser) -> None:
    p.add_argument("--confine", metavar="DIR", help=CONFINE_HELP)


def add_data(p: argparse.ArgumentParser) -> None:
    """``--data`` (a store, or a manifest when every encoder is live), ``--raw``, ``--confine`` and ``--device``:
    what `train`, `evaluate` and `predict` read a spec's inputs from, and where its model runs."""
    p.add_argument("--data", required=True, metavar="DATA", help="a feature store directory, or a raw manifest "
                   "(.csv/.jsonl) when every encoder is live")
    p.add_argument("--raw", metavar="MANIFEST", help="raw manifest (.csv/.jsonl) with the inputs of the spec's live "
                   "encoders, beside the feature store of --data (see docs/live-encoders.md)")
    add_confine(p)
    add_device(p)


def data_source(args: argparse.Namespace, target: str | None = None):
    """The :class:`~fusionkit.data.open.DataSource` of the options :func:`add_data` added, with ``target``."""
    from fusionkit.data.open import DataSource

    return DataSource(args.data, args.raw, args.confine, target)


def add_runs(p: argparse.ArgumentParser) -> None:
    """``RUN...``, ``--cv`` and ``--partial``: one trained run, or several as a fold ensemble."""
    p.add_argument("run", metavar="RUN", nargs="+", help="a run directory; several runs, or a cross-validation "
                   "directory (train --cv), are averaged as a fold ensemble whose decoder thresholds are fitted on "
                   "their pooled out-of-fold validation predictions")
    p.add_argument("--cv", action="store_true", help="RUN is a cross-validation directory: ensemble its fold models "
                   "(the same as naming it alone)")
    p.add_argument("--partial", action="store_true", help="ensemble the finished folds of an incomplete "
                   "cross-validation (by default every fold it lists must be finished)")


def add_budget(p: argparse.ArgumentParser) -> None:
    """``--budget`` and ``--budget-costs``: which on-demand encoders each sample runs, counted in what."""
    p.add_argument("--budget", metavar="B", help=BUDGET_HELP)
    p.add_argument("--budget-costs", choices=("flops", "time"), default="flops", help=BUDGET_COSTS_HELP)
