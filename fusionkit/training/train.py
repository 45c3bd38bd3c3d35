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

from fusionkit.checkpoint import load_checkpoint, save_checkpoint
from fusionkit.training.distributed import Dist, setup, wrap
from fusionkit.errors import CheckpointError, DataError, FusionkitError, FusionkitWarning
from fusionkit.files import atomic_write_text
from fusionkit.model import FusionModel, build_model
from fusionkit.training.rundir import CV_FORMAT, METRICS_FILE, RunDirectory, store_fingerprint, teacher_fingerprint
from fusionkit.spec import Spec, dump_spec, load_spec, spec_differences
from fusionkit.data.store import FeatureStore, open_store, target_rows
from fusionkit.training.tasks import task_for

#: An objective term's factory: ``make(model, store)`` -> a module returning named losses.
TermFactory = Callable[[FusionModel, FeatureStore], nn.Module]


@attrs.frozen
class _Setup:
    """What a run trains: the model, its further objective terms, their trainable parameters, the optimizer."""

    model: FusionModel
    terms: nn.ModuleList
    params: list
    optimizer: torch.optim.Optimizer


@attrs.frozen
class Split:
    """Sample indices into a store for one run."""

    train: np.ndarray
    val: np.ndarray
    test: np.ndarray
    test_fold: int | None
    val_fold: int | None


def make_split(store: FeatureStore, fold: int | None) -> Split:
    """Group-disjoint train / validation / test indices from the store's folds (labelled source rows only)."""
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
    return Split(train, val, test, test_fold, val_fold)


def spec_store(spec: Spec, data: str | os.PathLike, raw: str | os.PathLike | None = None,
               confine: str | os.PathLike | None = None) -> FeatureStore:
    """Open the data of a spec: a feature store (its encoders' feature sizes checked, the spec's NaN policy
    applied), plus the raw manifest ``raw`` for live encoders; or a manifest alone when every encoder is live.
    ``confine``: a folder every input path of the manifest must resolve into."""
    from fusionkit.data.raw import is_manifest, live_encoder_names, manifest_store, read_manifest

    live = live_encoder_names(spec)
    stored = [e.name for e in spec.encoders if e.name not in live]
    if is_manifest(data):
        if raw is not None:
            raise DataError(f"{data}: the data is already a manifest; --raw adds a manifest to a feature store")
        if stored:
            raise DataError(f"{data}: encoder(s) {stored} read stored features: give a feature store as the data and "
                            f"the manifest as --raw {data}")
        return manifest_store(read_manifest(data, spec.labels, confine))
    dims = {e.name: getattr(e.config, "dim", None) for e in spec.encoders if e.name not in live}
    store = open_store(data, dims, nan_policy=spec.data.nan_policy)
    if tuple(store.labels) != tuple(spec.labels):
        neutral = "neu" if "neu" in store.labels else "null"
        raise DataError(f"{store.path}: labels {list(store.labels)} differ from the spec's {list(spec.labels)} (the "
                        f"spec's default is BlEmoRE's). Write them in the spec, in the store's order: "
                        f"`labels: [{', '.join(store.labels)}]` and `neutral: {neutral}` (the label that never blends, "
                        "or null)")
    if raw is not None:
        manifest = read_manifest(raw, spec.labels, confine)
        store.attach_raw(manifest, manifest.rows_for(store.ids, store.path))
    elif live:
        raise DataError(f"encoder(s) {sorted(live)} are live and read raw inputs: give their manifest with --raw "
                        "(see docs/live-encoders.md)")
    return store


def fit_standardization(model: FusionModel, store: FeatureStore, index: np.ndarray, domain: str = "source") -> None:
    """Fit the model's input standardisation on the store's rows ``index`` (the training rows), or a further
    domain's statistics on that domain's rows (features only: labels are not read)."""
    inputs = {}
    for name in model.encoder_names:
        if name not in store.encoders:  # a live encoder: it reads raw inputs, nothing to standardise
            continue
        feats = store.encoders[name]
        rows = index[feats.available[index]]
        if feats.offsets is None:
            inputs[name] = feats.data[torch.as_tensor(rows, dtype=torch.long)]
        else:
            inputs[name] = torch.cat([feats.data[int(feats.offsets[i]) : int(feats.offsets[i + 1])] for i in rows])
    model.fit_standardization(inputs, domain=domain)


@torch.no_grad()
def estimate_domain_statistics(model: FusionModel, store: FeatureStore, index: np.ndarray, domain: str = "target",
                               batch_size: int = 256) -> None:
    """AdaBN: re-estimate the ``domain`` running statistics of every :class:`~fusionkit.model.DomainNorm`
    from the store's rows ``index`` (inputs only, never labels), as a cumulative average over all of them."""
    from fusionkit.model import DomainNorm

    norms = [m.norms[domain] for m in model.modules() if isinstance(m, DomainNorm) and domain in m.norms]
    if not norms or len(index) < 2:
        return
    was_training = model.training
    model.eval()
    saved = [(n.momentum, n.training) for n in norms]
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None  # cumulative: every row counts the same
        norm.train()
    model.set_domain(domain)
    try:
        for start in range(0, len(index), batch_size):
            rows = index[start : start + batch_size]
            if len(rows) > 1:
                model(*store.inputs_for(model, rows))
    finally:
        model.set_domain("source")
        for norm, (momentum, training) in zip(norms, saved):
            norm.momentum = momentum
            norm.train(training)
        model.train(was_training)


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

    ``terms`` are factories ``make(model, store) -> nn.Module``; the module's
    ``forward(out, rows, progress)`` returns named loss tensors added to the objective. Its
    parameters are trained with the model's and its state is checkpointed with it.
    """

    def __init__(self, spec: Spec, store: FeatureStore, out: str | os.PathLike, split: Split, *,
                 progress: bool = True, data_path: str | None = None, terms: Sequence[TermFactory] = (),
                 target_store: FeatureStore | None = None, overwrite: bool = False, dist: Dist | None = None) -> None:
        self.spec = spec
        self.dist = dist or Dist()
        self.store = store
        self.out = Path(out)
        self.split = split
        self.progress = progress
        self.data_path = data_path or str(store.path)
        self.term_factories = list(terms)
        self.target_store = target_store
        self.overwrite = overwrite
        self.run = RunDirectory(self.out)
        self.task = task_for(spec, store, split, target_store)
        if self.dist.enabled and (spec.towers or spec.adaptation):
            raise FusionkitError("under torchrun, fusionkit trains fusion models without adaptation losses so far; "
                                 "train two-tower models and adaptation in one process (see docs/scaling.md)")
        if len(split.train) == 0:
            raise DataError(f"{store.path}: no training samples in this split")

    def target_rows(self) -> tuple[FeatureStore, np.ndarray]:
        """The unlabelled target rows that per-domain statistics come from: the --target store, or this
        store's rows of domain "target" (their labels, if any, are never read here)."""
        store, index = target_rows(self.store, self.target_store)
        if len(index) < 2:
            raise DataError(f"{store.path}: per-domain statistics (data.standardize_per_domain, projector.domain_norm) "
                            "need target rows: give --target STORE or rows whose domain is 'target'")
        return store, index

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
        if self.store.raw is not None:
            self.store.raw.check_encoders(model.live_encoders())
        if self.spec.data.standardize:
            fit_standardization(model, self.store, self.split.train)
        if self.spec.data.standardize_per_domain:
            fit_standardization(model, *self.target_rows(), domain="target")
        terms = nn.ModuleList(make(model, self.store) for make in self.term_factories)
        params = [p for p in (*model.parameters(), *terms.parameters()) if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=train_cfg.lr, weight_decay=train_cfg.weight_decay)
        return _Setup(model, terms, params, optimizer)

    def _fit(self, setup: _Setup, resume: bool, stop_after_epochs: int | None) -> dict[str, Any]:
        spec, train_cfg, dist, main = self.spec, self.spec.train, self.dist, self.dist.is_main
        model, terms, params, optimizer = setup.model, setup.terms, setup.params, setup.optimizer
        missing = any(not feats.available.all() for feats in self.store.encoders.values())
        forward = wrap(model, dist, missing)  # DDP under torchrun, else the model itself
        shuffle = torch.Generator().manual_seed(train_cfg.seed)
        steps_per_epoch = math.ceil(len(self.split.train) / train_cfg.batch_size)
        total_steps = steps_per_epoch * train_cfg.epochs
        state = {"epoch": 0, "step": 0, "best_score": -1.0, "best_epoch": -1, "since_best": 0}

        if resume and not (self.out / "last").exists() and not self.run.read():
            raise CheckpointError(f"{self.out}: nothing to resume (no run was started there); start without --resume")
        if resume and (self.out / "last").exists():
            self.run.check_same_run(self.identity)
            state = self._restore(model, optimizer, shuffle, terms)
            if main:
                self.run.note_threads(torch.get_num_threads())
                self.run.update(status="running", error=None, world_size=dist.world_size)
        elif main:  # a new run, or one stopped before its first checkpoint: it starts from the beginning
            if resume:
                self.run.check_same_run(self.identity)
            dump_spec(self.spec, self.out / "spec.yaml")
            self.run.start({**self.identity, "n_train": int(len(self.split.train)), "n_val": int(len(self.split.val)),
                            "n_test": int(len(self.split.test)), "torch_threads": torch.get_num_threads(),
                            "world_size": dist.world_size})
        if main:
            self.run.truncate_log(state["epoch"])

        bar = _progress(range(state["epoch"], train_cfg.epochs), self.progress and main, initial=state["epoch"],
                        total=train_cfg.epochs)
        epochs_this_call = 0
        for epoch in bar:
            if state["since_best"] >= train_cfg.patience:
                break  # early stopping had happened before a kill: nothing more to train
            started = time.perf_counter()
            model.set_epoch(epoch)
            model.train()
            terms.train()
            sums: dict[str, float] = {}
            order = self.split.train[torch.randperm(len(self.split.train), generator=shuffle).numpy()]
            for rows, local, batch in self.batches(order, model):
                for group in optimizer.param_groups:
                    group["lr"] = train_cfg.lr * _lr_factor(state["step"], total_steps, train_cfg)
                out = forward(*batch)
                loss, parts = self.task.loss(model, out, local)
                for term in terms:
                    for name, value in term(out, local, state["step"] / max(1, total_steps)).items():
                        loss = loss + value
                        parts[name] = float(value.detach())
                # DDP averages over ranks: weight each rank by its share so the result is the mean over all
                # rows, as in one process (a stand-in row, see batches, weighs nothing)
                real = len(local) if dist.rank < len(rows) else 0
                weight = dist.loss_scale(real, len(rows))
                if not torch.isfinite(loss):
                    raise FusionkitError(f"epoch {epoch}: the loss became {float(loss)}; lower train.lr or check the features")
                optimizer.zero_grad(set_to_none=True)
                (loss * weight).backward()
                if train_cfg.grad_clip:
                    torch.nn.utils.clip_grad_norm_(params, train_cfg.grad_clip)
                optimizer.step()
                self.task.after_step(model)
                state["step"] += 1
                for k, v in {"loss": float(loss.detach()), **parts}.items():
                    sums[k] = sums.get(k, 0.0) + v * real
            sums = dist.sum(sums)  # every rank's share of the epoch's losses
            record: dict[str, Any] = {"epoch": epoch, "lr": optimizer.param_groups[0]["lr"],
                                      **{k: v / len(order) for k, v in sums.items()}}
            self.validate(model, epoch, state, record)
            state["epoch"] = epoch + 1
            record["seconds"] = round(time.perf_counter() - started, 3)
            # The log line goes first: after a kill between the two, resume drops it and redoes the epoch.
            rng_states = dist.all_gather_object(torch.get_rng_state())  # each rank's: dropout differs per rank
            if main:
                self.run.append_log(record)
                self._save_last(model, optimizer, shuffle, terms, state, rng_states)
            if hasattr(bar, "set_postfix"):
                bar.set_postfix(loss=f"{record['loss']:.3f}", val=f"{record.get('val', {}).get('score', float('nan')):.3f}")
            epochs_this_call += 1
            if stop_after_epochs is not None and epochs_this_call >= stop_after_epochs and state["epoch"] < train_cfg.epochs:
                if main:
                    self.run.update(status="interrupted")
                return {"interrupted": True, "epoch": state["epoch"]}
        if not main:  # rank 0 evaluates the best model alone and shares its metrics
            return self.dist.broadcast(None)
        return self.dist.broadcast(self.finish(state))

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
        bounds = [(start, min(start + size, len(order))) for start in range(0, len(order), size)]
        last = bounds[-1][1] - bounds[-1][0] if bounds else 0
        if len(bounds) > 1 and last < 2 * self.dist.world_size and _has_batch_norm(model):
            bounds[-2:] = [(bounds[-2][0], len(order))]

        def assemble(bound: tuple[int, int]) -> tuple[np.ndarray, np.ndarray, tuple]:
            rows = order[bound[0] : bound[1]]
            local = self.dist.shard(rows)
            if len(local) == 0:
                local = rows[:1].copy()
            return rows, local, self.store.inputs_for(model, local)

        return prefetch(assemble, bounds)

    def validate(self, model: FusionModel, epoch: int, state: dict[str, Any], record: dict[str, Any]) -> None:
        """Evaluation: fit the decoder on validation, track the best Score, save ``best/`` when it improves."""
        train_cfg = self.spec.train
        due = (epoch + 1) % train_cfg.eval_every == 0 or epoch + 1 == train_cfg.epochs
        if len(self.split.val) == 0:
            improved: bool | None = True
        elif not due:
            improved = None
        else:
            val = self.task.validate(model, self.dist)
            record["val"] = {k: val[k] for k in self.task.record_keys}
            improved = val["score"] > state["best_score"]
            if improved:
                state["best_score"] = val["score"]
        if improved:
            state["best_epoch"], state["since_best"] = epoch, 0
            if self.dist.is_main:
                if self.spec.projector.domain_norm:
                    estimate_domain_statistics(model, *self.target_rows())
                save_checkpoint(model, self.out / "best")
        elif improved is not None:
            state["since_best"] += 1

    def finish(self, state: dict[str, Any]) -> dict[str, Any]:
        """Evaluate the best model on validation and test data; write metrics.json."""
        model, _, _ = load_checkpoint(self.out / "best")
        metrics: dict[str, Any] = {"best_epoch": state["best_epoch"], "epochs_run": state["epoch"],
                                   "test_fold": self.split.test_fold, "val_fold": self.split.val_fold,
                                   **self.task.final(model, self.out)}
        atomic_write_text(self.out / METRICS_FILE, json.dumps(metrics, indent=2) + "\n")
        self.run.update(status="finished")
        return metrics

    # --- checkpoints ----------------------------------------------------------------------------

    def _save_last(self, model, optimizer, shuffle, terms, state, rng_states: list[torch.Tensor]) -> None:
        tensors, groups = _flatten_optimizer(optimizer)
        tensors.update({f"rng.torch.{rank}": rng for rank, rng in enumerate(rng_states)})
        tensors["rng.shuffle"] = shuffle.get_state()
        tensors.update({f"terms.{k}": v for k, v in terms.state_dict().items()})
        save_checkpoint(model, self.out / "last", extra_tensors=tensors,
                        extra_metadata={"trainer": state, "param_groups": groups, "world_size": len(rng_states)})

    def _restore(self, model, optimizer, shuffle, terms) -> dict[str, Any]:
        saved, tensors, metadata = load_checkpoint(self.out / "last")
        ignore = {"decoder": None}
        diffs = spec_differences(saved.spec.to_dict() | ignore, self.spec.to_dict() | ignore)
        if diffs:
            raise CheckpointError(f"{self.out}: the run was started with a different spec ({'; '.join(diffs[:10])}); "
                                  "resume with the same spec")
        model.load_state_dict(saved.state_dict())
        if hasattr(model, "set_decoder"):
            model.set_decoder(saved.decoder.config)
        _restore_optimizer(optimizer, tensors, metadata["extra"]["param_groups"])
        terms.load_state_dict({k[len("terms."):]: v for k, v in tensors.items() if k.startswith("terms.")})
        rank_key = f"rng.torch.{self.dist.rank}"
        if rank_key in tensors or "rng.torch" in tensors:  # "rng.torch": one state, as older runs saved it
            torch.set_rng_state(tensors.get(rank_key, tensors.get("rng.torch")))
        shuffle.set_state(tensors["rng.shuffle"])
        saved_world = metadata["extra"].get("world_size", 1)
        if saved_world != self.dist.world_size and self.dist.is_main:
            warnings.warn(
                f"{self.out}: the run was started with {saved_world} process(es) and resumes with "
                f"{self.dist.world_size}; training continues from the checkpoint, but the result is no longer the "
                "uninterrupted run's (each process's random state and share of every batch change). run.json records "
                "the new world size.", FusionkitWarning, stacklevel=2)
        return dict(metadata["extra"]["trainer"])


def _has_batch_norm(model: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training for m in model.modules())


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


def _progress(iterable, enabled: bool, **kwargs):
    if not enabled:
        return iterable
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return iterable
    return tqdm(iterable, desc="epochs", unit="epoch", leave=False, disable=None, **kwargs)


def train(spec: Spec | dict | str, data: str | os.PathLike, out: str | os.PathLike, *, fold: int | None = None,
          resume: bool = False, progress: bool = True, target: str | os.PathLike | None = None,
          overwrite: bool = False, raw: str | os.PathLike | None = None,
          confine: str | os.PathLike | None = None) -> dict[str, Any]:
    """Train one model; see the module docstring for the folds and the run directory.

    With adaptation losses in the spec, unlabelled target batches come from ``target`` (a
    second store) or, without it, from the rows of ``data`` whose domain is ``target``.
    Labelled target samples are evaluated ("target" in metrics.json), never trained on.
    Live encoders read their inputs from the manifest ``raw`` (or ``data`` is a manifest when
    every encoder is live; see docs/live-encoders.md); with ``confine``, every path in it must resolve
    inside that folder.
    ``out`` must be new, empty, or (with ``resume`` or ``overwrite``) a fusionkit run directory.
    """
    spec = load_spec(spec)
    store = spec_store(spec, data, raw, confine)
    target_store = spec_store(spec, target) if target is not None else None
    terms: list[TermFactory] = []
    if spec.adaptation:
        from fusionkit.training.adaptation import adaptation_loss_factory

        terms.append(adaptation_loss_factory(spec, target_store))
    if spec.distill:
        from fusionkit.training.distill import distillation_term

        terms.append(distillation_term(spec))
    split = make_split(store, fold)
    dist = setup()
    metrics = Trainer(spec, store, out, split, progress=progress, data_path=str(data), terms=terms,
                      target_store=target_store, overwrite=overwrite, dist=dist).fit(resume=resume)
    dist.close()
    return metrics


def cross_validate(spec: Spec | dict | str, data: str | os.PathLike, out: str | os.PathLike, *,
                   resume: bool = False, progress: bool = True, target: str | os.PathLike | None = None,
                   overwrite: bool = False, jobs: int = 1, raw: str | os.PathLike | None = None,
                   confine: str | os.PathLike | None = None) -> dict[str, Any]:
    """Train once per fold (each fold the test fold once); write RUN/cv.json with mean and std.

    ``RUN/foldK`` is fold K's run directory. With ``resume``, finished folds are read back and
    the others continue (or start). ``jobs`` > 1 trains that many folds at a time, each in its
    own process (the cores are shared out among them).
    """
    spec = load_spec(spec)
    store = spec_store(spec, data, raw, confine)
    folds = sorted(int(f) for f in np.unique(store.folds[store.select(labelled=True, domain="source")]) if f >= 0)
    root = RunDirectory(out, fmt=CV_FORMAT)
    root.check_owned(resume=resume, overwrite=overwrite)
    with root.locked():
        root.recover()
        if overwrite and not resume:
            root.clear()
        if not root.read():
            root.start({"data": os.path.abspath(data), "folds": folds})
        kwargs = [dict(spec=spec.to_dict(), data=data, out=Path(out) / f"fold{fold}", fold=fold, target=target, raw=raw, confine=confine,
                       resume=resume and (Path(out) / f"fold{fold}" / "last").exists()) for fold in folds]
        if jobs > 1:
            import multiprocessing
            from concurrent.futures import ProcessPoolExecutor

            threads = max(1, (os.cpu_count() or 1) // jobs)
            with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn"),
                                     initializer=torch.set_num_threads, initargs=(threads,)) as pool:
                results = list(pool.map(_train_fold, kwargs))
        else:
            results = [_train_fold({**k, "progress": progress}) for k in kwargs]
        per_fold = dict(zip(folds, results))
        summary = summarize_folds({f: m["test"] for f, m in per_fold.items()})
        atomic_write_text(Path(out) / "cv.json", json.dumps({"folds": folds, "test": summary}, indent=2) + "\n")
        root.update(status="finished")
    return summary


def _train_fold(kwargs: dict[str, Any]) -> dict[str, Any]:
    return train(**{"progress": False, **kwargs})


def summarize_folds(per_fold: dict[int, dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Mean and standard deviation of each metric over folds (over the folds where it applies: ACC_salience
    is None on a fold without blends; None where it applies to none)."""
    out = {}
    for key in ("acc_presence", "acc_salience", "score"):
        values = [m[key] for m in per_fold.values()]
        known = np.array([v for v in values if v is not None], dtype=float)
        out[key] = {"mean": float(known.mean()) if len(known) else None,
                    "std": float(known.std()) if len(known) else None, "values": values}
    return out
