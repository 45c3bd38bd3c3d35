"""Extraction throughput: ``fusionkit extract`` against the bare forward pass of the same backbone.

Both run in one process on the same batches of the UCI `pix` images (written as PNG files, as
in benchmarks/live.py). The bare pass has every batch decoded and preprocessed in memory before
the clock starts and times only ``embed`` under ``no_grad``; the pipeline times the whole
``fusionkit extract``: reading and decoding the files in loader workers, timm's transform,
the forward pass, shard writes and the final store. Each is timed ``--repeats`` times,
alternating, and the fastest of each is kept.

    .venv/bin/python benchmarks/extraction.py --source ../shared/data/uci-mfeat
"""

from __future__ import annotations

import argparse
import os
import shutil
import time
from pathlib import Path

import torch
from live import pix_images
from report import machine, markdown_table, write


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", default=os.environ.get("FUSIONKIT_UCI_MFEAT", "../shared/data/uci-mfeat"))
    parser.add_argument("--work", default="runs/benchmark-extraction")
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--img-size", type=int, default=64)
    parser.add_argument("--samples", type=int, default=1024)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    from fusionkit.extract import extract
    from fusionkit.model import build_model
    from fusionkit.raw import load_batches, read_manifest

    work = Path(args.work)
    _, full = pix_images(args.source, work)
    manifest_path = full.parent / f"first-{args.samples}.csv"
    lines = full.read_text().splitlines()
    manifest_path.write_text("\n".join(lines[: args.samples + 1]) + "\n")

    encoder_block = {"name": "cnn", "type": "timm", "model": args.model, "in_chans": 1,
                     "img_size": [args.img_size, args.img_size], "crop_pct": 1.0}
    spec = {"labels": ["d0", "d1", "d2", "d3", "d4", "d5"], "encoders": [encoder_block],
            "gate": {"type": "uniform", "top_n": 1}, "fusion": {"type": "weighted_sum"}}
    encoder = build_model(spec).encoders["cnn"].eval()
    manifest = read_manifest(manifest_path, spec["labels"])
    rows = list(range(len(manifest)))
    batches = [rows[i: i + args.batch_size] for i in range(0, len(rows), args.batch_size)]
    preloaded = [inputs["cnn"] for _, inputs, _ in load_batches(manifest, {"cnn": encoder}, batches, workers=0)]

    def bare() -> float:
        started = time.perf_counter()
        with torch.no_grad():
            for x in preloaded:
                encoder.embed(x)
        return time.perf_counter() - started

    def pipeline(workers: int) -> float:
        out = work / f"store-w{workers}"
        shutil.rmtree(out, ignore_errors=True)
        started = time.perf_counter()
        extract(spec, manifest_path, out, batch_size=args.batch_size, workers=workers, progress=False)
        return time.perf_counter() - started

    bare()  # warm-up: first-call allocations
    times: dict[str, list[float]] = {"bare forward": [], "extract, 2 workers": [], "extract, 0 workers": []}
    for _ in range(args.repeats):
        times["bare forward"].append(bare())
        times["extract, 2 workers"].append(pipeline(2))
        times["extract, 0 workers"].append(pipeline(0))
    best = {k: min(v) for k, v in times.items()}
    n = len(manifest)
    overhead = {k: best[k] / best["bare forward"] - 1 for k in best}
    data = {"machine": machine(), "torch_threads": torch.get_num_threads(), "model": args.model,
            "img_size": args.img_size, "samples": n, "batch_size": args.batch_size, "seconds": times,
            "samples_per_second": {k: n / v for k, v in best.items()}, "overhead_over_bare": overhead,
            "target_met": overhead["extract, 2 workers"] <= 0.10}
    rows_out = [[k, f"{best[k]:.2f}", f"{n / best[k]:.0f}", "—" if k == "bare forward" else f"{100 * overhead[k]:+.1f}%"]
                for k in best]
    section = "\n".join([
        "## Extraction throughput", "",
        f"`.venv/bin/python benchmarks/extraction.py --source ../shared/data/uci-mfeat`: timm `{args.model}` "
        f"(random weights, grayscale {args.img_size}×{args.img_size}) over the first {n} UCI `pix` images as PNG "
        f"files, batch {args.batch_size}, {torch.get_num_threads()} torch threads on {os.cpu_count()} cores, fastest of "
        f"{args.repeats} alternating repeats. The bare forward pass gets every batch preprocessed in memory; the "
        "pipeline is the whole `fusionkit extract` (file reading and decoding in loader workers, timm's transform, "
        "forward, shard writes, the store).", "",
        markdown_table(["pass", "seconds", "samples/s", "over the bare forward"], rows_out), "",
        f"Target (pipeline ≤ 10% over the bare forward with ≥ 2 loader workers): "
        f"**{'met' if data['target_met'] else 'not met'}**.",
    ])
    write("extraction", data, section)


if __name__ == "__main__":
    main()
