"""Live encoders on real images: the UCI `pix` view as image files, through a small timm CNN.

The `pix` view of UCI Multiple Features is each digit's 16 x 15 grayscale image (values 0-6).
This benchmark writes every sample of the clean blended task (singles, and blends as the
weighted sums of two images, as the task blends every view) as a PNG with a manifest, then
compares three ways of giving the fusion model that view, beside the five other pre-extracted
encoders (fou, fac, kar, zer, mor), with the best rank-aware recipe (top-3, rank_attention):

- pix:          the 240 pixel values as features (the quality benchmark's six encoders);
- cnn, frozen:  `fusionkit extract` with a small timm CNN (random init, its weights saved to a
                local safetensors file that the spec references), then trained on the store;
- cnn, end-to-end: the same CNN as a live encoder, trained with the fusion model.

    .venv/bin/python benchmarks/live.py --source ../shared/data/uci-mfeat --workers 2
"""

from __future__ import annotations

import csv
import time
from pathlib import Path

import numpy as np
from grid import grid_parser, mean_std, run_grid
from report import RESULTS, machine, markdown_table, write

FIVE = {"fou": 76, "fac": 216, "kar": 64, "zer": 47, "mor": 6}
CNN = {"name": "cnn", "type": "timm", "model": "test_resnet", "in_chans": 1, "img_size": [32, 32], "crop_pct": 1.0}


def write_pix_images(store_path: Path, out: Path) -> Path:
    """Every sample's `pix` row as a 16 x 15 PNG (0-6 scaled to 0-255), and a manifest; returns the manifest."""
    from PIL import Image

    from fusionkit.data.store import open_store

    store = open_store(store_path)
    (out / "img").mkdir(parents=True, exist_ok=True)
    pixels = store.encoders["pix"].data.numpy()
    with open(out / "manifest.csv", "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["id", "labels", "group", "fold", "domain", "cnn"])
        for sample, row in zip(store.samples, pixels):
            name = f"img/{sample.id}.png"
            Image.fromarray(np.round(row.reshape(16, 15) * 255 / 6).clip(0, 255).astype(np.uint8)).save(out / name)
            labels = ";".join(f"{e['emotion']}:{e['salience']:g}" for e in sample.labels)
            writer.writerow([sample.id, labels, sample.group, sample.fold, sample.domain, name])
    return out / "manifest.csv"


def pix_images(source: str, work: Path) -> tuple[Path, Path]:
    """The clean UCI blended store and its `pix` images with a manifest, made once under ``work``."""
    from fusionkit.components.datasets import build_dataset

    clean = work / "store-clean"
    if not (clean / "index.json").exists():
        build_dataset("uci-mfeat", {"source": source, "seed": 0}, clean, overwrite=True)
    manifest = work / "pix-images" / "manifest.csv"
    if not manifest.exists():
        write_pix_images(clean, manifest.parent)
    return clean, manifest


def save_cnn_weights(path: Path, cnn: dict = CNN) -> None:
    """The CNN's random initial weights (seed 0), as the local file the specs reference."""
    from safetensors.torch import save_file

    from fusionkit.models.factory import build_model

    enc = build_model({"labels": ["a", "b"], "encoders": [cnn], "gate": {"type": "uniform", "top_n": 1},
                       "fusion": {"type": "weighted_sum"}}).encoders["cnn"]
    save_file({k: v.contiguous() for k, v in enc.backbone.state_dict().items()}, str(path))


def main() -> None:
    args = grid_parser(__doc__, "runs/benchmark-live").parse_args()
    from fusionkit.data.extract import extract
    from fusionkit.data.store import open_store, write_store
    from fusionkit.spec import recipes

    work = Path(args.work)
    clean, manifest = pix_images(args.source, work)
    weights = work / "cnn-init.safetensors"
    if not weights.exists():
        save_cnn_weights(weights)
    live = {**CNN, "pretrained": str(weights.resolve())}
    extract_spec = {"labels": recipes.UCI_LABELS, "neutral": "d5", "encoders": [live],
                    "gate": {"type": "uniform", "top_n": 1}, "fusion": {"type": "weighted_sum"}}
    extracted, seconds = work / "store-cnn-only", None
    if not (extracted / "index.json").exists():
        started = time.perf_counter()
        extract(extract_spec, manifest, extracted, batch_size=64, workers=2, overwrite=True)
        seconds = round(time.perf_counter() - started, 1)
    cnn = open_store(extracted)
    combined = work / "store-five-cnn"
    if not (combined / "index.json").exists():
        base = open_store(clean)
        features = {name: base.encoders[name].data.numpy() for name in FIVE}
        features["cnn"] = cnn.encoders["cnn"].data.numpy()
        write_store(combined, base.labels, base.samples, features, overwrite=True, provenance=cnn.provenance)
    cnn_dim = cnn.encoders["cnn"].dim

    end_to_end = recipes.topn(3, "rank_attention", dims={**FIVE, "cnn": cnn_dim})
    end_to_end["encoders"] = [e if e["name"] != "cnn" else live for e in end_to_end["encoders"]]
    table = {
        "five + pix pixel features": (recipes.topn(3, "rank_attention"), clean, None),
        "five + cnn, extracted (frozen)": (recipes.topn(3, "rank_attention", dims={**FIVE, "cnn": cnn_dim}), combined, None),
        "five + cnn, end-to-end": (end_to_end, clean, manifest),
    }
    jobs = []
    for name, (spec, store, raw) in table.items():
        for fold in range(args.folds):
            for seed in range(args.seeds):
                jobs.append({"setting": "clean", "system": name, "fold": fold, "seed": seed, "store": str(store),
                             "raw": None if raw is None else str(raw),
                             "spec": {**spec, "train": {**spec["train"], "seed": seed}}})
    done = run_grid(jobs, RESULTS / "live-runs.jsonl", args.workers)
    stats = {name: mean_std([r for (_, n, f, s), r in done.items() if n == name and f < args.folds and s < args.seeds],
                            "test") for name in table}
    seconds_per_run = {name: float(np.mean([r["seconds"] for (_, n, _, _), r in done.items() if n == name and "seconds" in r]))
                       for name in table}
    data = {"machine": machine(), "folds": args.folds, "seeds": args.seeds, "stats": stats,
            "seconds_per_run": seconds_per_run, "extraction_seconds": seconds, "cnn": CNN, "cnn_dim": cnn_dim}
    rows = [[n, *(f"{v[k][0]:.3f} ± {v[k][1]:.3f}" for k in ("acc_presence", "acc_salience", "score")), v["score"][2],
             f"{seconds_per_run[n]:.0f}"] for n, v in stats.items()]
    section = "\n".join([
        "## Live encoders: UCI `pix` images through a timm CNN", "",
        f"`.venv/bin/python benchmarks/live.py --source ../shared/data/uci-mfeat --workers 2 --seeds {args.seeds}`: "
        "each sample's `pix` row written as a 16×15 PNG (blends as the weighted sum of their two images), "
        f"read by timm `{CNN['model']}` (grayscale, resized to 32×32 by timm's own transform, {cnn_dim}-d pooled "
        "features, random initial weights saved to a local safetensors file). The other five UCI views stay "
        "pre-extracted features. Recipe: top-3 attention gate, rank_attention (`fusionkit/spec/recipes.py`); test-fold "
        f"Score over {args.folds} folds × {args.seeds} seeds.", "",
        markdown_table(["system", "ACC_presence", "ACC_salience", "Score", "runs", "s/run"], rows), "",
    ])
    write("live", data, section)


if __name__ == "__main__":
    main()
