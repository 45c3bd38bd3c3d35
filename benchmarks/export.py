"""The runtime without torch against PyTorch eager: throughput, start-up and install size.

A model with the six UCI Multiple Features views (fou, kar, mor, zer always; fac and pix on demand, with declared
costs) is trained on fold 0, exported (`fusionkit export`) and checked (`--check`), then:

- **throughput**: samples per second of predict over the test fold, batch 64 and batch 1, the runtime
  (`fusionkit.runtime`, onnxruntime on the CPU) against the model in PyTorch eager (`model(..., budget=...)` under
  `torch.no_grad`, the inputs already tensors), at the full budget and at three mean budgets; one thread each;
- **start-up**: `import fusionkit.runtime; load(DIR)` against `import torch; load_model(RUN/best)`, each a fresh
  process (median of interleaved runs);
- **size**: a fresh virtual environment with the runtime's packages (numpy, onnxruntime, safetensors, attrs, pluggy), which
  imports `fusionkit.runtime` from the source tree and predicts, against this environment (torch, CUDA libraries).

    .venv/bin/python benchmarks/export.py --source ../shared/data/uci-mfeat
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


def throughput(model, runtime, store, rows: np.ndarray, budgets: dict, batch: int, rounds: int) -> list[dict]:
    import torch

    from fusionkit.runtime import read_store

    read = read_store(store.path, runtime.names).take(rows)
    out = []
    for label, (torch_budget, runtime_budget) in budgets.items():
        eager_batches, runtime_batches = [], []
        for start in range(0, len(rows), batch):
            part = rows[start:start + batch]
            eager_batches.append(store.inputs_for(model, part))
            runtime_batches.append({n: v[start:start + batch] for n, v in read.inputs.items()})

        def eager(inputs, budget=torch_budget):
            with torch.no_grad():
                return model(inputs[0], inputs[1], inputs[2], budget=budget)

        def onnx(inputs, budget=runtime_budget):
            return runtime.predict(inputs, budget)

        torch_rate = rate(eager, eager_batches, rounds, len(rows))
        onnx_rate = rate(onnx, runtime_batches, rounds, len(rows))
        spent = float(runtime.predict(read.inputs, runtime_budget).cost.mean())
        out.append({"budget": label, "batch": batch, "eager_per_s": torch_rate, "runtime_per_s": onnx_rate,
                    "ratio": onnx_rate / torch_rate, "mean_gflops": spent})
    return out


def startup(run: Path, export: Path, repeats: int) -> dict:
    py = sys.executable
    commands = {
        "import torch; load_model": [py, "-c", f"import torch; from fusionkit.models.factory import load_model; "
                                     f"load_model({str(run / 'best')!r}, device='cpu')"],
        "import fusionkit.runtime; load": [py, "-c", f"import fusionkit.runtime as rt; rt.load({str(export)!r})"],
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


def runtime_environment(export: Path, store: Path, workdir: Path) -> dict:
    """A fresh venv with the runtime's packages alone, predicting from the source tree; its size in bytes."""
    venv = workdir / "runtime-venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet"]
    subprocess.run([*pip, "numpy", "onnxruntime", "safetensors", "attrs", "pluggy"], check=True, capture_output=True)
    code = ("import sys, numpy as np, fusionkit.runtime as rt; m = rt.load(sys.argv[1]); "
            "r = rt.read_store(sys.argv[2], m.names).take(np.arange(8)); "
            "print(len(m.predict(r.inputs, 'mean').answers), 'torch' in sys.modules)")
    proc = subprocess.run([str(venv / "bin" / "python"), "-c", code, str(export), str(store)], capture_output=True,
                          text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    site = next((venv / "lib").glob("python*/site-packages"))
    return {"predicts": proc.returncode == 0 and proc.stdout.split() == ["8", "False"],
            "output": (proc.stdout + proc.stderr)[-500:], "bytes": size_of(venv), "site_packages_bytes": size_of(site)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", default=str(ROOT.parent / "shared" / "data" / "uci-mfeat"))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--workdir", default=str(ROOT / "runs" / "benchmark-export"))
    args = parser.parse_args()

    import torch

    from fusionkit.components.datasets import build_dataset
    from fusionkit.data.open import spec_store
    from fusionkit.inference import fit_mean_budget
    from fusionkit.inference.export import check_export, export_model
    from fusionkit.models.factory import load_model
    from fusionkit.runtime import load
    from fusionkit.training.train import make_split, train

    torch.set_num_threads(1)
    os.environ["OMP_NUM_THREADS"] = "1"
    work = Path(args.workdir)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
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
    runtimes = {label: load(exports["full" if label.startswith("full") else label]) for label in budgets}
    rows = []
    for batch in (64, 1):
        for label, pair in budgets.items():
            rows += throughput(model, runtimes[label], store, split.test, {label: pair}, batch, args.rounds)
    start = startup(work / "run", exports["mean:40%"], args.repeats)
    env = runtime_environment(exports["mean:40%"], store_path, work)
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
        "runtime env <= 300 MB": env["predicts"] and env["bytes"] <= 300e6,
    }
    data["targets"] = targets
    table = markdown_table(["budget", "batch", "eager samples/s", "runtime samples/s", "runtime / eager",
                            "GFLOPs per sample"],
                           [[r["budget"], r["batch"], f"{r['eager_per_s']:.0f}", f"{r['runtime_per_s']:.0f}",
                             f"{r['ratio']:.2f}x", f"{r['mean_gflops']:.2f}"] for r in rows])
    section = (
        "## Export and the runtime without torch\n\n"
        f"`.venv/bin/python benchmarks/export.py --source {args.source}` ({data['machine']['cpus']} CPUs, one thread "
        f"each; {data['machine'].get('cpu', '')}). A UCI model with fac and pix on demand (declared 2 and 4 "
        f"GFLOPs), trained on fold 0 (test Score {data['test_score']:.3f}), exported, checked on the test fold "
        f"(largest probability difference {max(line['max_prob_diff'] for line in check):.1e}, the same encoders "
        "run and the same answers at every checked budget), then timed over the test fold "
        f"({len(split.test)} samples; the best of {args.rounds} passes).\n\n" + table + "\n\n"
        f"Start-up (median of {args.repeats} fresh processes): `import torch` + `load_model` "
        f"{start['import torch; load_model']:.2f} s, `import fusionkit.runtime` + `load` "
        f"{start['import fusionkit.runtime; load']:.2f} s "
        f"({start['import fusionkit.runtime; load'] / start['import torch; load_model']:.2f}x).\n\n"
        f"Size: a fresh environment with numpy, onnxruntime, safetensors, attrs and pluggy is {env['bytes'] / 1e6:.0f} MB "
        f"(site-packages {env['site_packages_bytes'] / 1e6:.0f} MB) and predicts from the export without torch "
        f"({'yes' if env['predicts'] else 'no'}); this environment (torch with CUDA libraries, the plugins) is "
        f"{full_env / 1e9:.1f} GB.\n\n"
        "Targets: " + "; ".join(f"{name} **{'met' if ok else 'not met'}**" for name, ok in targets.items()) + ".\n"
    )
    write("export", data, section)


if __name__ == "__main__":
    main()
