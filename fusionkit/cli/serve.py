"""``fusionkit serve EXPORT_DIR``: an export behind HTTP, each request with its own compute budget
(:mod:`fusionkit.runtime.server`; docs/deployment.md#serving). Torch-free: ``pip install 'fusionkit[serve]'``."""

from __future__ import annotations

import argparse

__all__ = ["add_commands"]


def _cmd_serve(args: argparse.Namespace) -> int:
    from fusionkit.errors import FusionkitError

    try:
        from fusionkit.runtime.server import ServeOptions, serve
    except ModuleNotFoundError as exc:
        if (exc.name or "").split(".")[0] not in ("fastapi", "uvicorn", "pydantic", "starlette", "multipart"):
            raise
        raise FusionkitError(f"fusionkit serve needs {exc.name}: pip install 'fusionkit[serve]'") from None
    options = ServeOptions(max_batch=args.max_batch, max_wait=args.max_wait_ms / 1000.0,
                           max_body=int(args.max_body_mb * (1 << 20)), confine=args.confine,
                           default_budget=args.budget)
    serve(args.export, host=args.host, port=args.port, options=options, threads=args.threads,
          log_level=args.log_level)
    return 0


def add_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="serve an export over HTTP (no torch): a compute budget per request, requests "
                       "batched dynamically")
    p.add_argument("export", metavar="EXPORT_DIR", help="the folder `fusionkit export` wrote")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1, this machine only)")
    p.add_argument("--port", type=int, default=8000, help="port (default: 8000)")
    p.add_argument("--max-batch", type=int, default=32, metavar="N", help="rows predicted at once, at most "
                   "(default: 32)")
    p.add_argument("--max-wait-ms", type=float, default=0.0, metavar="MS", help="how long a request waits for "
                   "others to share its batch (default: 0: a batch is what queued while the model was busy)")
    p.add_argument("--max-body-mb", type=float, default=16.0, metavar="MB", help="the largest request body "
                   "(default: 16 MB; larger: 413)")
    p.add_argument("--budget", help="the budget of a request that names none (default: the gate's own rule)")
    p.add_argument("--confine", metavar="DIR", help="let requests name image files by path inside DIR (default: "
                   "no server-side path is read; images come as uploads or base64)")
    p.add_argument("--threads", type=int, help="onnxruntime's threads per graph (default: every core)")
    p.add_argument("--log-level", default="warning", choices=["critical", "error", "warning", "info", "debug"])
    p.set_defaults(func=_cmd_serve)
