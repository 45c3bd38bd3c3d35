"""Wall clock of predicting from raw images under a compute budget: the saving against the ideal.

The models are the scout models of `benchmarks/conditional_uci.py` (five pre-extracted views always run; two live
timm CNNs on the `pix` images on demand, at 10x10 and 40x40), one per fold and seed, trained there and kept under
`runs/benchmark-conditional/runs`. Each evaluates its test fold the way `fusionkit predict` does
(`fusionkit.inference.collect_outputs`, batch 64, one thread), at caps and mean budgets:

- *deferred*: fusionkit's data path, which reads and decodes an on-demand encoder's images only for the rows that
  run it (`FeatureStore.inputs_for(..., defer=...)`);
- *eager*: every image of a batch read and decoded first, the backbone then skipped for rows not kept (the data path
  before deferral).

*Ideal*: the full encoder cost over the spent encoder cost (GFLOPs per sample, as fusionkit counts them). *Speed-up*:
the full budget's seconds over the budget's. The target is a speed-up of at least 80% of the ideal. *Time ideal*:
the same ratio with each CNN's measured seconds per row (reading, decoding and encoding, timed alone) in place of its
FLOPs, and the always-run part as timed at a cap of 0%: it tells the execution's overheads from a cost model (FLOPs)
that does not follow time. Medians of interleaved rounds.

*Budgets over measured time* (``--budget-costs time``): the same mean budgets counted in each CNN's seconds per
sample as ``fusionkit.inference.measure_encoder_seconds`` measures them, their ideal the full measured time
over the spent one. Each budget's test-fold Score is recorded beside its seconds.

    .venv/bin/python benchmarks/conditional_wallclock.py --rounds 3
"""

from __future__ import annotations

import argparse
import re
import statistics
import time
from pathlib import Path

import numpy as np
from conditional_uci import HEAVY, SIZES, size_tag, two_columns
from report import machine, markdown_table, write

WORK = Path("runs/benchmark-conditional")
BUDGETS = (("cap 100%", "100%"), ("mean 70%", "mean:70%"), ("mean 55%", "mean:55%"), ("mean 40%", "mean:40%"),
           ("mean 25%", "mean:25%"), ("mean 10%", "mean:10%"), ("cap 0%", "0%"))
#: The same mean budgets counted in each CNN's measured seconds per sample (``--budget-costs time``).
TIME_BUDGETS = (("time 70%", "mean:70%"), ("time 55%", "mean:55%"), ("time 40%", "mean:40%"),
                ("time 25%", "mean:25%"), ("time 10%", "mean:10%"))
BATCH = 64


def eager_outputs(model, store, index, budget) -> None:
    """The predict path with every image read: what the data path did before deferral."""
    import torch

    model.eval()
    with torch.no_grad():
        for start in range(0, len(index), BATCH):
            model(*store.inputs_for(model, index[start:start + BATCH]), budget=budget)


def encoder_seconds(model, store, index, name: str) -> float:
    """Seconds to read, decode and encode every row of ``index`` with one on-demand encoder alone (batch 64)."""
    import torch

    encoder, rows = model.live_encoders()[name], store.raw_rows[index]
    started = time.perf_counter()
    with torch.no_grad():
        for start in range(0, len(rows), BATCH):
            x, lengths = store.raw.batch(rows[start:start + BATCH], {name: encoder})
            model.projectors[name](model.encoders[name](x[name], lengths.get(name)))
    return time.perf_counter() - started


def measure(run: Path, clean: Path, manifest: Path, fold: int, rounds: int) -> dict:
    import torch

    from fusionkit.conditional.budget import Budget
    from fusionkit.data.open import spec_store
    from fusionkit.inference import collect_outputs, fit_mean_budget, measure_encoder_seconds
    from fusionkit.models.factory import load_model
    from fusionkit.training.tasks import compute_summary, evaluate_outputs
    from fusionkit.training.train import make_split

    torch.set_num_threads(1)
    model = load_model(run / "best", device="cpu")
    store = spec_store(model.spec, clean, manifest)
    split = make_split(store, fold)
    budgets = {label: fit_mean_budget(model, store, split.val, b) if b.startswith("mean:") else Budget.parse(b)
               for label, b in BUDGETS}
    measured = measure_encoder_seconds(model, store, split.test, batch_size=BATCH)  # as --budget-costs time does
    budgets |= {label: fit_mean_budget(model, store, split.val, Budget.parse(b).timed(measured))
                for label, b in TIME_BUDGETS}
    eager = [label for label, _ in BUDGETS]
    spent, seconds = {}, {label: {"deferred": [], "eager": []} for label in budgets}
    parts = {name: [] for name in model.deferrable_inputs()}
    truth = store.truth_matrix(split.test)
    for label, budget in budgets.items():  # what each budget spends; the pass also warms every path up
        outputs = collect_outputs(model, store, split.test, batch_size=BATCH, budget=budget)
        summary = compute_summary(model, outputs)
        spent[label] = (summary["mean_gflops"], summary["full_gflops"], summary["run_rate"],
                        evaluate_outputs(model, outputs, truth)["score"])
    for _ in range(rounds):
        for label, budget in budgets.items():
            started = time.perf_counter()
            collect_outputs(model, store, split.test, batch_size=BATCH, budget=budget)
            seconds[label]["deferred"].append(time.perf_counter() - started)
            if label in eager:
                started = time.perf_counter()
                eager_outputs(model, store, split.test, budget)
                seconds[label]["eager"].append(time.perf_counter() - started)
        for name in parts:
            parts[name].append(encoder_seconds(model, store, split.test, name))
    return {"run": run.name, "n": int(len(split.test)),
            "encoder_seconds": {name: statistics.median(values) for name, values in parts.items()},
            "measured_seconds_per_sample": measured,
            "costs": {name: model.encoder_costs()[name] for name in parts},
            "points": {label: {"mean_gflops": spent[label][0], "full_gflops": spent[label][1],
                               "run_rate": spent[label][2], "score": spent[label][3],
                               "deferred": statistics.median(seconds[label]["deferred"]),
                               "eager": statistics.median(seconds[label]["eager"]) if label in eager else None}
                       for label in budgets}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", default=str(WORK), help="where conditional_uci.py kept its scout runs")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds per budget (medians)")
    parser.add_argument("--runs", type=int, default=10, help="how many of the scout runs (folds x seeds) to time")
    parser.add_argument("--heavy-size", type=int, default=HEAVY, help="time the scout runs of conditional_uci.py "
                        "--heavy-size N")
    args = parser.parse_args()
    tag = size_tag(args.heavy_size)
    work = Path(args.work)
    clean, manifest = work / "store-clean", two_columns(work / "pix-images" / "manifest.csv")
    runs = sorted(p for p in (work / "runs").glob(f"scout{tag}-f*-s*")
                  if re.fullmatch(rf"scout{re.escape(tag)}-f\d+-s\d+", p.name))[: args.runs]
    if not runs:
        raise SystemExit(f"{work}/runs: no scout runs; run benchmarks/conditional_uci.py first")
    results = [measure(run, clean, manifest, int(run.name.split("-")[-2][1:]), args.rounds) for run in runs]
    rows, table = {}, []
    base = {kind: float(np.mean([r["points"]["cap 100%"][kind] for r in results])) for kind in ("deferred", "eager")}
    alone = {name: float(np.mean([r["encoder_seconds"][name] for r in results])) for name in SIZES}

    def time_bound(label: str) -> float:
        """Seconds the budget's runs would take if each CNN cost its measured seconds per row (reading, decoding
        and encoding, as when it runs alone) and nothing else were added to the always-run part (cap 0%)."""
        return float(np.mean([r["points"]["cap 0%"]["deferred"]
                              + sum(r["points"][label]["run_rate"][n] * r["encoder_seconds"][n] for n in SIZES)
                              for r in results]))
    for label, _ in BUDGETS:
        pts = [r["points"][label] for r in results]
        full = float(np.mean([p["full_gflops"] for p in pts]))
        mean = float(np.mean([p["mean_gflops"] for p in pts]))
        secs = {kind: float(np.mean([p[kind] for p in pts])) for kind in ("deferred", "eager")}
        ideal = full / mean if mean > 0 else None
        speed = {kind: base[kind] / secs[kind] for kind in secs}
        timed = base["deferred"] / time_bound(label)
        rows[label] = {"mean_gflops": mean, "full_gflops": full, "ideal": ideal, "seconds": secs, "speedup": speed,
                       "of_ideal": {k: (v / ideal if ideal else None) for k, v in speed.items()},
                       "time_ideal": timed, "of_time_ideal": speed["deferred"] / timed,
                       "run_rate": {n: float(np.mean([p["run_rate"][n] for p in pts])) for n in SIZES},
                       "score": float(np.mean([p["score"] for p in pts]))}
        r = rows[label]
        table.append([label, f"{mean:.4g} of {full:.4g}", f"{ideal:.2f}×" if ideal else "∞",
                      f"{secs['deferred']:.2f}", f"{speed['deferred']:.2f}×",
                      f"{r['of_ideal']['deferred']:.0%}" if ideal else "–",
                      f"{timed:.2f}×", f"{r['of_time_ideal']:.0%}", f"{secs['eager']:.2f}", f"{speed['eager']:.2f}×",
                      f"{r['of_ideal']['eager']:.0%}" if ideal else "–"])
    timed_rows, timed_table = {}, []
    for label, _ in TIME_BUDGETS:  # budgets over each CNN's measured seconds: their ideal is in those seconds
        pts = [r["points"][label] for r in results]
        full_s = float(np.mean([sum(r["measured_seconds_per_sample"].values()) for r in results]))
        spent_s = float(np.mean([sum(r["points"][label]["run_rate"][n] * r["measured_seconds_per_sample"][n]
                                     for n in SIZES) for r in results]))
        secs = float(np.mean([p["deferred"] for p in pts]))
        mean = float(np.mean([p["mean_gflops"] for p in pts]))
        full = float(np.mean([p["full_gflops"] for p in pts]))
        ideal = full_s / spent_s if spent_s > 0 else None
        speed = base["deferred"] / secs
        timed_rows[label] = {"mean_encoder_seconds": spent_s, "full_encoder_seconds": full_s, "ideal": ideal,
                             "seconds": secs, "speedup": speed, "of_ideal": speed / ideal if ideal else None,
                             "mean_gflops": mean, "flops_of_ideal": speed * mean / full if mean else None,
                             "score": float(np.mean([p["score"] for p in pts])),
                             "run_rate": {n: float(np.mean([p["run_rate"][n] for p in pts])) for n in SIZES}}
        r = timed_rows[label]
        timed_table.append([label, f"{1e3 * spent_s:.3f} of {1e3 * full_s:.3f}", f"{ideal:.2f}×" if ideal else "∞",
                            f"{secs:.3f}", f"{speed:.2f}×", f"{r['of_ideal']:.0%}" if ideal else "–",
                            f"{mean:.4g}", ", ".join(f"{r['run_rate'][n]:.0%}" for n in SIZES), f"{r['score']:.3f}"])
    flops_table = [[label, f"{rows[label]['score']:.3f}"] for label, _ in BUDGETS]
    middle = [label for label, _ in BUDGETS if rows[label]["ideal"] and label != "cap 100%"]
    met = all(rows[label]["of_ideal"]["deferred"] >= 0.8 for label in middle)
    met_time = all(timed_rows[label]["of_ideal"] >= 0.8 for label, _ in TIME_BUDGETS if timed_rows[label]["ideal"])
    n = results[0]["n"]
    section = "\n".join([
        "## Conditional execution: wall clock from raw images"
        + (f", heavy CNN at {args.heavy_size}×{args.heavy_size}" if tag else ""), "",
        f"`.venv/bin/python benchmarks/conditional_wallclock.py --rounds {args.rounds}"
        + (f" --heavy-size {args.heavy_size}" if tag else "") + "`: the scout models of the "
        f"UCI benchmark above ({len(results)} runs: folds × seeds), each predicting its test fold (about {n} "
        "samples) from the raw `pix` images the way `fusionkit predict` does (batch 64, one thread), means over the "
        "runs of the median of interleaved rounds. *GFLOPs*: spent of full, per sample. *Ideal*: full over spent. "
        "*Deferred*: fusionkit's data path, which reads and decodes an on-demand encoder's images only for the rows "
        "that run it; *eager*: every image read and decoded first, as before. Speed-ups are against each path's own "
        "full budget. *Time ideal*: the speed-up if each CNN cost, per row it runs on, its measured seconds when it "
        "reads, decodes and encodes the test fold alone, and nothing were spent beyond the always-run part (the cap "
        f"0% seconds): what the rows chosen could save in time. ({machine()['cpus']} CPUs.)", "",
        markdown_table(["budget", "GFLOPs", "ideal", "deferred s", "speed-up", "of ideal", "time ideal", "of it",
                        "eager s", "speed-up", "of ideal"], table), "",
        "Each CNN alone on the test fold (reading, decoding, encoding): "
        + ", ".join(f"{n} {alone[n]:.3f} s" for n in SIZES)
        + f"; their FLOPs are 1 : {results[0]['costs']['cnn_heavy'] / results[0]['costs']['cnn_light']:.1f}, "
        f"their seconds 1 : {alone['cnn_heavy'] / alone['cnn_light']:.1f}. The always-run part (cap 0%) and both "
        f"CNNs alone add up to {time_bound('cap 100%'):.2f} s against the {base['deferred']:.2f} s measured at full "
        "budget.", "",
        f"Target: at least 80% of the ideal at every budget between 0% and 100%: **{'met' if met else 'not met'}**.",
        "", "Test-fold Score at each of these budgets: " + ", ".join(f"{a} {b}" for a, b in flops_table) + ".", "",
        "**Budgets over measured time** (`--budget-costs time`): the same mean budgets counted in each CNN's "
        "seconds per sample, measured by `fusionkit.inference.measure_encoder_seconds` on the test fold (as "
        "the command line does) and the threshold fitted on the validation fold. *Encoder ms*: measured encoder "
        "time per sample, spent of full; *ideal*: full over spent; speed-ups against the full budget above. "
        "*GFLOPs*: what the same rows spend in FLOPs. *Ran*: the light and heavy CNN's run rates.", "",
        markdown_table(["budget", "encoder ms", "ideal", "deferred s", "speed-up", "of ideal", "GFLOPs", "ran",
                        "Score"], timed_table), "",
        f"Target, counted in measured time: at least 80% of the ideal at every budget: "
        f"**{'met' if met_time else 'not met'}**.",
    ])
    write(f"conditional-wallclock{tag}", {"machine": machine(), "rounds": args.rounds, "budgets": rows,
                                         "time_budgets": timed_rows, "runs": results, "target_met": met,
                                         "target_met_in_time": met_time}, section)


if __name__ == "__main__":
    main()
