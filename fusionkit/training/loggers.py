"""Run loggers: where each epoch's record goes besides ``log.jsonl`` (which stays the source of truth for resume).

``train.log_to`` names them; :data:`LOGGERS` holds the built-in ones. A logger sees every epoch's record as it is
logged (losses, every objective term, learning rate, validation metrics, and the training diagnostics under
``train``: how many encoders each sample used, how often each encoder was kept, a two-tower model's logit scale).
An embedder can pass its own :class:`RunLogger` objects to :class:`fusionkit.training.train.Trainer`.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from fusionkit.errors import FusionkitError
from fusionkit.training.rundir import RunDirectory

__all__ = ["RunLogger", "TensorBoardLogger", "LOGGERS", "TENSORBOARD_DIR", "make_loggers", "flatten"]

TENSORBOARD_DIR = "tensorboard"
#: The event files TensorBoard's writer makes (the only files this logger ever removes).
EVENTS_GLOB = "events.out.tfevents.*"


class RunLogger:
    """Receives each epoch's record on rank 0. ``start(run_dir, first_epoch)``: before the first epoch of this call
    (``first_epoch`` > 0 on a resume: records of that epoch and later, from the run that was killed, are stale);
    ``log(epoch, record)`` after each epoch; ``close()`` at the end, also after an error."""

    def start(self, run_dir: Path, first_epoch: int) -> None:
        pass

    def log(self, epoch: int, record: Mapping[str, Any]) -> None:
        pass

    def close(self) -> None:
        pass


def flatten(record: Mapping[str, Any], prefix: str = "") -> dict[str, float]:
    """The numbers of a nested record as ``a/b/c`` tags (None and non-numbers left out)."""
    out: dict[str, float] = {}
    for key, value in record.items():
        tag = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flatten(value, tag + "/"))
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            out[tag] = float(value)
    return out


class TensorBoardLogger(RunLogger):
    """TensorBoard event files under ``RUN/tensorboard``: every number of the record as a scalar (``loss``,
    ``distill_vrd``, ``val/score``, ``train/keep_rate/<encoder>``, ...) and, for fusion models, the histogram of how
    many encoders the training samples used."""

    def __init__(self) -> None:
        self.writer: Any = None

    def start(self, run_dir: Path, first_epoch: int) -> None:
        """Open a new event file; on a resume, write into it the records that ``log.jsonl`` kept (every epoch before
        ``first_epoch``), then remove the earlier event files. The events always equal the log, wherever a kill
        fell (TensorBoard's own purge keeps an epoch twice when the kill came between its record and ``last/``)."""
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as exc:
            raise FusionkitError("train.log_to: tensorboard needs the tensorboard package: "
                                 "pip install 'fusionkit[tensorboard]'") from exc
        folder = run_dir / TENSORBOARD_DIR
        try:
            folder.mkdir(exist_ok=True)
            with tempfile.NamedTemporaryFile(dir=folder, prefix=".probe.tmp-"):
                pass
        except OSError as exc:
            raise FusionkitError(f"{folder}: TensorBoard cannot write its events there ({exc.strerror or exc}); make "
                                 "the folder writable, or leave tensorboard out of train.log_to") from None
        earlier = sorted(folder.glob(EVENTS_GLOB))
        self.writer = SummaryWriter(str(folder))
        for record in RunDirectory(run_dir).records(before=first_epoch):
            self.log(record["epoch"], record)
        self.writer.flush()
        for path in earlier:  # only once the new file holds what they held
            path.unlink(missing_ok=True)

    def log(self, epoch: int, record: Mapping[str, Any]) -> None:
        for tag, value in flatten({k: v for k, v in record.items() if k != "epoch"}).items():
            self.writer.add_scalar(tag, value, epoch)
        used = record.get("train", {}).get("used")
        if used:  # the share of samples that used n encoders -> a histogram of the counts
            counts = {int(n): share for n, share in used.items()}
            total = sum(counts.values()) or 1.0
            ns = sorted(counts)
            mean = sum(n * c for n, c in counts.items()) / total
            self.writer.add_histogram_raw(
                "train/encoders_used", min=ns[0], max=ns[-1], num=total, sum=mean * total,
                sum_squares=sum(n * n * c for n, c in counts.items()), bucket_limits=[n + 0.5 for n in ns],
                bucket_counts=[counts[n] for n in ns], global_step=epoch)
        rates = record.get("train", {}).get("keep_rate")
        if rates:
            import numpy as np

            self.writer.add_histogram("train/keep_rate", np.asarray(list(rates.values()), dtype=np.float64), epoch)
        self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


#: The built-in loggers by the name ``train.log_to`` uses.
LOGGERS: dict[str, Callable[[], RunLogger]] = {"tensorboard": TensorBoardLogger}


def make_loggers(names: list[str] | tuple[str, ...]) -> list[RunLogger]:
    """The loggers ``train.log_to`` names."""
    unknown = [n for n in names if n not in LOGGERS]
    if unknown:
        raise FusionkitError(f"train.log_to: unknown logger(s) {unknown}; known: {sorted(LOGGERS)}")
    return [LOGGERS[n]() for n in names]
