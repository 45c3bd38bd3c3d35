"""Conditional execution on the UCI blended task: accuracy against compute, from one trained model per fold and seed.

Always run: the five pre-extracted views (fou, fac, kar, zer, mor). On demand: two live timm CNNs (`test_resnet`,
random init from one local weights file) on the `pix` images, trained end to end, at two costs: 10x10 and 40x40
inputs (their FLOPs measured by fusionkit). The recipe is `recipes.best()`'s gate and fusion (every encoder kept
when it runs, attention gate with rank supervision, rank_attention with the residual mean path).

Systems, 5 folds x 2 seeds, test-fold Score:

- keep-all: the same recipe with both CNNs always run (its own training);
- always-run only: the five views;
- the scout: one model with both CNNs on demand, evaluated at a cap of 0% and 100% and at mean budgets
  (`mean:S%`, a threshold fitted on the run's validation fold);
- random rows: the same model, each CNN run on a random share of the rows equal to the scout's run rate at that
  budget (what a budget without a gate gives);
- top-n, everything run: the seed method (`recipes.selective()`: top-p 0.9, at least 2, in rank order) over the
  same seven encoders, both CNNs always run (selection without on-demand execution saves nothing).

Wall clock: the seconds of each evaluation (`benchmarks/conditional_wallclock.py` times reading on demand against reading every image).

    .venv/bin/python benchmarks/conditional_uci.py --source ../shared/data/uci-mfeat --workers 2 --seeds 2
"""

from __future__ import annotations

import csv
import json
import time
from pathlib import Path

import numpy as np
from grid import grid_parser, run_grid
from live import CNN, FIVE, pix_images, save_cnn_weights
from report import RESULTS, machine, markdown_table, write

MEAN_SHARES = (0.1, 0.25, 0.4, 0.55, 0.7, 0.85)
SIZES = {"cnn_light": [10, 10], "cnn_heavy": [40, 40]}
#: The heavy CNN's input side of the first measurement; another (``--heavy-size``) keeps its runs and caches apart.
HEAVY = 40


def sizes_for(heavy: int) -> dict[str, list[int]]:
    return {**SIZES, "cnn_heavy": [heavy, heavy]}


def size_tag(heavy: int) -> str:
    return "" if heavy == HEAVY else f"-h{heavy}"


def two_columns(manifest: Path) -> Path:
    """The images' manifest with the `cnn` column as one column per CNN (a live encoder reads its own column)."""
    out = manifest.with_name("manifest-two-cnns.csv")
    if not out.exists():
        with open(manifest, newline="") as fh:
            rows = list(csv.DictReader(fh))
        with open(out, "w", newline="") as fh:
            columns = [c for c in rows[0] if c != "cnn"] + list(SIZES)
            writer = csv.DictWriter(fh, columns)
            writer.writeheader()
            for row in rows:
                writer.writerow({**{k: v for k, v in row.items() if k != "cnn"}, **{name: row["cnn"] for name in SIZES}})
    return out


def cnn_material(source: str, work: Path) -> tuple[Path, Path, Path]:
    """The clean store, the images' manifest with a column per CNN, and the CNNs' initial weights, made once."""
    clean, pix_manifest = pix_images(source, work)
    weights = work / "cnn-init.safetensors"
    if not weights.exists():
        save_cnn_weights(weights)
    return clean, two_columns(pix_manifest), weights


def specs(seed: int, weights: Path, variant: dict[str, float] | None = None, heavy: int = HEAVY) -> dict[str, dict]:
    from fusionkit.spec import recipes

    cnns = {name: {**CNN, "name": name, "img_size": size, "pretrained": str(weights.resolve())}
            for name, size in sizes_for(heavy).items()}
    keep_all = recipes.best(seed, dims={**FIVE, **{name: 96 for name in SIZES}})
    keep_all["encoders"] = [cnns.get(e["name"], e) for e in keep_all["encoders"]]
    scout = json.loads(json.dumps(keep_all))
    for block in scout["encoders"]:
        if block["name"] in SIZES:
            block["run"] = "on_demand"
    if variant:
        scout["conditional"] = dict(variant)
    top_n = recipes.selective(seed, dims={**FIVE, **{name: 96 for name in SIZES}})
    top_n["encoders"] = [cnns.get(e["name"], e) for e in top_n["encoders"]]
    return {"keep-all": keep_all, scout_system(variant): scout, "always-run only": recipes.best(seed, dims=FIVE),
            "top-n, everything run": top_n}


#: The scout's training variants: conditional option -> (command-line flag, tag of runs and caches, its words).
VARIANTS = {"full_budget_rows": ("--full-budget-rows", "fb", "full budget on {:g} of the rows"),
            "full_budget_weight": ("--full-budget-weight", "fw", "full-budget pass weight {:g}")}


def scout_system(variant: dict[str, float] | None) -> str:
    """The scout's system name: a variant says its training options."""
    return ", ".join(["scout", *(VARIANTS[k][2].format(v) for k, v in (variant or {}).items())])


def variant_tag(variant: dict[str, float]) -> str:
    return "".join(f"-{VARIANTS[k][1]}{v:g}" for k, v in variant.items())


def variant_flags(variant: dict[str, float]) -> str:
    return "".join(f" {VARIANTS[k][0]} {v:g}" for k, v in variant.items())


def random_rows(model, store, index, rates: dict[str, float], seed: int) -> float:
    """Score with each on-demand encoder run on a random share of the rows (its rate), the others masked."""
    import torch

    from fusionkit.models.fusion import decoder_inputs
    from fusionkit.training.tasks import evaluate_outputs

    rng = np.random.default_rng(seed)
    parts: dict[str, list[np.ndarray]] = {}
    model.eval()
    with torch.no_grad():
        for start in range(0, len(index), 256):
            rows = index[start:start + 256]
            inputs, lengths, mask = store.inputs_for(model, rows)
            keep = torch.ones(len(rows), len(model.encoder_names), dtype=torch.bool) if mask is None else mask.bool()
            for k, name in enumerate(model.encoder_names):
                if name in rates:
                    keep[:, k] &= torch.from_numpy(rng.random(len(rows)) < rates[name])
            out = model(inputs, lengths, keep, everything=True)
            for key, value in decoder_inputs(out).items():
                parts.setdefault(key, []).append(value)
    outputs = {k: np.concatenate(v) for k, v in parts.items()}
    return evaluate_outputs(model, outputs, store.truth_matrix(index))["score"]


def evaluate_scout(run: Path, clean: Path, manifest: Path, fold: int, seed: int) -> dict:
    import torch

    from fusionkit.data.open import spec_store
    from fusionkit.inference import fit_mean_budget
    from fusionkit.models.factory import load_model
    from fusionkit.training.tasks import ClassificationTask
    from fusionkit.training.train import make_split

    torch.set_num_threads(1)
    model = load_model(run / "best", device="cpu")
    store = spec_store(model.spec, clean, manifest)
    split = make_split(store, fold)
    costs = model.encoder_costs()
    demand_cost = sum(costs[n] for n in SIZES)
    points = []
    budgets = [("cap 0%", "0%"), *((f"mean {s:.0%}", f"mean:{100 * s:g}%") for s in MEAN_SHARES), ("cap 100%", "100%")]
    for label, budget in budgets:
        if budget.startswith("mean:"):
            budget = fit_mean_budget(model, store, split.val, budget)
        started = time.perf_counter()
        metrics = ClassificationTask.evaluate_model(model, store, split.test, budget=budget)
        seconds = time.perf_counter() - started
        rates = {n: metrics["compute"]["run_rate"][n] for n in SIZES}
        spent = sum(rates[n] * costs[n] for n in SIZES) / demand_cost
        point = {"budget": label, "score": metrics["score"], "spent": spent, "rates": rates, "seconds": seconds}
        if 0.0 < spent < 1.0:
            point["random"] = random_rows(model, store, split.test, rates, seed=1000 * fold + seed)
        points.append(point)
    return {"fold": fold, "seed": seed, "checkpoint": checkpoint_hash(run), "costs": costs, "points": points}


def checkpoint_hash(run: Path) -> str:
    """SHA-256 of a run's best weights: a cached evaluation holds for the model it was made from only."""
    from fusionkit.files import sha256_file

    return sha256_file(run / "best" / "model.safetensors")


def main() -> None:
    parser = grid_parser(__doc__, "runs/benchmark-conditional")
    parser.add_argument("--full-budget-rows", type=float, default=None, help="train the scout with "
                        "conditional.full_budget_rows (a variant, reported in its own section)")
    parser.add_argument("--full-budget-weight", type=float, default=None, help="train the scout with "
                        "conditional.full_budget_weight (a variant, reported in its own section)")
    parser.add_argument("--heavy-size", type=int, default=HEAVY, help="the heavy CNN's input side (its runs, caches "
                        "and section are kept apart from the 40x40 measurement's)")
    args = parser.parse_args()
    variant = {k: v for k, v in (("full_budget_rows", args.full_budget_rows),
                                 ("full_budget_weight", args.full_budget_weight)) if v is not None}
    scout = scout_system(variant)
    tag = size_tag(args.heavy_size) + variant_tag(variant)
    work = Path(args.work)
    clean, manifest, weights = cnn_material(args.source, work)
    jobs = []
    for fold in range(args.folds):
        for seed in range(args.seeds):
            for system, spec in specs(seed, weights, variant, args.heavy_size).items():
                job = {"setting": "clean", "system": system, "fold": fold, "seed": seed, "store": str(clean),
                       "raw": str(manifest) if system != "always-run only" else None, "spec": spec}
                if system == scout:
                    job["keep"] = str(work / "runs" / f"scout{tag}-f{fold}-s{seed}")
                jobs.append(job)
    done = run_grid(jobs, RESULTS / f"conditional-uci-runs{size_tag(args.heavy_size)}.jsonl", args.workers)
    cache = RESULTS / f"conditional-uci-scout{tag}.jsonl"
    evaluated = {}
    if cache.exists():
        for line in cache.read_text().splitlines():
            r = json.loads(line)
            evaluated[(r["fold"], r["seed"])] = r
    with open(cache, "a") as fh:
        for fold in range(args.folds):
            for seed in range(args.seeds):
                run = work / "runs" / f"scout{tag}-f{fold}-s{seed}"
                if evaluated.get((fold, seed), {}).get("checkpoint") != checkpoint_hash(run):  # new, or retrained
                    r = evaluate_scout(run, clean, manifest, fold, seed)
                    evaluated[(fold, seed)] = r
                    fh.write(json.dumps(r) + "\n")
                    fh.flush()
    keys = [(f, s) for f in range(args.folds) for s in range(args.seeds)]
    systems = ("keep-all", "always-run only", scout, "top-n, everything run")
    score = {name: np.array([done[("clean", name, f, s)]["test"]["score"] for f, s in keys]) for name in systems}
    seconds = {name: float(np.mean([done[("clean", name, f, s)]["seconds"] for f, s in keys])) for name in systems}
    labels = [p["budget"] for p in evaluated[keys[0]]["points"]]
    rows, summary = [], []
    n = len(keys)
    for i, label in enumerate(labels):
        pts = [evaluated[k]["points"][i] for k in keys]
        s = np.array([p["score"] for p in pts])
        spent = float(np.mean([p["spent"] for p in pts]))
        gap = s - score["keep-all"]
        entry = {"budget": label, "score": [float(s.mean()), float(s.std())], "spent": spent,
                 "saved": 1 - spent, "minus_keep_all": [float(gap.mean()), float(gap.std() / np.sqrt(n))],
                 "seconds": float(np.mean([p["seconds"] for p in pts]))}
        random_text = "-"
        if all("random" in p for p in pts):
            r = np.array([p["random"] for p in pts])
            d = s - r
            entry["random"] = [float(r.mean()), float(r.std())]
            entry["scout_minus_random"] = [float(d.mean()), float(d.std() / np.sqrt(n))]
            random_text = f"{r.mean():.3f} ± {r.std():.3f} ({100 * d.mean():+.1f} ± {100 * d.std() / np.sqrt(n):.1f})"
        summary.append(entry)
        rows.append([f"{scout}, {label}", f"{100 * spent:.0f}%", f"{s.mean():.3f} ± {s.std():.3f}",
                     f"{100 * gap.mean():+.1f} ± {100 * gap.std() / np.sqrt(n):.1f}", random_text,
                     f"{entry['seconds']:.2f}"])
    for position, (name, spent) in enumerate((("keep-all", "100%"), ("top-n, everything run", "100%"),
                                              ("always-run only", "0%"))):
        gap = score[name] - score["keep-all"]
        versus = "-" if name == "keep-all" else f"{100 * gap.mean():+.1f} ± {100 * gap.std() / np.sqrt(n):.1f}"
        rows.insert(position, [name, spent, f"{score[name].mean():.3f} ± {score[name].std():.3f}", versus, "-", "-"])
    # the saving counts against the stronger full-cost system: keep-all, or the scout model at its own full cost
    strongest = max(float(score["keep-all"].mean()), next(e["score"][0] for e in summary if e["budget"] == "cap 100%"))
    within = [e for e in summary if e["score"][0] >= strongest - 0.005]
    best_saving = max((e["saved"] for e in within), default=None)
    costs = evaluated[keys[0]]["costs"]
    data = {"machine": machine(), "folds": args.folds, "seeds": args.seeds, "costs_gflops": costs,
            "scores": {k: v.tolist() for k, v in score.items()}, "seconds_per_training_run": seconds,
            "budgets": summary, "largest_saving_within_half_a_point": best_saving}
    section = "\n".join([
        "## Conditional execution on the UCI blended task"
        + (f", heavy CNN at {args.heavy_size}×{args.heavy_size}" if args.heavy_size != HEAVY else "")
        + (f" ({scout})" if variant else ""), "",
        f"`.venv/bin/python benchmarks/conditional_uci.py --source ../shared/data/uci-mfeat --workers {args.workers} "
        f"--seeds {args.seeds}{variant_flags(variant)}"
        + (f" --heavy-size {args.heavy_size}" if args.heavy_size != HEAVY else "") + "`: "
        "the five pre-extracted views always run; two live timm `test_resnet` CNNs on the `pix` images run on demand, "
        f"trained end to end, at 10×10 ({1000 * costs['cnn_light']:.2f} MFLOPs) and {args.heavy_size}×{args.heavy_size} "
        f"({1000 * costs['cnn_heavy']:.2f} MFLOPs, {costs['cnn_heavy'] / costs['cnn_light']:.1f}×) inputs, FLOPs measured by "
        f"fusionkit. Recipe: `recipes.best()`'s gate and fusion. Test-fold Score over {args.folds} folds × "
        f"{args.seeds} seeds; the scout's rows come from one trained model per fold and seed, at caps and at mean "
        "budgets (thresholds fitted on each run's validation fold). *spent*: the share of the on-demand FLOPs run. "
        "*random rows*: the same model, each CNN run on random rows at the scout's rates (scout − random, points, "
        "± standard error). *top-n, everything run*: the seed method (top-p 0.9, at least 2, rank order) over the same "
        "encoders, both CNNs always run. Seconds: one evaluation of the test fold, images read only for the rows that "
        f"run their CNN (see the wall-clock section). Training seconds per run: keep-all {seconds['keep-all']:.0f}, "
        f"scout {seconds[scout]:.0f}, "
        f"five views {seconds['always-run only']:.0f}, top-n {seconds['top-n, everything run']:.0f} "
        f"({seconds[scout] / seconds['keep-all']:.2f}× keep-all).", "",
        markdown_table(["system", "spent", "Score", "− keep-all (points)", "random rows (scout − random)", "s"], rows), "",
        "Largest saving of on-demand FLOPs within 0.5 Score points of the stronger full-cost system (keep-all, or "
        f"the scout model at its own full cost: {strongest:.3f}): "
        + ("none" if best_saving is None else f"{100 * best_saving:.0f}%") + " (target: 50%; DynMM 46.5%).", "",
    ])
    write(f"conditional-uci{tag}", data, section)


if __name__ == "__main__":
    main()
