"""``fusionkit report``: plots and a markdown summary of a run (drawn by :mod:`fusionkit.evaluation.report`)."""

from __future__ import annotations

import argparse

__all__ = ["add_commands"]


def _cmd_report(args: argparse.Namespace) -> int:
    from fusionkit.evaluation.report import write_report

    out = write_report(args.run)
    print(f"report written to {out}")
    return 0


def add_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("report", help="plots and a markdown summary of a run")
    p.add_argument("run", metavar="RUN")
    p.set_defaults(func=_cmd_report)
