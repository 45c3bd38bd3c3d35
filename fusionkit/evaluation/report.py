"""``fusionkit report RUN``: plots and a markdown summary of a finished run.

Writes RUN/report/: learning_curves.png, kept_per_label.png, presence_confusion.png,
salience_confusion.png and summary.md; for a two-tower run, learning_curves.png, retrieval.png
and summary.md. Needs matplotlib (``pip install 'fusionkit[report]'``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from fusionkit.blemore.metrics import format_metric
from fusionkit.errors import FusionkitError
from fusionkit.files import atomic_write_text, is_temporary
from fusionkit.spec import load_spec
from fusionkit.training.tasks import task_class

__all__ = ["RATIO_NAMES", "REPORT_FILES", "write_report"]

RATIO_NAMES = ("single", "50/50", "70/30", "30/70")


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise FusionkitError("fusionkit report needs matplotlib: pip install 'fusionkit[report]'") from exc
    return plt


def _learning_curves(plt, log: list[dict], best_epoch: int, keys: tuple[str, ...], path: Path) -> None:
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 3.5))
    epochs = [r["epoch"] for r in log]
    for key in sorted({k for r in log for k, v in r.items() if k not in ("epoch", "lr", "seconds")
                       and isinstance(v, (int, float))}):  # the losses; val and train diagnostics are nested
        a1.plot(epochs, [r.get(key, np.nan) for r in log], label=key)
    a1.set(xlabel="epoch", ylabel="training loss", title="Training losses")
    a1.legend(fontsize=7)
    for key in keys:
        a2.plot(epochs, [_number(r.get("val", {}).get(key)) for r in log], label=key)
    a2.axvline(best_epoch, color="grey", ls=":", label="best")
    a2.set(xlabel="epoch", title="Validation")
    a2.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _keep_rates(plt, rates: dict[str, dict[str, float | None]], path: Path) -> None:
    """Per encoder, how often the gate keeps it on clean samples and on samples where it was corrupted."""
    names = list(rates)
    kinds = [k for k in ("clean", "corrupted") if any(r[k] is not None for r in rates.values())
             and any(rates[n]["corrupted"] is not None for n in names)] or ["all"]
    fig, ax = plt.subplots(figsize=(max(5, 0.6 * len(names) * len(kinds)), 3.5))
    width = 0.8 / len(kinds)
    for i, kind in enumerate(kinds):
        ax.bar(np.arange(len(names)) + i * width, [_number(rates[n][kind]) for n in names], width, label=kind)
    ax.set_xticks(np.arange(len(names)) + width * (len(kinds) - 1) / 2, names, rotation=45, fontsize=7)
    ax.set(ylim=(0, 1), ylabel="share of samples keeping it", title="Gate: keep rate per encoder")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _retrieval_report(plt, run: Path, out: Path, metrics: dict) -> list[str]:
    """A two-tower run: retrieval in each direction, beside the learning curves."""
    splits = [s for s in ("val", "test") if s in metrics]
    directions = sorted(k for k in metrics[splits[-1]] if k.startswith("r") and "_to_" in k)
    fig, ax = plt.subplots(figsize=(max(5, 1.2 * len(directions)), 3.5))
    width = 0.8 / len(splits)
    for i, name in enumerate(splits):
        ax.bar(np.arange(len(directions)) + i * width, [metrics[name][d] for d in directions], width, label=name)
    ax.set_xticks(np.arange(len(directions)) + width * (len(splits) - 1) / 2, directions, rotation=20, fontsize=8)
    ax.set(ylim=(0, 1), ylabel="recall", title="Retrieval in each direction")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "retrieval.png", dpi=110)
    plt.close(fig)
    lines = [f"# Run {run.name} (two-tower)", "",
             f"Best epoch {metrics['best_epoch']} of {metrics['epochs_run']}; logit scale "
             f"{metrics.get('logit_scale', float('nan')):.2f}.", "",
             "| split | R@1 | R@5 | nearest-neighbour class accuracy | n |", "|---|---|---|---|---|"]
    for name in splits:
        x = metrics[name]
        lines.append(f"| {name} | {x['r1']:.3f} | {x['r5']:.3f} | {format_metric(x.get('nn_class_accuracy'))} | "
                     f"{int(x['n'])} |")
    lines += ["", "![learning curves](learning_curves.png)", "![retrieval](retrieval.png)"]
    return lines


def _ratio(pred: list[dict]) -> str:
    if len(pred) == 1:
        return "single"
    a, b = pred[0]["salience"], pred[1]["salience"]
    return "50/50" if round(a) == round(b) else ("70/30" if a > b else "30/70")


def write_report(run: str | Path) -> Path:
    """Write the report of a single run directory (or of every fold of a cross-validation run) into RUN/report/."""
    run = Path(run)
    if (run / "cv.json").exists():
        return _cv_report(run)
    if not (run / "metrics.json").exists():
        raise FusionkitError(f"{run}: no metrics.json; is it a finished run directory (fusionkit train ... --out {run})?")
    out = _report_dir(run)
    plt = _pyplot()
    metrics = _read_json(run / "metrics.json")
    log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines() if line.strip()]
    split = "test" if "test" in metrics else "val"
    task = task_class(load_spec(run / "spec.yaml"))  # the task says what a run has to draw
    _learning_curves(plt, log, metrics["best_epoch"], task.record_keys, out / "learning_curves.png")
    if not task.predicts:
        lines = _retrieval_report(plt, run, out, metrics)
    else:
        preds = _read_json(run / f"predictions_{split}.json")
        rates = metrics[split].get("keep_rates")
        _prediction_plots(plt, metrics[split], preds, rates, out)
        lines = _summary_lines(run, metrics, split) + _curve_sections(plt, run, out)
        lines += ["", "![learning curves](learning_curves.png)", "![kept per label](kept_per_label.png)",
                  "![presence confusion](presence_confusion.png)", "![salience confusion](salience_confusion.png)"]
    atomic_write_text(out / "summary.md", "\n".join(lines) + "\n")
    return out


#: What a report folder holds: a folder holding anything else is not replaced into.
REPORT_FILES = ("summary.md", "learning_curves.png", "kept_per_label.png", "keep_rates.png",
                "presence_confusion.png", "salience_confusion.png", "retrieval.png", "budget_curve_*.png")


def _report_dir(run: Path) -> Path:
    """RUN/report, created, after checking that it holds only what a report writes (a user's files are never
    written over)."""
    out = run / "report"
    if out.is_symlink() or (out.exists() and not out.is_dir()):
        raise FusionkitError(f"{out}: exists and is not a directory; move it away so that the report can be written")
    out.mkdir(exist_ok=True)
    foreign = [p.name for p in out.iterdir()
               if not is_temporary(p) and not any(p.match(pattern) for pattern in REPORT_FILES)]
    if foreign:
        raise FusionkitError(f"{out}: holds files that fusionkit's report does not write ({', '.join(sorted(foreign)[:5])}); "
                             "not written into. Move them away, then run fusionkit report again.")
    return out


def _read_json(path: Path) -> Any:
    """A JSON file of the run, or an error naming it and what to do."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FusionkitError(f"{path}: missing; the run directory is incomplete (train it again, or rerun the "
                             "command that writes it)") from None
    except (OSError, ValueError) as exc:
        raise FusionkitError(f"{path}: unreadable ({str(exc)[:200]}): it is truncated or damaged; rerun the command "
                             "that wrote it (e.g. fusionkit evaluate RUN --budget-curve) or move it away") from None


def _cv_report(run: Path) -> Path:
    folds = sorted(p for p in run.glob("fold*") if (p / "metrics.json").exists())
    for fold in folds:
        write_report(fold)
    cv = _read_json(run / "cv.json")
    lines = ["# Cross-validation", "", "| metric | mean | std |", "|---|---|---|"]
    lines += [f"| {k} | {format_metric(v['mean'])} | {format_metric(v['std'])} |" for k, v in cv["test"].items()]
    lines += ["", "Per fold: " + ", ".join(f"[{p.name}]({p.name}/report/summary.md)" for p in folds)]
    out = _report_dir(run)
    atomic_write_text(out / "summary.md", "\n".join(lines) + "\n")
    return out


def _prediction_plots(plt, m: dict, preds: dict, rates: dict | None, out: Path) -> None:
    """The plots of a fusion run's predictions: kept encoders per label, keep rates, and both confusions."""
    labels = list(m["per_label_f1"])
    kept = m["kept_counts"]
    encoders = list(next(iter(kept.values())))
    matrix = np.array([[kept[lab][e] for e in encoders] for lab in labels], dtype=float)
    totals = np.array([sum(1 for r in preds.values() if any(t["emotion"] == lab for t in r["truth"])) for lab in labels])
    share = matrix / np.maximum(totals[:, None], 1)
    _heatmap(plt, share, labels, encoders, "How often each encoder is kept, per true label", out / "kept_per_label.png",
             fmt="{:.2f}", xlabel="encoder", ylabel="true label")
    if rates:
        _keep_rates(plt, rates, out / "keep_rates.png")
    conf = np.zeros((len(labels), len(labels)))
    for r in preds.values():
        for t in r["truth"]:
            for p in r["prediction"]:
                conf[labels.index(t["emotion"]), labels.index(p["emotion"])] += 1
    _heatmap(plt, conf, labels, labels, "Presence: true label vs predicted label", out / "presence_confusion.png",
             fmt="{:.0f}", xlabel="predicted", ylabel="true")
    _heatmap(plt, _salience_counts(preds), RATIO_NAMES[1:], ("wrong pair", *RATIO_NAMES),
             "Salience on blends (ratios in the truth's emotion order)", out / "salience_confusion.png", fmt="{:.0f}",
             xlabel="predicted", ylabel="true")


def _salience_counts(preds: dict) -> np.ndarray:
    """[true ratio, predicted ratio] counts over the blends, a wrong pair or a single emotion its own column."""
    columns = ("wrong pair", *RATIO_NAMES)
    sal = np.zeros((3, len(columns)))
    for r in preds.values():
        if len(r["truth"]) != 2:
            continue
        truth_order = [t["emotion"] for t in r["truth"]]
        row = RATIO_NAMES.index(_ratio(r["truth"])) - 1
        if len(r["prediction"]) == 1:
            col = "single"
        elif {p["emotion"] for p in r["prediction"]} != set(truth_order):
            col = "wrong pair"
        else:
            col = _ratio(sorted(r["prediction"], key=lambda e: truth_order.index(e["emotion"])))
        sal[row, columns.index(col)] += 1
    return sal


def _summary_lines(run: Path, metrics: dict, split: str) -> list[str]:
    """The summary's scores, per-label F1, keep rates and compute."""
    m = metrics[split]
    rates = m.get("keep_rates")
    lines = [
        f"# Run {run.name}", "",
        f"Best epoch {metrics['best_epoch']} of {metrics['epochs_run']}; decoder {metrics['decoder']}.", "",
        "| split | ACC_presence | ACC_salience | Score | n |", "|---|---|---|---|---|",
    ]
    for name in ("val", "test"):
        if name in metrics:
            x = metrics[name]
            lines.append(f"| {name} | {x['acc_presence']:.3f} | {format_metric(x['acc_salience'])} | {x['score']:.3f} | "
                         f"{x['n']} |")
    lines += ["", f"Per-label F1 ({split}): " + ", ".join(f"{k} {v:.2f}" for k, v in m["per_label_f1"].items())]
    if "presence_map" in m:
        lines.append(f"Presence mAP ({split}): {m['presence_map']:.3f}")
    if rates:
        lines += ["", "Keep rate per encoder (clean / corrupted samples): " + ", ".join(
            f"{n} {format_metric(r['clean'], '.2f')} / {format_metric(r['corrupted'], '.2f')}" for n, r in rates.items()),
            "", "![keep rates](keep_rates.png)"]
    if "compute" in m:
        c = m["compute"]
        lines += ["", f"Compute ({split}): {c['mean_gflops']:.4g} of {c['full_gflops']:.4g} GFLOPs per sample; ran: " +
                  ", ".join(f"{n} {r:.0%}" for n, r in c["run_rate"].items())
                  + (f"; {c['unused_runs']:.0%} of the on-demand runs unused (not kept by the gate's top-n)"
                     if "unused_runs" in c else "")]
    return lines


def _curve_sections(plt, run: Path, out: Path) -> list[str]:
    """Each budget curve of the run (``evaluate --budget-curve``), drawn, with its section of the summary."""
    lines = []
    for curve in sorted(run.glob("budget_curve_*.json")):
        name = curve.stem[len("budget_curve_"):]
        data = _read_json(curve)
        _budget_curve(plt, data, out / f"budget_curve_{name}.png", curve)
        verdict = data.get("verdict", {}).get("summary") if isinstance(data.get("verdict"), dict) else None
        lines += ["", f"Accuracy against compute ({name}, `fusionkit evaluate --budget-curve`):", "",
                  f"![budget curve](budget_curve_{name}.png)"] + (["", f"Per-sample selection: {verdict}."]
                                                                 if verdict else [])
    return lines


def _budget_curve(plt, curve: Any, path: Path, source: Path) -> None:
    """Score against mean GFLOPs per sample (or, for a curve over measured time, encoder milliseconds per sample),
    each point labelled with its budget (a share of the full cost)."""
    timed = isinstance(curve, dict) and curve.get("costs") == "time"
    needed = ("budget_share", "score", "mean_encoder_seconds" if timed else "mean_gflops")
    points = curve.get("points") if isinstance(curve, dict) else None
    if not isinstance(points, list) or not all(isinstance(p, dict) and all(isinstance(p.get(k), (int, float))
                                                                           for k in needed) for p in points):
        raise FusionkitError(f"{source}: not a budget curve fusionkit can draw (each point needs {', '.join(needed)}); "
                             "write it again with fusionkit evaluate RUN --budget-curve, or move it away")
    if not all(isinstance(curve.get(k), (str, int)) for k in ("split", "n")):
        raise FusionkitError(f"{source}: its split or n is missing; write it again with fusionkit evaluate RUN "
                             "--budget-curve, or move it away")
    key = "mean_encoder_seconds" if timed else "mean_gflops"
    scale = 1e3 if timed else 1.0
    spent = [scale * p[key] for p in points]
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    _draw_controls(ax, curve, key, scale)
    kind = curve.get("kind", "cap")  # a curve from before kinds were written is at caps
    ax.plot(spent, [p["score"] for p in points], marker="o", label=f"scout ({kind} budgets)", zorder=3)
    caps = curve.get("cap_points")
    if kind != "cap" and isinstance(caps, list) and all(isinstance(p, dict) and all(isinstance(p.get(k), (int, float))
                                                                                    for k in needed) for p in caps):
        ax.plot([scale * p[key] for p in caps], [p["score"] for p in caps], marker=".", ls=":", color="tab:purple",
                label="scout (caps per sample)", zorder=3)
    labels: dict[tuple[float, float], list[float]] = {}  # budgets that spend alike share one point's label
    for x, p in zip(spent, points):
        labels.setdefault((x, p["score"]), []).append(p["budget_share"])
    for (x, y), shares in labels.items():
        text = f"{shares[0]:.0%}" if len(shares) == 1 else f"{shares[0]:.0%}-{shares[-1]:.0%}"
        ax.annotate(text, (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.set(title=f"Score against compute ({curve['split']}, n={curve['n']})",
           xlabel="mean encoder ms per sample (measured)" if timed else "mean GFLOPs per sample", ylabel="Score")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _draw_controls(ax, curve: dict, key: str, scale: float) -> None:
    """The controls beside the scout (``evaluate --budget-curve`` writes them; a curve from before has none): each
    static choice, their frontier, random rows at the scout's rates and the confidence cascade."""
    def xy(points: list) -> tuple[list[float], list[float]]:
        kept = [p for p in points if isinstance(p, dict) and isinstance(p.get(key), (int, float))]
        return [scale * p[key] for p in kept], [p["score"] for p in kept]

    if isinstance(curve.get("static"), list):
        ax.scatter(*xy(curve["static"]), marker="s", color="grey", s=18, label="static choices", zorder=2)
        for p in curve["static"]:
            ax.annotate("+".join(p.get("encoders", [])) or "none", (scale * p[key], p["score"]), fontsize=6,
                        color="grey", xytext=(3, -8), textcoords="offset points")
    if isinstance(curve.get("frontier"), list):
        ax.plot(*xy(curve["frontier"]), color="grey", ls="--", label="static frontier")
    if isinstance(curve.get("random"), list):
        ax.plot(*xy(curve["random"]), color="tab:orange", marker="x", ls=":", label="random rows")
    if isinstance(curve.get("cascade"), list):
        ax.plot(*xy(curve["cascade"]), color="tab:green", marker="^", ls="-.", label="confidence cascade")
    if isinstance(curve.get("known_frontier"), list):
        ax.plot(*xy(curve["known_frontier"]), color="tab:red", marker="*", ls="--",
                label="known corruption (each view where clean)")


def _heatmap(plt, values: np.ndarray, rows, cols, title: str, path: Path, fmt: str, xlabel: str, ylabel: str) -> None:
    fig, ax = plt.subplots(figsize=(1.0 + 0.8 * len(cols), 1.0 + 0.6 * len(rows)))
    ax.imshow(values, cmap="Blues")
    ax.set_xticks(range(len(cols)), cols, rotation=45, ha="right")
    ax.set_yticks(range(len(rows)), rows)
    top = values.max() if values.size else 0
    for i in range(values.shape[0]):
        for j in range(values.shape[1]):
            ax.text(j, i, fmt.format(values[i, j]), ha="center", va="center", fontsize=7,
                    color="white" if top and values[i, j] > 0.6 * top else "black")
    ax.set(title=title, xlabel=xlabel, ylabel=ylabel)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _number(value: float | None) -> float:
    """A metric for a plot: NaN (a gap) where it is missing or not applicable."""
    return np.nan if value is None else value
