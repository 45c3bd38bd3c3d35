"""Conditional execution, the microbenchmark: is the saving real in wall-clock time, and what does routing cost?

One cheap always-run encoder and K = 4 on-demand encoders of known cost (a features encoder whose projector is a
two-layer MLP over a 2048-wide input: about 9 MFLOPs per sample each, declared as cost_gflops), attention gate,
batch 256, inference (eval, no gradient). Every on-demand encoder costs the same, so a budget of s of the on-demand
cost runs s * K of them per sample: run shares 0, 0.25, 0.5, 0.75 and 1.0. Rows:

- the same model with every encoder `run: always` (today's unconditional path);
- the on-demand model at each budget (scout, gather, run, scatter, fuse);
- the on-demand model with `everything=True` (every encoder on every row through the conditional model).

It also times gather + scatter alone at each share, the ideal (the budget-0% time plus the run share of the encoders'
time), and a training step of each (every on-demand encoder on every row for the scout, or on a quarter of the rows).
Interleaved rounds, medians, one thread.

    .venv/bin/python benchmarks/conditional.py

With `--large`, the on-demand encoders are instead four timm ResNet-50s at 224×224 (random weights, 8.2 GFLOPs per
image as fusionkit measures it) on image tensors, batch 8, three rounds, inference only: the regime where the
encoders, not reading or routing, dominate, and the saving should approach its ideal.

    .venv/bin/python benchmarks/conditional.py --large
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from report import machine, markdown_table, write

K, DIM, HIDDEN, LATENT, BATCH = 4, 2048, 2048, 64, 256
SHARES = (0.0, 0.25, 0.5, 0.75, 1.0)


def spec(on_demand: bool, cost: float) -> dict:
    extra = {"run": "on_demand", "cost_gflops": cost} if on_demand else {"cost_gflops": cost}
    return {"latent_dim": LATENT, "projector": {"hidden": HIDDEN, "dropout": 0.0},
            "encoders": [{"name": "cheap", "type": "features", "dim": 16},
                         *({"name": f"dear{k}", "type": "features", "dim": DIM, **extra} for k in range(K))],
            "gate": {"type": "attention", "top_n": 3, "heads": 4},
            "heads": {"presence": {"type": "presence", "dropout": 0.0}, "salience": {"type": "salience", "dropout": 0.0}}}


LARGE_K, LARGE_BATCH = 4, 8


def large_spec(on_demand: bool) -> dict:
    """The cheap always-run encoder and LARGE_K ResNet-50s at 224×224 (random weights; their cost is measured)."""
    extra = {"run": "on_demand"} if on_demand else {}
    return {"latent_dim": LATENT, "projector": {"dropout": 0.0},
            "encoders": [{"name": "cheap", "type": "features", "dim": 16},
                         *({"name": f"dear{k}", "type": "timm", "model": "resnet50", "img_size": [224, 224],
                            "seed": k, **extra} for k in range(LARGE_K))],
            "gate": {"type": "attention", "top_n": LARGE_K + 1, "heads": 4},
            "heads": {"presence": {"type": "presence", "dropout": 0.0}, "salience": {"type": "salience", "dropout": 0.0}}}


def large(rounds: int) -> None:
    """Inference at budgets with ResNet-50s on demand, against every encoder always run, and the ideal."""
    import fusionkit

    torch.manual_seed(0)
    torch.set_num_threads(1)
    always = fusionkit.build_model(large_spec(False)).eval()
    demand = fusionkit.build_model(large_spec(True)).eval()
    demand.load_state_dict(always.state_dict())
    costs = demand.encoder_costs()
    x = {"cheap": torch.randn(LARGE_BATCH, 16),
         **{f"dear{k}": torch.randint(0, 256, (LARGE_BATCH, 3, 224, 224), dtype=torch.uint8) for k in range(LARGE_K)}}
    shares = (0.0, 0.25, 0.5, 0.75, 1.0)
    with torch.no_grad():
        runs = {"today (every encoder always)": lambda: always(x)}
        for share in shares:
            runs[f"on demand, budget {share:.0%}"] = lambda share=share: demand(x, budget=f"{100 * share}%")
        spent = {share: float(demand(x, budget=f"{100 * share}%").ran[:, 1:].float().mean()) for share in shares}
        times = {name: [] for name in runs}
        for _ in range(rounds):
            for name, fn in runs.items():
                times[name].append(median_seconds(fn, 1))
    med = {name: statistics.median(v) for name, v in times.items()}
    full, fixed = med["today (every encoder always)"], med["on demand, budget 0%"]
    rows, data_rows = [["today (every encoder always)", "1.00", f"{1000 * full:.0f}", "1.00", "-", "-"]], []
    for share in shares:
        t = med[f"on demand, budget {share:.0%}"]
        ideal = fixed + spent[share] * (full - fixed)
        rows.append([f"on demand, budget {share:.0%}", f"{spent[share]:.2f}", f"{1000 * t:.0f}", f"{t / full:.3f}",
                     f"{full / t:.2f}× of ideal {full / ideal:.2f}×", "-" if share == 0 else f"{100 * ideal / t:.0f}%"])
        data_rows.append({"share": share, "run_share": spent[share], "seconds": t, "ideal_seconds": ideal})
    data = {"machine": machine(), "threads": 1, "torch": torch.__version__, "batch": LARGE_BATCH,
            "gflops_per_encoder": costs["dear0"], "median_seconds": med, "budgets": data_rows}
    section = (
        "## Conditional execution: the microbenchmark with large encoders\n\n"
        f"`.venv/bin/python benchmarks/conditional.py --large`: one cheap always-run encoder and {LARGE_K} timm "
        f"ResNet-50s at 224×224 on demand ({costs['dear0']:.2f} GFLOPs per image each, measured by fusionkit; random "
        f"weights), attention gate keeping every encoder, batch {LARGE_BATCH} of image tensors, inference, one thread; "
        f"medians of {rounds} interleaved rounds ({data['machine']['cpus']} CPUs, torch {torch.__version__}). The ideal "
        "time is the budget 0% time plus the run share of the encoders' time; *of ideal*: ideal time over measured.\n\n"
        + markdown_table(["system", "run share", "ms per batch", "× today", "speed-up", "of ideal"], rows) + "\n")
    write("conditional-large", data, section)


def median_seconds(fn, rounds: int) -> float:
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=None, help="interleaved rounds (15; 3 with --large)")
    parser.add_argument("--large", action="store_true", help="four ResNet-50s at 224x224 on demand instead")
    args = parser.parse_args()
    if args.large:
        large(args.rounds or 3)
        return
    args.rounds = args.rounds or 15
    from torch.utils.flop_counter import FlopCounterMode

    import fusionkit
    from fusionkit.conditional.rows import gather_rows, scatter_rows

    torch.manual_seed(0)
    torch.set_num_threads(1)
    probe = fusionkit.build_model(spec(False, 0.0)).eval()
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        probe.projectors["dear0"](probe.encoders["dear0"](torch.randn(8, DIM)))
    cost = counter.get_total_flops() / 8 / 1e9
    always = fusionkit.build_model(spec(False, cost)).eval()
    demand = fusionkit.build_model(spec(True, cost)).eval()
    demand.load_state_dict(always.state_dict())
    x = {"cheap": torch.randn(BATCH, 16), **{f"dear{k}": torch.randn(BATCH, DIM) for k in range(K)}}

    with torch.no_grad():
        runs = {"today (every encoder always)": lambda: always(x),
                "on demand, everything=True": lambda: demand(x, everything=True)}
        for share in SHARES:
            runs[f"on demand, budget {share:.0%}"] = lambda share=share: demand(x, budget=f"{100 * share}%")
        spent = {share: float(demand(x, budget=f"{100 * share}%").ran[:, 1:].float().mean()) for share in SHARES}
        for fn in runs.values():  # warm-up
            fn()
        times = {name: [] for name in runs}
        for _ in range(args.rounds):
            for name, fn in runs.items():
                times[name].append(median_seconds(fn, 3))
        med = {name: statistics.median(v) for name, v in times.items()}

        z = torch.randn(BATCH, LATENT)
        routing = {}
        for share in SHARES[1:]:
            rows = torch.randperm(BATCH)[: int(share * BATCH)].sort().values

            def route(rows=rows):
                for k in range(K):
                    scatter_rows(gather_rows(x[f"dear{k}"], rows)[:, :LATENT] + z[rows], rows, BATCH)

            routing[share] = median_seconds(route, args.rounds * 3)

    # training: a step of each (forward, the supervised loss with the scout's term, backward)
    from fusionkit.training.losses import training_loss

    target = torch.softmax(torch.randn(BATCH, 6), dim=1)
    cheap_rows = fusionkit.build_model({**spec(True, cost), "conditional": {"scout_rows": 0.25}}).train()
    cheap_rows.load_state_dict(always.state_dict())
    models = {"today (every encoder always)": always, "on demand, scout_rows 1.0": demand,
              "on demand, scout_rows 0.25": cheap_rows}

    def train_step(model):
        model.train()
        model.zero_grad(set_to_none=True)
        training_loss(model, model(x), target)[0].backward()

    for model in models.values():
        train_step(model)
    train_times = {name: [] for name in models}
    for _ in range(args.rounds):
        for name, model in models.items():
            train_times[name].append(median_seconds(lambda model=model: train_step(model), 1))
    train_med = {name: statistics.median(v) for name, v in train_times.items()}
    always.eval()
    demand.eval()

    full = med["today (every encoder always)"]
    fixed = med["on demand, budget 0%"]  # the always-run encoder, the scout and the fusion
    rows = [["today (every encoder always)", "1.00", f"{full * 1000:.1f}", "1.00", "-"]]
    rows.append(["on demand, everything=True", "1.00", f"{med['on demand, everything=True'] * 1000:.1f}",
                 f"{med['on demand, everything=True'] / full:.2f}", "-"])
    data_rows = []
    for share in SHARES:
        t = med[f"on demand, budget {share:.0%}"]
        ideal = fixed + spent[share] * (full - fixed)
        speedup, ideal_speedup = full / t, full / ideal
        rows.append([f"on demand, budget {share:.0%}", f"{spent[share]:.2f}", f"{t * 1000:.1f}", f"{t / full:.2f}",
                     f"{speedup:.2f}× of ideal {ideal_speedup:.2f}×"])
        data_rows.append({"share": share, "run_share": spent[share], "seconds": t, "ideal_seconds": ideal})
    overhead = med["on demand, everything=True"] / full
    data = {"machine": machine(), "threads": 1, "torch": torch.__version__,
            "config": {"K": K, "input_dim": DIM, "hidden": HIDDEN, "latent": LATENT, "batch": BATCH,
                       "gflops_per_encoder": cost},
            "median_seconds": med, "budgets": data_rows, "routing_seconds": {str(k): v for k, v in routing.items()},
            "everything_over_today": overhead, "training_step_seconds": train_med}
    routing_text = ", ".join(f"{share:.0%} of rows {seconds * 1000:.2f} ms" for share, seconds in routing.items())
    section = (
        "## Conditional execution: the microbenchmark\n\n"
        f"`.venv/bin/python benchmarks/conditional.py`: one cheap always-run encoder and {K} on-demand encoders of "
        f"{cost * 1000:.1f} MFLOPs per sample each (a features encoder with a two-layer {DIM}-{HIDDEN}-{LATENT} "
        f"projector, declared as cost_gflops), attention gate, top 3, batch {BATCH}, inference, one thread; medians "
        f"of {args.rounds} interleaved rounds ({data['machine']['cpus']} CPUs, torch {torch.__version__}). A budget of "
        "s of the full cost runs s of the on-demand encoders per sample (run share). The ideal time is the budget 0% "
        "time (the always-run encoder, the scout and the fusion) plus the run share of the encoders' time.\n\n"
        + markdown_table(["system", "run share", "ms per batch", "× today", "speed-up"], rows)
        + f"\n\nWith every encoder kept, the conditional path is {100 * (overhead - 1):+.1f}% against today's "
        f"unconditional path (target: at most +5%). Gather and scatter alone, for all {K} encoders: {routing_text}.\n\n"
        "A training step (forward, loss with the scout's term, backward; same batch):\n\n"
        + markdown_table(["system", "ms per step", "× today"],
                         [[name, f"{t * 1000:.1f}", f"{t / train_med['today (every encoder always)']:.2f}"]
                          for name, t in train_med.items()])
        + "\n\nTarget: a scout model trains in at most 1.5× the time of keep-all.\n"
    )
    write("conditional", data, section)


if __name__ == "__main__":
    main()
