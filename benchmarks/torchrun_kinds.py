"""Every kind of training under torchrun: training samples/s with 1 and 2 processes (gloo, one thread each).

Kinds: a fusion model; two towers with the CLIP loss over the global batch, and with local_loss; CLIP-RD distillation
of towers; kd + rkd distillation of a fusion student; adaptation (mmd, coral, DANN, AdaBN statistics); and
`fusionkit extract` with a small live CNN. Data: a synthetic store (6,000 samples, 3 encoders of 256 dims; the
towers read two of them), and 600 16x15 PNG images for extraction. Training samples/s is the training rows over the
median epoch time (validation happens once, after the last epoch, and is left out); extraction's is images over the
whole command. On 2 cores the two processes share the machine one process had, so the figure shows what the
gathers and gradient averaging cost, not a speed-up.

    .venv/bin/python benchmarks/torchrun_kinds.py
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
import yaml
from report import machine, markdown_table, write

EPOCHS = 4
DIM = 256


def fusion_spec(**extra) -> dict:
    return {"latent_dim": 128, "encoders": [{"name": f"enc{k}", "type": "features", "dim": DIM} for k in range(3)],
            "projector": {"dropout": 0.0}, "gate": {"type": "attention", "top_n": 2},
            "train": {"epochs": EPOCHS, "batch_size": 256, "lr": 1e-3, "eval_every": EPOCHS, "patience": EPOCHS}, **extra}


def tower_spec(local_loss: bool = False, width: int = 128) -> dict:
    return {"latent_dim": width, "encoders": [{"name": f"enc{k}", "type": "features", "dim": DIM} for k in range(2)],
            "projector": {"dropout": 0.0, "hidden": 2 * width},
            "towers": {"a": {"encoders": ["enc0"], "embed_dim": width}, "b": {"encoders": ["enc1"], "embed_dim": width}},
            "contrastive": {"local_loss": local_loss},
            "train": {"epochs": EPOCHS, "batch_size": 256, "lr": 1e-3, "eval_every": EPOCHS, "patience": EPOCHS}}


def torchrun(n: int, args: list, cwd: Path) -> float:
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(n),
                           "-m", "fusionkit", *map(str, args), "--quiet"], cwd=cwd, capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=3600)
    if proc.returncode:
        raise SystemExit(f"{args}: {proc.stderr[-3000:]}")
    return time.perf_counter() - started


def samples_per_s(run: Path) -> float:
    info = json.loads((run / "run.json").read_text())
    epochs = [json.loads(line)["seconds"] for line in (run / "log.jsonl").read_text().splitlines()]
    return info["n_train"] / statistics.median(epochs[:-1])  # the last epoch also validates


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=6000)
    args = parser.parse_args()
    from PIL import Image

    from fusionkit.components.datasets import build_dataset

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        store = build_dataset("synthetic", {"samples": args.samples, "dim": DIM, "seed": 0, "target_shift": 1.0},
                              root / "store")
        teachers = {}
        for name, spec in (("towers", tower_spec(width=256)), ("fusion", fusion_spec(latent_dim=256))):
            (root / f"teacher-{name}.yaml").write_text(yaml.safe_dump(spec))
            torchrun(1, ["train", root / f"teacher-{name}.yaml", "--data", store, "--out", root / f"teacher-{name}",
                         "--fold", 0], root)
            teachers[name] = str(root / f"teacher-{name}" / "best")
        kinds = {
            "fusion model": fusion_spec(),
            "two towers, CLIP loss over the global batch": tower_spec(),
            "two towers, local_loss": tower_spec(local_loss=True),
            "distillation of towers (CLIP-RD preset)": {**tower_spec(), "distill": {"teacher": teachers["towers"],
                                                                                    "preset": "clip-rd"}},
            "distillation of a fusion student (kd + rkd)": {**fusion_spec(), "distill": {
                "teacher": teachers["fusion"], "losses": [{"type": "kd"}, {"type": "rkd"}]}},
            "adaptation (mmd, coral, DANN, AdaBN)": {
                **fusion_spec(), "projector": {"dropout": 0.0, "domain_norm": True},
                "adaptation": [{"type": "mmd"}, {"type": "coral", "on": "encoders"}, {"type": "dann", "weight": 0.1}]},
        }
        results = {}
        for kind, spec in kinds.items():
            (root / "spec.yaml").write_text(yaml.safe_dump(spec))
            results[kind] = {}
            for n in (1, 2):
                out = root / f"run-{len(results)}-{n}"
                torchrun(n, ["train", root / "spec.yaml", "--data", store, "--out", out, "--fold", 0], root)
                results[kind][n] = samples_per_s(out)
            print(kind, results[kind], flush=True)
        rng = np.random.default_rng(0)
        (root / "img").mkdir()
        lines = ["id,labels,img"]
        for i in range(600):
            Image.fromarray(rng.integers(0, 255, (16, 15), dtype=np.uint8)).save(root / "img" / f"{i}.png")
            lines.append(f"s{i:04d},ang,img/{i}.png")
        (root / "m.csv").write_text("\n".join(lines) + "\n")
        (root / "cnn.yaml").write_text(yaml.safe_dump({"encoders": [
            {"name": "img", "type": "timm", "model": "test_resnet", "in_chans": 1, "img_size": [32, 32],
             "crop_pct": 1.0}], "gate": {"type": "uniform", "top_n": 1}, "fusion": {"type": "weighted_sum"}}))
        kind = "extraction (timm test_resnet, 600 images)"
        results[kind] = {n: 600 / torchrun(n, ["extract", root / "cnn.yaml", "--data", root / "m.csv", "--out",
                                               root / f"x{n}", "--workers", 0, "--batch-size", 32], root)
                         for n in (1, 2)}
        print(kind, results[kind], flush=True)
    data = {"machine": machine(), "samples": args.samples, "epochs": EPOCHS,
            "samples_per_s": {k: {"1": v[1], "2": v[2], "ratio": v[2] / v[1]} for k, v in results.items()}}
    rows = [[k, f"{v[1]:,.0f}", f"{v[2]:,.0f}", f"{v[2] / v[1]:.2f}"] for k, v in results.items()]
    section = "\n".join([
        "## Every kind under torchrun", "",
        "`.venv/bin/python benchmarks/torchrun_kinds.py`: training samples/s (training rows over the median epoch "
        f"time, validation left out) of a synthetic store ({args.samples:,} samples, 3 encoders × {DIM}), global batch "
        "256, gloo, one thread per process; extraction: images/s over the whole `fusionkit extract` command (process "
        "start-up and model loading included). Two processes have twice the cores of one; a ratio under 2 is what the "
        "gathers, the gradient all-reduce and the barriers cost, over loopback, for models this small.", "",
        markdown_table(["kind", "1 process", "2 processes", "2 / 1"], rows), ""])
    write("torchrun-kinds", data, section)


if __name__ == "__main__":
    main()
