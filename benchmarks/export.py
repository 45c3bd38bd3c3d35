"""The runtime without torch against PyTorch eager: throughput, a mean budget's wall clock, start-up, install size.

Two testbeds, each trained on fold 0, exported (`fusionkit export`) and checked (`--check`) on the test fold:

- **views**: the six UCI Multiple Features views (fou, kar, mor, zer always; fac and pix on demand, with declared
  costs), stored features;
- **cnn**: the conditional benchmark's model (`benchmarks/conditional_uci.py`): the five views always, two live timm
  CNNs on the `pix` images on demand (10x10 and 40x40 inputs, measured FLOPs). Both sides read the images while they
  predict, each only for the rows that run a CNN: the model through the store's deferred inputs (as `fusionkit
  evaluate`), the runtime from the manifest's paths with PIL and numpy.

Then:

- **throughput**: samples per second of predict over the test fold, batch 64 and batch 1, the runtime
  (`fusionkit.runtime`, onnxruntime on the CPU) against the model in PyTorch eager (`model(..., budget=...)` under
  `torch.no_grad`; stored inputs already tensors), at the full budget and at three mean budgets; one thread each;
- **a mean budget's wall clock** (cnn): the runtime's seconds at each budget against its time ideal, the budget 0%
  time plus the budget's share of the on-demand GFLOPs of the 100% budget times the extra seconds of 100%;
- **start-up**: `import fusionkit.runtime; load(DIR)` against `import torch; load_model(RUN/best)`, each a fresh
  process (median of interleaved runs);
- **size**: a fresh virtual environment with `pip install 'fusionkit[runtime]'` from this source tree (no torch),
  which predicts from the export, against this environment (torch, CUDA libraries).

    .venv/bin/python benchmarks/export.py --source ../shared/data/uci-mfeat
    .venv/bin/python benchmarks/export.py --source ../shared/data/uci-mfeat --testbed cnn
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from report import machine, markdown_table, write

ROOT = Path(__file__).resolve().parents[1]
SPEC = {
    "labels": ["d0", "d1", "d2", "d3", "d4", "d5"],
    "neutral": "d5",
    "latent_dim": 64,
    "encoders": [
        {"name": "fou", "type": "features", "dim": 76},
        {"name": "kar", "type": "features", "dim": 64},
        {"name": "mor", "type": "features", "dim": 6},
        {"name": "zer", "type": "features", "dim": 47},
        {"name": "fac", "type": "features", "dim": 216, "run": "on_demand", "cost_gflops": 2.0},
        {"name": "pix", "type": "features", "dim": 240, "run": "on_demand", "cost_gflops": 4.0},
    ],
    "projector": {"hidden": 128, "dropout": 0.1},
    "gate": {"type": "attention", "top_n": 3, "heads": 2},
    "fusion": {"type": "rank_attention"},
    "train": {"epochs": 30, "batch_size": 64, "lr": 2e-3, "seed": 0},
}
MEAN_BUDGETS = ("mean:25%", "mean:40%", "mean:55%")


def rate(predict, batches: list, rounds: int, samples: int) -> float:
    """Samples per second of ``predict`` over ``batches`` of ``samples`` in all (the best of ``rounds`` passes, after
    a warm-up pass)."""
    for batch in batches:
        predict(batch)
    best = float("inf")
    for _ in range(rounds):
        start = time.perf_counter()
        for batch in batches:
            predict(batch)
        best = min(best, time.perf_counter() - start)
    return samples / best


def throughput(model, runtime, budgets: dict, batch: int, rounds: int, rows: np.ndarray, eager_inputs,
               runtime_inputs: dict) -> list[dict]:
    """Samples per second of the model (``eager_inputs(part)``: its inputs of the store rows ``part``) and of the
    runtime (``runtime_inputs``: its inputs of ``rows``) over ``rows`` in batches of ``batch``, at each budget
    (label -> (the model's budget, the runtime's))."""
    import torch

    out = []
    for label, (torch_budget, runtime_budget) in budgets.items():
        eager_batches, runtime_batches = [], []
        for start in range(0, len(rows), batch):
            eager_batches.append(eager_inputs(rows[start:start + batch]))
            runtime_batches.append({n: v[start:start + batch] for n, v in runtime_inputs.items()})

        def eager(inputs, budget=torch_budget):
            with torch.no_grad():
                return model(inputs[0], inputs[1], inputs[2], budget=budget)

        def onnx(inputs, budget=runtime_budget):
            return runtime.predict(inputs, budget)

        torch_rate = rate(eager, eager_batches, rounds, len(rows))
        onnx_rate = rate(onnx, runtime_batches, rounds, len(rows))
        spent = float(np.mean(np.concatenate([runtime.predict(b, runtime_budget).cost for b in runtime_batches])))
        out.append({"budget": label, "batch": batch, "eager_per_s": torch_rate, "runtime_per_s": onnx_rate,
                    "ratio": onnx_rate / torch_rate, "mean_gflops": spent})
    return out


def startup(run: Path, export: Path, repeats: int) -> dict:
    py = sys.executable
    commands = {
        "import torch; load_model": [py, "-c", f"import torch; from fusionkit.models.factory import load_model; "
                                     f"load_model({str(run / 'best')!r}, device='cpu')"],
        "import fusionkit.runtime; load": [py, "-c",
                                           f"import fusionkit.runtime as rt; rt.load({str(export)!r}, threads=1)"],
    }
    samples: dict[str, list[float]] = {k: [] for k in commands}
    for cmd in commands.values():
        subprocess.run(cmd, check=True, capture_output=True)
    for _ in range(repeats):
        for name, cmd in commands.items():
            start = time.perf_counter()
            subprocess.run(cmd, check=True, capture_output=True)
            samples[name].append(time.perf_counter() - start)
    return {k: statistics.median(v) for k, v in samples.items()} | {"samples": samples}


def size_of(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file() and not f.is_symlink())


def runtime_environment(export: Path, data: Path, raw: Path | None, workdir: Path) -> dict:
    """A fresh venv with ``pip install 'fusionkit[runtime]'`` from this source tree (a wheel built from it, as a
    user installs it), predicting 8 rows from the export outside the source tree; its size in bytes."""
    venv = workdir / "runtime-venv"
    shutil.rmtree(venv, ignore_errors=True)
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    python = str(venv / "bin" / "python")
    install = subprocess.run([python, "-m", "pip", "install", "--quiet", f"{ROOT}[runtime]"], capture_output=True,
                             text=True, cwd=workdir)
    code = ("import sys, numpy as np, fusionkit, fusionkit.runtime as rt; m = rt.load(sys.argv[1]); "
            "r = m.read(sys.argv[2], sys.argv[3] or None).take(np.arange(8)); "
            "print(len(m.predict(r.inputs, 'mean').answers), 'torch' in sys.modules, "
            "fusionkit.__file__.startswith(sys.prefix))")
    proc = subprocess.run([python, "-c", code, str(export), str(data), str(raw or "")], capture_output=True,
                          text=True, cwd=workdir)
    packages = subprocess.run([python, "-m", "pip", "list", "--format", "freeze"], capture_output=True, text=True)
    site = next((venv / "lib").glob("python*/site-packages"))
    predicts = proc.returncode == 0 and proc.stdout.split() == ["8", "False", "True"]
    return {"installed": install.returncode == 0, "predicts": predicts,
            "output": (install.stderr + proc.stdout + proc.stderr)[-800:],
            "packages": packages.stdout.split(), "bytes": size_of(venv), "site_packages_bytes": size_of(site)}


def interleaved_seconds(passes: dict, rounds: int) -> dict[str, float]:
    """The median seconds of each pass (name -> a function that runs it) over ``rounds`` interleaved rounds, after
    a warm-up of each: a slow moment of the machine falls on every pass alike (one pass after another, best of a few,
    gave the same budget 0.18 to 0.28 s here)."""
    for run in passes.values():
        run()
    samples: dict[str, list[float]] = {name: [] for name in passes}
    for _ in range(rounds):
        for name, run in passes.items():
            start = time.perf_counter()
            run()
            samples[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in samples.items()}


def runtime_wall_clock(runtime, inputs: dict, budgets: dict[str, str], fixed: float, rounds: int) -> list[dict]:
    """The runtime's seconds over ``inputs`` in batches of 64 at each budget (label -> the runtime's budget; the
    first is 0%, the last 100%), beside two ideals: the 0% time plus each on-demand encoder's share of rows run
    times its own seconds on every row (its images read and its graph run, timed alone: the time ideal), and the
    0% time plus the budget's share of the on-demand GFLOPs that 100% runs times the extra seconds of 100% (the
    GFLOPs ideal; ``fixed``: the always-run GFLOPs per sample). Every time is a median of interleaved rounds."""
    from fusionkit.runtime import read_images

    rows = len(next(iter(inputs.values())))
    batches = [{n: v[start:start + 64] for n, v in inputs.items()} for start in range(0, rows, 64)]

    def encoder_pass(entry):
        def run():
            for batch in batches:
                pixels = read_images(list(batch[entry["name"]]), entry["reads"])
                runtime.sessions[entry["name"]].run(["token"], {"x": pixels})
        return run

    def budget_pass(budget):
        def run():
            for batch in batches:
                runtime.predict(batch, budget)
        return run

    passes = {f"alone {runtime.names[k]}": encoder_pass(runtime.encoders[k]) for k in runtime.demand}
    passes |= {label: budget_pass(budget) for label, budget in budgets.items()}
    seconds = interleaved_seconds(passes, rounds)
    alone = {runtime.names[k]: seconds[f"alone {runtime.names[k]}"] for k in runtime.demand}
    out = []
    for label, budget in budgets.items():
        outputs = [runtime.predict(b, budget) for b in batches]
        ran = np.concatenate([o.ran for o in outputs]).mean(axis=0)
        out.append({"budget": label, "seconds": seconds[label], "run_rates": {runtime.names[k]: float(ran[k])
                                                                              for k in runtime.demand},
                    "on_demand_gflops": float(np.mean(np.concatenate([o.cost for o in outputs]))) - fixed})
    zero, full = out[0], out[-1]
    for line in out:
        share = line["on_demand_gflops"] / max(full["on_demand_gflops"], 1e-12)
        line["gflops_share"] = share
        line["gflops_ideal_seconds"] = zero["seconds"] + share * (full["seconds"] - zero["seconds"])
        line["ideal_seconds"] = zero["seconds"] + sum(line["run_rates"][n] * t for n, t in alone.items())
        line["of_ideal"] = line["ideal_seconds"] / line["seconds"]
        line["of_gflops_ideal"] = line["gflops_ideal_seconds"] / line["seconds"]
        line["encoder_seconds_alone"] = alone
    return out


def targets_line(targets: dict[str, bool]) -> str:
    return "Targets: " + "; ".join(f"{name} **{'met' if ok else 'not met'}**" for name, ok in targets.items()) + ".\n"


def throughput_table(rows: list[dict]) -> str:
    return markdown_table(["budget", "batch", "eager samples/s", "runtime samples/s", "runtime / eager",
                           "GFLOPs per sample"],
                          [[r["budget"], r["batch"], f"{r['eager_per_s']:.0f}", f"{r['runtime_per_s']:.0f}",
                            f"{r['ratio']:.2f}x", f"{r['mean_gflops']:.3g}"] for r in rows])


def size_words(env: dict, full_env: int) -> str:
    return (f"Size: a fresh environment with `pip install 'fusionkit[runtime]'` from this tree is {env['bytes'] / 1e6:.0f} "
            f"MB (site-packages {env['site_packages_bytes'] / 1e6:.0f} MB; {len(env['packages'])} packages, torch "
            f"{'among them' if any(p.lower().startswith('torch==') for p in env['packages']) else 'not among them'}) "
            f"and predicts from the export without torch ({'yes' if env['predicts'] else 'no'}); this environment "
            f"(torch with CUDA libraries, the plugins) is {full_env / 1e9:.1f} GB.")


def views(args: argparse.Namespace, work: Path) -> None:
    from fusionkit.components.datasets import build_dataset
    from fusionkit.data.open import spec_store
    from fusionkit.export.check import check_export
    from fusionkit.export.graphs import export_model
    from fusionkit.inference import fit_mean_budget
    from fusionkit.models.factory import load_model
    from fusionkit.runtime import load
    from fusionkit.training.train import make_split, train

    store_path = build_dataset("uci-mfeat", {"source": args.source, "seed": 0}, work / "store")
    started = time.perf_counter()
    metrics = train(SPEC, store_path, work / "run", fold=0, progress=False)
    train_seconds = time.perf_counter() - started
    model = load_model(work / "run" / "best", device="cpu").eval()
    store = spec_store(model.spec, store_path)
    split = make_split(store, 0)
    fitted = {label: fit_mean_budget(model, store, split.val, label) for label in MEAN_BUDGETS}
    exports = {}
    for label, budget in [("full", None), *fitted.items()]:
        exports[label] = export_model(model, work / f"export-{label.replace(':', '-').replace('%', 'pct')}",
                                      budget=budget)
    check = check_export(model, exports["mean:40%"], store, split.test)
    budgets = {"full (100%)": ("100%", "100%"), **{label: (fitted[label], "mean") for label in MEAN_BUDGETS}}
    runtimes = {label: load(exports["full" if label.startswith("full") else label], threads=1) for label in budgets}
    read = runtimes["full (100%)"].read(store_path).take(split.test)
    rows = []
    for batch in (64, 1):
        for label, pair in budgets.items():
            rows += throughput(model, runtimes[label], {label: pair}, batch, args.rounds, split.test,
                               lambda part: store.inputs_for(model, part), read.inputs)
    start = startup(work / "run", exports["mean:40%"], args.repeats)
    env = runtime_environment(exports["mean:40%"], store_path, None, work)
    full_env = size_of(Path(sys.prefix))
    data = {"machine": machine(), "spec": SPEC, "test_score": metrics["test"]["score"], "train_seconds": train_seconds,
            "check": check, "throughput": rows, "startup_seconds": start, "runtime_env": env,
            "full_env_bytes": full_env}
    batch1 = [r for r in rows if r["batch"] == 1]
    batch64 = [r for r in rows if r["batch"] == 64]
    targets = {
        "equal outputs": all(line["max_prob_diff"] <= 1e-4 for line in check),
        "batch 1 >= 1.5x eager": all(r["ratio"] >= 1.5 for r in batch1),
        "batch 64 >= 1x eager": all(r["ratio"] >= 1.0 for r in batch64),
        "start-up <= 0.2x": start["import fusionkit.runtime; load"] <= 0.2 * start["import torch; load_model"],
        "runtime env <= 300 MB without torch": env["predicts"] and env["bytes"] <= 300e6,
    }
    data["targets"] = targets
    section = (
        "## Export and the runtime without torch\n\n"
        f"`.venv/bin/python benchmarks/export.py --source {args.source}` ({data['machine']['cpus']} CPUs, one thread "
        f"each; {data['machine'].get('cpu', '')}). A UCI model with fac and pix on demand (declared 2 and 4 "
        f"GFLOPs), trained on fold 0 (test Score {data['test_score']:.3f}), exported, checked on the test fold "
        f"(largest probability difference {max(line['max_prob_diff'] for line in check):.1e}, the same encoders "
        "run and the same answers at every checked budget), then timed over the test fold "
        f"({len(split.test)} samples; the best of {args.rounds} passes).\n\n" + throughput_table(rows) + "\n\n"
        f"Start-up (median of {args.repeats} fresh processes): `import torch` + `load_model` "
        f"{start['import torch; load_model']:.2f} s, `import fusionkit.runtime` + `load` "
        f"{start['import fusionkit.runtime; load']:.2f} s "
        f"({start['import fusionkit.runtime; load'] / start['import torch; load_model']:.2f}x).\n\n"
        + size_words(env, full_env) + "\n\n" + targets_line(targets)
    )
    write("export", data, section)


def cnn(args: argparse.Namespace, work: Path) -> None:
    from conditional_uci import SIZES, cnn_material, scout_system, specs

    from fusionkit.data.open import DataSource, spec_store
    from fusionkit.export.check import check_export
    from fusionkit.export.graphs import export_model
    from fusionkit.inference import fit_mean_budget
    from fusionkit.models.factory import load_model
    from fusionkit.runtime import load
    from fusionkit.training.train import make_split, train

    clean, manifest, weights = cnn_material(args.source, work / "material")
    spec = specs(0, weights)[scout_system(None)]
    started = time.perf_counter()
    metrics = train(spec, DataSource(clean, manifest), work / "cnn-run", fold=0, progress=False)
    train_seconds = time.perf_counter() - started
    model = load_model(work / "cnn-run" / "best", device="cpu").eval()
    store = spec_store(model.spec, clean, manifest)
    split = make_split(store, 0)
    fitted = {label: fit_mean_budget(model, store, split.val, label) for label in MEAN_BUDGETS}
    exports = {label: export_model(model, work / f"cnn-export-{label.replace(':', '-').replace('%', 'pct')}",
                                   budget=budget) for label, budget in [("full", None), *fitted.items()]}
    check = [line | {"export": label} for label, folder in exports.items()
             for line in check_export(model, folder, store, split.test)]
    budgets = {"full (100%)": ("100%", "100%"), **{label: (fitted[label], "mean") for label in MEAN_BUDGETS}}
    runtimes = {label: load(exports["full" if label.startswith("full") else label], threads=1) for label in budgets}
    read = runtimes["full (100%)"].read(clean, manifest).take(split.test)
    defer = model.deferrable_inputs()
    rows = []
    for batch in (64, 1):
        for label, pair in budgets.items():
            rows += throughput(model, runtimes[label], {label: pair}, batch, args.rounds, split.test,
                               lambda part: store.inputs_for(model, part, defer=defer), read.inputs)
    costs = model.encoder_costs()
    fixed = sum(c for name, c in costs.items() if name not in SIZES)
    clock = []
    for label in MEAN_BUDGETS:
        clock.append(runtime_wall_clock(runtimes[label], read.inputs, {"0%": "0%", label: "mean", "100%": "100%"},
                                        fixed, 3 * args.rounds))
    env = runtime_environment(exports["mean:40%"], clean, manifest, work)
    data = {"machine": machine(), "spec": spec, "test_score": metrics["test"]["score"], "train_seconds": train_seconds,
            "costs": costs, "check": check, "throughput": rows, "wall_clock": clock, "runtime_env": env,
            "full_env_bytes": size_of(Path(sys.prefix))}
    targets = {
        "equal outputs": all(line["max_prob_diff"] <= 1e-4 for line in check if "max_prob_diff" in line),
        "batch 1 >= 1.5x eager": all(r["ratio"] >= 1.5 for r in rows if r["batch"] == 1),
        "batch 64 >= 1x eager": all(r["ratio"] >= 1.0 for r in rows if r["batch"] == 64),
        "mean budget >= 80% of its time ideal": all(c[1]["of_ideal"] >= 0.8 for c in clock),
        "runtime env <= 300 MB without torch, reading images": env["predicts"] and env["bytes"] <= 300e6,
    }
    data["targets"] = targets
    clock_table = markdown_table(
        ["budget", "rows run (light / heavy)", "runtime s (0% / budget / 100%)", "time ideal s", "of time ideal",
         "GFLOPs share", "of GFLOPs ideal"],
        [[c[1]["budget"], " / ".join(f"{c[1]['run_rates'][n]:.0%}" for n in SIZES),
          f"{c[0]['seconds']:.3f} / {c[1]['seconds']:.3f} / {c[2]['seconds']:.3f}", f"{c[1]['ideal_seconds']:.3f}",
          f"{c[1]['of_ideal']:.0%}", f"{c[1]['gflops_share']:.0%}", f"{c[1]['of_gflops_ideal']:.0%}"]
         for c in clock]
        + [["100%", " / ".join(f"{clock[0][2]['run_rates'][n]:.0%}" for n in SIZES),
            f"- / {clock[0][2]['seconds']:.3f}",
            f"{clock[0][2]['ideal_seconds']:.3f}", f"{clock[0][2]['of_ideal']:.0%}", "100%", "100%"]])
    alone = clock[0][0]["encoder_seconds_alone"]
    light, heavy = (costs[name] for name in SIZES)
    section = (
        "## Export and the runtime without torch: live CNNs on demand\n\n"
        f"`.venv/bin/python benchmarks/export.py --source {args.source} --testbed cnn` ({data['machine']['cpus']} "
        f"CPUs, one thread each). The conditional benchmark's model: the five UCI views always, two timm CNNs on the "
        f"`pix` images on demand ({light:.4f} and {heavy:.4f} GFLOPs per image, measured), trained end to end on "
        f"fold 0 (test Score {data['test_score']:.3f}, {train_seconds:.0f} s), exported with each mean budget, each "
        f"export checked on the test fold (largest probability difference "
        f"{max(line.get('max_prob_diff', 0.0) for line in check):.1e}, the same encoders run and the same answers at "
        f"every checked budget). Both sides read the PNG images while they predict, only for the rows that run a "
        f"CNN; timed over the test fold ({len(split.test)} samples; the best of {args.rounds} passes).\n\n"
        + throughput_table(rows) + "\n\n"
        f"A mean budget's wall clock in the runtime (batch 64; medians of {3 * args.rounds} interleaved rounds). "
        "The time ideal is the 0% time plus, per CNN, the "
        "share of rows it runs on times its own seconds on every row, timed alone (its images read and its graph "
        f"run: {' and '.join(f'{alone[n]:.3f} s' for n in SIZES)} over the test fold); the GFLOPs ideal is the 0% "
        "time plus the budget's share of the on-demand GFLOPs that 100% runs times the extra seconds of 100%, which "
        "assumes time follows FLOPs (true of the conditional benchmark's equal encoders, not of these two: reading "
        "and decoding an image costs each CNN the same).\n\n" + clock_table + "\n\n"
        + size_words(env, data["full_env_bytes"]) + "\n\n" + targets_line(targets)
    )
    write("export-cnn", data, section)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", default=str(ROOT.parent / "shared" / "data" / "uci-mfeat"))
    parser.add_argument("--testbed", choices=["views", "cnn"], default="views")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--workdir", default=str(ROOT / "runs" / "benchmark-export"))
    args = parser.parse_args()

    import torch

    torch.set_num_threads(1)
    os.environ["OMP_NUM_THREADS"] = "1"
    work = Path(args.workdir) / args.testbed
    if args.testbed == "views":
        shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True, exist_ok=True)
    (views if args.testbed == "views" else cnn)(args, work)


if __name__ == "__main__":
    main()
