"""Challenge submissions: ``FILE.json`` (``{"predictions": {id: answer}}``) and ``FILE.zip`` holding it, written
so that nothing a user wrote is ever replaced.

A zip that fusionkit wrote says so in its comment, with the SHA-256 of the JSON written beside it and of the one that
JSON replaced: an existing zip is replaced only when its comment marks it as fusionkit's, and an existing JSON only
when that comment vouches for it. The zip is written first, so a crash between the two writes leaves a pair the next
write still recognises. ``fusionkit predict`` and the runtime without torch (``fusionkit-runtime``) both write here.
"""

from __future__ import annotations

import hashlib
import json
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from fusionkit.errors import FusionkitError
from fusionkit.files import atomic_write, atomic_write_text, sha256_file

__all__ = ["SUBMISSION_COMMENT", "submission_paths", "check_submission_replaceable", "write_submission"]

#: How a submission zip that fusionkit wrote begins its comment.
SUBMISSION_COMMENT = "fusionkit submission"


def submission_paths(out: Path) -> tuple[Path, Path]:
    """(JSON, zip) paths of a submission from ``--out``: ``sub.json`` or ``sub.zip`` give both."""
    out = Path(out)
    if out.suffix.lower() not in (".json", ".zip"):
        raise FusionkitError(f"--out {out}: name the submission FILE.json or FILE.zip (both are written)")
    return out.with_suffix(".json"), out.with_suffix(".zip")


def _recorded(zip_path: Path) -> list[str] | None:
    """The JSON hashes a submission zip's comment records, or None when fusionkit did not write the zip."""
    try:
        with zipfile.ZipFile(zip_path) as zf:
            words = zf.comment.decode("ascii").split()
    except (OSError, ValueError, zipfile.BadZipFile):
        return None
    head = SUBMISSION_COMMENT.split()
    return words[len(head):] if words[:len(head)] == head else None


def check_submission_replaceable(json_path: Path, zip_path: Path) -> str:
    """Raise unless both files may be written: absent, or the pair fusionkit wrote. Returns the SHA-256 of the JSON
    about to be replaced ("none" when there is none), which the new zip's comment records."""
    for path in (json_path, zip_path):
        if path.is_symlink() or path.is_dir() or (path.exists() and not path.is_file()):
            raise FusionkitError(f"{path}: is not a regular file; --out names a submission file (FILE.json or "
                                 "FILE.zip). Not replaced.")
    recorded = _recorded(zip_path) if zip_path.exists() else []
    if recorded is None:
        raise FusionkitError(f"{zip_path}: exists and is not a submission zip written by fusionkit; not overwritten. "
                             "Choose another --out or move the file away.")
    old = sha256_file(json_path) if json_path.is_file() else "none"
    if json_path.exists() and old not in recorded:
        raise FusionkitError(f"{json_path}: exists and is not a fusionkit submission (not the JSON fusionkit wrote "
                             f"beside {zip_path.name}); not overwritten. Choose another --out or move the file away.")
    return old


def write_submission(out: Path, predictions: Mapping[str, Any]) -> tuple[Path, Path]:
    """Write ``predictions`` (sample id -> answer) as ``FILE.json`` and ``FILE.zip``; returns both paths. Call
    :func:`check_submission_replaceable` first (before any long work) to fail early; it is checked again here."""
    json_path, zip_path = submission_paths(out)
    replaced = check_submission_replaceable(json_path, zip_path)
    text = json.dumps({"predictions": dict(predictions)}, indent=1) + "\n"
    digest = hashlib.sha256(text.encode("utf-8")).hexdigest()

    def write_zip(tmp: Path) -> None:
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED) as zf:
            zf.comment = f"{SUBMISSION_COMMENT} {digest} {replaced}".encode("ascii")
            zf.writestr(json_path.name, text)

    # the zip first: until the JSON follows, its comment still vouches for the JSON it replaces
    atomic_write(zip_path, write_zip)
    atomic_write_text(json_path, text)
    return json_path, zip_path
