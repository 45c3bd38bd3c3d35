"""``fusionkit serve EXPORT_DIR``: an export behind HTTP, each request with its own compute budget.

Built on FastAPI and uvicorn (docs/deployment.md#serving says why): FastAPI parses and documents the requests
(``/openapi.json``, ``/docs``), uvicorn serves them and shuts down gracefully (requests in flight are answered). What
fusionkit adds is the batcher: requests from any clients wait at most ``max_wait`` seconds to share one
:meth:`~fusionkit.runtime.RuntimeModel.predict` call of at most ``max_batch`` rows, whatever budgets they asked for:
the runtime takes one budget per row and decides each row as if it were alone, so a request's answer does not
depend on its neighbours. Nothing here imports torch.

Endpoints: ``POST /predict`` (a JSON body, or a multipart form whose ``request`` field is that JSON and whose files
are live image encoders' images), ``GET /health``, ``GET /ready``, ``GET /metrics`` (Prometheus' text format).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import collections
import io
import json
import os
import signal
import threading
import time
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse
from pydantic import BaseModel

from fusionkit.conditional.budget import Budget
from fusionkit.errors import DataError, FusionkitError
from fusionkit.runtime.images import check_image_size
from fusionkit.runtime.model import DeploymentError, RuntimeModel, load

__all__ = ["ServeOptions", "Row", "Batcher", "Metrics", "BodyLimit", "RequestError", "parse_row", "request_schema",
           "Answer", "create_app", "serve"]


class RequestError(FusionkitError):
    """A request the server refuses: the HTTP status and what is wrong, in one line."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class ServeOptions:
    """How the server batches and what it accepts (``fusionkit serve --help`` names each)."""

    max_batch: int = 32
    max_wait: float = 0.005
    max_body: int = 16 << 20
    confine: str | None = None
    default_budget: str | None = None

    def __post_init__(self) -> None:
        if isinstance(self.max_batch, bool) or not isinstance(self.max_batch, int) or self.max_batch < 1:
            raise FusionkitError(f"max_batch {self.max_batch!r}: give a whole number of rows, at least 1")
        if not isinstance(self.max_wait, (int, float)) or not 0 <= self.max_wait <= 10:
            raise FusionkitError(f"max_wait {self.max_wait!r}: give seconds from 0 to 10")
        if isinstance(self.max_body, bool) or not isinstance(self.max_body, int) or self.max_body < 1024:
            raise FusionkitError(f"max_body {self.max_body!r}: give a whole number of bytes, at least 1024")


@dataclass
class Row:
    """One request's sample, checked: each encoder's array (``[1, ...]``) or image bytes, frame counts, which
    encoders are missing, and its budget."""

    inputs: dict[str, Any]
    lengths: dict[str, int]
    missing: np.ndarray
    budget: Budget | None
    future: asyncio.Future = field(default=None)  # type: ignore[assignment]


class Metrics:
    """What ``/metrics`` reports: requests by status, latency, GFLOPs spent per request, encoders run, batch sizes.
    Thread-safe; latencies and costs keep the last 10,000 requests for their quantiles."""

    KEEP = 10_000

    def __init__(self, encoders: list[str]) -> None:
        self.lock = threading.Lock()
        self.requests: dict[int, int] = {}
        self.latency: collections.deque[float] = collections.deque(maxlen=self.KEEP)
        self.gflops: collections.deque[float] = collections.deque(maxlen=self.KEEP)
        self.gflops_total = 0.0
        self.latency_total = 0.0
        self.runs = {name: 0 for name in encoders}
        self.batches = 0
        self.batch_rows = 0

    def request(self, status: int, seconds: float) -> None:
        with self.lock:
            self.requests[status] = self.requests.get(status, 0) + 1
            self.latency.append(seconds)
            self.latency_total += seconds

    def spent(self, gflops: float, ran: list[str]) -> None:
        with self.lock:
            self.gflops.append(gflops)
            self.gflops_total += gflops
            for name in ran:
                self.runs[name] += 1

    def batch(self, rows: int) -> None:
        with self.lock:
            self.batches += 1
            self.batch_rows += rows

    def text(self) -> str:
        """Prometheus' text exposition format."""
        with self.lock:
            lines = ["# HELP fusionkit_requests_total Requests answered, by HTTP status.",
                     "# TYPE fusionkit_requests_total counter"]
            lines += [f'fusionkit_requests_total{{status="{s}"}} {n}' for s, n in sorted(self.requests.items())]
            for name, values, total, unit in (("request_seconds", self.latency, self.latency_total, "seconds"),
                                              ("request_gflops", self.gflops, self.gflops_total, "GFLOPs")):
                lines += [f"# HELP fusionkit_{name} Per request {unit} (quantiles over the last {self.KEEP}).",
                          f"# TYPE fusionkit_{name} summary"]
                for q in (0.5, 0.9, 0.99):
                    value = float(np.quantile(values, q)) if values else float("nan")
                    lines.append(f'fusionkit_{name}{{quantile="{q}"}} {value:.6g}')
                count = sum(self.requests.values()) if name == "request_seconds" else len(values)
                lines += [f"fusionkit_{name}_sum {total:.6g}", f"fusionkit_{name}_count {count}"]
            lines += ["# HELP fusionkit_encoder_runs_total Rows each encoder ran on.",
                      "# TYPE fusionkit_encoder_runs_total counter"]
            lines += [f'fusionkit_encoder_runs_total{{encoder="{n}"}} {c}' for n, c in self.runs.items()]
            lines += ["# HELP fusionkit_batches_total Calls of the model.", "# TYPE fusionkit_batches_total counter",
                      f"fusionkit_batches_total {self.batches}",
                      "# HELP fusionkit_batch_rows_total Rows predicted in those calls.",
                      "# TYPE fusionkit_batch_rows_total counter", f"fusionkit_batch_rows_total {self.batch_rows}"]
            return "\n".join(lines) + "\n"


def _array(value: Any, where: str) -> np.ndarray:
    try:
        array = np.asarray(value, dtype=np.float32)
    except (TypeError, ValueError, OverflowError):
        raise RequestError(422, f"{where}: expected numbers (a list, or a list of frames), found {str(value)[:60]}")
    if array.ndim == 0:
        raise RequestError(422, f"{where}: expected a list of numbers, found one number")
    return array


def parse_row(model: RuntimeModel, body: Any, files: Mapping[str, bytes], options: ServeOptions) -> Row:
    """One request's JSON ``body`` (and uploaded image ``files``, by encoder) as a checked :class:`Row`: every
    problem is a :class:`RequestError` (422) that names the key."""
    if not isinstance(body, dict):
        raise RequestError(422, 'the body must be a JSON object: {"inputs": {encoder: values}, "budget": ...}')
    unknown = sorted(set(body) - {"inputs", "budget", "missing"})
    if unknown:
        raise RequestError(422, f"unknown key(s) {unknown}: a request has inputs, budget and missing")
    inputs = body.get("inputs", {})
    missing = body.get("missing", [])
    if not isinstance(inputs, dict) or not all(isinstance(k, str) for k in inputs):
        raise RequestError(422, "inputs: expected an object of encoder name to values")
    if not isinstance(missing, list) or not all(isinstance(n, str) for n in missing):
        raise RequestError(422, "missing: expected a list of encoder names")
    names = model.names
    strange = sorted((set(inputs) | set(files) | set(missing)) - set(names))
    if strange:
        raise RequestError(422, f"no encoder(s) {strange} in this model; it reads {names}")
    row_inputs: dict[str, Any] = {}
    lengths: dict[str, int] = {}
    absent = np.zeros(len(names), dtype=bool)
    for k, (name, entry) in enumerate(zip(names, model.encoders)):
        if name in missing:
            absent[k] = True
        elif name not in inputs and name not in files:
            raise RequestError(422, f"inputs: no value for encoder {name!r} (name it in missing if it has none)")
        if "reads" in entry:
            row_inputs[name] = b"" if absent[k] else _image(name, inputs.get(name), files.get(name), entry, options)
            continue
        shape = entry["inputs"]["x"]["shape"][1:]
        if absent[k]:
            value = np.zeros([1 if s == "frames" else s for s in shape], np.float32)
        else:
            value = _array(inputs[name], f"inputs.{name}")
        if value.shape and "lengths" in entry["inputs"]:
            lengths[name] = 0 if absent[k] else int(value.shape[0])
        row_inputs[name] = value[None]
    budget_value = body.get("budget", options.default_budget)
    if not (budget_value is None or isinstance(budget_value, str)
            or (isinstance(budget_value, (int, float)) and not isinstance(budget_value, bool))):
        raise RequestError(422, "budget: expected a cap (\"40%\", or GFLOPs as a number), a stored mean budget "
                           "(\"mean:40%\"), or null")
    try:
        budget = model.budget(budget_value)
        if budget is not None and not model.demand:
            raise DeploymentError("a budget needs on-demand encoders; this model runs every encoder always")
        model.check_inputs({n: [v] if isinstance(v, (bytes, str)) else v for n, v in row_inputs.items()},
                           {n: np.array([v]) for n, v in lengths.items()}, (~absent)[None])
    except FusionkitError as exc:
        raise RequestError(422, str(exc)) from None
    return Row(row_inputs, lengths, absent, budget)


def _image(name: str, value: Any, upload: bytes | None, entry: Mapping[str, Any], options: ServeOptions) -> bytes | str:
    """A live image encoder's input: uploaded bytes, ``{"base64": ...}``, or ``{"path": ...}`` inside the
    operator's ``--confine`` folder; its header is read now (size and format), its pixels when a budget runs it."""
    if upload is not None:
        data = upload
    elif isinstance(value, dict) and set(value) == {"base64"} and isinstance(value["base64"], str):
        try:
            data = base64.b64decode(value["base64"], validate=True)
        except (binascii.Error, ValueError):
            raise RequestError(422, f"inputs.{name}.base64: not valid base64") from None
    elif isinstance(value, dict) and set(value) == {"path"} and isinstance(value["path"], str):
        if options.confine is None:
            raise RequestError(422, f"inputs.{name}.path: this server reads no files of its own (start it with "
                               "--confine DIR to allow paths inside DIR); upload the image or send it as base64")
        root = Path(options.confine).resolve()
        path = (root / value["path"]).resolve()
        if not path.is_relative_to(root) or not path.is_file():
            raise RequestError(422, f"inputs.{name}.path: {value['path']!r} is no file inside the served folder")
        return str(path)
    else:
        raise RequestError(422, f"inputs.{name}: an image encoder takes {{\"base64\": ...}} or a multipart file "
                           f"named {name!r}")
    try:
        from PIL import Image

        with Image.open(io.BytesIO(data)) as image:
            check_image_size(*image.size, entry["reads"], f"inputs.{name}")
    except DataError as exc:
        raise RequestError(422, str(exc)) from None
    except Exception as exc:  # noqa: BLE001 - PIL's many errors for a file that is no image
        raise RequestError(422, f"inputs.{name}: not a readable image ({type(exc).__name__})") from None
    return data


class Batcher:
    """Requests queue here and leave in batches: each batch is what queued while the model was busy (and, with
    ``max_wait``, what arrives within that long of its first row), at most ``max_batch`` rows, predicted in one
    call with one budget per row on a worker thread. A batch that fails is predicted row by row, so that only the
    row at fault is refused."""

    def __init__(self, model: RuntimeModel, options: ServeOptions, metrics: Metrics) -> None:
        self.model, self.options, self.metrics = model, options, metrics
        self.queue: asyncio.Queue[Row] = asyncio.Queue()
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="fusionkit-predict")

    async def submit(self, row: Row) -> dict[str, Any]:
        row.future = asyncio.get_running_loop().create_future()
        await self.queue.put(row)
        return await row.future

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            rows = [await self.queue.get()]
            deadline = loop.time() + self.options.max_wait
            while len(rows) < self.options.max_batch:
                try:
                    rows.append(self.queue.get_nowait())
                    continue
                except asyncio.QueueEmpty:
                    pass
                left = deadline - loop.time()
                if left <= 0:
                    break
                try:
                    rows.append(await asyncio.wait_for(self.queue.get(), left))
                except TimeoutError:
                    break
            results = await loop.run_in_executor(self.executor, self.predict, rows)
            for row, result in zip(rows, results):
                if row.future.done():
                    continue
                if isinstance(result, BaseException):
                    row.future.set_exception(result)
                else:
                    row.future.set_result(result)

    def predict(self, rows: list[Row]) -> list[dict[str, Any] | BaseException]:
        try:
            return self._predict(rows)
        except FusionkitError as exc:
            if len(rows) == 1:
                return [RequestError(422, str(exc))]
            return [result for row in rows for result in self.predict([row])]
        except Exception as exc:  # noqa: BLE001 - a fault of the server's, answered 500 and logged by uvicorn
            return [exc] * len(rows)

    def _predict(self, rows: list[Row]) -> list[dict[str, Any]]:
        model = self.model
        inputs: dict[str, Any] = {}
        lengths: dict[str, np.ndarray] = {}
        for name, entry in zip(model.names, model.encoders):
            values = [row.inputs[name] for row in rows]
            if "reads" in entry:
                inputs[name] = values
            elif "lengths" in entry["inputs"]:
                frames = max(1, max(v.shape[1] for v in values))
                padded = np.zeros((len(rows), frames, values[0].shape[2]), np.float32)
                for n, v in enumerate(values):
                    padded[n, :v.shape[1]] = v[0]
                inputs[name] = padded
                lengths[name] = np.array([row.lengths[name] for row in rows], np.int64)
            else:
                inputs[name] = np.concatenate(values)
        mask = ~np.stack([row.missing for row in rows])
        out = model.predict(inputs, [row.budget for row in rows], lengths=lengths, mask=mask)
        self.metrics.batch(len(rows))
        results = []
        for n, row in enumerate(rows):
            ran = out.ran[n] if out.ran is not None else mask[n]
            names = [name for name, did in zip(model.names, ran) if did]
            gflops = float(out.cost[n])
            self.metrics.spent(gflops, names)
            results.append({"answer": out.answers[n], "probs": dict(zip(model.labels, map(float, out.probs[n]))),
                            "ran": names, "gflops": gflops,
                            "budget": None if row.budget is None else row.budget.describe()})
        return results


class Answer(BaseModel):
    """What ``POST /predict`` answers: the decoded BlEmoRE answer, the combined probability of each label, the
    encoders that ran, the GFLOPs the request spent, and the budget it was decided under."""

    answer: list[dict[str, Any]]
    probs: dict[str, float]
    ran: list[str]
    gflops: float
    budget: str | None


class _TooLarge(Exception):
    pass


class BodyLimit:
    """ASGI middleware: a request body over ``limit`` bytes is refused with 413 before it is read whole."""

    def __init__(self, app: Any, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.limit):
            return await self._refuse(send)
        received = 0

        async def limited() -> dict:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.limit:
                    raise _TooLarge
            return message

        try:
            await self.app(scope, limited, send)
        except _TooLarge:
            await self._refuse(send)

    async def _refuse(self, send: Any) -> None:
        body = json.dumps({"error": f"the request body is over {self.limit} bytes (this server's --max-body)"}).encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})


def request_schema(model: RuntimeModel) -> dict[str, Any]:
    """The JSON Schema of a ``/predict`` body for this export: each encoder's input, the budgets it takes."""
    properties = {}
    for entry in model.encoders:
        shape = entry["inputs"]["x"]["shape"][1:]
        if "reads" in entry:
            properties[entry["name"]] = {"type": "object", "properties": {"base64": {"type": "string"}},
                                         "description": "an image file, base64-encoded (or a multipart file)"}
        else:
            item: dict[str, Any] = {"type": "number"}
            for size in reversed(shape):
                item = {"type": "array", "items": item, **({} if size == "frames" else {"minItems": size,
                                                                                       "maxItems": size})}
            properties[entry["name"]] = item
    budgets = [b.describe() for b in model.stored_budgets]
    return {"type": "object", "required": ["inputs"], "additionalProperties": False, "properties": {
        "inputs": {"type": "object", "properties": properties, "additionalProperties": False},
        "budget": {"anyOf": [{"type": "string"}, {"type": "number"}, {"type": "null"}],
                   "description": "a cap (\"40%\", or GFLOPs per sample), or a stored mean budget "
                                  f"({', '.join(budgets) or 'none stored'}); null: the gate's own rule"},
        "missing": {"type": "array", "items": {"type": "string", "enum": model.names}}}}


def create_app(model: RuntimeModel, options: ServeOptions | None = None) -> Any:
    """The FastAPI application serving ``model``."""
    options = options or ServeOptions()
    metrics = Metrics(model.names)
    batcher = Batcher(model, options, metrics)
    state = {"ready": False}

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> Any:
        task = asyncio.create_task(batcher.run())
        state["ready"] = True
        try:
            yield
        finally:
            state["ready"] = False
            task.cancel()
            batcher.executor.shutdown(wait=True)

    app = FastAPI(title="fusionkit", version=model.manifest.get("fusionkit") or "unknown", lifespan=lifespan,
                  description=f"The export {model.folder.name}: labels {list(model.labels)}, encoders "
                              f"{model.names} (on demand: {[model.names[k] for k in model.demand]}).")

    @app.post("/predict", response_model=None, openapi_extra={"requestBody": {"required": True, "content": {
        "application/json": {"schema": request_schema(model)},
        "multipart/form-data": {"schema": {"type": "object", "properties": {
            "request": {"type": "string", "description": "the JSON body"}}}}}}},
        responses={200: {"model": Answer}, 413: {"description": "body too large"},
                   422: {"description": "a bad request, named"}})
    async def predict(request: Request) -> Any:
        start = time.perf_counter()
        status = 200
        try:
            body, files = await _read(request)
            row = parse_row(model, body, files, options)
            result = await batcher.submit(row)
        except RequestError as exc:
            status = exc.status
            return JSONResponse({"error": str(exc)}, status_code=status)
        finally:
            metrics.request(status, time.perf_counter() - start)
        return JSONResponse(result)  # built by the batcher: no second validation on the way out

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/ready")
    async def ready() -> Any:
        if not state["ready"]:
            return JSONResponse({"ready": False}, status_code=503)
        return {"ready": True, "encoders": model.names, "budgets": [b.describe() for b in model.stored_budgets]}

    @app.get("/metrics", response_class=PlainTextResponse)
    async def metrics_text() -> str:
        return metrics.text()

    return BodyLimit(app, options.max_body)


async def _read(request: Request) -> tuple[Any, dict[str, bytes]]:
    """A request's JSON body and its uploaded files (a multipart form: the JSON in ``request``)."""
    kind = request.headers.get("content-type", "")
    if kind.startswith("multipart/form-data"):
        try:
            form = await request.form()
        except Exception as exc:  # noqa: BLE001 - the multipart parser's errors
            raise RequestError(400, f"a malformed multipart body ({type(exc).__name__})") from None
        files = {key: await value.read() for key, value in form.items() if hasattr(value, "read")}
        text = form.get("request")
        if not isinstance(text, str):
            raise RequestError(422, "a multipart request carries its JSON in a field named 'request'")
    else:
        text = (await request.body()).decode("utf-8", "replace")
        files = {}
    try:
        return json.loads(text), files
    except (ValueError, RecursionError):
        raise RequestError(400, "the body is not valid JSON") from None


def serve(folder: str | os.PathLike, host: str = "127.0.0.1", port: int = 8000, options: ServeOptions | None = None,
          threads: int | None = None, log_level: str = "warning") -> None:
    """Load the export in ``folder`` and serve it until SIGINT or SIGTERM (requests in flight are answered)."""
    import uvicorn

    model = load(folder, threads=threads)
    options = options or ServeOptions()
    model.budget(options.default_budget)  # a bad default budget is refused before the server starts
    config = uvicorn.Config(create_app(model, options), host=host, port=port, log_level=log_level,
                            timeout_graceful_shutdown=30, access_log=False)
    server = uvicorn.Server(config)
    print(f"serving {folder} on http://{host}:{port} (POST /predict; /docs)", flush=True)
    # uvicorn answers the requests in flight on SIGTERM, then raises the signal again for the handler it found:
    # this one lets the process end with status 0, as a service manager expects of a clean stop
    previous = signal.signal(signal.SIGTERM, lambda *_: None)
    try:
        server.run()
    finally:
        signal.signal(signal.SIGTERM, previous)
    print("stopped: every request in flight was answered", flush=True)
