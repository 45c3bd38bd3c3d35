"""Fold ensembles against their single models, on a held-out test set (UCI Multiple Features blends).

The UCI blended task with 8 of its 40 writer-like groups held out as a labelled test set (the target domain,
unshifted: shift_strength 0), as a challenge's test clips are held out. Per seed, the best recipe
(`recipes.best()`) is cross-validated on the other groups (5 folds: one model per fold, each with its decoder
thresholds fitted on its own validation fold). The ensemble averages the 5 models' probabilities and fits its
thresholds on their pooled out-of-fold validation predictions (`fusionkit predict --cv`). Both are scored on the
held-out groups.

    .venv/bin/python benchmarks/ensemble.py --source ../shared/data/uci-mfeat --workers 2
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from grid import grid_parser
from report import machine, markdown_table, write


def main() -> None:
    args = grid_parser(__doc__, "runs/benchmark-ensemble").parse_args()
    import torch

    from fusionkit.components.datasets import build_dataset
    from fusionkit.data.open import spec_store
    from fusionkit.evaluation.ensemble import FoldEnsemble
    from fusionkit.spec import load_spec, recipes
    from fusionkit.training.tasks import ClassificationTask
    from fusionkit.training.train import cross_validate

    work = Path(args.work)
    store_path = work / "store"
    if not (store_path / "index.json").exists():
        build_dataset("uci-mfeat", {"source": args.source, "seed": 0, "shift_groups": 8, "shift_strength": 0.0},
                      store_path, overwrite=True)
    torch.set_num_threads(1)
    singles, ensembles, paired = [], [], []
    for seed in range(args.seeds):
        cv = work / f"cv-s{seed}"
        cross_validate(recipes.best(seed), store_path, cv, resume=(cv / "run.json").exists(), progress=False,
                       jobs=args.workers)
        store = spec_store(load_spec(recipes.best(seed)), store_path)
        held_out = store.select(domain="target")
        ensemble = FoldEnsemble([cv])
        own = [ClassificationTask.evaluate_model(model, store, held_out)["score"] for model in ensemble.models]
        ensemble.fit_decoder(store)
        together = ensemble.evaluate(store, held_out)["score"]
        singles += own
        ensembles.append(together)
        paired.append(together - float(np.mean(own)))
        print(f"seed {seed}: singles {np.round(own, 3).tolist()}, ensemble {together:.3f}", flush=True)
    n_test = len(held_out)
    data = {"machine": machine(), "folds": 5, "seeds": args.seeds, "held_out_samples": n_test,
            "single_scores": singles, "ensemble_scores": ensembles,
            "ensemble_minus_mean_single": {"mean": float(np.mean(paired)), "std": float(np.std(paired)), "n": len(paired)}}
    rows = [["one fold model (its own thresholds)", f"{np.mean(singles):.3f} ± {np.std(singles):.3f}", len(singles)],
            ["ensemble of the 5 fold models (out-of-fold thresholds)",
             f"{np.mean(ensembles):.3f} ± {np.std(ensembles):.3f}", len(ensembles)]]
    section = "\n".join([
        "## Fold ensembles", "",
        "`.venv/bin/python benchmarks/ensemble.py --source ../shared/data/uci-mfeat --workers 2`: the UCI blended task "
        f"with 8 of its 40 writer-like groups held out as a labelled test set ({n_test} samples, never trained or "
        "validated on). Per seed, `recipes.best()` cross-validated on the other groups (5 folds); the ensemble "
        "averages the 5 fold models' probabilities, with decoder thresholds fitted on their pooled out-of-fold "
        "validation predictions (`fusionkit predict --cv`). Score on the held-out groups.", "",
        markdown_table(["system", "Score (held out)", "runs"], rows), "",
        f"Ensemble − the mean of its own 5 fold models, paired per seed: {100 * np.mean(paired):+.1f} ± "
        f"{100 * np.std(paired):.1f} Score points ({len(paired)} seeds).", ""])
    write("ensemble", data, section)


if __name__ == "__main__":
    main()
