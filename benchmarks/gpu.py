"""Speed on the device fusionkit finds (a GPU when present, else the CPU), in one script.

1. A BlEmoRE-size training step: 7 encoders x 7,168 dims (stats7 of 1,024), latent 256, attention gate,
   top-2, rank_concat, presence + salience heads, batches of 64 and 512, in float32 and bf16. Samples/s, and
   the step's time against its bare matrix products measured in the same run (the projectors' forward and
   backward products alone): the share of bare GEMM throughput the whole step reaches (target >= 70% at 512).
2. Extraction: a random-weights resnet50 at 224x224 through `fusionkit extract` against the bare forward on the
   same batches (target <= 10% overhead with 8 loader workers).
3. End-to-end fine-tuning of a small timm CNN on UCI pix images: samples/s.
4. The 2,400-sample UCI quality recipe: seconds per run, on this device and on the CPU.

    .venv/bin/python benchmarks/gpu.py                 # the full measurement, into docs/benchmarks.md
    .venv/bin/python benchmarks/gpu.py --short --out DIR   # seconds: what the tests run, so the script cannot rot

It says which device it ran on. --short shrinks every size and skips parts 3 and 4.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
from report import RESULTS, machine, markdown_table, write

K, DIM, LATENT, TOP_N = 7, 7168, 256, 2


def step_spec(dim: int, precision: str, device: str) -> dict:
    return {"labels": ["ang", "disg", "fea", "hap", "sad", "neu"], "latent_dim": LATENT,
            "encoders": [{"name": f"enc{k}", "type": "features", "dim": dim} for k in range(K)],
            "projector": {"hidden": 0, "dropout": 0.0}, "gate": {"type": "attention", "top_n": TOP_N},
            "fusion": {"type": "rank_concat"}, "train": {"precision": precision, "device": device}}


def timed(fn, repeats: int, device: torch.device) -> float:
    """Median seconds of ``fn()`` over ``repeats`` calls, after two warm-up calls."""
    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    for _ in range(2):
        fn()
    times = []
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def training_step(device: torch.device, dim: int, batches: list[int], repeats: int) -> list[dict]:
    from fusionkit.models.factory import build_model
    from fusionkit.training.losses import supervised_loss
    from fusionkit.training.precision import Precision

    rows = []
    for precision in ("32", "bf16"):
        for batch in batches:
            torch.manual_seed(0)
            model = build_model(step_spec(dim, precision, str(device))).to(device).train()
            optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
            scaler = Precision(precision, device)
            inputs = {f"enc{k}": torch.randn(batch, dim, device=device) for k in range(K)}
            target = torch.softmax(torch.randn(batch, 6, device=device), -1)

            def step():
                with scaler.autocast():
                    out = model(inputs)
                    loss, _ = supervised_loss(out, target, model.spec.train, model)
                optimizer.zero_grad(set_to_none=True)
                scaler.step(loss, optimizer, list(model.parameters()), 0.0)

            weights = [torch.randn(dim, LATENT, device=device, requires_grad=True) for _ in range(K)]
            dtype = torch.bfloat16 if precision == "bf16" else torch.float32

            def bare():  # the projectors' products: forward, and the two of backward
                with torch.autocast(device.type, dtype=dtype, enabled=precision == "bf16"):
                    total = sum((inputs[f"enc{k}"] @ weights[k]).float().sum() for k in range(K))
                total.backward()

            step_s, bare_s = timed(step, repeats, device), timed(bare, repeats, device)
            rows.append({"precision": precision, "batch": batch, "samples_per_s": batch / step_s,
                         "step_ms": 1000 * step_s, "bare_gemm_ms": 1000 * bare_s,
                         "fraction_of_bare_gemm": bare_s / step_s})
    return rows


def extraction(device: torch.device, short: bool, workers: int) -> dict:
    import numpy as np
    from PIL import Image

    from fusionkit.data.extract import extract
    from fusionkit.models.factory import build_model

    model_name, size, n = ("test_resnet", 32, 16) if short else ("resnet50", 224, 256)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        (root / "img").mkdir()
        rng = np.random.default_rng(0)
        lines = ["id,labels,img"]
        for i in range(n):
            Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(root / "img" / f"{i}.png")
            lines.append(f"s{i},ang,img/{i}.png")
        (root / "m.csv").write_text("\n".join(lines) + "\n")
        spec = {"encoders": [{"name": "img", "type": "timm", "model": model_name, "img_size": [size, size],
                              "crop_pct": 1.0}], "gate": {"type": "uniform", "top_n": 1}}
        batch = 8 if short else 64
        started = time.perf_counter()
        extract(spec, root / "m.csv", root / "store", batch_size=batch, device=str(device), workers=workers,
                progress=False)
        pipeline_s = time.perf_counter() - started
        encoder = build_model(spec).live_encoders()["img"].eval().to(device)
        x = torch.randn(batch, 3, size, size, device=device)
        with torch.inference_mode():
            bare_s = timed(lambda: encoder.embed(x), 3, device) * (n / batch)
    return {"model": model_name, "size": size, "samples": n, "workers": workers,
            "samples_per_s": n / pipeline_s, "bare_samples_per_s": n / bare_s, "overhead": pipeline_s / bare_s - 1}


def fine_tuning(device: torch.device, source: str, epochs: int = 2) -> dict:
    """End-to-end training of the live benchmark's small timm CNN on the UCI pix images: samples/s."""
    from live import CNN, pix_images

    from fusionkit.spec import recipes
    from fusionkit.training.train import train

    with tempfile.TemporaryDirectory() as tmp:
        _, manifest = pix_images(source, Path(tmp))
        spec = {"labels": recipes.UCI_LABELS, "neutral": "d5", "encoders": [CNN], "gate": {"type": "uniform", "top_n": 1},
                "fusion": {"type": "weighted_sum"}, "train": {"epochs": epochs, "batch_size": 64, "patience": epochs}}
        started = time.perf_counter()
        train(spec, manifest, Path(tmp) / "run", fold=0, progress=False, device=str(device))
        seconds = time.perf_counter() - started
        trained = json.loads((Path(tmp) / "run" / "run.json").read_text())["n_train"]
    return {"model": CNN["model"], "epochs": epochs, "samples_per_s": epochs * trained / seconds}


def uci_seconds(device: torch.device, source: str) -> dict:
    from fusionkit.components.datasets import build_dataset
    from fusionkit.spec import recipes
    from fusionkit.training.train import train

    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        store = build_dataset("uci-mfeat", {"source": source}, Path(tmp) / "store")
        for where in dict.fromkeys([str(device), "cpu"]):
            started = time.perf_counter()
            train(recipes.best(), store, Path(tmp) / f"run-{where}", fold=0, progress=False, device=where)
            out[where] = time.perf_counter() - started
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--short", action="store_true", help="tiny sizes, parts 1-2 only: for the tests")
    parser.add_argument("--out", help="write gpu.json and gpu.md here instead of benchmarks/results and docs/")
    parser.add_argument("--workers", type=int, default=8, help="loader workers of the extraction part")
    parser.add_argument("--source", default="../shared/data/uci-mfeat", help="UCI Multiple Features (part 4)")
    args = parser.parse_args()
    from fusionkit.hardware.devices import device_name, resolve_device

    device = resolve_device("auto")
    dim, batches, repeats = (64, [8], 2) if args.short else (DIM, [64, 512], 10)
    data = {"machine": machine(), "device": str(device), "device_name": device_name(device), "short": args.short,
            "training_step": training_step(device, dim, batches, repeats),
            "extraction": extraction(device, args.short, 0 if args.short else args.workers)}
    if not args.short:
        data["fine_tuning"] = fine_tuning(device, args.source)
        data["uci_recipe_seconds"] = uci_seconds(device, args.source)
    step_rows = [[r["precision"], r["batch"], f"{r['samples_per_s']:,.0f}", f"{r['step_ms']:.2f}",
                  f"{r['bare_gemm_ms']:.2f}", f"{r['fraction_of_bare_gemm']:.0%}"] for r in data["training_step"]]
    ex = data["extraction"]
    lines = ["## On the device (GPU when present)", "",
             f"`.venv/bin/python benchmarks/gpu.py`{' --short' if args.short else ''}; device: {device} "
             f"({data['device_name']}).", "",
             f"Training step ({K} encoders x {dim}, latent {LATENT}, top-{TOP_N}): samples/s and the share of the "
             "projectors' bare matrix-product time in the whole step.", "",
             markdown_table(["precision", "batch", "samples/s", "step ms", "bare GEMM ms", "bare / step"], step_rows),
             "", f"Extraction ({ex['model']}, {ex['size']}x{ex['size']}, {ex['workers']} workers): "
             f"{ex['samples_per_s']:.1f} samples/s against {ex['bare_samples_per_s']:.1f} for the bare forward "
             f"({ex['overhead']:+.0%})."]
    if "fine_tuning" in data:
        lines += ["", f"End-to-end fine-tuning ({data['fine_tuning']['model']} on UCI pix images, with validation): "
                  f"{data['fine_tuning']['samples_per_s']:.0f} training samples/s."]
    if "uci_recipe_seconds" in data:
        lines += ["", "UCI quality recipe, seconds per run: " + ", ".join(
            f"{k} {v:.1f}" for k, v in data["uci_recipe_seconds"].items())]
    section = "\n".join(lines)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "gpu.json").write_text(json.dumps(data, indent=2) + "\n")
        (out / "gpu.md").write_text(section + "\n")
        print(section)
    else:
        write("gpu", data, section)
        print(f"written to {RESULTS / 'gpu.json'}")


if __name__ == "__main__":
    main()
