"""The ``fusionkit`` command line: one module per command group, each parser beside its handler.

Only argparse is imported at start-up; each handler imports what it needs, so ``fusionkit --help`` stays fast
whatever plugins are installed. A command module exposes ``add_commands(sub)``, which adds its parsers to the
``fusionkit`` sub-parsers and sets each one's handler (``func``).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from fusionkit.blemore.submission import submission_paths
from fusionkit.cli import data, demo, evaluate, export, plugins, report, serve, spec, sweep, train
from fusionkit.cli.spec import cost_table, model_summary

__all__ = ["COMMANDS", "EXIT_ERROR", "EXIT_OS", "EXIT_INTERRUPTED", "EXIT_PIPE", "build_parser", "main",
           "model_summary", "cost_table", "submission_paths"]

#: The command groups, in the order `fusionkit --help` lists them.
COMMANDS = (plugins, spec, data, train, evaluate, export, serve, sweep, report, demo)

#: Exit codes: 2 a fusionkit error (bad input), 74 an operating-system error (EX_IOERR),
#: 130 interrupted (128 + SIGINT), 141 the output was closed early (128 + SIGPIPE).
EXIT_ERROR, EXIT_OS, EXIT_INTERRUPTED, EXIT_PIPE = 2, 74, 130, 141


def build_parser() -> argparse.ArgumentParser:
    from fusionkit.errors import torch_installed

    parser = argparse.ArgumentParser(
        prog="fusionkit", description="Build, train and evaluate rank-aware top-n multi-encoder fusion models.",
        epilog=None if torch_installed() else "PyTorch is not installed here, and every command above but serve needs "
        "it: pip install 'fusionkit[torch]'. An exported model runs without it: fusionkit serve EXPORT_DIR, or "
        "fusionkit-runtime DIR --data STORE --out FILE",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for module in COMMANDS:
        module.add_commands(sub)
    return parser


def _one_line_warnings() -> None:
    import warnings

    warnings.formatwarning = lambda message, category, *a, **k: f"fusionkit: warning: {message}\n"


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    code = _run(args)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # a torchrun rank: ends without the interpreter's finalization
        from fusionkit.hardware.distributed import end_rank

        end_rank(code)
    return code


def _run(args: argparse.Namespace) -> int:
    """The command's exit status; its errors as one line each."""
    from fusionkit.errors import NO_TORCH, FusionkitError

    _one_line_warnings()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    where = f" (rank {os.environ.get('RANK', '?')} of {world})" if world > 1 else ""
    try:
        return int(args.func(args) or 0)
    except FusionkitError as exc:
        print(f"fusionkit: error{where}: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except ModuleNotFoundError as exc:
        if (exc.name or "").split(".")[0] != "torch":
            raise
        print(f"fusionkit: error{where}: {NO_TORCH}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        hint = getattr(args, "interrupt_hint", None)
        print(f"fusionkit: interrupted{'; ' + hint if hint else ''}", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        # The reader went away (`fusionkit plugins | head -1`): stop writing, and keep the
        # interpreter's final flush of stdout from failing again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        print("fusionkit: output closed early (broken pipe)", file=sys.stderr)
        return EXIT_PIPE
    except OSError as exc:
        where = f"{exc.filename}: " if exc.filename else ""
        what = exc.strerror or str(exc)
        if isinstance(exc, (FileExistsError, NotADirectoryError)) and exc.filename and Path(exc.filename).is_file():
            what = "is a file where a directory is needed; choose another path"
        print(f"fusionkit: error: {where}{what}", file=sys.stderr)
        return EXIT_OS
