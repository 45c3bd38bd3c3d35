"""Extraction (fusionkit.data.extract): shards that are checked on resume, and one writer at a time."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from test_live import IMG, raw_images, spec_with  # noqa: F401 - the fixture is used by name

from fusionkit.errors import DataError

# --- extraction shards and one writer ------------------------------------------------------------


class Killed(Exception):
    pass


def _interrupted_extraction(raw_images, monkeypatch, shards_written: int = 1, shard_batches: int = 1) -> Path:
    import fusionkit.data.extract as extract_module

    real = extract_module._write_shard
    calls = []

    def write_then_die(*args):
        if len(calls) == shards_written:
            raise Killed()
        calls.append(1)
        real(*args)

    monkeypatch.setattr(extract_module, "_write_shard", write_then_die)
    with pytest.raises(Killed):
        extract_module.extract(spec_with(IMG), raw_images / "manifest.csv", raw_images / "out", batch_size=4,
                               shard_batches=shard_batches, workers=0, progress=False)
    monkeypatch.undo()
    return raw_images / "out.partial"


def test_a_truncated_shard_is_refused_by_name(raw_images, monkeypatch):
    """a truncated shard gave a raw traceback when the store was assembled."""
    from fusionkit.data.extract import extract

    partial = _interrupted_extraction(raw_images, monkeypatch)
    shard = partial / "shard-00000.safetensors"
    shard.write_bytes(shard.read_bytes()[:100])
    with pytest.raises(DataError, match=r"shard-00000.safetensors: unreadable or incomplete shard .*remove .*"
                                        r"shard-00000.safetensors and run the same command again"):
        extract(spec_with(IMG), raw_images / "manifest.csv", raw_images / "out", batch_size=4, shard_batches=1,
                workers=0, progress=False)
    assert not (raw_images / "out").exists()


def test_a_shard_copied_over_another_is_refused(raw_images, monkeypatch):
    """a shard copied over another gave a silently wrong store; each shard's ids are now checked."""
    from fusionkit.data.extract import extract

    partial = _interrupted_extraction(raw_images, monkeypatch, shards_written=2)
    (partial / "shard-00001.safetensors").write_bytes((partial / "shard-00000.safetensors").read_bytes())
    with pytest.raises(DataError, match=r"shard-00001.safetensors: holds other samples than shard 1"):
        extract(spec_with(IMG), raw_images / "manifest.csv", raw_images / "out", batch_size=4, shard_batches=1,
                workers=0, progress=False)
    (partial / "shard-00001.safetensors").unlink()  # as the message says: the next run extracts it again
    store = extract(spec_with(IMG), raw_images / "manifest.csv", raw_images / "out", batch_size=4, shard_batches=1,
                    workers=0, progress=False)
    from fusionkit.data.store import open_store

    assert open_store(store).ids == [f"s{i:02d}" for i in range(24)]


def test_an_empty_leftover_partial_folder_does_not_block(raw_images):
    """an empty, unmarked OUT.partial (what a lost race used to leave) is replaced, not refused."""
    from fusionkit.data.extract import extract

    (raw_images / "out.partial").mkdir()
    extract(spec_with(IMG), raw_images / "manifest.csv", raw_images / "out", batch_size=8, workers=0, progress=False)
    assert (raw_images / "out" / "index.json").exists() and not (raw_images / "out.partial").exists()


def test_a_held_extraction_lock_is_refused_with_a_clear_error(raw_images, monkeypatch):
    """the second writer is refused at once, and the first one's partial folder is untouched."""
    from fusionkit.files import exclusive_lock

    partial = _interrupted_extraction(raw_images, monkeypatch, shards_written=0, shard_batches=8)  # the CLI's default
    before = sorted(p.name for p in partial.iterdir())
    with exclusive_lock(partial, "extraction", "(held by this test)"):
        child = subprocess.run(
            [sys.executable, "-m", "fusionkit", "extract", str(_spec_file(raw_images)), "--data", str(raw_images / "manifest.csv"), "--out",
             str(raw_images / "out"), "--quiet", "--workers", "0", "--batch-size", "4"],
            capture_output=True, text=True, timeout=300)
    assert child.returncode == 2
    assert "another fusionkit process is writing this extraction" in child.stderr
    assert sorted(p.name for p in partial.iterdir()) == before


def _spec_file(root: Path) -> Path:
    spec = root / "spec.json"
    spec.write_text(json.dumps(spec_with(IMG)))
    return spec
