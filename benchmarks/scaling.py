"""Scale-out and the training step against the machine's limit, at BlEmoRE size.

1. DDP: training samples/s with 1 and 2 processes (torchrun, gloo, one thread each) on
   7 encoders x 7,168 dims, latent 256, attention gate top-2, rank_concat, global batch 64;
   scaling efficiency = samples/s(2) / (2 x samples/s(1)).
2. The step against its matrix multiplications: forward + backward of that model (no optimiser
   step), against the
   same step's GEMMs alone (the seven projectors forward, and their weight gradients), timed
   in interleaved rounds in one process; the ratio is the share of bare GEMM throughput the
   step reaches.
3. The data path: time to assemble a batch of 64 from a store (the trainer's batch source)
   beside the step's compute, for a vector store (3,000 samples x 7 x 7,168) and a sequence
   store (7 encoders x 768 dims, 1-120 frames, pooled by mean or stats7); and the stats7 step
   (statistics computed once per sample) against the mean step.

    .venv/bin/python benchmarks/scaling.py
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from report import machine, markdown_table, write

K, DIM, LATENT, BATCH = 7, 7168, 256, 64


def blemore_spec(dim: int = DIM, pooling: str = "none", k: int = K) -> dict:
    return {
        "latent_dim": LATENT,
        "encoders": [{"name": f"enc{i}", "type": "features", "dim": dim, "pooling": pooling} for i in range(k)],
        "projector": {"hidden": 0, "dropout": 0.0},
        "gate": {"type": "attention", "top_n": 2, "heads": 4, "dropout": 0.0},
        "fusion": {"type": "rank_concat"},
        "heads": {"presence": {"type": "presence", "dropout": 0.0}, "salience": {"type": "salience", "dropout": 0.0}},
    }


def forward_backward(model, batch, target):
    from fusionkit.training.losses import supervised_loss

    out = model(*batch)
    loss, _ = supervised_loss(out, target, model.spec.train if hasattr(model, "spec") else model.module.spec.train)
    for p in model.parameters():
        p.grad = None
    loss.backward()


def train_step(model, optimizer, batch, target):
    forward_backward(model, batch, target)
    optimizer.step()


def ddp_worker(steps: int) -> None:
    """Run under torchrun: time ``steps`` DDP training steps at global batch 64; rank 0 prints samples/s."""
    from fusionkit.hardware.distributed import setup, wrap
    from fusionkit.models.factory import build_model

    torch.set_num_threads(1)
    dist = setup()
    torch.manual_seed(0)
    model = build_model(blemore_spec())
    ddp = wrap(model, dist)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    local = BATCH // dist.world_size
    g = torch.Generator().manual_seed(dist.rank)
    batch = ({f"enc{i}": torch.randn(local, DIM, generator=g) for i in range(K)}, None, None)
    target = torch.softmax(torch.randn(local, 6, generator=g), dim=-1)
    for _ in range(3):
        train_step(ddp, optimizer, batch, target)
    dist.barrier()
    started = time.perf_counter()
    for _ in range(steps):
        train_step(ddp, optimizer, batch, target)
    dist.barrier()
    if dist.is_main:
        print(json.dumps({"world": dist.world_size, "samples_per_s": steps * BATCH / (time.perf_counter() - started)}))


def measure_ddp(steps: int) -> dict:
    out = {}
    for n in (1, 2):
        proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(n),
                               __file__, "--ddp-worker", "--steps", str(steps)], capture_output=True, text=True,
                              env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=1800)
        if proc.returncode:
            raise SystemExit(proc.stderr[-3000:])
        out[n] = json.loads(proc.stdout.strip().splitlines()[-1])["samples_per_s"]
    return {"samples_per_s_1": out[1], "samples_per_s_2": out[2], "scaling_efficiency": out[2] / (2 * out[1])}


def interleaved(fns: dict, rounds: int, reps: int) -> dict[str, float]:
    """Median seconds per call of each function, timed in interleaved rounds."""
    times: dict[str, list[float]] = {k: [] for k in fns}
    for fn in fns.values():
        fn()
    for _ in range(rounds):
        for name, fn in fns.items():
            started = time.perf_counter()
            for _ in range(reps):
                fn()
            times[name].append((time.perf_counter() - started) / reps)
    return {k: statistics.median(v) for k, v in times.items()}


def measure_matmul(rounds: int) -> dict:
    from fusionkit.models.factory import build_model

    torch.manual_seed(0)
    model = build_model(blemore_spec())
    model.train()
    x = {f"enc{i}": torch.randn(BATCH, DIM) for i in range(K)}
    target = torch.softmax(torch.randn(BATCH, 6), dim=-1)
    weights = [model.projectors[f"enc{i}"].net[0].weight.detach() for i in range(K)]  # [LATENT, DIM]
    grads = torch.randn(BATCH, LATENT)

    def gemms():  # the step's large matrix multiplications: projector forward, and its weight gradient
        for i, w in enumerate(weights):
            torch.mm(x[f"enc{i}"], w.T)
            torch.mm(grads.T, x[f"enc{i}"])

    t = interleaved({"step": lambda: forward_backward(model, (x, None, None), target), "gemms": gemms}, rounds, 3)
    flops = K * 2 * (2 * BATCH * DIM * LATENT)
    return {"step_s": t["step"], "gemm_s": t["gemms"], "matmul_ratio": t["gemms"] / t["step"],
            "gemm_gflops": flops / t["gemms"] / 1e9, "step_gemm_gflops": flops / t["step"] / 1e9}


def build_stores(root: Path) -> dict[str, Path]:
    from fusionkit.data.store import Sample, write_store

    g = np.random.default_rng(0)
    labels = ["ang", "disg", "fea", "hap", "sad", "neu"]

    def samples(n):
        return [Sample(id=f"s{i}", labels=[{"emotion": labels[i % 6], "salience": 100.0}], group=f"g{i % 10}",
                       fold=i % 5) for i in range(n)]

    vectors = write_store(root / "vectors", labels, samples(3000),
                          {f"enc{i}": g.standard_normal((3000, DIM), dtype=np.float32) for i in range(K)})
    n_seq = 640
    lengths = g.integers(1, 121, size=n_seq)
    sequences = write_store(root / "sequences", labels, samples(n_seq),
                            {f"enc{i}": [g.standard_normal((t, 768), dtype=np.float32) for t in lengths] for i in range(K)})
    return {"vectors": vectors, "sequences": sequences}


def measure_data_path(root: Path, rounds: int) -> dict:
    from fusionkit.data.store import open_store
    from fusionkit.models.factory import build_model
    from fusionkit.training.train import prefetch

    stores = build_stores(root)
    out = {}
    cases = {"vectors": ("vectors", DIM, "none"), "sequences, mean": ("sequences", 768, "mean"),
             "sequences, stats7": ("sequences", 768, "stats7")}
    for name, (store_name, dim, pooling) in cases.items():
        store = open_store(stores[store_name])
        torch.manual_seed(0)
        model = build_model(blemore_spec(dim, pooling))
        model.train()
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
        g = np.random.default_rng(1)
        target = torch.softmax(torch.randn(BATCH, 6), dim=-1)
        first = time.perf_counter()
        store.inputs_for(model, np.arange(BATCH))  # stats7: the once-per-sample statistics are computed here
        once = time.perf_counter() - first
        batch = store.inputs_for(model, g.choice(len(store), BATCH, replace=False))
        t = interleaved({"data": lambda: store.inputs_for(model, g.choice(len(store), BATCH, replace=False)),
                         "compute": lambda: train_step(model, optimizer, batch, target)}, rounds, 3)
        waits, steps = [], []
        keys = [g.choice(len(store), BATCH, replace=False) for _ in range(4 * rounds)]
        batches = prefetch(lambda rows: store.inputs_for(model, rows), keys)  # the trainer's batch source
        for _ in keys:
            started = time.perf_counter()
            batch = next(batches)
            waits.append(time.perf_counter() - started)
            started = time.perf_counter()
            train_step(model, optimizer, batch, target)
            steps.append(time.perf_counter() - started)
        wait, step = statistics.median(waits[1:]), statistics.median(steps[1:])
        out[name] = {"data_s": t["data"], "compute_s": t["compute"], "wait_s": wait, "data_share": wait / (wait + step),
                     "first_batch_s": once, "samples": len(store)}
    # stats7 pooled inside the model every step (no per-sample cache), for comparison
    store = open_store(stores["sequences"])
    model = build_model(blemore_spec(768, "stats7"))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    rows = np.arange(BATCH)
    raw = store.batch(rows, model.encoder_names)
    t = interleaved({"in_model": lambda: train_step(model, optimizer, raw, target)}, rounds, 3)
    out["stats7 in the model"] = {"compute_s": t["in_model"]}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--ddp-worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.ddp_worker:
        ddp_worker(args.steps)
        return
    ddp = measure_ddp(args.steps)
    torch.set_num_threads(1)
    mm = measure_matmul(args.rounds)
    with tempfile.TemporaryDirectory() as tmp:
        data = measure_data_path(Path(tmp), args.rounds)
    stats7_vs_mean = data["sequences, stats7"]["compute_s"] / data["sequences, mean"]["compute_s"]
    met = {"data_path_at_most_10_percent": all(v["data_share"] <= 0.10 for v in data.values() if "data_share" in v),
           "stats7_step_within_1.5x_of_mean": stats7_vs_mean <= 1.5, "step_at_least_70_percent_of_gemm": mm["matmul_ratio"] >= 0.7}
    result = {"machine": machine(), "ddp": ddp, "matmul": mm, "data_path": data, "stats7_over_mean": stats7_vs_mean,
              "targets_met": met}
    rows = [[name, f"{v['data_s'] * 1e3:.1f}", f"{v['wait_s'] * 1e3:.1f}", f"{v['compute_s'] * 1e3:.1f}",
             f"{100 * v['data_share']:.1f}%", f"{v['first_batch_s']:.2f}"] for name, v in data.items() if "data_share" in v]
    lines = ["## Scale-out and the training step", "",
             "`.venv/bin/python benchmarks/scaling.py` (one thread per process; medians of interleaved rounds). "
             f"BlEmoRE size: {K} encoders × {DIM:,} dims, latent {LATENT}, attention gate top-2, rank_concat, batch {BATCH}.", "",
             "| measure | value |", "|---|---|",
             f"| training samples/s, 1 process | {ddp['samples_per_s_1']:.0f} |",
             f"| training samples/s, 2 processes (torchrun, gloo) | {ddp['samples_per_s_2']:.0f} |",
             f"| scaling efficiency | {100 * ddp['scaling_efficiency']:.0f}% |",
             f"| forward + backward | {mm['step_s'] * 1e3:.1f} ms |",
             f"| the step's GEMMs alone | {mm['gemm_s'] * 1e3:.1f} ms ({mm['gemm_gflops']:.0f} GFLOP/s) |",
             f"| step / bare GEMM throughput | {100 * mm['matmul_ratio']:.0f}% |",
             f"| stats7 step / mean step (statistics once per sample) | {stats7_vs_mean:.2f}× |",
             f"| stats7 pooled in the model every step / mean step | "
             f"{data['stats7 in the model']['compute_s'] / data['sequences, mean']['compute_s']:.2f}× |", "",
             "Data path: assembling a batch from a store (`FeatureStore.inputs_for`), and the time the training loop "
             "still waits for it when the trainer's batch source assembles the next batch on a background thread "
             "during the step; the share is that wait over wait + step. The sequence store has 640 samples (the cost "
             "per batch does not depend on the store's size); 'first batch' includes the once-per-sample stats7.", "",
             markdown_table(["store", "assemble ms", "exposed wait ms", "step ms", "data share", "first batch s"], rows), "",
             "Targets: " + ", ".join(f"{k}: **{'met' if ok else 'not met'}**" for k, ok in met.items()) + "."]
    write("scaling", result, "\n".join(lines))


if __name__ == "__main__":
    main()
