"""Reading text tables written by people (CSV files, and the text files behind them): one reader for every loader.

What each loader gets, and what it may rely on:

- UTF-8 text, with or without Excel's byte-order mark; anything else is a :class:`DataError` naming the file and the
  byte, never a ``UnicodeDecodeError``.
- Rows parsed by the csv module itself, so quoted commas and line breaks stay in their cell; cells up to
  :data:`MAX_CSV_CELL` characters (the csv module's own limit is 128 KiB).
- A header that names each column once (a second ``fold`` column would silently win), and rows with exactly as many
  cells as the header; each row keeps the line it ended on, for errors.
"""

from __future__ import annotations

import csv
import io
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fusionkit.errors import DataError

__all__ = ["MAX_CSV_CELL", "MANIFEST_SUFFIXES", "read_text", "read_csv", "is_manifest", "manifest_is_the_data",
           "manifest_records"]

#: The longest CSV cell read (a text for a text encoder can be long).
MAX_CSV_CELL = 1 << 24


def read_text(path: Path) -> str:
    """The UTF-8 text of ``path`` (a leading byte-order mark dropped, line ends as written)."""
    if not path.is_file():
        raise DataError(f"{path}: not a regular file")
    try:
        with open(path, encoding="utf-8-sig", newline="") as fh:
            return fh.read()
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start}); save it as UTF-8") from None


def read_csv(path: Path, required: Sequence[str] = ()) -> tuple[list[str], list[tuple[int, dict[str, str]]]]:
    """The header of the CSV file ``path`` and its rows as (line, {column: cell}); blank lines are skipped.

    Raises :class:`DataError` naming the file (and line) for text that is not UTF-8, CSV the csv module cannot
    parse, a missing ``required`` column, a column named twice, or a row of another length than the header."""
    text = read_text(path)
    limit = csv.field_size_limit()
    csv.field_size_limit(max(limit, MAX_CSV_CELL))
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        header = next(reader, None) or []
        missing = [c for c in required if c not in header]
        if missing:
            raise DataError(f"{path}: the first line must be a header with the column(s) {list(required)}; "
                            f"no {missing[0]!r} among {header[:20]}")
        duplicated = sorted({name for name in header if header.count(name) > 1})
        if duplicated:
            raise DataError(f"{path}: the header names column(s) {duplicated} more than once; name each column once")
        rows = []
        for row in reader:
            if not row:
                continue
            if len(row) != len(header):
                raise DataError(
                    f"{path}:{reader.line_num}: {len(row)} cells where the header has {len(header)} "
                    f"({', '.join(header)[:300]}); quote a cell that holds a comma or a line break (\"a, b\")")
            rows.append((reader.line_num, dict(zip(header, row))))
        return header, rows
    except csv.Error as exc:
        raise DataError(f"{path}:{reader.line_num}: not valid CSV ({exc})") from None
    finally:
        csv.field_size_limit(limit)

#: The suffixes of a raw manifest's file (docs/live-encoders.md).
MANIFEST_SUFFIXES = (".csv", ".jsonl")


def is_manifest(path: str | os.PathLike) -> bool:
    """Whether ``path`` names a manifest file (rather than a feature store folder)."""
    return Path(path).suffix.lower() in MANIFEST_SUFFIXES and not Path(path).is_dir()


def manifest_is_the_data(data: str | os.PathLike, raw: str | os.PathLike | None, stored: Sequence[str]) -> bool:
    """Whether ``data`` is a manifest standing for the whole data (every encoder live), rather than a feature store
    that ``raw`` completes: a manifest as the data with ``raw`` beside it, or with encoders that read ``stored``
    features, is refused, saying what to give instead (``fusionkit train`` and the runtime read data alike)."""
    if not is_manifest(data):
        return False
    if raw is not None:
        raise DataError(f"{data}: the data is already a manifest; --raw adds a manifest to a feature store")
    if stored:
        raise DataError(f"{data}: encoder(s) {list(stored)} read stored features: give a feature store as the data "
                        f"and the manifest as --raw {data}")
    return True


def manifest_records(path: Path) -> list[dict[str, Any]]:
    """The records of a raw manifest (docs/live-encoders.md), a ``.csv`` or ``.jsonl`` file, as dicts, before any
    meaning is given to their columns: what :func:`fusionkit.data.raw.read_manifest` and the runtime without torch
    both read. Errors name the file (and the line of a JSONL file)."""
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        records = _jsonl_records(path)
    elif suffix == ".csv":
        records = _csv_records(path)
    else:
        raise DataError(f"{path}: a manifest is a .csv or .jsonl file")
    if not records:
        raise DataError(f"{path}: no samples")
    return records


def _jsonl_records(path: Path) -> list[dict[str, Any]]:
    records = []
    for n, line in enumerate(read_text(path).splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}:{n}: not a JSON object ({exc})") from None
        if not isinstance(rec, dict):
            raise DataError(f"{path}:{n}: each line must be a JSON object, found {type(rec).__name__}")
        records.append(rec)
    return records


def _csv_records(path: Path) -> list[dict[str, Any]]:
    """Rows of a CSV manifest (:func:`fusionkit.data.tables.read_csv`: quoted line breaks kept, rows of another
    length and columns named twice refused)."""
    header, rows = read_csv(path)
    if not header or "id" not in header:
        raise DataError(f"{path}: the first line must be a header with an 'id' column, found {header[:20]}")
    return [_csv_record(row) for _, row in rows]


def _csv_record(row: dict[str, str]) -> dict[str, Any]:
    rec: dict[str, Any] = dict(row)
    if rec.get("fold", "") in ("", None):
        rec.pop("fold", None)
    else:
        try:
            rec["fold"] = int(rec["fold"])
        except ValueError:
            pass  # reported by the record check, with the sample id
    for key in ("group", "domain"):
        if rec.get(key) == "":
            rec.pop(key)
    return rec
