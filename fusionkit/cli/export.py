"""``fusionkit export RUN --out DIR``: a trained run as split ONNX graphs and a manifest, for the runtime without
torch (``fusionkit-runtime``); ``--check STORE`` runs both on a store's rows and compares them."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

__all__ = ["add_commands"]


def _cmd_export(args: argparse.Namespace) -> int:
    from fusionkit.conditional.budget import Budget
    from fusionkit.data.open import DataSource
    from fusionkit.errors import FusionkitError
    from fusionkit.evaluation.budgets import fit_run_budget
    from fusionkit.export.check import check_export
    from fusionkit.export.graphs import export_model
    from fusionkit.models.factory import load_model

    run = Path(args.run)
    model = load_model(run / "best", device="cpu")
    budgets = []
    for given in args.budget or ():
        budget = Budget.parse(given)
        if not budget.mean:
            raise FusionkitError(f"--budget {given}: an export stores a mean budget (mean:40%), whose threshold "
                                 "is fitted now; a cap needs nothing stored: give it to the runtime at predict time")
        if args.data is None:
            raise FusionkitError(f"--budget {given}: its threshold is fitted on the run's validation fold; give "
                                 "the store the run trained on with --data STORE")
        budgets.append(budget)
    if budgets:
        store = DataSource(args.data, args.raw).open(model.spec)
        budgets = [fit_run_budget(run, model, store, budget) for budget in budgets]
        for budget in budgets:
            print(f"mean budget {budget.describe()}: threshold {budget.threshold:.4g} fitted on the validation fold")
    report: list[dict] = []
    check = None
    if args.check:  # checked before the export takes --out's place: a failed check replaces and leaves nothing
        check_store = DataSource(args.check, args.raw).open(model.spec)

        def check(folder: Path) -> None:
            report.extend(check_export(model, folder, check_store))

    out = export_model(model, args.out, budget=budgets, overwrite=args.overwrite, exporter=args.exporter, check=check)
    graphs = json.loads((out / "manifest.json").read_text(encoding="utf-8"))["sha256"]
    print(f"exported to {out}: {', '.join(sorted(graphs))}, with manifest.json")
    if args.check:
        for line in report:
            if "tower" in line:
                print(f"  checked tower {line['tower']}: {line['rows']} rows, embeddings within "
                      f"{line['max_embedding_diff']:.2g}")
                continue
            print(f"  checked budget {line['budget'] or 'gate rule'}: {line['rows']} rows, probabilities within "
                  f"{line['max_prob_diff']:.2g}, the same encoders run, the same answers "
                  f"({line['mean_gflops']:.4g} GFLOPs per sample)")
        print("the export matches the model")
    return 0


def add_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="write a trained run as ONNX graphs for the runtime without torch "
                       "(fusionkit-runtime)")
    p.add_argument("run", metavar="RUN", help="a run directory (its best/ checkpoint is exported)")
    p.add_argument("--out", required=True, metavar="DIR", help="the export folder: new or empty (or, with "
                   "--overwrite, an earlier export)")
    p.add_argument("--budget", metavar="mean:S%", action="append", help="store a mean budget, its threshold "
                   "fitted on the run's validation fold (needs --data); give it several times for several, which "
                   "a request names (--budget mean:40%% in the runtime; mean when one is stored)")
    p.add_argument("--data", metavar="STORE", help="the store the run trained on (to fit --budget)")
    p.add_argument("--check", metavar="STORE", help="run the export and the model on this store's first rows at "
                   "several budgets and compare them (probabilities, encoders run, answers) before the export takes "
                   "--out's place: a failed check leaves nothing")
    p.add_argument("--raw", metavar="MANIFEST", help="with --data or --check: the manifest of the live encoders' "
                   "inputs beside the store (as fusionkit train --raw)")
    p.add_argument("--exporter", choices=["torchscript", "dynamo"], default="torchscript",
                   help="torch's ONNX exporter: torchscript (default: fast) or dynamo (torch.export; needs onnxscript)")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier export in --out")
    p.set_defaults(func=_cmd_export)
