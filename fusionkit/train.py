"""Training: folds, standardisation, the epoch loop, early stopping, checkpoints and resume.

A run directory holds::

    RUN/spec.yaml       the resolved spec
    RUN/run.json        what was trained on: store, folds, status
    RUN/log.jsonl       one line per epoch: losses, learning rate, validation metrics
    RUN/last/           checkpoint of the latest epoch, with optimizer and RNG state (for --resume)
    RUN/best/           the model of the best validation Score, decoder thresholds fitted on validation
    RUN/metrics.json    validation and test metrics of the best model

Folds: with ``fold=K`` fold K is the test fold, fold K+1 (cyclically) validates —
early stopping and decoder thresholds — and the others train. Without a fold the
last fold validates and every other labelled source sample trains.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Any

import attrs
import numpy as np
import torch

from fusionkit.answers import Prediction, from_order, order_to_matrix
from fusionkit.checkpoint import load_checkpoint, save_checkpoint
from fusionkit.errors import CheckpointError, DataError, FusionkitError
from fusionkit.files import atomic_write_text
from fusionkit.losses import supervised_loss
from fusionkit.metrics import per_label_f1, presence_map, scores_from_matrices
from fusionkit.model import FusionModel, decoder_inputs
from fusionkit.spec import Spec, dump_spec, load_spec
from fusionkit.store import FeatureStore, open_store


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


def spec_store(spec: Spec, data: str | os.PathLike) -> FeatureStore:
    """Open a store for a spec: its encoders' feature sizes checked, the spec's NaN policy applied."""
    dims = {e.name: getattr(e.config, "dim", None) for e in spec.encoders}
    store = open_store(data, dims, nan_policy=spec.data.nan_policy)
    if tuple(store.labels) != tuple(spec.labels):
        raise DataError(f"{store.path}: labels {list(store.labels)} differ from the spec's {list(spec.labels)}")
    return store


def fit_standardization(model: FusionModel, store: FeatureStore, index: np.ndarray) -> None:
    """Per-dimension mean/std of each encoder's inputs over the training rows that have it."""
    for name, encoder in model.encoders.items():
        if not hasattr(encoder, "set_standardization"):
            continue
        feats = store.encoders[name]
        rows = index[feats.available[index]]
        if feats.offsets is None:
            x = feats.data[torch.as_tensor(rows, dtype=torch.long)]
        else:
            x = torch.cat([feats.data[int(feats.offsets[i]) : int(feats.offsets[i + 1])] for i in rows])
        if len(x) < 2:
            raise DataError(f"encoder {name!r}: fewer than two training samples have features")
        encoder.set_standardization(x.mean(0), x.std(0))


@torch.no_grad()
def collect_outputs(model: FusionModel, store: FeatureStore, index: np.ndarray, batch_size: int = 256) -> dict[str, np.ndarray]:
    """Probabilities (and kept encoders) of the samples ``index``, in eval mode."""
    model.eval()
    parts: dict[str, list[np.ndarray]] = {}
    for start in range(0, len(index), batch_size):
        rows = index[start : start + batch_size]
        out = model(*store.batch(rows, model.encoder_names))
        arrays = decoder_inputs(out)
        arrays["kept"] = out.kept.cpu().numpy()
        for key, value in arrays.items():
            parts.setdefault(key, []).append(value)
    return {k: np.concatenate(v) for k, v in parts.items()}


def evaluate_outputs(model: FusionModel, outputs: dict[str, np.ndarray], truth: np.ndarray) -> dict[str, Any]:
    """BlEmoRE metrics with the model's current decoder, plus per-label F1 and presence mAP."""
    order, sal = model.decoder.decode(outputs)
    pred = order_to_matrix(order, sal, len(model.labels))
    metrics: dict[str, Any] = scores_from_matrices(pred, truth)
    metrics["per_label_f1"] = per_label_f1(pred, truth, model.labels)
    if "presence" in outputs:
        metrics["presence_map"] = presence_map(outputs["presence"], truth)
    metrics["n"] = int(len(truth))
    return metrics


def kept_counts(model: FusionModel, outputs: dict[str, np.ndarray], truth: np.ndarray) -> dict[str, dict[str, int]]:
    """How often each encoder was kept, per true label (a sample counts for each label it has)."""
    out: dict[str, dict[str, int]] = {}
    kept = outputs["kept"]
    for j, label in enumerate(model.labels):
        rows = kept[truth[:, j] > 0]
        out[label] = {name: int((rows == k).sum()) for k, name in enumerate(model.encoder_names)}
    return out


def predictions_for(model: FusionModel, store: FeatureStore, index: np.ndarray) -> dict[str, Prediction]:
    """Sample id -> BlEmoRE prediction with the model's stored decoder thresholds."""
    outputs = collect_outputs(model, store, index)
    order, sal = model.decoder.decode(outputs)
    preds = from_order(order, sal, model.labels)
    return {store.ids[i]: p for i, p in zip(index.tolist(), preds)}


def write_predictions(path: Path, model: FusionModel, store: FeatureStore, index: np.ndarray,
                      outputs: dict[str, np.ndarray]) -> None:
    """Per-sample predictions beside the truth (when known), for reports and error analysis."""
    order, sal = model.decoder.decode(outputs)
    preds = from_order(order, sal, model.labels)
    rows = {store.ids[i]: {"prediction": p, "truth": store.samples[i].labels,
                           "kept": [model.encoder_names[k] for k in kept if k >= 0]}
            for i, p, kept in zip(index.tolist(), preds, outputs["kept"].tolist())}
    atomic_write_text(path, json.dumps(rows) + "\n")


def _lr_factor(step: int, total: int, train) -> float:
    warm = max(1, int(train.warmup_fraction * total))
    if step < warm:
        return (step + 1) / warm
    if train.schedule == "constant":
        return 1.0
    progress = (step - warm) / max(1, total - warm)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


class Trainer:
    """Trains one model on one split and keeps the run directory up to date."""

    def __init__(self, spec: Spec, store: FeatureStore, out: str | os.PathLike, split: Split, *,
                 progress: bool = True, data_path: str | None = None, extra_loss_factory=None,
                 target_store: FeatureStore | None = None) -> None:
        self.spec = spec
        self.store = store
        self.out = Path(out)
        self.split = split
        self.progress = progress
        self.data_path = data_path or str(store.path)
        self.extra_loss_factory = extra_loss_factory
        self.target_store = target_store
        if len(split.train) == 0:
            raise DataError(f"{store.path}: no training samples in this split")

    def fit(self, resume: bool = False, stop_after_epochs: int | None = None) -> dict[str, Any]:
        """Train (or continue a killed run); returns the final metrics. ``stop_after_epochs`` simulates a kill."""
        spec, train_cfg = self.spec, self.spec.train
        self.out.mkdir(parents=True, exist_ok=True)
        torch.manual_seed(train_cfg.seed)
        model = FusionModel(spec)
        if spec.data.standardize:
            fit_standardization(model, self.store, self.split.train)
        params = [p for p in model.parameters() if p.requires_grad]
        extra = self.extra_loss_factory(model, self.store) if self.extra_loss_factory else None
        if extra is not None:
            params += [p for p in extra.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=train_cfg.lr, weight_decay=train_cfg.weight_decay)
        shuffle = torch.Generator().manual_seed(train_cfg.seed)
        steps_per_epoch = math.ceil(len(self.split.train) / train_cfg.batch_size)
        total_steps = steps_per_epoch * train_cfg.epochs
        state = {"epoch": 0, "step": 0, "best_score": -1.0, "best_epoch": -1, "since_best": 0}

        if resume and (self.out / "last").exists():
            state = self._restore(model, optimizer, shuffle, extra)
        elif resume:
            raise CheckpointError(f"{self.out}: nothing to resume (no last/ checkpoint); start without --resume")
        else:
            self._start_run_files()
        self._truncate_log(state["epoch"])

        target = torch.as_tensor(self.store.truth_matrix(self.split.train) / 100.0, dtype=torch.float32)
        position = {int(i): r for r, i in enumerate(self.split.train)}
        val_truth = self.store.truth_matrix(self.split.val) if len(self.split.val) else None
        bar = _progress(range(state["epoch"], train_cfg.epochs), self.progress, initial=state["epoch"], total=train_cfg.epochs)
        epochs_this_call = 0
        for epoch in bar:
            started = time.perf_counter()
            model.set_epoch(epoch)
            model.train()
            if extra is not None:
                extra.train()
            order = self.split.train[torch.randperm(len(self.split.train), generator=shuffle).numpy()]
            sums: dict[str, float] = {}
            for start in range(0, len(order), train_cfg.batch_size):
                rows = order[start : start + train_cfg.batch_size]
                for group in optimizer.param_groups:
                    group["lr"] = train_cfg.lr * _lr_factor(state["step"], total_steps, train_cfg)
                out = model(*self.store.batch(rows, model.encoder_names))
                tgt = target[[position[int(i)] for i in rows]]
                loss, parts = supervised_loss(out, tgt, train_cfg, model)
                if extra is not None:
                    terms = extra(out, rows, state["step"] / max(1, total_steps))
                    for k, v in terms.items():
                        loss = loss + v
                        parts[k] = float(v.detach())
                if not torch.isfinite(loss):
                    raise FusionkitError(f"epoch {epoch}: the loss became {float(loss)}; lower train.lr or check the features")
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if train_cfg.grad_clip:
                    torch.nn.utils.clip_grad_norm_(params, train_cfg.grad_clip)
                optimizer.step()
                state["step"] += 1
                for k, v in {"loss": float(loss.detach()), **parts}.items():
                    sums[k] = sums.get(k, 0.0) + v * len(rows)
            record: dict[str, Any] = {"epoch": epoch, "lr": optimizer.param_groups[0]["lr"],
                                      **{k: v / len(order) for k, v in sums.items()}}
            improved = True
            validate = (epoch + 1) % train_cfg.eval_every == 0 or epoch + 1 == train_cfg.epochs
            if val_truth is not None and not validate:
                improved = None
            elif val_truth is not None:
                outputs = collect_outputs(model, self.store, self.split.val)
                model.set_decoder(model.decoder.fit(outputs, val_truth))
                val = evaluate_outputs(model, outputs, val_truth)
                record["val"] = {k: val[k] for k in ("acc_presence", "acc_salience", "score")}
                improved = val["score"] > state["best_score"]
                if improved:
                    state["best_score"] = val["score"]
            if improved:
                state["best_epoch"], state["since_best"] = epoch, 0
                save_checkpoint(model, self.out / "best")
            elif improved is not None:
                state["since_best"] += 1
            state["epoch"] = epoch + 1
            record["seconds"] = round(time.perf_counter() - started, 3)
            self._save_last(model, optimizer, shuffle, extra, state)
            with open(self.out / "log.jsonl", "a", encoding="utf-8") as fh:
                fh.write(json.dumps(record) + "\n")
            if hasattr(bar, "set_postfix"):
                bar.set_postfix(loss=f"{record['loss']:.3f}", val=f"{record.get('val', {}).get('score', float('nan')):.3f}")
            epochs_this_call += 1
            if state["since_best"] >= train_cfg.patience:
                break
            if stop_after_epochs is not None and epochs_this_call >= stop_after_epochs:
                return {"interrupted": True, "epoch": state["epoch"]}
        return self.finish(state)

    def finish(self, state: dict[str, Any]) -> dict[str, Any]:
        """Evaluate the best model on validation and test data; write metrics.json."""
        model, _, _ = load_checkpoint(self.out / "best")
        metrics: dict[str, Any] = {"best_epoch": state["best_epoch"], "epochs_run": state["epoch"],
                                   "test_fold": self.split.test_fold, "val_fold": self.split.val_fold,
                                   "decoder": {"type": model.spec.decoder.type, **attrs.asdict(model.decoder.config)}}
        target_store = self.target_store or self.store
        target = target_store.select(labelled=True) if self.target_store else self.store.select(labelled=True, domain="target")
        for name, store, index in (("val", self.store, self.split.val), ("test", self.store, self.split.test),
                                   ("target", target_store, target)):
            if len(index):  # target labels are read here, for evaluation, and nowhere else
                truth = store.truth_matrix(index)
                outputs = collect_outputs(model, store, index)
                metrics[name] = evaluate_outputs(model, outputs, truth)
                metrics[name]["kept_counts"] = kept_counts(model, outputs, truth)
                write_predictions(self.out / f"predictions_{name}.json", model, store, index, outputs)
        atomic_write_text(self.out / "metrics.json", json.dumps(metrics, indent=2) + "\n")
        self._update_run(status="finished")
        return metrics

    # --- run files -------------------------------------------------------------------------

    def _start_run_files(self) -> None:
        for name in ("log.jsonl", "metrics.json"):
            (self.out / name).unlink(missing_ok=True)
        dump_spec(self.spec, self.out / "spec.yaml")
        run = {"data": os.path.abspath(self.data_path), "test_fold": self.split.test_fold, "val_fold": self.split.val_fold,
               "n_train": int(len(self.split.train)), "n_val": int(len(self.split.val)), "n_test": int(len(self.split.test)),
               "status": "running"}
        atomic_write_text(self.out / "run.json", json.dumps(run, indent=2) + "\n")

    def _update_run(self, **changes: Any) -> None:
        path = self.out / "run.json"
        run = json.loads(path.read_text()) if path.exists() else {}
        run.update(changes)
        atomic_write_text(path, json.dumps(run, indent=2) + "\n")

    def _truncate_log(self, epoch: int) -> None:
        """Drop log lines of epochs after the checkpoint a resumed run restarts from."""
        path = self.out / "log.jsonl"
        if not path.exists():
            return
        lines = [ln for ln in path.read_text().splitlines() if ln.strip() and json.loads(ln)["epoch"] < epoch]
        atomic_write_text(path, "".join(ln + "\n" for ln in lines))

    def _save_last(self, model, optimizer, shuffle, extra, state) -> None:
        tensors, groups = _flatten_optimizer(optimizer)
        tensors["rng.torch"] = torch.get_rng_state()
        tensors["rng.shuffle"] = shuffle.get_state()
        if extra is not None:
            tensors.update({f"extra_loss.{k}": v for k, v in extra.state_dict().items()})
        save_checkpoint(model, self.out / "last", extra_tensors=tensors,
                        extra_metadata={"trainer": state, "param_groups": groups})

    def _restore(self, model, optimizer, shuffle, extra) -> dict[str, Any]:
        saved, tensors, metadata = load_checkpoint(self.out / "last")
        if saved.spec.to_dict() | {"decoder": None} != self.spec.to_dict() | {"decoder": None}:
            raise CheckpointError(f"{self.out}: the run was started with a different spec; resume with the same spec")
        model.load_state_dict(saved.state_dict())
        model.set_decoder(saved.decoder.config)
        _restore_optimizer(optimizer, tensors, metadata["extra"]["param_groups"])
        if extra is not None:
            extra.load_state_dict({k[len("extra_loss."):]: v for k, v in tensors.items() if k.startswith("extra_loss.")})
        torch.set_rng_state(tensors["rng.torch"])
        shuffle.set_state(tensors["rng.shuffle"])
        return dict(metadata["extra"]["trainer"])


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
          resume: bool = False, progress: bool = True, target: str | os.PathLike | None = None) -> dict[str, Any]:
    """Train one model; see the module docstring for the folds and the run directory.

    With adaptation losses in the spec, unlabelled target batches come from ``target`` (a
    second store) or, without it, from the rows of ``data`` whose domain is ``target``.
    Labelled target samples are evaluated ("target" in metrics.json), never trained on.
    """
    spec = load_spec(spec)
    store = spec_store(spec, data)
    target_store = spec_store(spec, target) if target is not None else None
    factory = None
    if spec.adaptation:
        from fusionkit.adaptation import adaptation_loss_factory

        factory = adaptation_loss_factory(spec, target_store)
    split = make_split(store, fold)
    return Trainer(spec, store, out, split, progress=progress, data_path=str(data), extra_loss_factory=factory,
                   target_store=target_store).fit(resume=resume)


def cross_validate(spec: Spec | dict | str, data: str | os.PathLike, out: str | os.PathLike, *,
                   resume: bool = False, progress: bool = True, target: str | os.PathLike | None = None) -> dict[str, Any]:
    """Train once per fold (each fold the test fold once); write RUN/cv.json with mean and std."""
    spec = load_spec(spec)
    store = spec_store(spec, data)
    folds = sorted(int(f) for f in np.unique(store.folds[store.select(labelled=True, domain="source")]) if f >= 0)
    per_fold = {}
    for fold in folds:
        fold_dir = Path(out) / f"fold{fold}"
        done = (fold_dir / "metrics.json").exists() and resume
        per_fold[fold] = json.loads((fold_dir / "metrics.json").read_text()) if done else train(
            spec, data, fold_dir, fold=fold, resume=resume and (fold_dir / "last").exists(), progress=progress,
            target=target)
    summary = summarize_folds({f: m["test"] for f, m in per_fold.items()})
    atomic_write_text(Path(out) / "cv.json", json.dumps({"folds": folds, "test": summary}, indent=2) + "\n")
    return summary


def summarize_folds(per_fold: dict[int, dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Mean and standard deviation of each metric over folds."""
    out = {}
    for key in ("acc_presence", "acc_salience", "score"):
        values = np.array([m[key] for m in per_fold.values()])
        out[key] = {"mean": float(values.mean()), "std": float(values.std()), "values": values.tolist()}
    return out
