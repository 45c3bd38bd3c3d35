"""`fusionkit serve`: a real server process on 127.0.0.1 and a real HTTP client. Answers equal
`RuntimeModel.predict` row by row at mixed budgets batched together, bad requests get a 4xx naming what is wrong
and the server keeps serving, and a shutdown answers the requests in flight."""

from __future__ import annotations

import base64
import io
import json
import math
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
import torch

import fusionkit
from fusionkit.components.datasets import build_dataset
from fusionkit.data.open import spec_store
from fusionkit.export.graphs import export_model
from fusionkit.inference import fit_mean_budget
from fusionkit.runtime import load, read_store

BUDGETS = [None, "0%", "30%", "100%", "mean:25%", "mean:60%", 2.5]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start(folder, *options) -> tuple[subprocess.Popen, str]:
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "fusionkit", "serve", str(folder), "--port", str(port),
                             "--threads", "1", *map(str, options)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 60
    while time.time() < deadline:
        assert proc.poll() is None, proc.stderr.read()[-2000:]
        try:
            if httpx.get(f"{url}/ready", timeout=1).status_code == 200:
                return proc, url
        except httpx.TransportError:
            time.sleep(0.1)
    proc.kill()
    pytest.fail("the server did not become ready in 60 s")


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """An untrained model of sequences and vectors, two encoders on demand, two stored mean budgets."""
    root = tmp_path_factory.mktemp("serve")
    store_path = build_dataset("synthetic", {"samples": 60, "noise": [0.3, 1.0, 2.0], "dim": 6, "seed": 5,
                                             "sequence_length": 4}, root / "store")
    spec = {"latent_dim": 8, "gate": {"type": "attention", "top_n": 3},
            "encoders": [{"name": "enc0", "type": "features", "dim": 6, "pooling": "mean"},
                         {"name": "enc1", "type": "features", "dim": 6, "pooling": "stats7", "run": "on_demand",
                          "cost_gflops": 1.0},
                         {"name": "enc2", "type": "features", "dim": 6, "pooling": "attention", "run": "on_demand",
                          "cost_gflops": 3.0}]}
    torch.manual_seed(0)
    model = fusionkit.build_model(spec).eval()
    store = spec_store(model.spec, store_path)
    budgets = [fit_mean_budget(model, store, np.arange(30, 60), b) for b in ("mean:25%", "mean:60%")]
    folder = export_model(model, root / "export", budget=budgets)
    return folder, read_store(store_path, ["enc0", "enc1", "enc2"])


@pytest.fixture(scope="module")
def server(exported):
    proc, url = start(exported[0], "--max-wait-ms", 30, "--max-body-mb", 0.05)
    yield url
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=30)


def body(rows, n, budget="absent"):
    inputs = {}
    for name, value in rows.inputs.items():
        x = value[n]
        if name in rows.lengths:
            x = x[:rows.lengths[name][n]]
        inputs[name] = x.tolist()
    return {"inputs": inputs, **({} if budget == "absent" else {"budget": budget})}


def test_answers_equal_the_runtime_row_by_row_at_mixed_budgets_in_shared_batches(server, exported):
    folder, rows = exported
    runtime = load(folder, threads=1)
    budgets = [BUDGETS[n % len(BUDGETS)] for n in range(42)]
    with httpx.Client(timeout=60) as client, ThreadPoolExecutor(14) as pool:  # 14 clients at once
        before = _metric(client.get(f"{server}/metrics").text, "fusionkit_batches_total")
        answers = list(pool.map(lambda n: client.post(f"{server}/predict", json=body(rows, n, budgets[n])),
                                range(42)))
        text = client.get(f"{server}/metrics").text
    assert [a.status_code for a in answers] == [200] * 42, answers[0].text
    for n, answer in enumerate(answers):
        got = answer.json()
        alone = runtime.predict({k: v[n:n + 1, :rows.lengths[k][n]] if k in rows.lengths else v[n:n + 1]
                                 for k, v in rows.inputs.items()}, budgets[n],
                                lengths={k: v[n:n + 1] for k, v in rows.lengths.items()})
        assert got["answer"] == alone.answers[0] and got["ran"] == [runtime.names[k] for k in
                                                                    np.flatnonzero(alone.ran[0])]
        assert math.isclose(got["gflops"], float(alone.cost[0]), abs_tol=1e-9)
        assert np.allclose([got["probs"][label] for label in runtime.labels], alone.probs[0], atol=1e-5)
    batches = _metric(text, "fusionkit_batches_total") - before
    assert batches < 42  # requests shared batches
    assert _metric(text, 'fusionkit_requests_total{status="200"}') >= 42
    assert _metric(text, "fusionkit_request_gflops_sum") > 0 and 'encoder="enc2"' in text
    spent = {b: [a.json()["gflops"] for a, g in zip(answers, budgets) if g == b] for b in ("0%", "30%")}
    assert max(spent["0%"]) == 0.0 and max(spent["30%"]) <= 0.3 * 4.0 + 1e-9  # each got the budget it asked


def _metric(text: str, name: str) -> float:
    return float(next(line.split()[-1] for line in text.splitlines() if line.startswith(name + " ")
                      or line.startswith(name + "{") and line.split()[0] == name))


BAD = [
    ("not json", {"content": b"{inputs"}, 400, "not valid JSON"),
    ("not an object", {"json": [1, 2]}, 422, "the body must be a JSON object"),
    ("unknown key", {"json": {"inputs": {}, "budgte": "40%"}}, 422, r"unknown key\(s\) \['budgte'\]"),
    ("unknown encoder", {"json": {"inputs": {"enc9": [1]}}}, 422, r"no encoder\(s\) \['enc9'\]"),
    ("missing input", {"json": {"inputs": {"enc0": [[0.0] * 6]}}}, 422, "no value for encoder 'enc1'"),
    ("wrong width", {"json": {"inputs": {"enc0": [[0.0] * 5], "enc1": [[0.0] * 6], "enc2": [[0.0] * 6]}}}, 422,
     r"inputs\['enc0'\]: expected \['batch', 'frames', 6\]"),
    ("strings", {"json": {"inputs": {"enc0": "abc", "enc1": [[0.0] * 6], "enc2": [[0.0] * 6]}}}, 422,
     "inputs.enc0: expected numbers"),
    ("nan", {"content": b'{"inputs": {"enc0": [[NaN, 0, 0, 0, 0, 0]], "enc1": [[0,0,0,0,0,0]], '
                        b'"enc2": [[0,0,0,0,0,0]]}}'}, 422, "NaN or inf in rows"),
    ("unknown budget", {"json": {"inputs": {"enc0": [[0.0] * 6], "enc1": [[0.0] * 6], "enc2": [[0.0] * 6]},
                                 "budget": "mean:33%"}}, 422, r"stores the mean budget\(s\) mean:25%, mean:60%"),
    ("bad budget", {"json": {"inputs": {"enc0": [[0.0] * 6], "enc1": [[0.0] * 6], "enc2": [[0.0] * 6]},
                             "budget": "lots"}}, 422, "expected GFLOPs per sample"),
    ("budget type", {"json": {"inputs": {"enc0": [[0.0] * 6], "enc1": [[0.0] * 6], "enc2": [[0.0] * 6]},
                              "budget": [1]}}, 422, "budget: expected a cap"),
    ("too large", {"content": b'{"inputs": {"enc0": [' + b"0.0," * 20000 + b"0.0]}}"}, 413, "over 52428 bytes"),
]


@pytest.mark.parametrize("name, sent, status, message", BAD, ids=[b[0] for b in BAD])
def test_a_bad_request_gets_a_4xx_naming_it_and_the_server_keeps_serving(server, exported, name, sent, status,
                                                                          message):
    import re

    _, rows = exported
    answer = httpx.post(f"{server}/predict", timeout=30, **sent)
    assert answer.status_code == status, answer.text
    assert re.search(message, answer.json()["error"]), answer.json()
    assert httpx.post(f"{server}/predict", json=body(rows, 0, "40%"), timeout=30).status_code == 200


def test_health_readiness_and_the_openapi_schema(server):
    assert httpx.get(f"{server}/health").json() == {"status": "ok"}
    assert httpx.get(f"{server}/ready").json()["budgets"] == ["mean:25%", "mean:60%"]
    schema = httpx.get(f"{server}/openapi.json").json()
    request = schema["paths"]["/predict"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert set(request["properties"]["inputs"]["properties"]) == {"enc0", "enc1", "enc2"}
    assert "mean:25%, mean:60%" in request["properties"]["budget"]["description"]


def test_a_shutdown_answers_the_requests_in_flight(exported):
    folder, rows = exported
    proc, url = start(folder, "--max-wait-ms", 200)  # requests wait in the batcher when the signal comes
    with httpx.Client(timeout=60) as client, ThreadPoolExecutor(8) as pool:
        futures = [pool.submit(client.post, f"{url}/predict", json=body(rows, n, "100%")) for n in range(8)]
        time.sleep(0.1)
        proc.send_signal(signal.SIGTERM)
        answers = [f.result() for f in futures]
    assert [a.status_code for a in answers] == [200] * 8
    assert proc.wait(timeout=30) == 0
    with pytest.raises(httpx.TransportError):
        httpx.get(f"{url}/health", timeout=2)


def test_image_uploads_base64_and_broken_images(tmp_path):
    """A live image encoder on demand: an upload (multipart) and base64 give the runtime's answer for that file;
    a broken image, a strip too long for its width, bad base64 and a server-side path are refused."""
    from PIL import Image

    model = fusionkit.build_model({"latent_dim": 8, "gate": {"type": "attention", "top_n": 2},
                                   "encoders": [{"name": "vec", "type": "features", "dim": 4},
                                                {"name": "img", "type": "timm", "model": "test_resnet",
                                                 "in_chans": 1, "img_size": [32, 32], "run": "on_demand"}]})
    folder = export_model(model.eval(), tmp_path / "export")
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 30), dtype=np.uint8)).save(tmp_path / "a.png")
    png = (tmp_path / "a.png").read_bytes()
    proc, url = start(folder)
    try:
        expected = load(folder, threads=1).predict({"vec": np.ones((1, 4), np.float32),
                                                    "img": [str(tmp_path / "a.png")]}, "100%")
        request = {"inputs": {"vec": [1.0] * 4, "img": {"base64": base64.b64encode(png).decode()}}, "budget": "100%"}
        as_json = httpx.post(f"{url}/predict", json=request, timeout=30).json()
        upload = httpx.post(f"{url}/predict", timeout=30, files={"img": ("a.png", png, "image/png")},
                            data={"request": json.dumps({"inputs": {"vec": [1.0] * 4}, "budget": "100%"})}).json()
        for got in (as_json, upload):
            assert got["ran"] == ["vec", "img"] and got["answer"] == expected.answers[0]
            assert np.allclose([got["probs"][label] for label in model.labels], expected.probs[0], atol=1e-5)
        strip = io.BytesIO()
        Image.new("L", (4000, 1)).save(strip, format="PNG")
        for image, message in ((b"not an image", "not a readable image"), (strip.getvalue(), "aspect ratio over")):
            bad = {"inputs": {"vec": [1.0] * 4, "img": {"base64": base64.b64encode(image).decode()}}}
            answer = httpx.post(f"{url}/predict", json=bad, timeout=30)
            assert answer.status_code == 422 and message in answer.json()["error"]
        answer = httpx.post(f"{url}/predict", json={"inputs": {"vec": [1.0] * 4, "img": {"base64": "@@"}}})
        assert answer.status_code == 422 and "not valid base64" in answer.json()["error"]
        answer = httpx.post(f"{url}/predict", json={"inputs": {"vec": [1.0] * 4, "img": {"path": "/etc/hostname"}}})
        assert answer.status_code == 422 and "reads no files of its own" in answer.json()["error"]
        assert httpx.post(f"{url}/predict", json=request, timeout=30).status_code == 200
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
