"""Does choosing per sample pay? Two scouts against every static choice, random rows and a cascade, on two testbeds.

Each testbed trains, per fold and seed, keep-all (every encoder always run) and one model per scout with encoders on
demand (`conditional.scout: gate`, the gate's scores before they run; `conditional.scout: value`, the value head that
predicts each encoder's loss drop and decides in stages). Each scout model is evaluated on the test fold at mean
budgets (25%, 40%, 55%, and 10%, 70%, 85% for the saving; thresholds fitted on the validation fold) and at a cap of
100%, and beside it, on the same model (`fusionkit.evaluation.controls`):

- the static frontier: every subset of the on-demand encoders run on every row, its upper hull read at the scout's
  mean cost (mixing two static choices over the rows gives every point between them);
- random rows: each on-demand encoder run on random rows at the scout's rate;
- the confidence cascade: encoders added in cost order to the least confident rows, fitted on validation to the
  scout's mean cost;
- a diagnostic, not a control: an oracle that knows the labels and picks each row's subset (its loss plus a price
  per GFLOP, priced to the scout's mean cost); it cherry-picks per row, so it bounds what a scout could gain.

`--full-budget-weight W` trains the scouts with `conditional.full_budget_weight: W` (its runs, results and section
are its own; keep-all's runs are shared).

Testbeds (UCI Multiple Features, the clean blended task):

- views: stored views, fou, zer and mor always run; kar, fac and pix on demand at declared costs of 0.5, 1 and 2
  GFLOPs (what a deployment would pay to extract them);
- cnn: the five stored views always run; two live timm `test_resnet` CNNs on the `pix` images on demand, trained end
  to end, at 10x10 and 40x40 (FLOPs measured by fusionkit), as in `benchmarks/conditional_uci.py`.

- corrupt-views: the views testbed with each on-demand view corrupted per sample (a share of the samples, a level
  drawn per sample), a preview of each for the scouts, and the known-corruption control beside the others.
- corrupt-cnn: the cnn testbed with the `pix` image corrupted per sample (a share of the samples; noise, blur or
  occlusion, the kind and level drawn per sample), so both CNNs read a bad image there; each scout also runs a
  thumbnail of the image per CNN (a live `test_resnet` at 8x8, `preview_of`, not fused), and the known-corruption
  control stands beside the others.

    .venv/bin/python benchmarks/per_sample.py --testbed views --seeds 2
    .venv/bin/python benchmarks/per_sample.py --testbed cnn --seeds 2
    .venv/bin/python benchmarks/per_sample.py --testbed corrupt-views --seeds 2
    .venv/bin/python benchmarks/per_sample.py --testbed corrupt-views --seeds 2 --preview structure
    .venv/bin/python benchmarks/per_sample.py --testbed corrupt-views --seeds 2 --preview structure --corruption occlusion
    .venv/bin/python benchmarks/per_sample.py --testbed corrupt-cnn --seeds 2
    .venv/bin/python benchmarks/per_sample.py --testbed corrupt-cnn --seeds 2 --images swapped
"""

from __future__ import annotations

import json
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from conditional_uci import SIZES, checkpoint_hash, cnn_material, specs
from grid import grid_parser, run_grid
from live import CNN, pix_images
from report import RESULTS, machine, markdown_table, write

#: The corrupted views testbed: each on-demand view corrupted on this share of the samples, independently, at a
#: level drawn per sample from LEVELS; a preview of each, a fixed random projection to LOOK_DIM dimensions.
CORRUPT_SHARE = 0.35
LEVELS = (0.5, 1.0)
LOOK_DIM = 8
LOOK_COST = 0.05
MIDDLE = (0.25, 0.4, 0.55)
OTHERS = (0.1, 0.7, 0.85)
VIEW_COSTS = {"kar": 0.5, "fac": 1.0, "pix": 2.0}
SCOUTS = ("gate", "value")
#: The corrupted testbed also trains the quality scout, which judges each view's input from its preview.
CORRUPT_SCOUTS = (*SCOUTS, "quality")


#: The testbeds whose inputs are corrupted on some samples (their stores record which; the known control reads it).
CORRUPTED = ("corrupt-views", "corrupt-cnn")


def scouts_of(testbed: str) -> tuple[str, ...]:
    return CORRUPT_SCOUTS if testbed in CORRUPTED else SCOUTS


def view_specs(seed: int, conditional: dict | None = None) -> dict[str, dict]:
    from fusionkit.spec import recipes

    keep_all = recipes.best(seed)
    systems = {"keep-all": keep_all}
    for scout in SCOUTS:
        spec = recipes.on_demand(seed, costs=VIEW_COSTS)
        spec["conditional"] = {"scout": scout, **(conditional or {})}
        systems[f"scout: {scout}"] = spec
    return systems


#: The previews the corrupted testbed can give the scouts (``--preview``): a random projection of the view, or a
#: look at its structure (the lag-1 and lag-2 correlation of its standardised dimensions, which noise breaks, beside a
#: smaller projection).
PREVIEWS = ("projection", "structure")


def _look(z: np.ndarray, kind: str, rng: np.random.Generator) -> np.ndarray:
    """A view's preview from its standardised features ``z`` ``[N, D]`` (LOOK_DIM columns). The projection is drawn
    whole in both kinds, so that both corrupt the same values."""
    projection = rng.standard_normal((z.shape[1], LOOK_DIM)) / np.sqrt(z.shape[1])
    if kind == "projection":
        return (z @ projection).astype(np.float32)
    lags = [(z[:, :-lag] * z[:, lag:]).mean(1, keepdims=True) for lag in (1, 2)]
    return np.concatenate([z @ projection[:, :LOOK_DIM - 2], *lags], axis=1).astype(np.float32)


#: How the corrupted testbed corrupts a view (``--corruption``): ``noise``, mixed toward noise of the view's own mean
#: and spread; ``occlusion``, a share of its dimensions blanked to their mean (a patch covered), each at a level
#: drawn per sample.
CORRUPTIONS = ("noise", "occlusion")


def corrupt_tag(preview: str = "projection", corruption: str = "noise", images: str = "degraded") -> str:
    """The corrupted testbeds' variant, as its stores, runs and results are named (the defaults: nothing)."""
    return ("" if preview == "projection" else f"-{preview}") + ("" if corruption == "noise" else f"-{corruption}") + (
        "" if images == "degraded" else f"-{images}")


def corrupt_flags(preview: str = "projection", corruption: str = "noise", images: str = "degraded") -> str:
    """The command-line flags that choose the corrupted testbeds' variant (the defaults: none)."""
    return ("" if preview == "projection" else f" --preview {preview}") + ("" if corruption == "noise" else (
        f" --corruption {corruption}")) + ("" if images == "degraded" else f" --images {images}")


def _corrupt(x: np.ndarray, level: np.ndarray, kind: str, rng: np.random.Generator) -> np.ndarray:
    """``x`` ``[N, D]`` corrupted at ``level`` ``[N, 1]`` per row (see CORRUPTIONS)."""
    mu, sigma = x.mean(0), x.std(0) + 1e-6
    if kind == "noise":
        return (1 - level) * x + level * (mu + sigma * rng.standard_normal(x.shape))
    covered = rng.random(x.shape) < level
    return np.where(covered, mu, x)


def corrupted_views(clean: Path, work: Path, seed: int = 0, preview: str = "projection",
                    corruption: str = "noise") -> Path:
    """The views testbed with quality that varies per sample: each on-demand view (kar, fac, pix) corrupted on
    CORRUPT_SHARE of the samples, independently, at a level ``a`` drawn per sample from LEVELS (``noise``: ``x' =
    (1 - a) x + a (mu + sigma z)``, as ADMN draws each modality's noise level per sample; ``occlusion``: a share
    ``a`` of its dimensions set to their mean), in every fold alike; and a preview of each, ``NAME_look``: a fixed
    random projection of the (corrupted) view's standardised features to LOOK_DIM dimensions. The index records
    which views each sample had corrupted (the known-corruption control reads it)."""
    import attrs

    from fusionkit.data.store import open_store, write_store

    out = work / f"store-corrupted{corrupt_tag(preview, corruption)}"
    if (out / "index.json").exists():
        return out
    store = open_store(clean)
    rng = np.random.default_rng(seed)
    features = {name: store.encoders[name].data.numpy().copy() for name in store.encoders}
    hit = {name: rng.random(len(store.samples)) < CORRUPT_SHARE for name in VIEW_COSTS}
    for name in VIEW_COSTS:
        x = features[name]
        mu, sigma = x.mean(0), x.std(0) + 1e-6
        level = rng.uniform(*LEVELS, size=(len(x), 1))
        noisy = _corrupt(x, level, corruption, rng)
        x[hit[name]] = noisy[hit[name]]
        features[f"{name}_look"] = _look((x - mu) / sigma, preview, rng)
    samples = [attrs.evolve(s, corrupted=tuple(n for n in VIEW_COSTS if hit[n][i])) for i, s in enumerate(store.samples)]
    write_store(out, store.labels, samples, features)
    return out


#: The corrupted images testbed: the `pix` image corrupted on CORRUPT_SHARE of the samples, by a kind drawn per sample
#: from IMAGE_CORRUPTIONS at a level drawn per sample from LEVELS; each CNN previewed by a thumbnail, a live CNN at
#: THUMB x THUMB on the same image.
IMAGE_CORRUPTIONS = ("noise", "blur", "occlusion")
THUMB = 8
#: How the images testbed corrupts an image (``--images``): ``degraded``, by one of IMAGE_CORRUPTIONS (the corruption
#: shows in the image); ``swapped``, replaced by another sample's clean image, as a desynchronised stream or a misfiled
#: frame gives (nothing in the image shows it; only its disagreement with the rest of the sample does).
IMAGE_RECIPES = ("degraded", "swapped")


def _corrupt_image(image: np.ndarray, kind: str, level: float, gray: tuple[float, float],
                   rng: np.random.Generator) -> np.ndarray:
    """One image (pixels 0-255) corrupted at ``level``: ``noise``, mixed toward pixel noise of the images' mean and
    spread (``gray``); ``blur``, a Gaussian blur of 2 ``level`` pixels; ``occlusion``, a rectangle of a share
    ``level`` of its area, at a random place, set to the images' mean."""
    from scipy.ndimage import gaussian_filter

    if kind == "noise":
        return (1 - level) * image + level * (gray[0] + gray[1] * rng.standard_normal(image.shape))
    if kind == "blur":
        return gaussian_filter(image, sigma=2 * level)
    h, w = (max(1, round(side * np.sqrt(level))) for side in image.shape)
    top, left = rng.integers(0, image.shape[0] - h + 1), rng.integers(0, image.shape[1] - w + 1)
    out = image.copy()
    out[top:top + h, left:left + w] = gray[0]
    return out


def corrupted_images(clean: Path, work: Path, seed: int = 0, recipe: str = "degraded") -> tuple[Path, Path]:
    """The cnn testbed with quality that varies per sample: each sample's `pix` image (16 x 15) corrupted on
    CORRUPT_SHARE of the samples, in every fold alike (IMAGE_RECIPES: ``degraded``, by a kind drawn per sample from
    IMAGE_CORRUPTIONS at a level ``a`` drawn from LEVELS; ``swapped``, replaced by the image of another sample drawn
    at random); both CNNs and their thumbnails read the same image. Returns the store (the clean one's features; the
    index records the CNNs as corrupted on those samples, for the known control) and the images' manifest, a column
    per CNN and per thumbnail."""
    import csv

    import attrs
    from PIL import Image

    from fusionkit.data.store import open_store, write_store

    tag = corrupt_tag(images=recipe)
    out, folder = work / f"store-corrupted-images{tag}", work / f"corrupted-images{tag}"
    manifest = folder / "manifest.csv"
    if (out / "index.json").exists() and manifest.exists():
        return out, manifest
    store = open_store(clean)
    rng = np.random.default_rng(seed)
    pixels = store.encoders["pix"].data.numpy().reshape(-1, 16, 15) * 255 / 6
    gray = (float(pixels.mean()), float(pixels.std()))
    hit = rng.random(len(pixels)) < CORRUPT_SHARE
    kinds = rng.integers(0, len(IMAGE_CORRUPTIONS), len(pixels))
    levels = rng.uniform(*LEVELS, size=len(pixels))
    if recipe == "swapped":  # drawn after the degraded recipe's draws, which stay as they were
        others = (np.arange(len(pixels)) + rng.integers(1, len(pixels), len(pixels))) % len(pixels)  # never itself
    (folder / "img").mkdir(parents=True, exist_ok=True)
    columns = [*SIZES, *(f"{c}_look" for c in SIZES)]
    with open(manifest, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["id", "labels", "group", "fold", "domain", *columns])
        for i, (sample, image) in enumerate(zip(store.samples, pixels)):
            if hit[i] and recipe == "swapped":
                image = pixels[others[i]]
            elif hit[i]:
                image = _corrupt_image(image, IMAGE_CORRUPTIONS[kinds[i]], levels[i], gray, rng)
            name = f"img/{sample.id}.png"
            Image.fromarray(np.round(image).clip(0, 255).astype(np.uint8)).save(folder / name)
            labels = ";".join(f"{e['emotion']}:{e['salience']:g}" for e in sample.labels)
            writer.writerow([sample.id, labels, sample.group, sample.fold, sample.domain, *[name] * len(columns)])
    samples = [attrs.evolve(s, corrupted=tuple(SIZES) if hit[i] else ()) for i, s in enumerate(store.samples)]
    write_store(out, store.labels, samples, {name: store.encoders[name].data.numpy() for name in store.encoders})
    return out, manifest


def probe_auc(store_path: Path, folds: int) -> dict[str, dict[str, float]]:
    """Can a scout tell? Per on-demand view, the test-fold AUC (mean over folds) of a logistic regression, fitted on
    the other folds, from what the scout sees of that view (its preview) to whether the sample's view is corrupted;
    beside it the same probe from the view's own features (what running the encoder would show)."""
    import torch

    from fusionkit.data.store import open_store

    store = open_store(store_path)
    folds_of = store.folds
    out: dict[str, dict[str, float]] = {}
    for view in VIEW_COSTS:
        target = np.array([view in s.corrupted for s in store.samples], dtype=np.float32)
        out[view] = {}
        for source in (f"{view}_look", view):
            x = store.encoders[source].data.numpy()
            aucs = []
            for fold in range(folds):
                train, test = folds_of != fold, folds_of == fold
                mu, sigma = x[train].mean(0), x[train].std(0) + 1e-6
                features = torch.tensor((x - mu) / sigma, dtype=torch.float32)
                features = torch.cat([features, features ** 2], dim=1)  # a quadratic probe: scale and spread
                torch.manual_seed(0)
                probe = torch.nn.Linear(features.shape[1], 1)
                optimiser = torch.optim.Adam(probe.parameters(), lr=0.05)
                y = torch.tensor(target)
                for _ in range(300):
                    optimiser.zero_grad()
                    loss = torch.nn.functional.binary_cross_entropy_with_logits(
                        probe(features[train]).squeeze(1), y[train])
                    loss.backward()
                    optimiser.step()
                with torch.no_grad():
                    scores = probe(features[test]).squeeze(1).numpy()
                aucs.append(_auc(scores, target[test]))
            out[view]["preview" if source != view else "view"] = float(np.mean(aucs))
    return out


def _auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """The probability that a positive scores above a negative (ties count half)."""
    order = np.argsort(scores, kind="stable")
    ranks = np.empty(len(scores))
    ranks[order] = np.arange(1, len(scores) + 1)
    for value in np.unique(scores):  # average ranks of ties
        tied = scores == value
        ranks[tied] = ranks[tied].mean()
    positive = labels > 0.5
    n_pos, n_neg = positive.sum(), (~positive).sum()
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / max(n_pos * n_neg, 1))


def with_quality(systems: dict[str, dict]) -> dict[str, dict]:
    """The systems and the quality scout, on the value scout's spec."""
    quality = json.loads(json.dumps(systems["scout: value"]))
    quality["conditional"]["scout"] = "quality"
    return {**systems, "scout: quality": quality}


def corrupted_specs(seed: int, conditional: dict | None = None) -> dict[str, dict]:
    """keep-all on the six views, and each scout with a preview of each on-demand view (``preview_of``, not fused)."""
    systems = with_quality(view_specs(seed, conditional))
    for name, spec in systems.items():
        if name != "keep-all":
            spec["encoders"] += [{"name": f"{v}_look", "type": "features", "dim": LOOK_DIM, "preview_of": v,
                                  "fused": False, "cost_gflops": LOOK_COST} for v in VIEW_COSTS]
    return systems


def cnn_specs(seed: int, weights: Path, conditional: dict | None = None) -> dict[str, dict]:
    both = specs(seed, weights)
    systems = {"keep-all": both["keep-all"]}
    for scout in SCOUTS:
        spec = json.loads(json.dumps(both["scout"]))
        spec["conditional"] = {"scout": scout, **(conditional or {})}
        systems[f"scout: {scout}"] = spec
    return systems


def corrupted_cnn_specs(seed: int, weights: Path, conditional: dict | None = None) -> dict[str, dict]:
    """The cnn testbed's systems and the quality scout, each scout with a thumbnail of each CNN's image (a live CNN
    at THUMB x THUMB, ``preview_of``, not fused; its FLOPs measured and counted in every budget)."""
    systems = with_quality(cnn_specs(seed, weights, conditional))
    for name, spec in systems.items():
        if name != "keep-all":
            spec["encoders"] += [{**CNN, "name": f"{c}_look", "img_size": [THUMB, THUMB], "preview_of": c,
                                  "fused": False, "pretrained": str(weights.resolve())} for c in SIZES]
    return systems


def tokens_of(model, store, index: np.ndarray):
    """Every encoder's token on the rows ``index`` (each encoder run), and which are present: ``[N, K, d]``,
    ``[N, K]``."""
    import torch

    inputs, lengths, mask = store.inputs_for(model, index)
    names = model.encoder_names
    with torch.no_grad():
        raw = torch.stack([model.projectors[n](model.encoders[n](inputs[n], lengths.get(n))) for n in names], 1)
    return raw, torch.ones(raw.shape[:2], dtype=torch.bool) if mask is None else mask.bool()


def verdict_auc(model, store, index: np.ndarray) -> dict[str, float]:
    """Can the quality scout tell? Per on-demand encoder, the AUC of its judge's verdict, before anything on demand
    ran, against whether the row's input of it is corrupted (empty for another scout)."""
    import torch

    if not hasattr(model.scout, "judged"):
        return {}
    names, demand = model.encoder_names, list(model.on_demand)
    first, present = tokens_of(model, store, index)
    first[:, demand] = 0.0
    with torch.no_grad():
        verdicts = model.scout.judged(first, present).numpy()
    bad = np.array([[names[k] in store.samples[i].corrupted for k in demand] for i in index])
    return {names[k]: _auc(verdicts[:, j], bad[:, j]) for j, k in enumerate(demand)}


def evaluate(job: dict) -> dict:
    """One scout model on its fold's test rows: its points and their controls."""
    import torch

    from fusionkit.data.open import spec_store
    from fusionkit.evaluation.controls import (
        cascade,
        frontier_at,
        known_corruption,
        random_rows,
        static_choices,
        static_frontier,
    )
    from fusionkit.inference import fit_mean_budget
    from fusionkit.models.factory import load_model
    from fusionkit.training.tasks import ClassificationTask
    from fusionkit.training.train import make_split

    torch.set_num_threads(1)
    started = time.perf_counter()
    model = load_model(Path(job["run"]) / "best", device="cpu")
    store = spec_store(model.spec, job["store"], job["raw"])
    split = make_split(store, job["fold"])
    costs = model.encoder_costs()
    demand = [model.encoder_names[k] for k in model.on_demand]
    always = sum(costs[n] or 0.0 for n in model.encoder_names if n not in demand)
    demand_cost = sum(costs[n] for n in demand)
    static = static_choices(model, store, split.test)
    frontier = static_frontier(static)
    known = known_corruption(model, store, split.test)  # empty where the store records no corruption
    known_frontier = static_frontier(known) if known else None
    judged = verdict_auc(model, store, split.test) if known else {}
    points = []
    for share in (*sorted(MIDDLE + OTHERS), 1.0):
        budget = fit_mean_budget(model, store, split.val, f"mean:{100 * share:g}%") if share < 1 else "100%"
        metrics = ClassificationTask.evaluate_model(model, store, split.test, budget=budget)
        compute = metrics["compute"]
        rates = {n: compute["run_rate"][n] for n in demand}
        point = {"share": share, "score": metrics["score"], "mean_gflops": compute["mean_gflops"],
                 "spent": (compute["mean_gflops"] - always) / demand_cost, "rates": rates,
                 "unused_runs": compute.get("unused_runs", 0.0)}
        point["static"] = frontier_at(frontier, compute["mean_gflops"])
        if known_frontier:
            point["known"] = frontier_at(known_frontier, compute["mean_gflops"])
        point["random"] = random_rows(model, store, split.test, rates, seed=1000 * job["fold"] + job["seed"])["score"]
        points.append(point)
    metrics = ClassificationTask.evaluate_model(model, store, split.test, budget=None)  # the model's own rule
    own = {"score": metrics["score"], "mean_gflops": metrics["compute"]["mean_gflops"],
           "spent": (metrics["compute"]["mean_gflops"] - always) / demand_cost,
           "static": frontier_at(frontier, metrics["compute"]["mean_gflops"]),
           **({"known": frontier_at(known_frontier, metrics["compute"]["mean_gflops"])} if known_frontier else {})}
    steps = cascade(model, store, split.test, split.val, [p["mean_gflops"] for p in points])
    oracle = Oracle(model, store, split.test)
    for point, step in zip(points, steps):
        point["cascade"] = step["score"]
        point["oracle"] = oracle.score_at(point["mean_gflops"])
    return {"system": job["system"], "fold": job["fold"], "seed": job["seed"], "checkpoint": job["checkpoint"],
            "static": static, "frontier": frontier, "known": known, "points": points, "own": own, "judged": judged,
            "seconds": time.perf_counter() - started}


class Oracle:
    """The headroom of per-sample selection on one model: each row runs the subset of on-demand encoders that
    minimises its own loss (the labels known) plus a price per GFLOP, the price set so that the mean cost meets a
    target. No deployable scout can do better on the same model; a diagnostic, not a control."""

    def __init__(self, model, store, index) -> None:
        import itertools

        from fusionkit.inference import collect_outputs

        self.model, m = model, len(model.on_demand)
        self.subsets = [c for r in range(m + 1) for c in itertools.combinations(range(m), r)]
        self.outputs = []
        for chosen in self.subsets:
            runs = np.zeros((len(index), m), dtype=bool)
            runs[:, list(chosen)] = True
            self.outputs.append(collect_outputs(model, store, index, runs=runs))
        self.truth = store.truth_matrix(index)
        target = self.truth / self.truth.sum(1, keepdims=True)
        self.loss = np.stack([-(target * np.log(np.clip(o["probs"], 1e-12, None))).sum(1) for o in self.outputs])
        self.cost = np.stack([o["cost"] for o in self.outputs])  # [subsets, N]

    def score_at(self, mean_cost: float) -> float:
        from fusionkit.blemore.answers import order_to_matrix
        from fusionkit.blemore.metrics import scores_from_matrices

        low, high = 0.0, 1e6
        for _ in range(60):  # the lowest price per GFLOP whose choices fit the mean cost
            price = (low + high) / 2
            pick = (self.loss + price * self.cost).argmin(axis=0)
            if self.cost[pick, np.arange(self.cost.shape[1])].mean() <= mean_cost + 1e-9:
                high = price
            else:
                low = price
        pick = (self.loss + high * self.cost).argmin(axis=0)
        rows = np.arange(len(pick))
        chosen = {key: np.stack([o[key] for o in self.outputs])[pick, rows]
                  for key in self.outputs[0] if key in ("probs", "presence", "salience")}
        order, sal = self.model.decoder.decode(chosen)
        return float(scores_from_matrices(order_to_matrix(order, sal, len(self.model.labels)), self.truth)["score"])


def _own_rule_row(system: str, runs: list[dict], keep_all: np.ndarray, rows: list[list[str]]) -> dict | None:
    """The model's own rule (no budget) of a scout, as a table row, where its evaluation has it."""
    if not all("own" in r for r in runs):
        return None
    own = [r["own"] for r in runs]
    score = np.array([o["score"] for o in own])
    entry = {"score": [float(score.mean()), float(score.std())], "spent": float(np.mean([o["spent"] for o in own])),
             "minus_keep_all": mean_se([100 * (o["score"] - k) for o, k in zip(own, keep_all)]),
             "over_static": mean_se([100 * (o["score"] - o["static"]) for o in own]),
             **({"over_known": mean_se([100 * (o["score"] - o["known"]) for o in own])} if "known" in own[0] else {})}
    rows.append([f"{system}, own rule", f"{100 * entry['spent']:.0f}%", f"{score.mean():.3f} ± {score.std():.3f}",
                 "{:+.1f} ± {:.1f}".format(*entry["over_static"]), "", "",
                 "{:+.1f} ± {:.1f}".format(*entry["minus_keep_all"]), "", "",
                 *(["{:+.1f} ± {:.1f}".format(*entry["over_known"])] if "over_known" in entry else [])])
    return entry


def mean_se(values: list[float]) -> tuple[float, float]:
    a = np.asarray(values, dtype=float)
    return float(a.mean()), float(a.std(ddof=1) / np.sqrt(len(a))) if len(a) > 1 else 0.0


def main() -> None:
    parser = grid_parser(__doc__, "runs/benchmark-per-sample")
    parser.add_argument("--testbed", choices=("views", "cnn", *CORRUPTED), default="views")
    parser.add_argument("--preview", choices=PREVIEWS, default="projection", help="corrupt-views: each view's preview "
                        "(projection: a random projection; structure: its dimensions' lag-1 and lag-2 correlation "
                        "beside a smaller projection); a variant has its own runs, results and section")
    parser.add_argument("--corruption", choices=CORRUPTIONS, default="noise", help="corrupt-views: how each view is "
                        "corrupted (noise: mixed toward noise; occlusion: a share of its dimensions blanked); a variant "
                        "has its own runs, results and section")
    parser.add_argument("--images", choices=IMAGE_RECIPES, default="degraded", help="corrupt-cnn: how an image "
                        "is corrupted (degraded: noise, blur or occlusion; swapped: another sample's image); a "
                        "variant has its own runs, results and section")
    parser.add_argument("--full-budget-weight", type=float, default=None, help="train the scouts with "
                        "conditional.full_budget_weight (a variant: its runs, results and section are its own)")
    args = parser.parse_args()
    conditional = {} if args.full_budget_weight is None else {"full_budget_weight": args.full_budget_weight}
    args.scouts = scouts_of(args.testbed)
    args.tag = (args.testbed + ("" if args.full_budget_weight is None else f"-fw{args.full_budget_weight:g}")
                + corrupt_tag(args.preview, args.corruption, args.images))
    work = Path(args.work)
    raw = weights = None
    if args.testbed in ("cnn", "corrupt-cnn"):
        clean, raw, weights = cnn_material(args.source, work)
    else:
        clean, _ = pix_images(args.source, work)
    if args.testbed == "corrupt-views":
        clean = corrupted_views(clean, work, preview=args.preview, corruption=args.corruption)
    if args.testbed == "corrupt-cnn":
        clean, raw = corrupted_images(clean, work, recipe=args.images)
    jobs = []
    for fold in range(args.folds):
        for seed in range(args.seeds):
            systems = (view_specs(seed, conditional) if args.testbed == "views"
                       else corrupted_specs(seed, conditional) if args.testbed == "corrupt-views"
                       else cnn_specs(seed, weights, conditional) if args.testbed == "cnn"
                       else corrupted_cnn_specs(seed, weights, conditional))
            for system, spec in systems.items():
                job = {"setting": args.testbed, "system": system, "fold": fold, "seed": seed, "store": str(clean),
                       "raw": None if raw is None else str(raw), "spec": spec}
                if system != "keep-all":
                    job["keep"] = str(work / "runs" / f"{args.tag}-{system.split(': ')[1]}-f{fold}-s{seed}")
                jobs.append(job)
    runs_cache = RESULTS / f"per-sample-{args.tag}-runs.jsonl"
    # a variant of the scouts or previews shares keep-all's runs (keep-all reads neither); another corruption does not
    own_data = corrupt_tag(corruption=args.corruption, images=args.images)
    base = RESULTS / f"per-sample-{args.testbed}{own_data}-runs.jsonl"
    if runs_cache != base and not runs_cache.exists() and base.exists():
        runs_cache.write_text("".join(line + "\n" for line in base.read_text().splitlines()
                                      if json.loads(line)["system"] == "keep-all"))
    done = run_grid(jobs, runs_cache, args.workers)
    failed = [k for k, r in done.items() if "error" in r and k[0] == args.testbed]
    if failed:
        raise SystemExit(f"failed runs: {failed}")
    cache = RESULTS / f"per-sample-{args.tag}-points.jsonl"
    evaluated = {}
    if cache.exists():
        for line in cache.read_text().splitlines():
            r = json.loads(line)
            evaluated[(r["system"], r["fold"], r["seed"])] = r
    todo = []
    for job in jobs:
        if "keep" in job:
            digest = checkpoint_hash(Path(job["keep"]))
            if evaluated.get((job["system"], job["fold"], job["seed"]), {}).get("checkpoint") != digest:
                todo.append({"system": job["system"], "fold": job["fold"], "seed": job["seed"], "run": job["keep"],
                             "store": job["store"], "raw": job["raw"], "checkpoint": digest})
    print(f"{len(todo)} scout models to evaluate", flush=True)
    with ProcessPoolExecutor(args.workers) as pool, open(cache, "a") as fh:
        for r in pool.map(evaluate, todo):
            evaluated[(r["system"], r["fold"], r["seed"])] = r
            fh.write(json.dumps(r) + "\n")
            fh.flush()
            print(f"evaluated {r['system']} fold {r['fold']} seed {r['seed']} in {r['seconds']:.0f} s", flush=True)
    summarize(args, done, evaluated)


def summarize(args, done: dict, evaluated: dict) -> None:
    keys = [(f, s) for f in range(args.folds) for s in range(args.seeds)]
    keep_all = np.array([done[(args.testbed, "keep-all", f, s)]["test"]["score"] for f, s in keys])
    seconds = {name: float(np.mean([done[(args.testbed, name, f, s)]["seconds"] for f, s in keys]))
               for name in ("keep-all", *(f"scout: {x}" for x in args.scouts))}
    rows, data = [], {"machine": machine(), "testbed": args.testbed, "folds": args.folds, "seeds": args.seeds,
                      "keep_all": [float(keep_all.mean()), float(keep_all.std())], "seconds_per_training_run": seconds,
                      "systems": {}}
    rows.append(["keep-all", "100%", f"{keep_all.mean():.3f} ± {keep_all.std():.3f}", "-", "-", "-", "-", "-", "-"])
    targets = {}
    for scout in args.scouts:
        system = f"scout: {scout}"
        runs = [evaluated[(system, f, s)] for f, s in keys]
        shares = [p["share"] for p in runs[0]["points"]]
        entries = []
        for i, share in enumerate(shares):
            pts = [r["points"][i] for r in runs]
            score = np.array([p["score"] for p in pts])
            margins = {c: mean_se([100 * (p["score"] - p[c]) for p in pts])
                       for c in ("static", "random", "cascade", "oracle", *(("known",) if "known" in pts[0] else ()))}
            headroom = mean_se([100 * (p["oracle"] - p["static"]) for p in pts])
            full_gap = mean_se([100 * (p["score"] - k) for p, k in zip(pts, keep_all)])
            entry = {"share": share, "score": [float(score.mean()), float(score.std())],
                     "spent": float(np.mean([p["spent"] for p in pts])), "over": margins, "minus_keep_all": full_gap,
                     "unused_runs": float(np.mean([p["unused_runs"] for p in pts])), "oracle_over_static": headroom,
                     "rates": {k: float(np.mean([p["rates"][k] for p in pts])) for k in pts[0]["rates"]}}
            entries.append(entry)
            label = "cap 100%" if share == 1.0 else f"mean {100 * share:g}%"
            rows.append([f"{system}, {label}", f"{100 * entry['spent']:.0f}%", f"{score.mean():.3f} ± {score.std():.3f}",
                         *(f"{m:+.1f} ± {se:.1f}" for m, se in (margins["static"], margins["random"],
                                                                 margins["cascade"], full_gap)),
                         f"{headroom[0]:+.1f} ± {headroom[1]:.1f}", f"{100 * entry['unused_runs']:.1f}%",
                         *([f"{margins['known'][0]:+.1f} ± {margins['known'][1]:.1f}"] if "known" in margins else [])])
        own = _own_rule_row(system, runs, keep_all, rows)
        full = entries[-1]
        best_full = max(float(keep_all.mean()), full["score"][0])
        within = [e for e in entries if e["score"][0] >= best_full - 0.005]
        saving = max((1 - e["spent"] for e in within), default=0.0)
        middle = [e for e in entries if e["share"] in MIDDLE]
        targets[system] = {
            "per_sample_beats_static": all(e["over"]["static"][0] >= 1.0 and e["over"]["static"][0] > 2 * e["over"]["static"][1]
                                           for e in middle),
            "per_sample_beats_random": all(e["over"]["random"][0] >= 1.0 and e["over"]["random"][0] > 2 * e["over"]["random"][1]
                                           for e in middle),
            "beats_cascade": all(e["over"]["cascade"][0] > 0 for e in middle),
            "full_budget_within_half_a_point": full["minus_keep_all"][0] >= -0.5,
            "saving_within_half_a_point": saving, "saving_target_met": saving >= 0.5,
            "training_time_ratio": seconds[system] / seconds["keep-all"],
            "max_unused_runs": max(e["unused_runs"] for e in entries),
            **({"within_half_a_point_of_known": all(e["over"]["known"][0] >= -0.5 for e in middle),
                "full_budget_beats_keep_all_by_1_5": full["minus_keep_all"][0] >= 1.5}
               if "known" in full["over"] else {}),
            **({"own_rule": own, "own_rule_beats_keep_all_by_1_5": own["minus_keep_all"][0] >= 1.5} if own else {})}
        data["systems"][system] = {"points": entries, "targets": targets[system]}
    corrupt_words = (f"the views testbed with each on-demand view corrupted on {100 * CORRUPT_SHARE:g}% of the "
                     f"samples, independently, at a level drawn per sample from U{LEVELS} ("
                     + ("x' = (1 - a) x + a (mu + sigma z)" if args.corruption == "noise" else
                        "a share a of its dimensions set to their mean")
                     + "), in every fold; each scout also runs a preview of each view (`preview_of`, not fused, "
                     f"{LOOK_COST} GFLOPs): "
                     + (f"a fixed random projection of the corrupted view to {LOOK_DIM} dimensions. "
                        if args.preview == "projection" else
                        f"the lag-1 and lag-2 correlation of its standardised dimensions beside a random projection to "
                        f"{LOOK_DIM - 2}. ")
                     + "*− known*: the scout against the known-corruption control's frontier (each view run only where "
                     "clean, and the k cheapest clean per row) at its cost")
    cnn_words = ("the five stored views always run; two live timm `test_resnet` CNNs on the `pix` images on demand, "
                 "trained end to end, at 10×10 and 40×40 (FLOPs measured by fusionkit)")
    image_words = (f"{cnn_words}; the image corrupted on {100 * CORRUPT_SHARE:g}% of the samples (both CNNs read it), "
                   + (f"by a kind drawn per sample from {', '.join(IMAGE_CORRUPTIONS)} at a level a drawn per sample "
                      f"from U{LEVELS} (noise: mixed toward pixel noise, (1 - a) x + a (mu + sigma z); blur: a "
                      "Gaussian of 2a pixels; occlusion: a rectangle of a share a of the image set to the mean)"
                      if args.images == "degraded" else
                      "replaced by the clean image of another sample drawn at random (a desynchronised stream or a "
                      "misfiled frame: nothing in the image shows it)")
                   + ", in every fold; each "
                   f"scout also runs a thumbnail per CNN (a live `test_resnet` on the same image at {THUMB}×{THUMB}, "
                   "`preview_of`, not fused, its FLOPs counted in every budget). *− known*: the scout against the "
                   "known-corruption control's frontier (the CNNs run only where the image is clean, and the k "
                   "cheapest per clean row) at its cost")
    testbed_words = (corrupt_words if args.testbed == "corrupt-views" else image_words if args.testbed == "corrupt-cnn"
                     else
                     "stored views: fou, zer and mor always run; kar, fac and pix on demand at declared costs of "
                     "0.5, 1 and 2 GFLOPs" if args.testbed == "views" else cnn_words)
    verdicts = []
    for system, t in targets.items():
        verdicts.append(f"- **{system}**: beats the static frontier by ≥ 1 point beyond 2 SE at 25/40/55%: "
                        f"{'met' if t['per_sample_beats_static'] else 'not met'}; random rows: "
                        f"{'met' if t['per_sample_beats_random'] else 'not met'}; beats the cascade at all three: "
                        f"{'yes' if t['beats_cascade'] else 'no'}; full budget within 0.5 of keep-all: "
                        f"{'met' if t['full_budget_within_half_a_point'] else 'not met'}; largest saving within 0.5 of "
                        f"the better full-cost system: {100 * t['saving_within_half_a_point']:.0f}% (target 50%); "
                        f"training time {t['training_time_ratio']:.2f}× keep-all (target ≤ 1.5×); unused on-demand "
                        f"runs at most {100 * t['max_unused_runs']:.1f}% (target ≤ 5%)."
                        + ("" if "within_half_a_point_of_known" not in t else
                           f" Within 0.5 of the known-corruption control at 25/40/55%: "
                           f"{'met' if t['within_half_a_point_of_known'] else 'not met'}; full budget above keep-all "
                           f"by ≥ 1.5: {'met' if t['full_budget_beats_keep_all_by_1_5'] else 'not met'}.")
                        + ("" if "own_rule" not in t else
                           f" Its own rule (no budget: every encoder available, chosen per sample) "
                           f"{t['own_rule']['minus_keep_all'][0]:+.1f} ± {t['own_rule']['minus_keep_all'][1]:.1f} "
                           f"over keep-all at {100 * t['own_rule']['spent']:.0f}% of the on-demand cost: above by ≥ 1.5 "
                           f"{'met' if t['own_rule_beats_keep_all_by_1_5'] else 'not met'}."))
    section = "\n".join([
        f"## Per-sample selection against static choices: {args.testbed} testbed"
        + ("" if args.full_budget_weight is None else f", full-budget pass weight {args.full_budget_weight:g}")
        + ("" if args.preview == "projection" else f", {args.preview} previews")
        + ("" if args.corruption == "noise" else f", {args.corruption}")
        + ("" if args.images == "degraded" else f", {args.images} images"), "",
        f"`.venv/bin/python benchmarks/per_sample.py --testbed {args.testbed} --seeds {args.seeds} --workers "
        f"{args.workers}" + ("" if args.full_budget_weight is None else f" --full-budget-weight {args.full_budget_weight:g}")
        + corrupt_flags(args.preview, args.corruption, args.images)
        + f"`: {testbed_words}. Recipe: `recipes.best()` (every encoder kept when it runs). Test-fold "
        f"Score over {args.folds} folds × {args.seeds} seeds; each scout's rows come from one model per fold and seed, at "
        "mean budgets fitted on the validation fold and at a cap of 100%. *spent*: the share of the on-demand cost run. "
        "The margins are the scout's, in points, ± standard error over the runs: over the **static frontier** (every "
        "subset of the on-demand encoders on every row, their upper hull at the scout's mean cost), over **random "
        "rows** at the scout's rates, over the **confidence cascade** fitted to the same mean cost, and over keep-all. "
        "*oracle − static*: the headroom: an oracle that knows the labels picks each row's subset (its own loss "
        "plus a price per GFLOP, priced to the scout's mean cost), against the static frontier; no scout can beat "
        "the oracle on the same model. "
        f"Training seconds per run: keep-all {seconds['keep-all']:.0f}, "
        + ", ".join(f"{s} {seconds[f'scout: {s}']:.0f}" for s in args.scouts) + ". *own rule*: the model's own "
        "rule, no budget (every encoder available; the scout runs what it judges worth running).", "",
        markdown_table(["system", "spent", "Score", "− static", "− random", "− cascade", "− keep-all",
                        "oracle − static", "unused runs", *(["− known"] if args.testbed in CORRUPTED else [])],
                       [r + ([""] if args.testbed in CORRUPTED and len(r) == 9 else []) for r in rows]), "",
        *verdicts, ""])
    if args.testbed == "corrupt-views":
        probes = probe_auc(Path(args.work) / f"store-corrupted{corrupt_tag(args.preview, args.corruption)}", args.folds)
        data["probe_auc"] = probes
        section += ("\nCan the scout tell? The AUC of a quadratic logistic probe, fitted on the other folds, from each "
                    "view's preview to whether the sample's view is corrupted (and from the view itself): "
                    + "; ".join(f"{v} {p['preview']:.2f} from the preview, {p['view']:.2f} from the view"
                                for v, p in probes.items()) + ".\n")
    judged = {name: float(np.mean([evaluated[("scout: quality", f, s)]["judged"][name] for f, s in keys]))
              for name in evaluated[("scout: quality", 0, 0)].get("judged", {})} if "quality" in args.scouts else {}
    if judged:
        data["verdict_auc"] = judged
        section += ("\nCan the quality scout tell? The AUC of its judges' verdicts on the test rows, before anything "
                    "on demand ran, against whether the row's input is corrupted (mean over the runs): "
                    + ", ".join(f"{name} {auc:.2f}" for name, auc in judged.items()) + ".\n")
    data["targets"] = targets
    write(f"per-sample-{args.tag}", data, section)


if __name__ == "__main__":
    main()
