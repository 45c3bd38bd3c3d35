"""What selection buys: the best recipe against controls that each remove one thing, on clean data and in
the regimes where selection should pay (heavy corruption, distractor encoders).

Systems (``fusionkit.spec.recipes.controls``): the best recipe (top-p 0.9, at least 2 encoders, rank_attention,
residual mean); every encoder kept in rank order (no selection); every encoder kept in a fixed order (no
selection, no ranking); top-p in a fixed order (selection, no ranking); the fusion module over a uniform gate.
Regimes (the uci-mfeat dataset's options): clean; heavy corruption (80% of samples, 2-4 encoders replaced by
noise); 18 or 6 noise distractor encoders beside the six real ones; 6 shuffled distractors (real views of other
samples); corrupted (30% of samples, 1-3 encoders). Test Score over folds x seeds; runs are cached in
benchmarks/results/selection-runs.jsonl, so an interrupted benchmark continues where it stopped, and the jobs
run seed by seed, fold by fold, so that a partial run covers every system alike.

    .venv/bin/python benchmarks/selection.py --source ../shared/data/uci-mfeat --workers 2
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from grid import grid_parser, mean_std, run_grid
from report import RESULTS, machine, markdown_table, write

REGIMES = {
    "clean": {},
    "heavy: 80% corrupted (2-4 encoders)": {"corrupt_fraction": 0.8, "corrupt_min": 2, "corrupt_max": 4},
    "18 noise distractors": {"distractors": 18, "distractor_kind": "noise"},
    "6 shuffled distractors": {"distractors": 6, "distractor_kind": "shuffled"},
    "6 noise distractors": {"distractors": 6, "distractor_kind": "noise"},
    "corrupted 30% (1-3 encoders)": {"corrupt_fraction": 0.3},
}
BEST = "best: top-p 0.9 (min 2), rank order"
KEEP_ALL = "keep all, rank order"


def dims_of(options: dict) -> dict[str, int]:
    from fusionkit.spec.recipes import UCI_DIMS

    sizes = list(UCI_DIMS.values())
    extra = {f"x{j:02d}": sizes[j % len(sizes)] for j in range(options.get("distractors", 0))}
    return {**UCI_DIMS, **extra}


def main() -> None:
    parser = grid_parser(__doc__, "runs/benchmark-selection")
    parser.add_argument("--regimes", nargs="*", default=list(REGIMES)[:4], help="which regimes (default: the first "
                        "four; the last two are measured with --regimes when time allows)")
    args = parser.parse_args()
    from fusionkit.components.datasets import build_dataset
    from fusionkit.spec.recipes import controls

    jobs = []
    for seed in range(args.seeds):
        for fold in range(args.folds):
            for setting in args.regimes:
                options = REGIMES[setting]
                store = Path(args.work) / f"store-{list(REGIMES).index(setting)}"
                if not (store / "index.json").exists():
                    build_dataset("uci-mfeat", {"source": args.source, "seed": 0, **options}, store, overwrite=True)
                for name, spec in controls(seed, dims_of(options)).items():
                    jobs.append({"setting": setting, "system": name, "fold": fold, "seed": seed, "store": str(store),
                                 "spec": spec})
    done = run_grid(jobs, RESULTS / "selection-runs.jsonl", args.workers)
    summarize(done, args)


def paired(done: dict, setting: str, a: str, b: str) -> tuple[float, float, int]:
    """Mean and std over (fold, seed) of Score(a) - Score(b), in points, on the runs both finished."""
    diffs = [100 * (done[(setting, a, f, s)]["test"]["score"] - done[(setting, b, f, s)]["test"]["score"])
             for (st, name, f, s) in done if st == setting and name == a and (setting, b, f, s) in done
             and "error" not in done[(setting, a, f, s)] and "error" not in done[(setting, b, f, s)]]
    return (float(np.mean(diffs)), float(np.std(diffs)), len(diffs)) if diffs else (float("nan"), float("nan"), 0)


def summarize(done: dict, args) -> None:
    from fusionkit.spec.recipes import controls

    systems = list(controls())
    stats = {setting: {name: mean_std([r for (st, n, f, s), r in done.items() if st == setting and n == name
                                       and f < args.folds and s < args.seeds], "test")
                       for name in systems}
             for setting in REGIMES if any(k[0] == setting for k in done)}
    differences = {setting: {name: paired(done, setting, BEST, name) for name in systems if name != BEST}
                   for setting in stats}
    data = {"machine": machine(), "folds": args.folds, "seeds": args.seeds, "regimes": REGIMES, "stats": stats,
            "best_minus_control_points": differences}
    sections = ["## What selection buys", "",
                f"`.venv/bin/python benchmarks/selection.py --source ../shared/data/uci-mfeat --workers 2`: test "
                f"Score over up to {args.folds} group-disjoint folds × {args.seeds} seeds, mean ± std (runs: how many "
                "finished). Each control changes one thing of the selective recipe (the seed method, "
                "`fusionkit.spec.recipes.selective`; its row is named \"best: ...\", the best recipe of the quality "
                "tables; `fusionkit.spec.recipes.controls`). The differences are paired: the selective recipe minus the "
                "control on the same fold and seed, in Score points, mean ± std over the pairs.", ""]
    for setting, by in stats.items():
        rows = [[name, *(f"{v[k][0]:.3f} ± {v[k][1]:.3f}" if k in v else "-" for k in ("acc_presence", "score")),
                 v["score"][2] if "score" in v else 0,
                 "" if name == BEST else "{:+.1f} ± {:.1f} ({})".format(*differences[setting][name])]
                for name, v in by.items()]
        sections += [f"### {setting}", "", markdown_table(
            ["system", "ACC_presence", "Score", "runs", "selective − this (points)"], rows), ""]
    sections += reading(differences)
    write("selection", data, "\n".join(sections))


def verdict(mean: float, std: float, n: int) -> str:
    """Beats / loses / within noise, by a paired difference against twice its standard error."""
    if n < 2:
        return "not measured"
    se = std / np.sqrt(n)
    return "within noise" if abs(mean) < 2 * se else ("the selective recipe ahead" if mean > 0 else "the control ahead")


def reading(differences: dict) -> list[str]:
    """What each control says, regime by regime, from the paired differences (no figure is written by hand)."""
    lines = ["### Reading", "",
             "Each line: the selective recipe minus a control, in Score points (paired mean ± std over folds × seeds), "
             "and whether it is beyond twice its standard error.", ""]
    for setting, diffs in differences.items():
        parts = []
        for control, label in ((KEEP_ALL, "selection (vs keep all, rank order)"),
                               ("top-p 0.9 (min 2), fixed order", "rank order (vs the same selection, fixed order)"),
                               ("fusion alone, uniform gate", "the gate's weighting (vs a uniform gate)")):
            mean, std, n = diffs[control]
            parts.append(f"{label}: {mean:+.1f} ± {std:.1f}, {verdict(mean, std, n)}")
        lines.append(f"- **{setting}**: " + "; ".join(parts) + ".")
    return lines


if __name__ == "__main__":
    main()
