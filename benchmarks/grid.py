"""Running many training runs in parallel worker processes, with a resumable JSONL cache."""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

KEY = ("setting", "system", "fold", "seed")


def grid_parser(doc: str, work: str) -> argparse.ArgumentParser:
    """The options every grid benchmark takes: data source, seeds, folds, workers, work directory."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", default=os.environ.get("FUSIONKIT_UCI_MFEAT", "../shared/data/uci-mfeat"))
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--work", default=work, help="where the stores (and kept runs) are written")
    return parser


METRICS = ("acc_presence", "acc_salience", "score", "r1", "r5", "nn_class_accuracy")


def run_one(job: dict) -> dict:
    """Train one job (one thread) in a temporary run directory, or in ``job["keep"]`` when the run
    is needed later (a teacher); return its metrics."""
    import torch

    from fusionkit.training.train import train

    torch.set_num_threads(1)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        out_dir = job.get("keep") or Path(tmp) / "run"
        metrics = train(job["spec"], job["store"], out_dir, fold=job["fold"], progress=False, overwrite=True,
                        raw=job.get("raw"))
        epochs = [json.loads(line)["seconds"] for line in (Path(out_dir) / "log.jsonl").read_text().splitlines()]
    out = {k: job[k] for k in KEY} | {"best_epoch": metrics["best_epoch"], "seconds": round(time.perf_counter() - started, 2),
                                       "epoch_seconds": round(float(np.median(epochs)), 3)}
    for split in ("test", "target"):
        if split in metrics:
            out[split] = {k: metrics[split][k] for k in METRICS if k in metrics[split]}
    return out


def load_cache(cache: Path) -> dict[tuple, dict]:
    """Finished runs by key; a failed run is kept (with its error) and not retried."""
    done = {}
    if cache.exists():
        for line in cache.read_text().splitlines():
            r = json.loads(line)
            done[tuple(r[k] for k in KEY)] = r
    return done


def run_grid(jobs: list[dict], cache: Path, workers: int) -> dict[tuple, dict]:
    """Run the jobs not in ``cache`` yet; every finished run is appended to it at once.

    A job that keeps its run (``job["keep"]``) is run again when that run's checkpoint is gone (a fresh clone holds
    the cache but not ``runs/``), so a later benchmark that loads it finds it; the new line supersedes the old."""
    cache.parent.mkdir(parents=True, exist_ok=True)
    done = load_cache(cache)
    todo = [j for j in jobs if tuple(j[k] for k in KEY) not in done
            or (j.get("keep") and not (Path(j["keep"]) / "best").exists())]
    print(f"{len(jobs) - len(todo)} runs cached, {len(todo)} to run", flush=True)
    started = time.perf_counter()
    with ProcessPoolExecutor(workers) as pool, open(cache, "a") as fh:
        futures = [pool.submit(run_one, job) for job in todo]
        for i, (job, fut) in enumerate(zip(todo, futures), 1):
            try:
                r = fut.result()
            except Exception as exc:  # one diverged run must not lose the others; it is reported
                r = {k: job[k] for k in KEY} | {"error": f"{type(exc).__name__}: {exc}"}
                print(f"failed: {r}", flush=True)
            done[tuple(r[k] for k in KEY)] = r
            fh.write(json.dumps(r) + "\n")
            fh.flush()
            if i % 10 == 0 or i == len(todo):
                print(f"{i}/{len(todo)} runs, {time.perf_counter() - started:.0f} s", flush=True)
    return done


def mean_std(runs: list[dict], split: str) -> dict[str, tuple[float, float, int]]:
    """Mean, std and count of each metric over the runs that finished (failed runs hold "error")."""
    runs = [r for r in runs if "error" not in r]
    keys = [k for k in METRICS if runs and k in runs[0][split]]
    return {k: (float(np.mean([r[split][k] for r in runs])), float(np.std([r[split][k] for r in runs])), len(runs))
            for k in keys}
