"""Tasks: what a model is trained to do, and how it is scored.

The trainer's loop is the same for every task; a task supplies the objective's main term,
the validation score that selects the best epoch, and the final metrics:

- :class:`ClassificationTask` (fusion models): presence + salience supervision, decoder
  thresholds fitted on the validation fold, BlEmoRE metrics;
- :class:`ContrastiveTask` (two-tower models): the CLIP loss, retrieval Recall@1/@5 in both
  directions and cross-tower nearest-neighbour class accuracy.
"""

from __future__ import annotations

import abc
import json
from pathlib import Path
from typing import Any, ClassVar

import attrs
import numpy as np
import torch

from fusionkit import inference
from fusionkit.blemore.answers import from_order, order_to_matrix
from fusionkit.blemore.metrics import format_metric, per_label_f1, presence_map, scores_from_matrices
from fusionkit.conditional.budget import Budget
from fusionkit.data.store import FeatureStore
from fusionkit.errors import FusionkitError
from fusionkit.files import atomic_write_text
from fusionkit.hardware.distributed import Dist
from fusionkit.models.fusion import FusionModel
from fusionkit.models.towers import clip_loss, local_clip_loss, retrieval_metrics
from fusionkit.moved import moved_names
from fusionkit.spec import Spec
from fusionkit.training.losses import supervised_loss
from fusionkit.training.scout_values import fit_scout_values, fits_on_validation
from fusionkit.training.statistics import fit_standardization

__all__ = ["keep_rates", "evaluate_outputs", "compute_summary", 
           "kept_counts", "write_predictions", "Task", "ClassificationTask", "ContrastiveTask", "collect_embeddings", "task_class",
           "task_for"]


def evaluate_outputs(model: FusionModel, outputs: dict[str, np.ndarray], truth: np.ndarray,
                     budget: Budget | None = None) -> dict[str, Any]:
    """BlEmoRE metrics with the model's current decoder, plus per-label F1 and presence mAP (and, for a model with
    on-demand encoders, what ``budget`` let it spend)."""
    order, sal = model.decoder.decode(outputs)
    pred = order_to_matrix(order, sal, len(model.labels))
    metrics: dict[str, Any] = scores_from_matrices(pred, truth)
    metrics["per_label_f1"] = per_label_f1(pred, truth, model.labels)
    if "presence" in outputs:
        metrics["presence_map"] = presence_map(outputs["presence"], truth)
    metrics["n"] = int(len(truth))
    if "ran" in outputs:
        metrics["compute"] = compute_summary(model, outputs, budget=budget)
    return metrics


def compute_summary(model: FusionModel, outputs: dict[str, np.ndarray], seconds: dict[str, float] | None = None,
                    budget: Budget | None = None) -> dict[str, Any]:
    """What a model with on-demand encoders spent: mean GFLOPs per sample (and the full cost, every encoder run),
    and the share of samples on which each encoder ran; with ``seconds`` per sample of each on-demand encoder (by
    default a time budget's own), also their measured time per sample as spent (``mean_encoder_seconds``) and in
    full.

    ``unused_runs``: the share of on-demand runs whose token the gate's final top-n did not keep (compute spent for
    nothing), and ``unused_run_rate`` the same per encoder. With ``budget``, it is recorded (``budget``); a cap below
    what the always-run encoders cost cannot hold, since they run whatever the budget: ``over_cap`` then says so,
    with both figures."""
    if seconds is None and budget is not None and budget.seconds is not None:
        seconds = dict(budget.seconds)
    costs = model.encoder_costs()
    summary: dict[str, Any] = {
        "mean_gflops": float(np.mean(outputs["cost"])), "full_gflops": float(sum(c or 0.0 for c in costs.values())),
        "run_rate": {name: float(np.mean(outputs["ran"][:, k])) for k, name in enumerate(model.encoder_names)}}
    demand = list(model.on_demand)
    if demand and "kept" in outputs:  # an on-demand encoder that ran but that the gate's final top-n did not keep
        kept = np.stack([(outputs["kept"] == k).any(axis=1) for k in demand], axis=1)
        ran = outputs["ran"][:, demand].astype(bool)
        unused = ran & ~kept
        summary["unused_runs"] = float(unused.sum() / ran.sum()) if ran.any() else 0.0
        summary["unused_run_rate"] = {model.encoder_names[k]: float(unused[:, j].sum() / max(ran[:, j].sum(), 1))
                                      for j, k in enumerate(demand)}
    if budget is not None:
        summary["budget"] = budget.describe()
        over = model.over_cap(budget)
        if over is not None:
            limit, always = over
            summary["over_cap"] = {
                "limit_gflops": limit, "always_run_gflops": always,
                "note": f"the budget {budget.describe()} ({limit:.4g} GFLOPs per sample) is below what the always-run "
                        f"encoders cost ({always:.4g}); they ran anyway, and nothing on demand ran"}
    if seconds:
        per_encoder = np.array([seconds.get(name, 0.0) for name in model.encoder_names])
        summary |= {"encoder_seconds": dict(seconds),
                    "mean_encoder_seconds": float(np.mean(outputs["ran"] @ per_encoder)),
                    "full_encoder_seconds": float(per_encoder.sum())}
    return summary


def kept_counts(model: FusionModel, outputs: dict[str, np.ndarray], truth: np.ndarray) -> dict[str, dict[str, int]]:
    """How often each encoder was kept, per true label (a sample counts for each label it has)."""
    out: dict[str, dict[str, int]] = {}
    kept = outputs["kept"]
    for j, label in enumerate(model.labels):
        rows = kept[truth[:, j] > 0]
        out[label] = {name: int((rows == k).sum()) for k, name in enumerate(model.encoder_names)}
    return out


def keep_rates(model: FusionModel, outputs: dict[str, np.ndarray], store: FeatureStore,
               index: np.ndarray) -> dict[str, dict[str, float | None]]:
    """Per encoder, the share of samples that keep it (of those where it is available): over all samples, and
    apart on the samples where a dataset corrupted it and those where it is clean (None without such samples).
    A gate that does its job keeps an encoder less where it is corrupted."""
    kept = outputs["kept"]
    out: dict[str, dict[str, float | None]] = {}
    for k, name in enumerate(model.encoder_names):
        chosen = (kept == k).any(axis=1)
        available = store.encoders[name].available[index] if name in store.encoders else np.ones(len(index), bool)
        hit = np.array([name in store.samples[i].corrupted for i in index], dtype=bool)

        def rate(rows: np.ndarray) -> float | None:
            rows = rows & available
            return float(chosen[rows].mean()) if rows.any() else None

        out[name] = {"all": rate(np.ones(len(index), bool)), "clean": rate(~hit), "corrupted": rate(hit)}
    return out


def write_predictions(path: Path, model: FusionModel, store: FeatureStore, index: np.ndarray,
                      outputs: dict[str, np.ndarray]) -> None:
    """Per-sample predictions beside the truth (when known), for reports and error analysis."""
    order, sal = model.decoder.decode(outputs)
    preds = from_order(order, sal, model.labels)
    rows = {store.ids[i]: {"prediction": p, "truth": store.samples[i].labels,
                           "kept": [model.encoder_names[k] for k in kept if k >= 0],
                           "used": sum(1 for k in kept if k >= 0)}
            for i, p, kept in zip(index.tolist(), preds, outputs["kept"].tolist())}
    atomic_write_text(path, json.dumps(rows) + "\n")


@attrs.frozen
class Losses:
    """A training step's losses: ``local`` is a mean over this rank's rows (the trainer weighs it by the rank's
    share of the global batch), ``shared`` is computed over the gathered global batch, the same on every rank
    (added as it is); ``parts`` names every term for the log."""

    local: torch.Tensor
    shared: torch.Tensor | float
    parts: dict[str, float]


class Task(abc.ABC):
    """What a model is trained to do and how it is scored: every method the trainer's loop calls.

    A task is built once per run (:func:`task_for`) on the run's store and split, and the loop asks it, in order:
    :meth:`prepare` before training, :meth:`restore` on resume, :meth:`loss` and :meth:`after_step` at every
    step, :meth:`validate` when validation is due, and :meth:`final` once, on the best checkpoint. The commands
    ask its class: :meth:`evaluate_model`, :meth:`summary`, :attr:`record_keys`, :attr:`predicts`.
    """

    #: The validation metrics a log record keeps (``score`` selects the best epoch).
    record_keys: ClassVar[tuple[str, ...]]
    #: Whether the model predicts answers (a challenge submission), or only embeds.
    predicts: ClassVar[bool]

    def __init__(self, spec: Spec, store: FeatureStore, split: Any, target_store: FeatureStore | None = None,
                 dist: Dist | None = None) -> None:
        self.spec, self.store, self.split, self.target_store = spec, store, split, target_store
        self.dist = dist or Dist()

    @staticmethod
    @abc.abstractmethod
    def evaluate_model(model: Any, store: FeatureStore, index: np.ndarray) -> dict[str, Any]:
        """Metrics of a trained model on the samples ``index`` (``fusionkit evaluate``)."""

    @staticmethod
    @abc.abstractmethod
    def summary(metrics: dict[str, Any]) -> str:
        """One line of a split's metrics, for the terminal."""

    def prepare(self, model: Any) -> None:
        """Before training: ``data.standardize`` fits each encoder's input statistics on the training rows."""
        if self.spec.data.standardize:
            fit_standardization(model, self.store, self.split.train)

    def restore(self, model: Any, saved: Any) -> None:
        """On resume: carry over what the checkpoint's model holds beyond its weights."""

    @abc.abstractmethod
    def loss(self, model: Any, out: Any, rows: np.ndarray, real: int) -> Losses:
        """The :class:`Losses` of a batch: ``rows`` are this rank's rows, the first ``real`` of them its own (under
        torchrun a rank left without rows gets a stand-in row that weighs nothing)."""

    def after_step(self, model: Any) -> None:
        """After each optimiser step (e.g. clamp a learned scale)."""

    @abc.abstractmethod
    def validate(self, model: Any, dist: Dist | None = None) -> dict[str, Any]:
        """The validation metrics, ``score`` among them (every rank calls it; ``dist`` shares the work)."""

    @abc.abstractmethod
    def final(self, model: Any, out: Path) -> dict[str, Any]:
        """The metrics of the best model, for ``metrics.json`` (rank 0 alone)."""


class ClassificationTask(Task):
    """Fusion models: supervised presence + salience loss, BlEmoRE Score on validation."""

    record_keys = ("acc_presence", "acc_salience", "score")
    predicts = True

    @staticmethod
    def evaluate_model(model: FusionModel, store: FeatureStore, index: np.ndarray,
                       budget: Budget | str | float | None = None) -> dict[str, Any]:
        """Metrics of a trained model on the labelled samples ``index`` (``fusionkit evaluate``), its on-demand
        encoders within ``budget`` when given."""
        budget = Budget.parse(budget)
        return evaluate_outputs(model, inference.collect_outputs(model, store, index, budget=budget), store.truth_matrix(index),
                                budget)

    @staticmethod
    def summary(metrics: dict[str, Any]) -> str:
        """One line of a split's metrics, for the terminal."""
        return (f"ACC_presence {metrics['acc_presence']:.3f}  ACC_salience {format_metric(metrics['acc_salience'])}  "
                f"Score {metrics['score']:.3f}  (n={metrics['n']})")

    def __init__(self, spec: Spec, store: FeatureStore, split: Any, target_store: FeatureStore | None = None,
                 dist: Dist | None = None) -> None:
        super().__init__(spec, store, split, target_store, dist)
        self.target = torch.as_tensor(store.truth_matrix(split.train) / 100.0, dtype=torch.float32)
        self.position = {int(i): r for r, i in enumerate(split.train)}

    def loss(self, model: FusionModel, out: Any, rows: np.ndarray, real: int) -> Losses:
        loss, parts = supervised_loss(out, self.target[[self.position[int(i)] for i in rows]].to(out.probs.device),
                                      self.spec.train, model)
        return Losses(loss, 0.0, {**parts, **_selection_diagnostics(model, out.kept[:real])})

    def restore(self, model: FusionModel, saved: FusionModel) -> None:
        model.set_decoder(saved.decoder.config)  # the thresholds fitted on validation so far

    def prepare(self, model: Any) -> None:
        """Before training: the input statistics (:meth:`Task.prepare`); a scout whose values learn on validation
        rows needs some."""
        if fits_on_validation(model) and not len(self.split.val):
            raise FusionkitError(f"conditional.scout: {model.spec.conditional.scout.type!r} fits its values on the "
                                 "validation rows, and this run has none (its split leaves no validation fold); "
                                 "train with a validation fold, or choose another scout")
        super().prepare(model)

    def validate(self, model: FusionModel, dist: Dist | None = None) -> dict[str, Any]:
        """Fit a scout's values on validation where it learns them there, the decoder's thresholds, and score
        with them."""
        fit_scout_values(model, self.store, self.split.val, self.spec.train, dist)
        truth = self.store.truth_matrix(self.split.val)
        # values fitted afresh at each evaluation would make the best epoch a fit's luck: such a model is chosen
        # with every encoder run, on the fusion's quality
        budget = "100%" if fits_on_validation(model) else None
        outputs = inference.collect_outputs(model, self.store, self.split.val, dist=dist, budget=budget)
        model.set_decoder(model.decoder.fit(outputs, truth))
        return evaluate_outputs(model, outputs, truth)

    def final(self, model: FusionModel, out: Path) -> dict[str, Any]:
        """Metrics of the best model on validation, test and target samples; predictions files."""
        metrics: dict[str, Any] = {"decoder": {"type": model.spec.decoder.type, **attrs.asdict(model.decoder.config)}}
        target_store = self.target_store or self.store
        target = target_store.select(labelled=True) if self.target_store else self.store.select(labelled=True, domain="target")
        for name, store, index in (("val", self.store, self.split.val), ("test", self.store, self.split.test),
                                   ("target", target_store, target)):
            if len(index):  # target labels are read here, for evaluation, and nowhere else
                truth = store.truth_matrix(index)
                outputs = inference.collect_outputs(model, store, index,
                                          domain="target" if name == "target" and self.target_store else None)
                metrics[name] = evaluate_outputs(model, outputs, truth)
                metrics[name]["kept_counts"] = kept_counts(model, outputs, truth)
                metrics[name]["keep_rates"] = keep_rates(model, outputs, store, index)
                used = (outputs["kept"] >= 0).sum(1)
                metrics[name]["encoders_used"] = {"mean": float(used.mean()),
                                                  "histogram": {str(int(n)): int((used == n).sum()) for n in np.unique(used)}}
                write_predictions(out / f"predictions_{name}.json", model, store, index, outputs)
        return metrics


def _selection_diagnostics(model: FusionModel, kept: torch.Tensor) -> dict[str, float]:
    """Per-sample means over a batch's own rows (every rank gives the same keys): how many encoders each sample used
    (``train/encoders_used``, and the share using n: ``train/used/n``) and how often each encoder was kept. One
    copy to the host, so a GPU step waits once."""
    k = len(model.encoder_names)
    rows = kept.detach().cpu().numpy()
    if len(rows) == 0:  # a stand-in share (it weighs nothing): the keys, with zeros
        rows = np.full((1, max(1, rows.shape[1] if rows.ndim == 2 else 1)), -1)
    used = (rows >= 0).sum(1)
    out = {"train/encoders_used": float(used.mean())}
    out.update({f"train/used/{n}": float((used == n).mean()) for n in range(1, k + 1)})
    hits = (rows[:, :, None] == np.arange(k)).any(1).mean(0)
    out.update({f"train/keep_rate/{name}": float(rate) for name, rate in zip(model.encoder_names, hits)})
    return out


class ContrastiveTask(Task):
    """Two-tower models: the CLIP loss, mean Recall@1 over both directions on validation."""

    record_keys = ("r1", "r5", "score")
    predicts = False

    @staticmethod
    def evaluate_model(model: Any, store: FeatureStore, index: np.ndarray) -> dict[str, Any]:
        """Retrieval metrics of a trained two-tower model on the samples ``index``."""
        emb = collect_embeddings(model, store, index)
        classes = store.truth_matrix(index).argmax(1) if store.labelled[index].all() else None
        return retrieval_metrics(emb[model.tower_names[0]], emb[model.tower_names[1]], classes, model.tower_names)

    @staticmethod
    def summary(metrics: dict[str, Any]) -> str:
        return f"R@1 {metrics['r1']:.3f}  R@5 {metrics['r5']:.3f}  (n={int(metrics['n'])})"

    def loss(self, model: Any, out: Any, rows: np.ndarray, real: int) -> Losses:
        """The CLIP loss over the global batch: every rank's embeddings gathered, with gradients through each
        rank's own rows (``contrastive.local_loss``: this rank's rows against every column)."""
        a, b = (out.embeddings[name][:real] for name in model.tower_names)
        all_a, offset = self.dist.gather_rows(a)
        all_b, _ = self.dist.gather_rows(b)
        aux = sum(out.aux_losses.values()) if out.aux_losses else 0.0
        parts = {k: float(v.detach()) for k, v in out.aux_losses.items()}
        if self.dist.enabled and self.spec.contrastive.local_loss:
            if real:
                clip = local_clip_loss(a, b, all_a, all_b, offset, out.scale)
            else:  # a stand-in row: the same computation (every rank's backward meets the same collectives), no weight
                stand_a, stand_b = (out.embeddings[name][:1] for name in model.tower_names)
                clip = 0.0 * local_clip_loss(stand_a, stand_b, all_a, all_b, 0, out.scale)
            parts["clip"] = float(clip.detach())
            parts["train/logit_scale"] = float(out.scale.detach())
            return Losses(clip + aux, 0.0, parts)
        clip = clip_loss(all_a, all_b, out.scale)
        parts["clip"] = float(clip.detach())
        parts["train/logit_scale"] = float(out.scale.detach())
        return Losses(aux if torch.is_tensor(aux) else clip.new_zeros(()), clip, parts)

    def after_step(self, model: Any) -> None:
        model.clamp_scale()

    def validate(self, model: Any, dist: Dist | None = None) -> dict[str, Any]:
        return self.evaluate_model(model, self.store, self.split.val)

    def final(self, model: Any, out: Path) -> dict[str, Any]:
        metrics: dict[str, Any] = {"logit_scale": float(model.logit_scale.detach().exp())}
        for name, index in (("val", self.split.val), ("test", self.split.test)):
            if len(index):
                metrics[name] = self.evaluate_model(model, self.store, index)
        return metrics


@torch.no_grad()
def collect_embeddings(model: Any, store: FeatureStore, index: np.ndarray, batch_size: int = 256) -> dict[str, np.ndarray]:
    """Each tower's normalised embeddings of the samples ``index``, in eval mode."""
    model.eval()
    parts: dict[str, list[np.ndarray]] = {}
    for start in range(0, len(index), batch_size):
        out = model(*store.inputs_for(model, index[start : start + batch_size]))
        for name, emb in out.embeddings.items():
            parts.setdefault(name, []).append(emb.cpu().numpy())
    return {k: np.concatenate(v) for k, v in parts.items()}


def task_class(spec: Spec) -> type[ClassificationTask] | type[ContrastiveTask]:
    """The kind of task a spec describes: contrastive with a ``towers`` block, else classification."""
    return ContrastiveTask if spec.task == "contrastive" else ClassificationTask


def task_for(spec: Spec, store: FeatureStore, split: Any, target_store: FeatureStore | None = None,
             dist: Dist | None = None):
    """The task a spec describes, for training on ``split`` of ``store`` (on the ranks of ``dist``)."""
    return task_class(spec)(spec, store, split, target_store, dist)


__getattr__ = moved_names(__name__, {
    **{name: "fusionkit.inference" for name in (
        "collect_outputs", "predictions_for", "fit_mean_budget", "measure_encoder_seconds", "TIMED_SAMPLES")},
    **dict.fromkeys(("budget_curve", "CURVE_SHARES", "CURVE_KINDS"), "fusionkit.evaluation.curves"),
})
