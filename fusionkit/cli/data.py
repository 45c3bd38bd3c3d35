"""``fusionkit extract`` and ``fusionkit data build|options|info``: feature stores, made and described."""

from __future__ import annotations

import argparse
import os

from fusionkit.cli.options import add_confine, add_device

__all__ = ["add_commands"]


def _cmd_extract(args: argparse.Namespace) -> int:
    from fusionkit.data.extract import extract

    args.interrupt_hint = f"the extraction is resumable: run the same command again (partial: {args.out}.partial)"
    out = extract(args.spec, args.data, args.out, batch_size=args.batch_size, device=args.device, workers=args.workers,
                  overwrite=args.overwrite, progress=not args.quiet, confine=args.confine,
                  shard_batches=args.shard_batches)
    if os.environ.get("RANK", "0") == "0":  # under torchrun, rank 0 reports
        print(f"feature store written to {out}")
    return 0


def _cmd_data_build(args: argparse.Namespace) -> int:
    from fusionkit.components.datasets import build_dataset
    from fusionkit.errors import FusionkitError
    from fusionkit.spec.yaml_reader import load_yaml

    options = {}
    for item in args.set or []:
        key, sep, value = item.partition("=")
        if not sep:
            raise FusionkitError(f"--set expects key=value, got {item!r}")
        options[key] = load_yaml(value)
    path = build_dataset(args.dataset, options, args.out, overwrite=args.overwrite)
    print(f"store written to {path}")
    return 0


def _cmd_data_options(args: argparse.Namespace) -> int:
    from fusionkit.config import describe_options
    from fusionkit.plugins import get_registry

    registry = get_registry()
    names = [args.dataset] if args.dataset else registry.names("dataset")
    for name in names:
        reg = registry.get("dataset", name)
        print(f"{name}: {reg.description}")
        for line in describe_options(reg.config):
            print(f"  {line}")
    return 0


def _cmd_data_info(args: argparse.Namespace) -> int:
    import collections

    from fusionkit.data.store import open_store

    store = open_store(args.store)
    blends = sum(1 for s in store.samples if s.labels and len(s.labels) == 2)
    print(f"{store.path}: {len(store)} samples ({int(store.labelled.sum())} labelled, {blends} blends), "
          f"labels {list(store.labels)}")
    print(f"  folds {dict(sorted(collections.Counter(store.folds.tolist()).items()))}, "
          f"domains {dict(collections.Counter(store.domains.tolist()))}, groups {len(set(store.groups.tolist()))}")
    for name, feats in store.encoders.items():
        kind = "sequences" if feats.is_sequence else "vectors"
        print(f"  {name}: {kind}, dim {feats.dim}, missing for {int((~feats.available).sum())} samples")
        made = store.provenance.get(name)
        if made:
            print(f"    extracted by {made.get('type')} {made.get('model')!r} ({made.get('distribution')} "
                  f"{made.get('version')}), weights sha256 {str(made.get('weights_sha256'))[:16]}…")
    return 0


def add_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("extract", help="run a spec's live encoders over raw data into a feature store")
    p.add_argument("spec", metavar="SPEC")
    p.add_argument("--data", required=True, metavar="MANIFEST", help="raw manifest (.csv/.jsonl; see docs/live-encoders.md)")
    p.add_argument("--out", required=True, metavar="STORE", help="feature store to write (new, empty, or with "
                   "--overwrite a fusionkit store); an interrupted extraction resumes when run again")
    p.add_argument("--batch-size", type=int, default=32, metavar="N", help="samples per forward pass (default 32)")
    p.add_argument("--shard-batches", type=int, default=8, metavar="N", help="batches per shard: the unit a killed "
                   "extraction resumes from, and that torchrun ranks share out (default 8)")
    add_device(p, default="auto")
    p.add_argument("--workers", type=int, default=2, metavar="N", help="data-loader processes reading and "
                   "preprocessing the files (default 2; 0: in this process)")
    p.add_argument("--overwrite", action="store_true", help="replace the fusionkit store already in --out")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    add_confine(p)
    p.set_defaults(func=_cmd_extract)

    data = sub.add_parser("data", help="build or inspect feature stores").add_subparsers(
        dest="data_command", metavar="ACTION", required=True)
    p = data.add_parser("build", help="build a registered dataset into a store",
                        epilog="Each dataset's options, with types and defaults: fusionkit data options [DATASET]")
    p.add_argument("dataset", metavar="DATASET", help="e.g. uci-mfeat, blemore, synthetic")
    p.add_argument("--out", required=True, metavar="STORE")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="a dataset option (YAML value); repeatable; "
                   "see `fusionkit data options DATASET`")
    p.add_argument("--overwrite", action="store_true", help="replace an existing store (only a fusionkit store or "
                   "an empty directory)")
    p.set_defaults(func=_cmd_data_build)
    p = data.add_parser("options", help="list datasets' options with types, defaults and descriptions")
    p.add_argument("dataset", nargs="?", metavar="DATASET", help="one dataset (default: all)")
    p.set_defaults(func=_cmd_data_options)
    p = data.add_parser("info", help="describe a store")
    p.add_argument("store", metavar="STORE")
    p.set_defaults(func=_cmd_data_info)
