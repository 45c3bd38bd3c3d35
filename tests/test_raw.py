"""Raw manifests (fusionkit.data.raw): the CSV reader, domains, duplicates, which paths are read, and decoders that
fail: a bad manifest gets one clear error naming its row."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np
import pytest
from test_live import IMG, raw_images, spec_with  # noqa: F401 - the fixture is used by name

from fusionkit.data.raw import read_manifest
from fusionkit.errors import DataError

LABELS = ["a", "b"]


def write(path: Path, text: str, encoding: str = "utf-8") -> Path:
    path.write_bytes(text.encode(encoding))
    return path


# --- the CSV reader -------------------------------------------------------------------------------


def test_a_quoted_line_break_and_comma_stay_in_their_cell(tmp_path):
    """the csv module parses the file itself, so a quoted newline is not dropped."""
    manifest = read_manifest(write(tmp_path / "m.csv", 'id,labels,text\ns1,a,"hello\nworld"\ns2,b,"x, y"\n'), LABELS)
    assert manifest.columns["text"] == ["hello\nworld", "x, y"]


@pytest.mark.parametrize("row, message", [
    ("s2,b,hello, world and more", r"m.csv:3: 4 cells where the header has 3"),
    ("s2,b", r"m.csv:3: 2 cells where the header has 3"),
])
def test_a_row_with_extra_or_missing_cells_is_refused_by_line(tmp_path, row, message):
    """an unquoted comma no longer truncates the cell to 'hello'."""
    with pytest.raises(DataError, match=message):
        read_manifest(write(tmp_path / "m.csv", f"id,labels,text\ns1,a,x\n{row}\n"), LABELS)


@pytest.mark.parametrize("header", ["id,labels,text,text", "id,id,labels,text"])
def test_a_duplicate_header_name_is_refused(tmp_path, header):
    """a duplicate column (a duplicate id included) was last-wins."""
    cells = ",".join(["s1", "a", "x", "y"][: len(header.split(","))])
    with pytest.raises(DataError, match=r"names column\(s\) \['(text|id)'\] more than once"):
        read_manifest(write(tmp_path / "m.csv", f"{header}\n{cells}\n"), LABELS)


def test_a_utf8_byte_order_mark_is_accepted(tmp_path):
    """Excel's "CSV UTF-8" starts with a BOM; the first column was read as '\\ufeffid'."""
    manifest = read_manifest(write(tmp_path / "m.csv", "id,labels,text\ns1,a,x\n", "utf-8-sig"), LABELS)
    assert manifest.ids == ["s1"]


def test_a_cell_over_128_kb_is_read(tmp_path):
    """the csv module's 128 KiB cell limit gave a raw _csv.Error."""
    long = "word " * 40_000
    manifest = read_manifest(write(tmp_path / "m.csv", f"id,labels,text\ns1,a,{long}\n"), LABELS)
    assert manifest.columns["text"] == [long]
    import csv

    assert csv.field_size_limit() == 131072  # the process-wide limit is left as it was


# --- domains ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".csv", ".jsonl"])
def test_a_domain_typo_is_refused_naming_the_row(tmp_path, suffix):
    """'domain: Source' silently removed its rows from training."""
    if suffix == ".csv":
        path = write(tmp_path / "m.csv", "id,labels,domain,text\ns1,a,source,x\ns2,b,Source,y\n")
    else:
        path = write(tmp_path / "m.jsonl", '{"id": "s1", "labels": "a", "text": "x"}\n'
                                           '{"id": "s2", "labels": "b", "domain": "Source", "text": "y"}\n')
    with pytest.raises(DataError, match=r"sample 's2' \(record #1\): domain 'Source' is not one of \['source', 'target'\]"):
        read_manifest(path, LABELS)


def test_a_store_index_with_an_unknown_domain_is_refused(tmp_path):
    """Stores: the same check guards the index that write_store and open_store read."""
    from fusionkit.data.store import Sample, write_store

    with pytest.raises(DataError, match="domain 'tgt' is not one of"):
        write_store(tmp_path / "s", LABELS, [Sample(id="x", domain="tgt")], {"f": np.zeros((1, 2), np.float32)})


# --- linear duplicate check --------------------------------------------------------------------------


def test_a_large_manifest_with_one_duplicate_is_rejected_quickly(tmp_path):
    """100k rows with one duplicate took 133 s (quadratic; 50k rows: about 33 s). Measured against a clean read of
    the same file in the same process, so the test holds on any machine: the rejection costs about as much as the
    read."""
    rows = [f"s{i},a,t{i}" for i in range(50_000)]
    clean = write(tmp_path / "clean.csv", "id,labels,text\n" + "\n".join(rows) + "\n")
    started = time.perf_counter()
    read_manifest(clean, LABELS)
    read_time = time.perf_counter() - started
    dup = write(tmp_path / "dup.csv", "id,labels,text\n" + "\n".join(rows + ["s7,a,again"]) + "\n")
    started = time.perf_counter()
    with pytest.raises(DataError, match=r"duplicate sample ids \['s7'\] \(1 in all\)"):
        read_manifest(dup, LABELS)
    assert time.perf_counter() - started < 3 * read_time + 1.0


# --- the path rule: which paths are read ----------------------------------------------------------


def test_a_fifo_is_refused_not_opened(raw_images):
    """a FIFO named x.png hung extract and train forever; only regular files and folders are read."""
    from fusionkit.data.extract import extract

    fifo = raw_images / "img" / "s05.png"
    fifo.unlink()
    os.mkfifo(fifo)
    with pytest.raises(DataError, match=r"sample 's05' \(.*s05.png: not a regular file or a folder\)"):
        extract(spec_with(IMG), raw_images / "manifest.csv", raw_images / "out", batch_size=4, workers=0,
                progress=False)
    assert not (raw_images / "out").exists()


def test_confine_refuses_paths_that_resolve_outside(raw_images, tmp_path_factory):
    """Paths: '..', absolute paths and symlinks out of the folder are read by default, refused under --confine."""
    from fusionkit.models.factory import build_model

    outside = tmp_path_factory.mktemp("elsewhere") / "x.png"
    (raw_images / "img" / "s03.png").rename(outside)
    (raw_images / "img" / "s03.png").symlink_to(outside)
    encoders = build_model(spec_with(IMG)).live_encoders()
    read_manifest(raw_images / "manifest.csv", LABELS).check_encoders(encoders)  # allowed without --confine
    confined = read_manifest(raw_images / "manifest.csv", LABELS, confine=raw_images)
    with pytest.raises(DataError, match=r"1 unusable input path.*'s03' .*resolves outside --confine"):
        confined.check_encoders(encoders)


def test_confine_from_the_command_line(raw_images, tmp_path_factory, capsys):
    from fusionkit.cli import main

    outside = tmp_path_factory.mktemp("elsewhere2") / "x.png"
    (raw_images / "img" / "s03.png").rename(outside)
    text = (raw_images / "manifest.csv").read_text().replace("img/s03.png", str(outside))
    (raw_images / "manifest.csv").write_text(text)
    spec = raw_images / "spec.json"
    spec.write_text(json.dumps(spec_with(IMG)))
    code = main(["extract", str(spec), "--data", str(raw_images / "manifest.csv"), "--out", str(raw_images / "out"),
                 "--quiet", "--workers", "0", "--confine", str(raw_images)])
    assert code == 2 and "resolves outside --confine" in capsys.readouterr().err
    assert not (raw_images / "out").exists()


# --- decoders that raise something else ----------------------------------------------------------------


def test_a_decompression_bomb_is_a_clear_error(raw_images):
    """a PNG claiming 20000x20000 gave a raw DecompressionBombError traceback."""
    import struct
    import zlib

    from fusionkit.data.extract import extract

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", 20000, 20000, 8, 0, 0, 0, 0)
    (raw_images / "img" / "s02.png").write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IEND", b""))
    with pytest.raises(DataError, match=r"sample 's02': encoder 'img' cannot read 'img/s02.png' \(DecompressionBombError"):
        extract(spec_with(IMG), raw_images / "manifest.csv", raw_images / "out", batch_size=4, workers=0,
                progress=False)
