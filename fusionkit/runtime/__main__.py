"""``fusionkit-runtime DIR --data STORE [--raw MANIFEST] --out sub.json [--budget B] [--split S]``: the challenge
files of an export, predicted without torch (``python -m fusionkit.runtime`` is the same)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from fusionkit.blemore.submission import check_submission_replaceable, submission_paths, write_submission
from fusionkit.errors import FusionkitError
from fusionkit.runtime.model import load
from fusionkit.runtime.store import select_rows

__all__ = ["main", "build_parser"]

#: Rows predicted at once.
BATCH = 256


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fusionkit-runtime", description="Predict with an exported fusionkit model "
                                     "(numpy and onnxruntime, no torch) and write a challenge submission.")
    parser.add_argument("export", metavar="DIR", help="the folder `fusionkit export` wrote")
    parser.add_argument("--data", required=True, metavar="STORE", help="a feature store with the export's encoders, "
                        "or the raw manifest when every encoder is live (reads images)")
    parser.add_argument("--raw", metavar="MANIFEST", help="the manifest of the live encoders' image files, beside a "
                        "feature store (as fusionkit train --raw)")
    parser.add_argument("--out", required=True, metavar="FILE.json", help="FILE.json and FILE.zip are written")
    parser.add_argument("--split", default="unlabelled", choices=["unlabelled", "labelled", "target", "all"],
                        help="which samples (default: the unlabelled ones)")
    parser.add_argument("--budget", help="a cap (40%% of the full cost, or 2.5 GFLOPs per sample), or mean (the "
                        "mean budget the export stores); default: the gate's own rule")
    parser.add_argument("--confine", metavar="DIR", help="refuse a manifest whose image paths resolve outside DIR "
                        "(for a manifest you did not write)")
    parser.add_argument("--threads", type=int, help="threads per graph, from 1 to the cores available (default: "
                        "onnxruntime's, every core)")
    parser.add_argument("--id-suffix", default="", help="appended to sample ids, e.g. .mov for BlEmoRE test clips")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        check_submission_replaceable(*submission_paths(Path(args.out)))
        model = load(args.export, threads=args.threads)
        model.budget(args.budget)  # a bad budget is refused before any store is read
        rows = model.read(args.data, args.raw, args.confine)
        chosen = select_rows(rows, args.split)
        answers = []
        for start in range(0, len(chosen), BATCH):
            part = rows.take(chosen[start:start + BATCH])
            answers += model.predict(part.inputs, args.budget, lengths=part.lengths).answers
        ids = [rows.ids[i] for i in chosen]
        json_path, zip_path = write_submission(Path(args.out), {f"{i}{args.id_suffix}": a
                                                                for i, a in zip(ids, answers)})
    except FusionkitError as exc:
        print(f"fusionkit-runtime: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # the output or an input could not be written or read: named, in one line
        print(f"fusionkit-runtime: error: {exc.filename or args.out}: {exc.strerror or exc}", file=sys.stderr)
        return 2
    print(f"{len(answers)} predictions written to {json_path} and {zip_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
