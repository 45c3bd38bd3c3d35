"""bf16 against float32 on the quality recipe: does mixed precision keep the Score?

The selective recipe (``fusionkit.spec.recipes.selective``, the seed method) on clean UCI blends, 5 folds x 3 seeds, trained with
``train.precision: bf16`` (autocast on this machine's device); the float32 runs are the selection
benchmark's runs of the same recipe on the same data, with the same code (benchmarks/results/selection-runs.jsonl;
run benchmarks/selection.py first). The differences are paired by fold and seed.

    .venv/bin/python benchmarks/precision.py --source ../shared/data/uci-mfeat --workers 2
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from grid import grid_parser, load_cache, mean_std, run_grid
from report import RESULTS, machine, markdown_table, write

SYSTEM = "best: top-p 0.9 (min 2), rank order"  # the selection benchmark's name of recipes.selective()


def main() -> None:
    args = grid_parser(__doc__, "runs/benchmark-selection").parse_args()
    from fusionkit.components.datasets import build_dataset
    from fusionkit.spec import recipes

    store = Path(args.work) / "store-0"  # the selection benchmark's clean store
    if not (store / "index.json").exists():
        build_dataset("uci-mfeat", {"source": args.source, "seed": 0}, store, overwrite=True)
    jobs = []
    for seed in range(args.seeds):
        for fold in range(args.folds):
            spec = recipes.selective(seed)
            spec["train"] = {**spec["train"], "precision": "bf16"}
            jobs.append({"setting": "clean", "system": "bf16", "fold": fold, "seed": seed, "store": str(store),
                         "spec": spec})
    bf16 = run_grid(jobs, RESULTS / "precision-runs.jsonl", args.workers)
    fp32 = {k: r for k, r in load_cache(RESULTS / "selection-runs.jsonl").items() if k[0] == "clean" and k[1] == SYSTEM}
    pairs = [(fp32[("clean", SYSTEM, f, s)], r) for (_, _, f, s), r in bf16.items()
             if ("clean", SYSTEM, f, s) in fp32 and "error" not in r and f < args.folds and s < args.seeds]
    diffs = np.array([100 * (b["test"]["score"] - a["test"]["score"]) for a, b in pairs])
    stats = {"float32": mean_std([a for a, _ in pairs], "test"), "bf16": mean_std([b for _, b in pairs], "test")}
    seconds = {"float32": float(np.mean([a["seconds"] for a, _ in pairs])), "bf16": float(np.mean([b["seconds"] for _, b in pairs]))}
    data = {"machine": machine(), "pairs": len(pairs), "stats": stats, "seconds_per_run": seconds,
            "bf16_minus_float32_points": {"mean": float(diffs.mean()), "std": float(diffs.std())}}
    rows = [[name, f"{v['score'][0]:.3f} ± {v['score'][1]:.3f}", v["score"][2], f"{seconds[name]:.1f}"]
            for name, v in stats.items()]
    section = "\n".join([
        "## Mixed precision: bf16 against float32", "",
        "`.venv/bin/python benchmarks/precision.py --source ../shared/data/uci-mfeat --workers 2` (after "
        f"benchmarks/selection.py): the selective recipe (the seed method) on clean UCI blends, {len(pairs)} paired runs (folds × seeds), "
        "bf16 autocast on the CPU against float32 runs of the same recipe, data and code.", "",
        markdown_table(["precision", "test Score", "runs", "s / run"], rows), "",
        f"bf16 − float32: {diffs.mean():+.2f} ± {diffs.std():.2f} Score points (paired over fold and seed)."])
    write("precision", data, section)


if __name__ == "__main__":
    main()
