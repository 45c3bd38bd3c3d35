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
import json
import os
import shutil
import time
from pathlib import Path

import torch
from live import pix_images
from report import RESULTS, machine, markdown_table, write

#: (timm architecture, input side, images): a light backbone where decoding weighs most, and a common one.
CONFIGS = (("resnet18", 64, 1024), ("resnet50", 112, 512))


def measure(model_name: str, side: int, samples: int, full_manifest: Path, work: Path, batch_size: int,
            repeats: int) -> dict:
    """Bare forward vs the whole extraction for one backbone, fastest of ``repeats`` alternating runs."""
    from fusionkit.data.extract import extract
    from fusionkit.data.raw import load_batches, read_manifest
    from fusionkit.models.factory import build_model

    manifest_path = full_manifest.parent / f"first-{samples}.csv"
    manifest_path.write_text("\n".join(full_manifest.read_text().splitlines()[: samples + 1]) + "\n")
    spec = {"labels": ["d0", "d1", "d2", "d3", "d4", "d5"],
            "encoders": [{"name": "cnn", "type": "timm", "model": model_name, "in_chans": 1, "img_size": [side, side],
                          "crop_pct": 1.0}],
            "gate": {"type": "uniform", "top_n": 1}, "fusion": {"type": "weighted_sum"}}
    encoder = build_model(spec).encoders["cnn"].eval()
    manifest = read_manifest(manifest_path, spec["labels"])
    rows = list(range(len(manifest)))
    batches = [rows[i: i + batch_size] for i in range(0, len(rows), batch_size)]
    preloaded = [inputs["cnn"] for _, inputs, _ in load_batches(manifest, {"cnn": encoder}, batches, workers=0)]

    def bare() -> float:
        started = time.perf_counter()
        with torch.no_grad():
            for x in preloaded:
                encoder.embed(x)
        return time.perf_counter() - started

    def pipeline(workers: int) -> float:
        out = work / f"store-{model_name}-w{workers}"
        shutil.rmtree(out, ignore_errors=True)
        started = time.perf_counter()
        extract(spec, manifest_path, out, batch_size=batch_size, workers=workers, progress=False)
        return time.perf_counter() - started

    def decode() -> float:
        """Reading, decoding and transforming the files alone, in this process (no forward pass)."""
        started = time.perf_counter()
        for _ in load_batches(manifest, {"cnn": encoder}, batches, workers=0):
            pass
        return time.perf_counter() - started

    def build() -> float:
        started = time.perf_counter()
        build_model(spec)
        return time.perf_counter() - started

    bare()  # warm-up: first-call allocations
    times: dict[str, list[float]] = {"bare forward": [], "extract, 2 workers": [], "extract, 0 workers": [],
                                     "model build": [], "decode only": []}
    for _ in range(repeats):
        times["bare forward"].append(bare())
        times["extract, 2 workers"].append(pipeline(2))
        times["extract, 0 workers"].append(pipeline(0))
        times["model build"].append(build())
        times["decode only"].append(decode())
    best = {k: min(v) for k, v in times.items()}
    build_s = best.pop("model build")
    decode_s = best.pop("decode only")
    net = {k: best[k] - (0.0 if k == "bare forward" else build_s) for k in best}
    return {"model": model_name, "side": side, "samples": len(manifest), "seconds": times, "best": best,
            "model_build_seconds": build_s, "decode_seconds": decode_s,
            "spread": {k: max(times[k]) / min(times[k]) - 1 for k in best},
            "overhead_over_bare": {k: best[k] / best["bare forward"] - 1 for k in best},
            "overhead_without_build": {k: net[k] / best["bare forward"] - 1 for k in best}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", default=os.environ.get("FUSIONKIT_UCI_MFEAT", "../shared/data/uci-mfeat"))
    parser.add_argument("--work", default="runs/benchmark-extraction")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--publish-only", action="store_true", help="rewrite the docs section from "
                        "benchmarks/results/extraction.json without measuring")
    args = parser.parse_args()
    if args.publish_only:
        publish(json.loads((RESULTS / "extraction.json").read_text()))
        return
    work = Path(args.work)
    _, full = pix_images(args.source, work)
    results = [measure(m, side, n, full, work, args.batch_size, args.repeats) for m, side, n in CONFIGS]
    met = {r["model"]: r["overhead_without_build"]["extract, 2 workers"] <= 0.10 for r in results}
    publish({"machine": machine(), "torch_threads": torch.get_num_threads(), "batch_size": args.batch_size,
             "repeats": args.repeats, "results": results, "target_met": met})


def publish(data: dict) -> None:
    """Write the JSON and the docs section of a measurement (``--publish-only`` redoes the section from the JSON)."""
    results = data["results"]
    rows = []
    for r in results:
        for k, seconds in r["best"].items():
            over, net = r["overhead_over_bare"][k], r["overhead_without_build"][k]
            rows.append([f"{r['model']} {r['side']}×{r['side']}", k, f"{seconds:.2f}", f"{r['samples'] / seconds:.0f}",
                         "—" if k == "bare forward" else f"{100 * over:+.1f}%",
                         "—" if k == "bare forward" else f"{100 * net:+.1f}%", f"{100 * r['spread'][k]:.0f}%"])
    builds = ", ".join(f"{r['model']} {r['model_build_seconds']:.2f} s" for r in results)
    decodes = ", ".join(f"{r['decode_seconds']:.2f} s for {r['model']}'s {r['samples']} images at {r['side']}×{r['side']} "
                        f"({100 * r['decode_seconds'] / r['best']['bare forward']:.0f}% of its bare forward)"
                        for r in results)
    section = "\n".join([
        "## Extraction throughput", "",
        "`.venv/bin/python benchmarks/extraction.py --source ../shared/data/uci-mfeat`: timm backbones (random "
        "weights, grayscale input) over the first UCI `pix` images as PNG files, batch "
        f"{data['batch_size']}, {data['torch_threads']} torch threads on {data['machine']['cpus']} cores, fastest of "
        f"{data['repeats']} alternating repeats. The bare forward pass gets every batch preprocessed in memory; the "
        "pipeline is the whole `fusionkit extract` (model build, file reading and decoding in loader workers, "
        f"timm's transform, forward, shard writes, the store); the last column leaves out the one-time model build "
        f"({builds}), which the bare pass does not repeat.", "",
        markdown_table(["backbone", "pass", "seconds", "samples/s", "over the bare forward", "without the model build",
                        "slowest repeat over fastest"], rows), "",
        f"Reading, decoding and transforming the files alone, in one process: {decodes}.", "",
        "Target (the pipeline — loading, preprocessing, writing — ≤ 10% over the bare forward with ≥ 2 loader "
        "workers): "
        + ", ".join(f"{m}: **{'met' if ok else 'not met'}**" for m, ok in data["target_met"].items()) + ".",
    ])
    write("extraction", data, section)


if __name__ == "__main__":
    main()
