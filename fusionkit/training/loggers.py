"""Run loggers: where each epoch's record goes besides ``log.jsonl`` (which stays the source of truth for resume).

``train.log_to`` names them; :data:`LOGGERS` holds the built-in ones. A logger sees every epoch's record as it is
logged (losses, every objective term, learning rate, validation metrics, and the training diagnostics under
``train``: how many encoders each sample used, how often each encoder was kept, a two-tower model's logit scale).
An embedder can pass its own :class:`RunLogger` objects to :class:`fusionkit.training.train.Trainer`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from fusionkit.errors import FusionkitError

__all__ = ["RunLogger", "TensorBoardLogger", "LOGGERS", "TENSORBOARD_DIR", "make_loggers", "flatten"]

TENSORBOARD_DIR = "tensorboard"


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
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as exc:
            raise FusionkitError("train.log_to: tensorboard needs the tensorboard package: "
                                 "pip install 'fusionkit[tensorboard]'") from exc
        # purge_step: on a resume, events of the epochs being redone are dropped, as log.jsonl drops their lines
        self.writer = SummaryWriter(str(run_dir / TENSORBOARD_DIR), purge_step=first_epoch or None)

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
