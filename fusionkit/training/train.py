"""Training: folds, standardisation, the epoch loop, early stopping, checkpoints and resume.

A run directory holds::

    RUN/spec.yaml       the resolved spec
    RUN/run.json        what was trained on: store (path, fingerprint), folds, status, torch threads
    RUN/log.jsonl       one line per epoch: losses, learning rate, validation metrics
    RUN/last/           checkpoint of the latest epoch, with optimizer and RNG state (for --resume)
    RUN/best/           the model of the best validation Score, decoder thresholds fitted on validation
    RUN/metrics.json    validation and test metrics of the best model

Folds: with ``fold=K`` fold K is the test fold, fold K+1 (cyclically) validates —
early stopping and decoder thresholds — and the others train. Without a fold the
last fold validates and every other labelled source sample trains.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import os
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import attrs
import numpy as np
import torch
from torch import nn

from fusionkit.checkpoint import save_checkpoint
from fusionkit.conditional.rows import RowShare
from fusionkit.data.open import DataSource
from fusionkit.data.store import FeatureStore
from fusionkit.errors import CheckpointError, DataError, FusionkitError, FusionkitWarning
from fusionkit.files import atomic_write_text
from fusionkit.hardware.devices import device_name, resolve_device
from fusionkit.hardware.distributed import Dist, setup, wrap
from fusionkit.models.factory import build_model, load_checkpoint
from fusionkit.models.fusion import FusionModel, has_batch_norm
from fusionkit.moved import moved_names
from fusionkit.progress import progress_bar
from fusionkit.spec import Spec, dump_spec, load_spec, spec_differences
from fusionkit.training.loggers import RunLogger, make_loggers
from fusionkit.training.objective import ObjectiveTerm, TermFactory
from fusionkit.training.precision import Precision
from fusionkit.training.rundir import CV_FORMAT, METRICS_FILE, RunDirectory, store_fingerprint, teacher_fingerprint
from fusionkit.training.state import LoopState
from fusionkit.training.tasks import task_class, task_for
from fusionkit.training.terms import objective_terms

__all__ = ["Split", "make_split", "Trainer", "prefetch", "train", "cross_validate", "summarize_folds"]

@attrs.define
class _Setup:
    """What a run trains: the model, its further objective terms, their trainable parameters, the optimizer,
    the shuffling generator, the number of steps of the whole run, and (once every rank is ready) the model
    as the loop calls it: in DDP under torchrun, else itself; ``synced``: the parameters whose gradients the
    trainer averages over ranks itself (those outside DDP)."""

    model: FusionModel
    terms: nn.ModuleList
    params: list
    optimizer: torch.optim.Optimizer
    shuffle: torch.Generator
    total_steps: int
    forward: nn.Module | None = None
    synced: list = attrs.Factory(list)


@attrs.frozen
class Split:
    """Sample indices into a store for one run."""

    train: np.ndarray
    val: np.ndarray
    test: np.ndarray
    test_fold: int | None
    val_fold: int | None


def make_split(store: FeatureStore, fold: int | None, train_fraction: float = 1.0) -> Split:
    """Group-disjoint train / validation / test indices from the store's folds (labelled source rows only); with
    ``train_fraction`` < 1 the training rows are the first of one fixed shuffle of them (``train.train_fraction``)."""
    labelled = store.select(labelled=True, domain="source")
    folds = sorted(int(f) for f in np.unique(store.folds[labelled]) if f >= 0)
    if len(folds) < 2 or (fold is not None and len(folds) < 3):
        raise DataError(f"{store.path}: needs at least {2 if fold is None else 3} folds among labelled samples, found {folds}")
    if fold is not None and fold not in folds:
        raise DataError(f"--fold {fold}: the store's folds are {folds}")
    test_fold = fold
    val_fold = folds[(folds.index(fold) + 1) % len(folds)] if fold is not None else folds[-1]
    in_fold = store.folds[labelled]
    test = labelled[in_fold == test_fold] if test_fold is not None else labelled[:0]
    val = labelled[in_fold == val_fold]
    train = labelled[(in_fold >= 0) & (in_fold != val_fold) & (in_fold != test_fold if test_fold is not None else True)]
    if train_fraction < 1.0:
        if train_fraction <= 0.0:
            raise DataError("train.train_fraction is 0: no training rows are left; give a share in (0, 1]")
        keep = np.random.default_rng(0).permutation(len(train))[: max(1, round(train_fraction * len(train)))]
        train = train[np.sort(keep)]
    return Split(train, val, test, test_fold, val_fold)


def _lr_factor(step: int, total: int, train) -> float:
    warm = max(1, int(train.warmup_fraction * total))
    if step < warm:
        return (step + 1) / warm
    if train.schedule == "constant":
        return 1.0
    progress = (step - warm) / max(1, total - warm)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


class Trainer:
    """Trains one model on one split and keeps its run directory up to date.

    The epoch loop is built from seams, so that new kinds of training plug in rather than
    branch: the **batch source** (:meth:`batches`), the **task** (the objective's main term,
    the validation score and the final metrics: :mod:`fusionkit.training.tasks`), further objective
    **terms** (adaptation, distillation, ...), and **checkpointing** (a
    :class:`~fusionkit.training.rundir.RunDirectory`).

    ``terms`` are factories ``make(model, store) -> ObjectiveTerm`` (:mod:`fusionkit.training.objective`);
    by default the spec's own (:func:`~fusionkit.training.terms.objective_terms`). A term's
    ``forward(out, rows, progress)`` returns named loss tensors added to the objective, its
    ``on_best(model)`` runs before a best checkpoint; its parameters are trained with the
    model's and its state is checkpointed with it.
    """

    def __init__(self, spec: Spec, store: FeatureStore, out: str | os.PathLike, split: Split, *,
                 progress: bool = True, data_path: str | None = None, terms: Sequence[TermFactory] | None = None,
                 target_store: FeatureStore | None = None, overwrite: bool = False, dist: Dist | None = None,
                 loggers: Sequence[RunLogger] = ()) -> None:
        self.spec = spec
        self.dist = dist or Dist()
        self.store = store
        self.out = Path(out)
        self.split = split
        self.progress = progress
        self.data_path = data_path or str(store.path)
        self.term_factories = list(terms) if terms is not None else objective_terms(spec, target_store, self.dist)
        self.target_store = target_store
        self.overwrite = overwrite
        self.run = RunDirectory(self.out)
        self.loggers = [*make_loggers(spec.train.log_to), *loggers]
        self.device = resolve_device(spec.train.device, "train.device", self.dist.local_rank if self.dist.enabled else None)
        self.precision = Precision(spec.train.precision, self.device)
        self.task = task_for(spec, store, split, target_store, self.dist)
        if len(split.train) == 0:
            raise DataError(f"{store.path}: no training samples in this split")

    @functools.cached_property
    def identity(self) -> dict[str, Any]:
        """What makes this run this run: a resume must match it."""
        raw = self.store.raw
        return {"data": os.path.abspath(self.data_path), "data_fingerprint": store_fingerprint(self.store.path),
                **({"raw_fingerprint": raw.fingerprint()} if raw is not None and raw.path != self.store.path else {}),
                "test_fold": self.split.test_fold, "val_fold": self.split.val_fold,
                "target": None if self.target_store is None else os.path.abspath(self.target_store.path),
                **({"teacher_sha256": teacher_fingerprint(self.spec.distill.teacher)} if self.spec.distill else {})}

    def fit(self, resume: bool = False, stop_after_epochs: int | None = None) -> dict[str, Any]:
        """Train (or continue a killed run); returns the final metrics. ``stop_after_epochs`` simulates a kill.

        A resumed run that had already finished returns its metrics; one that was killed after
        its last epoch (or after early stopping) only finishes what remained.

        Under torchrun every rank calls this; rank 0 alone prepares, locks and writes the run
        directory, and the others wait for it.
        """
        if not self.dist.is_main:
            self.dist.barrier()  # rank 0 has checked, locked and repaired the run directory
            finished = self.dist.broadcast(None)
            return finished if finished is not None else self._fit(self._prepare(), resume, stop_after_epochs)
        self.run.check_owned(resume=resume, overwrite=self.overwrite)
        with self.run.locked():
            self.run.recover()
            finished = None
            if resume and self.run.read().get("status") == "finished" and (self.out / METRICS_FILE).exists():
                self.run.check_same_run(self.identity)
                if (self.out / "spec.yaml").is_file():
                    self._check_same_spec(load_spec(self.out / "spec.yaml"))
                finished = json.loads((self.out / METRICS_FILE).read_text(encoding="utf-8"))
            # Everything that can fail on the user's input (model, objective terms, the teacher) is built
            # before a previous run is cleared, so a bad spec under --overwrite loses nothing.
            setup = None if finished is not None else self._prepare()
            if self.overwrite and not resume:
                self.run.clear()
            self.dist.barrier()
            self.dist.broadcast(finished)
            if finished is not None:
                return finished
            try:
                return self._fit(setup, resume, stop_after_epochs)
            except KeyboardInterrupt:
                self.run.update(status="interrupted")
                raise
            except BaseException as exc:
                self.run.update(status="failed", error=f"{type(exc).__name__}: {exc}"[:2000])
                raise

    def _prepare(self) -> _Setup:
        """The model, its objective terms and optimizer, built and checked; nothing is written."""
        train_cfg = self.spec.train
        torch.manual_seed(train_cfg.seed)
        model = build_model(self.spec)
        self.store.check_inputs(model)
        self.task.prepare(model)
        model.to(self.device)
        terms = nn.ModuleList(make(model, self.store) for make in self.term_factories).to(self.device)
        params = [p for p in (*model.parameters(), *terms.parameters()) if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=train_cfg.lr, weight_decay=train_cfg.weight_decay)
        total_steps = math.ceil(len(self.split.train) / train_cfg.batch_size) * train_cfg.epochs
        return _Setup(model, terms, params, optimizer, torch.Generator().manual_seed(train_cfg.seed), total_steps)

    def _fit(self, setup: _Setup, resume: bool, stop_after_epochs: int | None) -> dict[str, Any]:
        train_cfg, main = self.spec.train, self.dist.is_main
        missing = any(not feats.available.all() for feats in self.store.encoders.values())
        if any(term.forwards_model for term in setup.terms):  # gradients averaged by the trainer (see ObjectiveTerm)
            self.dist.broadcast_parameters(setup.model)
            setup.forward, setup.synced = setup.model, [p for p in setup.params if p.requires_grad]
        else:
            setup.forward = wrap(setup.model, self.dist, missing)  # a collective: every rank is here
            setup.synced = [p for p in setup.terms.parameters() if p.requires_grad]  # outside DDP: averaged here
        state = self._begin(setup, resume)
        loggers = self.loggers if main else []
        for logger in loggers:
            logger.start(self.out, state.epoch)
        try:
            bar = progress_bar(range(state.epoch, train_cfg.epochs), enabled=self.progress and main, desc="epochs",
                               unit="epoch", leave=False, initial=state.epoch, total=train_cfg.epochs)
            epochs_this_call = 0
            for epoch in bar:
                if state.since_best >= train_cfg.patience:
                    break  # early stopping had happened before a kill: nothing more to train
                started = time.perf_counter()
                record = self._train_epoch(setup, epoch, state)
                self.validate(setup.model, setup.terms, epoch, state, record)
                state.epoch = epoch + 1
                record["seconds"] = round(time.perf_counter() - started, 3)
                self._end_epoch(setup, state, record)
                bar.set_postfix(loss=f"{record['loss']:.3f}", val=f"{record.get('val', {}).get('score', float('nan')):.3f}")
                epochs_this_call += 1
                if stop_after_epochs is not None and epochs_this_call >= stop_after_epochs and state.epoch < train_cfg.epochs:
                    if main:
                        self.run.update(status="interrupted")
                    return {"interrupted": True, "epoch": state.epoch}
        finally:
            for logger in loggers:
                logger.close()
        if not main:  # rank 0 evaluates the best model alone and shares its metrics
            return self.dist.broadcast(None)
        return self.dist.broadcast(self.finish(state))

    def _begin(self, setup: _Setup, resume: bool) -> LoopState:
        """The trainer's state at the first epoch to train: restored from ``last/``, or a new run recorded."""
        main = self.dist.is_main
        state = LoopState()
        if resume and not (self.out / "last").exists() and not self.run.read():
            raise CheckpointError(f"{self.out}: nothing to resume (no run was started there); start without --resume")
        if resume and (self.out / "last").exists():
            self.run.check_same_run(self.identity)
            state = self._restore(setup)
            if main:
                self.run.note_threads(torch.get_num_threads())
                self.run.note_device(str(self.device))
                self.run.update(status="running", error=None, world_size=self.dist.world_size, **self._hardware())
        elif main:  # a new run, or one stopped before its first checkpoint: it starts from the beginning
            if resume:
                self.run.check_same_run(self.identity)
            dump_spec(self.spec, self.out / "spec.yaml")
            self.run.start({**self.identity, "n_train": int(len(self.split.train)), "n_val": int(len(self.split.val)),
                            "n_test": int(len(self.split.test)), "torch_threads": torch.get_num_threads(),
                            "world_size": self.dist.world_size, **self._hardware()})
        if main:
            self.run.truncate_log(state.epoch)
        return state

    def _hardware(self) -> dict[str, str]:
        return {"device": str(self.device), "device_name": device_name(self.device), "precision": self.spec.train.precision}

    def _train_epoch(self, setup: _Setup, epoch: int, state: LoopState) -> dict[str, Any]:
        """One pass over the training rows; returns the epoch's log record (mean losses, learning rate)."""
        setup.model.set_epoch(epoch)
        setup.model.train()
        setup.terms.train()
        sums: dict[str, float] = {}
        order = self.split.train[torch.randperm(len(self.split.train), generator=setup.shuffle).numpy()]
        for rows, local, batch in self.batches(order, setup.model):
            real, losses = self._step(setup, epoch, state, rows, local, batch)
            for k, v in losses.items():
                sums[k] = sums.get(k, 0.0) + v * real
        sums = self.dist.sum(sums)  # every rank's share of the epoch's losses
        record: dict[str, Any] = {"epoch": epoch, "lr": setup.optimizer.param_groups[0]["lr"]}
        for key, total in sums.items():  # "train/keep_rate/enc0" -> record["train"]["keep_rate"]["enc0"]
            *groups, name = key.split("/")
            place = record
            for group in groups:
                place = place.setdefault(group, {})
            place[name] = total / len(order)
        return record

    def _step(self, setup: _Setup, epoch: int, state: LoopState, rows: np.ndarray, local: np.ndarray,
              batch: tuple) -> tuple[int, dict[str, float]]:
        """One optimisation step: the task's loss plus every term's; returns this rank's real rows and the losses."""
        train_cfg, model, optimizer = self.spec.train, setup.model, setup.optimizer
        for group in optimizer.param_groups:
            group["lr"] = train_cfg.lr * _lr_factor(state.step, setup.total_steps, train_cfg)
        real = len(local) if self.dist.rank < len(rows) else 0  # a stand-in row (see batches) is not the rank's own
        if self.dist.enabled and isinstance(model, FusionModel):  # per-row draws: the global batch's
            model.row_share = RowShare.of(len(rows), self.dist.rank, self.dist.world_size)
        with self.precision.autocast():
            out = setup.forward(*batch)
            losses = self.task.loss(model, out, local, real)
            loss, parts = losses.local, losses.parts
            shared = losses.shared
            for term in setup.terms:
                for name, value in term(out, local[:real], state.step / max(1, setup.total_steps)).items():
                    if term.shares(name):
                        shared = shared + value
                    else:
                        loss = loss + value
                    parts[name] = float(value.detach())
        # DDP averages over ranks: a local mean is weighted by the rank's share, so that the result is the mean over
        # all rows, as in one process; a loss over the gathered global batch is the same on every rank and is not
        total = loss * self.dist.loss_scale(real, len(rows)) + shared
        if not torch.isfinite(total):
            raise FusionkitError(f"epoch {epoch}: the loss became {float(total)}; lower train.lr or check the features")
        optimizer.zero_grad(set_to_none=True)
        self.precision.step(total, optimizer, setup.params, train_cfg.grad_clip,
                            lambda: self.dist.average_gradients(setup.synced))
        self.task.after_step(model)
        state.step += 1
        return real, {"loss": float((loss + shared).detach()), **parts}

    def _end_epoch(self, setup: _Setup, state: LoopState, record: dict[str, Any]) -> None:
        """The epoch's log line, then ``last/`` (after a kill between the two, resume drops the line and redoes
        the epoch)."""
        rng_states = self.dist.all_gather_object(torch.get_rng_state())  # each rank's: dropout differs per rank
        if self.dist.is_main:
            self.run.append_log(record)
            for logger in self.loggers:
                logger.log(record["epoch"], record)
            self._save_last(setup, state, rng_states)

    def batches(self, order: np.ndarray, model: FusionModel) -> Iterator[tuple[np.ndarray, np.ndarray, tuple]]:
        """The batch source: (global rows, this rank's rows, model inputs) for each step of an epoch.

        ``train.batch_size`` is the global batch: under torchrun each rank takes every
        ``world_size``-th row of it. A rank left without rows (a last batch smaller than the
        world) gets one stand-in row whose loss weight is zero. A model with batch normalisation
        (a live CNN) never gets a last batch that would leave a process one row, which it cannot
        normalise: those rows join the batch before. The next batch is assembled on a background
        thread while the current one trains.
        """
        size = self.spec.train.batch_size
        if size < 2 * self.dist.world_size and has_batch_norm(model):
            raise FusionkitError(f"train.batch_size: {size} leaves each of the {self.dist.world_size} process(es) "
                                 "fewer than 2 rows, and the model has batch normalisation (projector.domain_norm, or "
                                 "a live encoder's), which cannot normalise one row in training; raise "
                                 f"train.batch_size to at least {2 * self.dist.world_size}")
        bounds = [(start, min(start + size, len(order))) for start in range(0, len(order), size)]
        last = bounds[-1][1] - bounds[-1][0] if bounds else 0
        if len(bounds) > 1 and last < 2 * self.dist.world_size and has_batch_norm(model):
            bounds[-2:] = [(bounds[-2][0], len(order))]

        def assemble(bound: tuple[int, int]) -> tuple[np.ndarray, np.ndarray, tuple]:
            rows = order[bound[0] : bound[1]]
            local = self.dist.shard(rows)
            if len(local) == 0:
                local = rows[:1].copy()
            return rows, local, self.store.inputs_for(model, local)

        return prefetch(assemble, bounds)

    def validate(self, model: FusionModel, terms: Sequence[ObjectiveTerm], epoch: int, state: LoopState,
                 record: dict[str, Any]) -> None:
        """Evaluation: the task scores validation, the best score is tracked, and ``best/`` saved when it improves
        (each term told first)."""
        train_cfg = self.spec.train
        due = (epoch + 1) % train_cfg.eval_every == 0 or epoch + 1 == train_cfg.epochs
        if len(self.split.val) == 0:
            improved: bool | None = True
        elif not due:
            improved = None
        else:
            val = self.task.validate(model, self.dist)
            record["val"] = {k: val[k] for k in self.task.record_keys}
            improved = val["score"] > state.best_score
            if improved:
                state.best_score = val["score"]
        if improved:
            state.best_epoch, state.since_best = epoch, 0
            if self.dist.is_main:
                for term in terms:
                    term.on_best(model)
                save_checkpoint(model, self.out / "best")
        elif improved is not None:
            state.since_best += 1

    def finish(self, state: LoopState) -> dict[str, Any]:
        """Evaluate the best model on validation and test data; write metrics.json."""
        model, _, _ = load_checkpoint(self.out / "best", device=self.device)
        metrics: dict[str, Any] = {"best_epoch": state.best_epoch, "epochs_run": state.epoch,
                                   "test_fold": self.split.test_fold, "val_fold": self.split.val_fold,
                                   **self.task.final(model, self.out)}
        atomic_write_text(self.out / METRICS_FILE, json.dumps(metrics, indent=2) + "\n")
        self.run.update(status="finished")
        return metrics

    # --- checkpoints ----------------------------------------------------------------------------

    def _save_last(self, setup: _Setup, state: LoopState, rng_states: list[torch.Tensor]) -> None:
        tensors, groups = _flatten_optimizer(setup.optimizer)
        tensors.update({f"rng.torch.{rank}": rng for rank, rng in enumerate(rng_states)})
        tensors["rng.shuffle"] = setup.shuffle.get_state()
        tensors.update({f"terms.{k}": v for k, v in setup.terms.state_dict().items()})
        save_checkpoint(setup.model, self.out / "last", extra_tensors=tensors,
                        extra_metadata={"trainer": state.state_dict(), "param_groups": groups, "world_size": len(rng_states),
                                        "scaler": self.precision.state_dict()})

    def _check_same_spec(self, saved: Spec) -> None:
        """Refuse to resume a run (finished or not) under another spec than it was started with."""
        diffs = spec_differences(_resumable(saved), _resumable(self.spec))
        if diffs:
            raise CheckpointError(f"{self.out}: the run was started with a different spec ({'; '.join(diffs[:10])}); "
                                  "resume with the same spec")

    def _restore(self, setup: _Setup) -> LoopState:
        model, optimizer, shuffle, terms = setup.model, setup.optimizer, setup.shuffle, setup.terms
        saved, tensors, metadata = load_checkpoint(self.out / "last")
        self._check_same_spec(saved.spec)
        model.load_state_dict(saved.state_dict())
        self.task.restore(model, saved)
        _restore_optimizer(optimizer, tensors, metadata["extra"]["param_groups"])
        terms.load_state_dict({k[len("terms."):]: v for k, v in tensors.items() if k.startswith("terms.")})
        rank_key = f"rng.torch.{self.dist.rank}"
        if rank_key in tensors or "rng.torch" in tensors:  # "rng.torch": one state, as older runs saved it
            torch.set_rng_state(tensors.get(rank_key, tensors.get("rng.torch")))
        shuffle.set_state(tensors["rng.shuffle"])
        self.precision.load_state_dict(metadata["extra"].get("scaler", {}))
        saved_world = metadata["extra"].get("world_size", 1)
        if saved_world != self.dist.world_size and self.dist.is_main:
            warnings.warn(
                f"{self.out}: the run was started with {saved_world} process(es) and resumes with "
                f"{self.dist.world_size}; training continues from the checkpoint, but the result is no longer the "
                "uninterrupted run's (each process's random state and share of every batch change). run.json records "
                "the new world size.", FusionkitWarning, stacklevel=2)
        return LoopState.from_state_dict(metadata["extra"]["trainer"], where=str(self.out / "last"))


def _resumable(spec: Spec) -> dict[str, Any]:
    """A spec as a resume compares it: the fitted decoder and the device may differ (a resume on another device
    warns instead, see RunDirectory.note_device)."""
    data = spec.to_dict()
    data["decoder"] = None
    data["train"] = {k: v for k, v in data["train"].items() if k != "device"}
    return data


def prefetch(make: Callable[[Any], Any], keys: Sequence[Any]) -> Iterator[Any]:
    """``make(key)`` for each key, in order, each computed on a background thread while the previous
    one is consumed (tensor indexing releases the GIL, so assembling overlaps the training step)."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(1, thread_name_prefix="fusionkit-batches") as pool:
        pending = pool.submit(make, keys[0]) if len(keys) else None
        for i in range(len(keys)):
            current = pending.result()
            pending = pool.submit(make, keys[i + 1]) if i + 1 < len(keys) else None
            yield current


def _flatten_optimizer(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], list]:
    sd = optimizer.state_dict()
    tensors = {}
    for idx, entry in sd["state"].items():
        for key, value in entry.items():
            tensors[f"optim.{idx}.{key}"] = value if torch.is_tensor(value) else torch.tensor(value)
    return tensors, sd["param_groups"]


def _restore_optimizer(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], groups: list) -> None:
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        if key.startswith("optim."):
            _, idx, name = key.split(".", 2)
            state.setdefault(int(idx), {})[name] = value
    optimizer.load_state_dict({"state": state, "param_groups": groups})


def train(spec: Spec | dict | str, data: DataSource | str | os.PathLike, out: str | os.PathLike, *,
          fold: int | None = None,
          resume: bool = False, progress: bool = True, target: str | os.PathLike | None = None,
          overwrite: bool = False, raw: str | os.PathLike | None = None,
          confine: str | os.PathLike | None = None, device: str | None = None,
          loggers: Sequence[RunLogger] = ()) -> dict[str, Any]:
    """Train one model; see the module docstring for the folds and the run directory.

    ``data`` is a :class:`~fusionkit.data.open.DataSource`, or its ``data`` path with ``target``, ``raw`` and
    ``confine`` beside it. With adaptation losses in the spec, unlabelled target batches come from ``target`` (a
    second store) or, without it, from the rows of ``data`` whose domain is ``target``.
    Labelled target samples are evaluated ("target" in metrics.json), never trained on.
    Live encoders read their inputs from the manifest ``raw`` (or ``data`` is a manifest when
    every encoder is live; see docs/live-encoders.md); with ``confine``, every path in it must resolve
    inside that folder. ``device`` (auto, cpu, cuda, cuda:K) overrides the spec's ``train.device``.
    ``loggers`` receive every epoch's record besides those of ``train.log_to`` (:mod:`fusionkit.training.loggers`).
    ``out`` must be new, empty, or (with ``resume`` or ``overwrite``) a fusionkit run directory.
    """
    spec, source = on_device(load_spec(spec), device), DataSource.of(data, raw, confine, target)
    return _train_opened(spec, source.open(spec), source.open_target(spec), source.data, out, fold, resume, progress,
                         overwrite, loggers)


def on_device(spec: Spec, device: str | None) -> Spec:
    """``spec`` with ``train.device`` set to ``device`` (``--device``), or unchanged for None."""
    return spec if device is None else attrs.evolve(spec, train=attrs.evolve(spec.train, device=device))


def _train_opened(spec: Spec, store: FeatureStore, target_store: FeatureStore | None, data: str | os.PathLike,
                  out: str | os.PathLike, fold: int | None, resume: bool, progress: bool, overwrite: bool,
                  loggers: Sequence[RunLogger] = ()) -> dict[str, Any]:
    """:func:`train` once the spec is validated and its data opened (cross-validation opens them once)."""
    dist = setup()
    metrics = Trainer(spec, store, out, make_split(store, fold, spec.train.train_fraction), progress=progress,
                      data_path=str(data), target_store=target_store, overwrite=overwrite, dist=dist,
                      loggers=loggers).fit(resume=resume)
    dist.close()
    return metrics


def cross_validate(spec: Spec | dict | str, data: DataSource | str | os.PathLike, out: str | os.PathLike, *,
                   resume: bool = False, progress: bool = True, target: str | os.PathLike | None = None,
                   overwrite: bool = False, jobs: int = 1, raw: str | os.PathLike | None = None,
                   confine: str | os.PathLike | None = None, device: str | None = None,
                   after_fold: Callable[[int, dict[str, Any], bool], None] | None = None) -> dict[str, Any]:
    """Train once per fold (each fold the test fold once); write RUN/cv.json with mean and std of the task's
    metrics (BlEmoRE's for a fusion model, recall for two towers). ``data`` (and ``target``, ``raw``, ``confine``)
    as for :func:`train`.

    ``RUN/foldK`` is fold K's run directory. With ``resume``, finished folds are read back and
    the others continue (or start). ``jobs`` > 1 trains that many folds at a time, each in its
    own process (the cores are shared out among them). ``after_fold(fold, metrics, last)`` is
    called after each fold, in fold order (a sweep reports and prunes there); an exception it
    raises stops the cross-validation, whose status then says so. Under torchrun every rank trains
    each fold together and rank 0 alone writes RUN; ``jobs`` must then be 1.
    """
    spec, source = on_device(load_spec(spec), device), DataSource.of(data, raw, confine, target)
    dist = setup()  # under torchrun the ranks train each fold together, and rank 0 alone writes RUN itself
    if dist.enabled and jobs > 1:
        dist.close()
        raise FusionkitError(f"cross-validation with jobs={jobs} trains folds in processes of its own, which torchrun "
                             "cannot share out: under torchrun every rank trains each fold together, so leave jobs "
                             "at 1 (--jobs), or run without torchrun")
    store = source.open(spec)
    folds = sorted(int(f) for f in np.unique(store.folds[store.select(labelled=True, domain="source")]) if f >= 0)
    root, main = RunDirectory(out, fmt=CV_FORMAT), dist.is_main
    if main:
        root.check_owned(resume=resume, overwrite=overwrite)
    with root.locked() if main else contextlib.nullcontext():
        if main:
            root.recover()
            if overwrite and not resume:
                root.clear()
            if not root.read():
                root.start({"data": os.path.abspath(source.data), "folds": folds})
        dist.barrier()  # the other ranks wait for rank 0 to have checked, locked and started RUN
        kwargs = [dict(spec=spec.to_dict(), data=source, out=Path(out) / f"fold{fold}", fold=fold,
                       resume=resume and (Path(out) / f"fold{fold}" / "last").exists()) for fold in folds]
        try:
            results = _run_folds(spec, source, store, kwargs, jobs, progress, after_fold)
            per_fold = dict(zip(folds, results))
            summary = summarize_folds({f: m["test"] for f, m in per_fold.items()}, task_class(spec).record_keys)
        except KeyboardInterrupt:
            if main:
                root.update(status="interrupted")
            raise
        except BaseException as exc:
            if main:
                root.update(status="stopped", error=f"{type(exc).__name__}: {exc}"[:2000])
            raise
        if main:
            atomic_write_text(Path(out) / "cv.json", json.dumps({"folds": folds, "test": summary}, indent=2) + "\n")
            root.update(status="finished", error=None)
    dist.close()
    return summary


def _run_folds(spec: Spec, source: DataSource, store: FeatureStore, kwargs: list[dict[str, Any]], jobs: int,
               progress: bool, after_fold: Callable[[int, dict[str, Any], bool], None] | None) -> list[dict[str, Any]]:
    """Each fold's metrics, in fold order (``kwargs``: :func:`train`'s arguments per fold), trained here one after
    another or ``jobs`` at a time in processes of their own; ``after_fold`` is called after each, in fold order."""
    last = kwargs[-1]["fold"] if kwargs else None
    results = []
    if jobs > 1:  # each process validates the spec and opens the data itself
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        threads = max(1, (os.cpu_count() or 1) // jobs)
        with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn"),
                                 initializer=torch.set_num_threads, initargs=(threads,)) as pool:
            for k, metrics in zip(kwargs, pool.map(_train_fold, kwargs)):
                results.append(metrics)
                if after_fold is not None:
                    after_fold(k["fold"], metrics, k["fold"] == last)
        return results
    target_store = source.open_target(spec)
    for k in kwargs:
        results.append(_train_opened(spec, store, target_store, source.data, k["out"], k["fold"], k["resume"],
                                     progress, False))
        if after_fold is not None:
            after_fold(k["fold"], results[-1], k["fold"] == last)
    return results


def _train_fold(kwargs: dict[str, Any]) -> dict[str, Any]:
    return train(**{"progress": False, **kwargs})


def summarize_folds(per_fold: dict[int, dict[str, Any]],
                    keys: Sequence[str] = ("acc_presence", "acc_salience", "score")) -> dict[str, dict[str, float]]:
    """Mean and standard deviation of each metric in ``keys`` over folds (the task's ``record_keys``; over the
    folds where it applies: ACC_salience is None on a fold without blends; None where it applies to none)."""
    out = {}
    for key in keys:
        values = [m.get(key) for m in per_fold.values()]
        known = np.array([v for v in values if v is not None], dtype=float)
        out[key] = {"mean": float(known.mean()) if len(known) else None,
                    "std": float(known.std()) if len(known) else None, "values": values}
    return out


__getattr__ = moved_names(__name__, {"spec_store": "fusionkit.data.open",
                                     "fit_standardization": "fusionkit.training.statistics",
                                     "estimate_domain_statistics": "fusionkit.training.statistics"})
