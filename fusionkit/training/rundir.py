"""A run directory: one writer at a time, crash recovery, and the record of what a run is.

``RUN/run.json`` names the format (so fusionkit knows the directory is its own), what the
run trains on (store path and fingerprint, folds, target store), its status (running,
interrupted, failed, finished) and the torch thread count. While a run writes, it holds an
exclusive lock on ``RUN/.fusionkit.lock``; the operating system releases it when the
process ends, however it ends, so a crashed run never leaves a lock that blocks the next.

At every start :meth:`RunDirectory.recover` repairs what a kill can leave: a checkpoint
caught between the two renames of its swap is put back, and temporary files and
directories are removed.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from fusionkit.checkpoint import WEIGHTS_FILE
from fusionkit.errors import CheckpointError, DataError, FusionkitError, FusionkitWarning
from fusionkit.files import (
    LOCK_FILE,
    LockedError,
    atomic_write_text,
    describe_contents,
    exclusive_lock,
    is_temporary,
    json_marker,
    recover_directory,
    remove_temporaries,
    sha256_file,
)

__all__ = ["RUN_FILE", "LOG_FILE", "METRICS_FILE", "RUN_FORMAT", "CV_FORMAT", "CHECKPOINTS", "RUN_OUTPUTS", "is_run",
           "RunLockedError", "check_trained_store", "RunDirectory", "store_fingerprint", "teacher_fingerprint"]

RUN_FILE = "run.json"
LOG_FILE = "log.jsonl"
METRICS_FILE = "metrics.json"
RUN_FORMAT = "fusionkit-run"
CV_FORMAT = "fusionkit-cv"
CHECKPOINTS = ("last", "best")
#: What a run writes; ``--overwrite`` removes these and nothing else.
RUN_OUTPUTS = (RUN_FILE, LOG_FILE, METRICS_FILE, "spec.yaml", "cv.json", "last", "best", "report", "tensorboard",
               "predictions_*.json", "evaluation_*.json", "budget_curve_*.json", "fold[0-9]*")

is_run = json_marker(RUN_FILE, "format", (RUN_FORMAT, CV_FORMAT))


class RunLockedError(LockedError):
    """Another process is writing to the run directory."""


class RunDirectory:
    """One run's directory. Use :meth:`locked` around everything that writes to it."""

    def __init__(self, path: str | os.PathLike, fmt: str = RUN_FORMAT) -> None:
        self.path = Path(path)
        self.format = fmt

    # --- ownership and locking -------------------------------------------------------------

    def check_owned(self, *, resume: bool, overwrite: bool) -> None:
        """Refuse to write into a directory that is not an empty one or a fusionkit run."""
        if self.path.is_symlink() or (self.path.exists() and not self.path.is_dir()):
            raise FusionkitError(f"{self.path}: exists and is not a directory; choose another --out")
        if not self.path.exists() or not self._user_entries():
            return
        if not is_run(self.path):
            raise FusionkitError(
                f"{self.path}: not a fusionkit run directory (no {RUN_FILE}), and it holds "
                f"{describe_contents(self.path)}; nothing there is touched. Choose an empty or new --out."
            )
        if not resume and not overwrite:
            status = self.read().get("status", "unknown")
            raise FusionkitError(
                f"{self.path}: already holds a run (status: {status}). Continue it with --resume, replace it with "
                "--overwrite, or choose another --out."
            )

    def _user_entries(self) -> list[Path]:
        return [p for p in self.path.iterdir() if p.name != LOCK_FILE and not is_temporary(p)]

    @contextlib.contextmanager
    def locked(self) -> Iterator[RunDirectory]:
        """Hold the run's exclusive lock; a second writer gets :class:`RunLockedError` at once."""
        self.path.mkdir(parents=True, exist_ok=True)
        try:
            with exclusive_lock(self.path, "run", "Wait for it to end, stop it, or choose another --out."):
                yield self
        except LockedError as exc:
            raise RunLockedError(str(exc)) from None

    # --- recovery and replacement ------------------------------------------------------------

    def recover(self) -> None:
        """Repair what a kill can leave: half-swapped checkpoints back in place, temporaries removed."""
        for name in CHECKPOINTS:
            recover_directory(self.path / name)
        remove_temporaries(self.path)

    def clear(self) -> None:
        """Remove a previous run's outputs (``--overwrite``); other files are left alone."""
        for pattern in RUN_OUTPUTS:
            for entry in self.path.glob(pattern):
                if entry.is_dir() and not entry.is_symlink():
                    shutil.rmtree(entry)
                else:
                    entry.unlink()

    # --- run.json -------------------------------------------------------------------------------

    def read(self) -> dict[str, Any]:
        path = self.path / RUN_FILE
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return {}
        except (ValueError, OSError) as exc:
            raise CheckpointError(f"{path}: unreadable ({exc}); the run directory is damaged") from None
        return data if isinstance(data, dict) else {}

    def start(self, info: dict[str, Any]) -> None:
        atomic_write_text(self.path / RUN_FILE, json.dumps({"format": self.format, **info, "status": "running"},
                                                           indent=2) + "\n")

    def update(self, **changes: Any) -> None:
        if not (self.path / RUN_FILE).exists():
            return
        run = self.read()
        run.update(changes)
        atomic_write_text(self.path / RUN_FILE, json.dumps(run, indent=2) + "\n")

    def check_same_run(self, identity: dict[str, Any]) -> None:
        """Refuse to resume with other data, folds or target than the run was started with."""
        recorded = self.read()
        labels = {"data": "--data", "data_fingerprint": "--data (its contents)", "raw_fingerprint": "--raw (its contents)",
                  "test_fold": "--fold",
                  "val_fold": "the validation fold", "target": "--target",
                  "teacher_sha256": "distill.teacher (the SHA-256 of its weights: it was retrained or replaced)"}
        diffs = [f"{labels.get(k, k)}: the run used {recorded.get(k)!r}, now {v!r}"
                 for k, v in identity.items() if k in recorded and recorded[k] != v and k != "data"]
        if recorded.get("data_fingerprint") == identity.get("data_fingerprint"):
            diffs = [d for d in diffs if not d.startswith("--data")]  # the same store, moved: fine
        elif recorded.get("data") != identity.get("data"):
            diffs.insert(0, f"--data: the run used {recorded.get('data')!r}, now {identity.get('data')!r}")
        if diffs:
            raise CheckpointError(f"{self.path}: --resume must continue the same run, but " + "; ".join(diffs) +
                                  ". Resume with the original options, or start a new run.")

    def note_threads(self, threads: int) -> None:
        recorded = self.read().get("torch_threads")
        if recorded is not None and recorded != threads:
            warnings.warn(
                f"{self.path}: the run was started with {recorded} torch threads, it resumes with {threads}; results "
                "are bitwise reproducible only at one thread count (set OMP_NUM_THREADS or torch.set_num_threads).",
                FusionkitWarning, stacklevel=3,
            )

    def note_device(self, device: str) -> None:
        recorded = self.read().get("device")
        if recorded is not None and recorded != device:
            warnings.warn(
                f"{self.path}: the run was started on {recorded}, it resumes on {device}; training continues from the "
                "checkpoint, but results are no longer bit-identical to an uninterrupted run on one device.",
                FusionkitWarning, stacklevel=3)

    # --- the log ----------------------------------------------------------------------------------

    def append_log(self, record: dict[str, Any]) -> None:
        with open(self.path / LOG_FILE, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(record) + "\n")
            fh.flush()
            os.fsync(fh.fileno())

    def truncate_log(self, epoch: int) -> None:
        """Keep the log records of the epochs before ``epoch``, those the checkpoint has seen.

        The log line of an epoch is written before its checkpoint, so after a kill the log holds
        at most one epoch more than the checkpoint; a torn last line is dropped too.
        """
        path = self.path / LOG_FILE
        if not path.exists():
            return
        kept = [line for line, record in self._epoch_lines() if record["epoch"] < epoch]
        atomic_write_text(path, "".join(line + "\n" for line in kept))

    def records(self, before: int) -> list[dict[str, Any]]:
        """The epoch records of the log for the epochs before ``before`` (a torn line is skipped)."""
        return [record for _, record in self._epoch_lines() if record["epoch"] < before]

    def _epoch_lines(self) -> Iterator[tuple[str, dict[str, Any]]]:
        path = self.path / LOG_FILE
        if not path.exists():
            return
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if isinstance(record, dict) and isinstance(record.get("epoch"), int):
                yield line, record

    def log(self) -> list[dict[str, Any]]:
        path = self.path / LOG_FILE
        return [json.loads(x) for x in path.read_text(encoding="utf-8").splitlines()] if path.exists() else []


def store_fingerprint(root: Path) -> str:
    """SHA-256 of a store's index and the sizes of its feature files: cheap, and changes when the store does.
    For a raw manifest (a file), the SHA-256 of the file."""
    if root.is_file():
        return sha256_file(root)
    digest = hashlib.sha256((root / "index.json").read_bytes())
    for file in sorted(root.glob("*.safetensors")):
        digest.update(f"{file.name}:{file.stat().st_size}".encode())
    return digest.hexdigest()


def check_trained_store(run: Path, info: dict[str, Any], store: Any, why: str) -> None:
    """Refuse a store (a :class:`fusionkit.data.store.FeatureStore`) other than the one the run ``run`` (its
    ``run.json`` read as ``info``) trained on; ``why`` says what would go wrong on another one."""
    here = store_fingerprint(store.path)
    if info.get("data_fingerprint") not in (None, here):
        raise DataError(f"{run}: trained on other data than {store.path} (the store's contents differ from "
                        f"{info.get('data')!r}, which it trained on: another store, or its folds were reassigned); "
                        f"{why}. Give the store the run was trained on")
    raw = store.raw.fingerprint() if store.raw is not None and store.raw.path != store.path else None
    if raw is not None and info.get("raw_fingerprint") not in (None, raw):
        raise DataError(f"{run}: trained with another raw manifest than {store.raw.path}; {why}. Give the one it "
                        "trained with")


def teacher_fingerprint(teacher: str | os.PathLike) -> str | None:
    """SHA-256 of a distillation teacher's weights file (None when it is missing: loading it reports that)."""
    try:
        return sha256_file(Path(teacher) / WEIGHTS_FILE)
    except OSError:
        return None


def run_info(run: Path) -> dict[str, Any]:
    """A run's ``run.json``, checked to be a fusionkit run's or cross-validation's."""
    path = run / RUN_FILE
    if not path.is_file():
        raise CheckpointError(f"{run}: not a fusionkit run directory (no {RUN_FILE})")
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, OSError) as exc:
        raise CheckpointError(f"{path}: unreadable ({type(exc).__name__}: {exc}); the run directory is damaged") from None
    if not isinstance(info, dict) or info.get("format") not in (RUN_FORMAT, CV_FORMAT):
        raise CheckpointError(f"{path}: not a fusionkit run record (its format is not {RUN_FORMAT} or {CV_FORMAT})")
    return info
