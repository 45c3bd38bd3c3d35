"""Where does a scout's gap to the known-corruption control come from? Two measurements on the corrupted testbed's
kept scout models (`benchmarks/per_sample.py --testbed corrupt-views`, run it first), on each test fold:

- **Does the scout's choice see the corruption?** The AUC, per on-demand view, of the scout's value for the view
  before anything on demand ran (its first stage) against whether the sample's view is corrupted (a lower value
  where it is: AUC above 0.5).
- **Is a drop on a training row what a new row shows?** Each view's mean drop of the training loss when it joins a
  row that ran nothing on demand, clean and corrupted, on the training rows and on the test rows.
- **What could a rule that reads the previews reach?** A *preview-probe rule*: a quadratic logistic probe fitted
  on the training fold WITH the corruption labels, from each view's preview token to whether the view is corrupted;
  each view then runs where the probe's P(clean) exceeds tau, and at most the k cheapest such views per row
  (tau in 0.1 .. 0.9, k in 1 .. m). Its upper hull over those choices, read at the scout's mean cost, beside the
  scout and the known-corruption control (which knows exactly which views are corrupted). It chooses tau and k on
  the test fold, so it is optimistic: a ceiling for what the previews tell, not a deployable rule.

    .venv/bin/python benchmarks/scout_diagnostics.py --seeds 1
    .venv/bin/python benchmarks/scout_diagnostics.py --seeds 1 --preview structure
    .venv/bin/python benchmarks/scout_diagnostics.py --seeds 1 --preview structure --corruption occlusion
"""

from __future__ import annotations

import argparse
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from per_sample import (
    CORRUPT_SCOUTS,
    CORRUPTIONS,
    MIDDLE,
    PREVIEWS,
    _auc,
    corrupt_flags,
    corrupt_tag,
    tokens_of,
    verdict_auc,
)
from report import machine, markdown_table, write

TAUS = (0.1, 0.3, 0.5, 0.7, 0.9)


def _probe(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray) -> np.ndarray:
    """P(corrupted) on ``test_x`` from a quadratic logistic probe fitted on ``train_x`` (standardised features and
    their squares, as ``per_sample.probe_auc`` fits)."""
    import torch

    mu, sigma = train_x.mean(0), train_x.std(0) + 1e-6

    def features(x: np.ndarray) -> torch.Tensor:
        z = torch.tensor((x - mu) / sigma, dtype=torch.float32)
        return torch.cat([z, z ** 2], dim=1)

    torch.manual_seed(0)
    probe = torch.nn.Linear(2 * train_x.shape[1], 1)
    optimiser = torch.optim.Adam(probe.parameters(), lr=0.05)
    x, y = features(train_x), torch.tensor(train_y, dtype=torch.float32)
    for _ in range(300):
        optimiser.zero_grad()
        torch.nn.functional.binary_cross_entropy_with_logits(probe(x).squeeze(1), y).backward()
        optimiser.step()
    with torch.no_grad():
        return torch.sigmoid(probe(features(test_x)).squeeze(1)).numpy()


def diagnose(job: dict) -> dict:
    """One kept scout model: its first-stage AUCs, and the scout, the preview-probe rule and the known control at
    the middle mean budgets."""
    import torch

    from fusionkit.data.open import spec_store
    from fusionkit.evaluation.controls import _Scorer, frontier_at, known_corruption, static_frontier
    from fusionkit.inference import fit_mean_budget
    from fusionkit.models.factory import load_model
    from fusionkit.training.scout_values import held_out_examples
    from fusionkit.training.tasks import ClassificationTask
    from fusionkit.training.train import make_split

    torch.set_num_threads(1)
    started = time.perf_counter()
    model = load_model(Path(job["run"]) / "best", device="cpu")
    store = spec_store(model.spec, job["store"], None)
    split = make_split(store, job["fold"])
    names, demand = model.encoder_names, list(model.on_demand)
    looks = {names.index(e.preview_of): names.index(e.name) for e in model.spec.encoders if e.preview_of}

    def corrupted(index: np.ndarray) -> np.ndarray:
        return np.array([[names[k] in store.samples[i].corrupted for k in demand] for i in index])

    drops = {}  # in-sample against held-out: each view's mean drop from the empty state, clean and corrupted
    for part in ("train", "test"):
        index = getattr(split, part)
        measured = held_out_examples(model, store, index, model.spec.train)[0].measured.numpy()
        bad = corrupted(index)
        drops[part] = {names[k]: [float(measured[~bad[:, j], j].mean()), float(measured[bad[:, j], j].mean())]
                       for j, k in enumerate(demand)}
    raw, present = tokens_of(model, store, split.test)
    first = raw.clone()
    first[:, demand] = 0.0
    with torch.no_grad():
        values = (model.scout(first, present, torch.zeros(len(raw), len(demand), dtype=torch.bool)) if model.staged
                  else model.gate.score(first + model.identity, present)[:, demand])
    bad = corrupted(split.test)
    auc = {names[k]: _auc(-values[:, j].numpy(), bad[:, j]) for j, k in enumerate(demand)}
    judged = verdict_auc(model, store, split.test) or None  # the quality scout's verdicts; None for the others

    train_raw, _ = tokens_of(model, store, split.train)
    train_bad = corrupted(split.train)
    clean = np.stack([1 - _probe(train_raw[:, looks[k]].numpy(), train_bad[:, j], raw[:, looks[k]].numpy())
                      for j, k in enumerate(demand)], 1)
    scorer = _Scorer(model, store, split.test, None)
    costs = np.array([model.encoder_costs()[names[k]] for k in demand])
    order = np.argsort(costs, kind="stable")
    choices = [scorer.point(scorer.outputs(np.zeros_like(clean, dtype=bool)))]
    for tau in TAUS:
        likely = clean > tau
        taken = np.cumsum(likely[:, order], axis=1)
        for most in range(1, len(demand) + 1):
            runs = np.zeros_like(likely)
            runs[:, order] = likely[:, order] & (taken <= most)
            choices.append(scorer.point(scorer.outputs(runs)))
    probe_frontier = static_frontier(choices)
    known = static_frontier(known_corruption(model, store, split.test))
    points = []
    for share in sorted(MIDDLE):
        budget = fit_mean_budget(model, store, split.val, f"mean:{100 * share:g}%")
        metrics = ClassificationTask.evaluate_model(model, store, split.test, budget=budget)
        cost = metrics["compute"]["mean_gflops"]
        points.append({"share": share, "scout": metrics["score"], "probe_rule": frontier_at(probe_frontier, cost),
                       "known": frontier_at(known, cost)})
    return {"system": job["system"], "fold": job["fold"], "seed": job["seed"], "auc": auc, "points": points,
            "drops": drops, "judged": judged,
            "seconds": time.perf_counter() - started}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--seeds", type=int, default=1)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--work", default="runs/benchmark-per-sample")
    parser.add_argument("--preview", choices=PREVIEWS, default="projection")
    parser.add_argument("--corruption", choices=CORRUPTIONS, default="noise")
    args = parser.parse_args()
    work = Path(args.work)
    variant = corrupt_tag(args.preview, args.corruption)
    tag, store = f"corrupt-views{variant}", work / f"store-corrupted{variant}"
    jobs = [{"system": scout, "fold": fold, "seed": seed, "store": str(store),
             "run": str(work / "runs" / f"{tag}-{scout}-f{fold}-s{seed}")}
            for scout in CORRUPT_SCOUTS for fold in range(args.folds) for seed in range(args.seeds)]
    missing = [j["run"] for j in jobs if not (Path(j["run"]) / "best").is_dir()]
    if missing:
        raise SystemExit(f"kept scout runs missing (run benchmarks/per_sample.py --testbed corrupt-views first): "
                         f"{missing[:3]}")
    with ProcessPoolExecutor(args.workers) as pool:
        results = list(pool.map(diagnose, jobs))
    rows, drop_rows = [], []
    data = {"machine": machine(), "preview": args.preview, "folds": args.folds, "seeds": args.seeds, "systems": {}}
    for scout in CORRUPT_SCOUTS:
        runs = [r for r in results if r["system"] == scout]
        aucs = {view: float(np.mean([r["auc"][view] for r in runs])) for view in runs[0]["auc"]}
        entry = {"auc_first_stage": aucs, "points": []}
        if runs[0]["judged"] is not None:
            entry["auc_verdicts"] = {view: float(np.mean([r["judged"][view] for r in runs]))
                                     for view in runs[0]["judged"]}
        for i, share in enumerate(sorted(MIDDLE)):
            pts = [r["points"][i] for r in runs]
            gap = {key: 100 * float(np.mean([p[key] - p["scout"] for p in pts])) for key in ("probe_rule", "known")}
            entry["points"].append({"share": share, "scout": float(np.mean([p["scout"] for p in pts])), **gap})
            rows.append([f"{scout}, mean {100 * share:g}%", f"{np.mean([p['scout'] for p in pts]):.3f}",
                         f"{gap['probe_rule']:+.1f}", f"{gap['known']:+.1f}",
                         ", ".join(f"{v} {a:.2f}" for v, a in aucs.items()) if i == 0 else
                         ", ".join(f"{v} {a:.2f}" for v, a in entry["auc_verdicts"].items()) + " (verdicts)"
                         if i == 1 and "auc_verdicts" in entry else ""])
        entry["drops"] = {part: {view: [float(np.mean([r["drops"][part][view][i] for r in runs])) for i in (0, 1)]
                                 for view in runs[0]["drops"][part]} for part in ("train", "test")}
        drop_rows.append([scout, *("{:.3f} / {:.3f}".format(*entry["drops"][part][view])
                                   for view in entry["drops"]["train"] for part in ("train", "test"))])
        data["systems"][scout] = entry
    section = "\n".join([
        f"## Scout diagnostics: corrupt-views testbed, {args.preview} previews"
        + ("" if args.corruption == "noise" else f", {args.corruption}"), "",
        f"`.venv/bin/python benchmarks/scout_diagnostics.py --seeds {args.seeds}"
        + corrupt_flags(args.preview, args.corruption)
        + f"`, on the kept models of `benchmarks/per_sample.py --testbed corrupt-views` ({args.folds} folds × "
        f"{args.seeds} seed, test folds). *probe rule − scout*: a rule that reads each view's preview through a probe "
        "fitted WITH the corruption labels (each view run where P(clean) > tau, at most the k cheapest per row; "
        "tau and k chosen on the test fold: optimistic), at the scout's mean cost, in points. *known − scout*: the "
        "known-corruption control. *first-stage AUC*: how well the scout's value for each view before anything on "
        "demand ran tells a corrupted view (0.5: not at all); for the quality scout, the second row gives its judges' "
        "verdicts' AUC.", "",
        markdown_table(["scout, budget", "Score", "probe rule − scout", "known − scout", "first-stage AUC"], rows),
        "", "In-sample against held-out: each view's mean drop of the training loss when it joins a row that ran "
        "nothing on demand, on the training rows and on the test rows, clean / corrupted (the same models).", "",
        markdown_table(["scout model", *(f"{view}, {part} rows" for view in data["systems"][CORRUPT_SCOUTS[0]]["drops"]
                                         ["train"] for part in ("training", "test"))], drop_rows),
        ""])
    write(f"scout-diagnostics-{tag}", data, section)


if __name__ == "__main__":
    main()
