"""An exported model driven by numpy and onnxruntime: the always-run graphs, the scout, each on-demand graph on
the rows that keep it (gathered and scattered in numpy), then the fusion, and the decoded answers.

Nothing here imports torch: a deployment installs numpy, onnxruntime and safetensors (docs/deployment.md).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fusionkit.answers import Prediction, from_order
from fusionkit.budget import Budget
from fusionkit.decoding import blemore_decode, presence_salience_decode
from fusionkit.errors import FusionkitError
from fusionkit.files import sha256_file
from fusionkit.runtime.images import check_reads, read_images
from fusionkit.runtime.store import StoreRows, read_inputs

__all__ = ["EXPORT_FORMAT", "MANIFEST_FILE", "DeploymentError", "RuntimeOutput", "RuntimeModel", "load",
           "within_budget", "value_per_cost"]

EXPORT_FORMAT = "fusionkit-export"
MANIFEST_FILE = "manifest.json"


class DeploymentError(FusionkitError):
    """An export that cannot be loaded or run: tampered, incomplete, or given inputs it does not take."""


@dataclass
class RuntimeOutput:
    """What :meth:`RuntimeModel.predict` gives for a batch of ``B`` samples.

    ``probs`` ``[B, L]`` the combined probabilities; ``ran`` ``[B, K]`` which encoders ran (None without on-demand
    encoders); ``cost`` ``[B]`` GFLOPs spent per sample; ``answers`` the decoded BlEmoRE predictions; ``kept``
    ``[B, n]`` the encoders fused, in rank order (-1: an empty slot); ``presence``/``salience`` the heads'
    probabilities (None without that head)."""

    probs: np.ndarray
    ran: np.ndarray | None
    cost: np.ndarray
    answers: list[Prediction]
    kept: np.ndarray
    presence: np.ndarray | None = None
    salience: np.ndarray | None = None


def within_budget(scores: np.ndarray, available: np.ndarray, costs: np.ndarray, limit: np.ndarray) -> np.ndarray:
    """``[B, m]`` which on-demand encoders run: per row, in the order of ``scores`` (best first), each whose cost
    still fits ``limit`` (``[B]``, GFLOPs left after the always-run encoders); the rule of
    :func:`fusionkit.models.conditional.within_budget`, in numpy."""
    masked = np.where(available, scores, -np.inf)
    order = np.argsort(-masked, axis=1, kind="stable")
    rows = np.arange(len(scores))
    run = np.zeros_like(available)
    spent = np.zeros(len(scores), dtype=np.float64)
    for j in range(scores.shape[1]):
        k = order[:, j]
        cost = costs[k]
        fits = available[rows, k] & (spent + cost <= limit + 1e-9)
        run[rows, k] = fits
        spent = spent + cost * fits
    return run


def value_per_cost(scores: np.ndarray, present: np.ndarray, costs: np.ndarray, demand: list[int]) -> np.ndarray:
    """``[B, m]``: the scout's softmax share of each on-demand encoder per unit of its cost (relative to the mean
    on-demand cost), -inf where absent; :func:`fusionkit.models.conditional.value_per_cost` in numpy (float32)."""
    logits = np.where(present, scores.astype(np.float32), np.float32(-np.inf))
    top = np.max(logits, axis=1, keepdims=True)
    top = np.where(np.isfinite(top), top, np.float32(0.0))
    exp = np.exp(logits - top).astype(np.float32)
    total = exp.sum(axis=1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        share = np.nan_to_num(exp / total, nan=0.0).astype(np.float32)
    cost = costs[demand].astype(np.float32)
    relative = cost / np.float32(max(float(cost.mean()), 1e-12))
    value = share[:, demand] / np.maximum(relative, np.float32(1e-12))
    return np.where(present[:, demand], value, np.float32(-np.inf))


def _is_paths(value: Any) -> bool:
    """Whether an input is a sequence of file paths (an image encoder's, read by the runtime) rather than an array."""
    if isinstance(value, np.ndarray):
        return value.dtype == object or value.dtype.kind == "U"
    return isinstance(value, (list, tuple)) and all(isinstance(v, (str, os.PathLike)) for v in value)


def _read_manifest(folder: Path) -> dict[str, Any]:
    path = folder / MANIFEST_FILE
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DeploymentError(f"{path}: missing; is {folder} a fusionkit export (fusionkit export RUN --out DIR)?") from None
    except (OSError, ValueError) as exc:
        raise DeploymentError(f"{path}: unreadable ({str(exc)[:200]}); export the model again") from None
    if not isinstance(manifest, dict) or manifest.get("format") != EXPORT_FORMAT:
        raise DeploymentError(f"{path}: not a fusionkit export's manifest (format {EXPORT_FORMAT!r})")
    needed = ("labels", "latent_dim", "encoders", "sha256",
              *(("towers",) if manifest.get("kind") == "two_tower" else ("on_demand", "decoder", "heads")))
    missing = [key for key in needed if key not in manifest]
    if missing:
        raise DeploymentError(f"{path}: the manifest lacks {missing}; export the model again")
    return manifest


class RuntimeModel:
    """An export loaded for prediction (:func:`load`). Each graph's SHA-256 is checked against the manifest first,
    so a tampered or mismatched graph is refused before it runs."""

    def __init__(self, folder: str | Path, providers: list[str] | None = None, threads: int | None = None) -> None:
        import onnxruntime as ort  # the one heavy import, deferred: importing fusionkit.runtime stays cheap

        self.folder = Path(folder)
        self.manifest = manifest = _read_manifest(self.folder)
        for relative, expected in manifest["sha256"].items():
            path = self.folder / relative
            if ".." in Path(relative).parts or not path.is_file():
                raise DeploymentError(f"{path}: missing graph named by the manifest; export the model again")
            if sha256_file(path) != expected:
                raise DeploymentError(f"{path}: its SHA-256 does not match the manifest's (the graph was changed or "
                                    "replaced after export); refused. Export the model again")
        options = ort.SessionOptions()
        options.log_severity_level = 3
        if threads is not None:
            if threads < 1:
                raise DeploymentError(f"threads {threads}: give at least 1 (None: onnxruntime's default, every core)")
            options.intra_op_num_threads = threads
        providers = providers or ["CPUExecutionProvider"]

        def session(relative: str) -> Any:
            if relative not in manifest["sha256"]:
                raise DeploymentError(f"{self.folder}: the manifest names {relative} without its SHA-256; refused")
            return ort.InferenceSession(str(self.folder / relative), options, providers=providers)

        self.encoders: list[dict[str, Any]] = manifest["encoders"]
        self.names = [e["name"] for e in self.encoders]
        for entry in self.encoders:
            if "reads" in entry:
                try:
                    check_reads(entry["reads"], f"{self.folder / MANIFEST_FILE}: encoder {entry['name']!r}")
                except FusionkitError as exc:
                    raise DeploymentError(str(exc)) from None
        self.labels: tuple[str, ...] = tuple(manifest["labels"])
        self.demand = [self.names.index(n) for n in manifest.get("on_demand", [])]
        self.costs = np.array([float(e["cost_gflops"] or 0.0) for e in self.encoders], dtype=np.float64)
        if not np.isfinite(self.costs.sum()):
            raise DeploymentError(f"{self.folder}: the manifest's encoder costs are not finite")
        self.sessions = {e["name"]: session(e["graph"]) for e in self.encoders}
        self.towers: dict[str, dict[str, Any]] = manifest.get("towers") or {}
        self.tower_sessions = {name: session(t["graph"]) for name, t in self.towers.items()}
        self.fusion = None if self.towers else session("fusion.onnx")
        #: Which scout decides what runs: "gate" (scout.onnx) or "value" (value.onnx, in stages); None without
        #: on-demand encoders.
        self.scout_kind: str | None = manifest.get("scout") or ("gate" if self.demand else None)
        self.scout_graph = "value.onnx" if self.scout_kind == "value" else "scout.onnx"
        self.scout = session(self.scout_graph) if self.demand else None
        self.slots = int(manifest.get("slots") or len(self.names))
        self.stored_budget = manifest.get("budget")

    # --- budgets ------------------------------------------------------------------------------------------------

    def budget(self, value: Budget | str | float | None) -> Budget | None:
        """``value`` as a Budget: a cap (``"40%"``, ``2.5``), or ``"mean"`` (or the stored mean budget written
        out, e.g. ``"mean:40%"``): the mean budget whose threshold the export stored."""
        if value is None:
            return None
        stored = self.stored_budget
        if isinstance(value, str) and value.strip().lower().startswith("mean"):
            if stored is None:
                raise DeploymentError(f"--budget {value}: this export stores no mean budget; export it with --budget "
                                    "mean:S% to fit its threshold on the run's validation fold, or give a cap (40%)")
            budget = Budget(gflops=stored["gflops"], share=stored["share"], mean=True, threshold=stored["threshold"])
            if value.strip().lower() not in ("mean", budget.describe().lower()):
                raise DeploymentError(f"--budget {value}: this export stores the mean budget {budget.describe()} only; "
                                    "give --budget mean (or that one), or a cap")
            return budget
        budget = Budget.parse(value)
        if budget.seconds is not None:
            raise DeploymentError("a budget over measured time is not supported by the runtime; give a share or GFLOPs")
        if budget.mean and budget.threshold is None:
            raise DeploymentError(f"budget {budget.describe()}: a mean budget needs its fitted threshold")
        return budget

    # --- prediction -----------------------------------------------------------------------------------------------

    def _inputs(self, inputs: Mapping[str, np.ndarray], lengths: Mapping[str, np.ndarray] | None,
                mask: np.ndarray | None, names: list[str] | None = None
                ) -> tuple[dict[str, dict[str, np.ndarray]], np.ndarray]:
        """The graph inputs of the encoders ``names`` (default: every encoder) and their ``[B, len(names)]``
        availability (NaN rows missing, or refused)."""
        lengths = lengths or {}
        names = self.names if names is None else names
        missing = [n for n in names if n not in inputs]
        if missing:
            raise DeploymentError(f"inputs: no array for encoder(s) {missing}; the export reads {names}")
        batch = len(inputs[names[0]])
        present = np.ones((batch, len(names)), dtype=bool) if mask is None else np.asarray(mask, dtype=bool).copy()
        if present.shape != (batch, len(names)):
            raise DeploymentError(f"mask: expected [{batch}, {len(names)}], found {list(present.shape)}")
        feeds = {}
        for k, name in enumerate(names):
            entry = self.encoders[self.names.index(name)]
            given = inputs[name]
            if "reads" in entry and _is_paths(given):  # read later, only for the rows that run the encoder
                if len(given) != batch:
                    raise DeploymentError(f"inputs[{name!r}]: {len(given)} paths for {batch} rows")
                feeds[name] = {"paths": np.asarray([os.fspath(p) for p in given], dtype=object)}
                continue
            spec = entry["inputs"]["x"]
            dtype = np.dtype(spec.get("dtype", "float32"))
            if dtype == np.uint8 and np.asarray(given).dtype != np.uint8:
                raise DeploymentError(f"inputs[{name!r}]: expected uint8 pixels (fusionkit.runtime.images.read_images "
                                      f"gives them) or a list of image paths, found {np.asarray(given).dtype}")
            x = np.asarray(given, dtype=dtype)
            shape = spec["shape"]
            fixed = [(x.shape[n], size) for n, size in enumerate(shape) if isinstance(size, int) and n < x.ndim]
            if x.ndim != len(shape) or any(a != b for a, b in fixed) or len(x) != batch:
                raise DeploymentError(f"inputs[{name!r}]: expected {shape} with {batch} rows, found {list(x.shape)}")
            bad = ~np.isfinite(x.reshape(batch, -1)).all(axis=1)
            if bad.any():
                if self.manifest.get("nan_policy") != "mask":
                    raise DeploymentError(f"inputs[{name!r}]: NaN or inf in rows {np.flatnonzero(bad)[:5].tolist()}; the "
                                        "model's nan_policy is 'error' (with 'mask' such rows count as missing)")
                x = np.where(bad.reshape((batch,) + (1,) * (x.ndim - 1)), np.float32(0.0), x)
                present[bad, k] = False
            feed = {"x": np.ascontiguousarray(x)}
            if "lengths" in entry["inputs"]:
                given = lengths.get(name)
                steps = np.full(batch, x.shape[1], dtype=np.int64) if given is None else np.asarray(given, np.int64)
                present[steps == 0, k] = False
                feed["lengths"] = np.maximum(steps, 1) if (steps == 0).any() else steps
            feeds[name] = feed
        return feeds, present

    def _encode(self, name: str, feed: Mapping[str, np.ndarray], rows: np.ndarray | None) -> np.ndarray:
        if rows is not None:
            feed = {key: value[rows] for key, value in feed.items()}
        if "paths" in feed:  # a live encoder's images, read now for these rows alone
            feed = {"x": read_images(list(feed["paths"]), self.encoders[self.names.index(name)]["reads"])}
        return self.sessions[name].run(["token"], dict(feed))[0]

    def read(self, data: str | os.PathLike, raw: str | os.PathLike | None = None,
             confine: str | os.PathLike | None = None) -> StoreRows:
        """The inputs of this export's encoders: ``data`` a feature store (and ``raw`` the manifest of the live
        encoders' image files), or the manifest itself when every encoder is live; ``confine``: a folder every image
        path must resolve into (:func:`fusionkit.runtime.store.read_inputs`). Images are read by :meth:`predict`,
        for the rows that run their encoder."""
        live = [e["name"] for e in self.encoders if "reads" in e]
        return read_inputs(data, [n for n in self.names if n not in live], live, raw, confine)

    def _choose(self, scores: np.ndarray, gate_runs: np.ndarray, candidates: np.ndarray, present: np.ndarray,
                budget: Budget | None) -> np.ndarray:
        """Which on-demand encoders run for each row: the gate's own rule, or a budget over the ``candidates`` (those
        that could enter the row's top-n, so that every encoder run is fused), as the PyTorch model chooses."""
        available = present[:, self.demand]
        if budget is None:
            return gate_runs.astype(bool) & available
        candidates = candidates.astype(bool) & available
        if budget.mean:
            return (value_per_cost(scores, present, self.costs, self.demand) >= budget.threshold) & candidates
        choice = self.costs
        full = (choice * present).sum(1)
        paid = full - (choice[self.demand] * available).sum(1)
        limit = np.full_like(full, budget.limit(float(choice.sum()))) - paid
        return within_budget(scores[:, self.demand], candidates, choice[self.demand], limit)

    def _stages(self, tokens: np.ndarray, feeds: Mapping[str, Mapping[str, np.ndarray]], present: np.ndarray,
                budget: Budget | None) -> np.ndarray:
        """The value scout's decisions, in stages, as :meth:`fusionkit.models.fusion.Trunk._stages` makes them: each
        row still going picks the on-demand encoder of most predicted value per unit of cost among those left (that
        fit a cap), runs it when that value reaches the threshold (0 under the gate's own rule, the stored one under
        a mean budget, any under a cap), and the rest are re-scored with its token, written into ``tokens``."""
        demand, batch, m = self.demand, len(present), len(self.demand)
        available = present[:, demand]
        cost = self.costs[demand].astype(np.float32)
        relative = np.maximum(cost / max(float(cost.mean()), 1e-12), np.float32(1e-12)).astype(np.float32)
        limit, threshold = None, 0.0
        if budget is not None and budget.mean:
            threshold = float(budget.threshold)
        elif budget is not None:
            full = (self.costs * present).sum(1)
            paid = full - (self.costs[demand] * available).sum(1)
            limit, threshold = np.full_like(full, budget.limit(float(self.costs.sum()))) - paid, -np.inf
        run = np.zeros((batch, m), dtype=bool)
        going = available.any(axis=1)
        for _ in range(m):
            values = self.scout.run(["values"], {"tokens": tokens, "present": present, "ran": run})[0]
            eligible = available & ~run & (going & (run.sum(1) < self.slots))[:, None]
            if limit is not None:
                eligible &= self.costs[demand][None, :] <= limit[:, None] + 1e-9
            key = np.where(eligible, values.astype(np.float32) / relative, np.float32(-np.inf))
            pick, best = key.argmax(axis=1), key.max(axis=1)
            going = np.isfinite(best) & (best >= threshold)
            for j, k in enumerate(demand):
                rows = np.flatnonzero(going & (pick == j))
                if len(rows):  # each stage runs each on-demand graph once, on the rows that picked it
                    tokens[rows, k] = self._encode(self.names[k], feeds[self.names[k]],
                                                   None if len(rows) == batch else rows)
            run[np.flatnonzero(going), pick[going]] = True
            if limit is not None:
                limit = limit - np.where(going, self.costs[demand][pick], 0.0)
        return run

    def predict(self, inputs: Mapping[str, np.ndarray], budget: Budget | str | float | None = None, *,
                lengths: Mapping[str, np.ndarray] | None = None, mask: np.ndarray | None = None) -> RuntimeOutput:
        """Predict a batch: ``inputs`` maps every encoder name to ``[B, D]`` (or ``[B, T, D]`` frames, with
        ``lengths``), a live image encoder's to ``B`` image paths (read only for the rows that run it) or its
        ``uint8`` ``[B, C, H, W]`` pixels (:func:`fusionkit.runtime.images.read_images`); ``mask`` ``[B, K]`` is
        False where an encoder is missing. ``budget``: None (the gate's own rule), a cap (``"40%"``, ``2.5``
        GFLOPs) or ``"mean"`` (the mean budget the export stores)."""
        if self.towers:
            raise DeploymentError(f"{self.folder}: a two-tower export embeds and predicts no answers; use embed()")
        budget = self.budget(budget)
        if budget is not None and not self.demand:
            raise DeploymentError("a budget needs on-demand encoders; this export runs every encoder always")
        feeds, present = self._inputs(inputs, lengths, mask)
        batch, d = len(present), int(self.manifest["latent_dim"])
        tokens = np.zeros((batch, len(self.names), d), dtype=np.float32)
        always = [k for k in range(len(self.names)) if k not in self.demand]
        for k in always:
            tokens[:, k] = self._encode(self.names[k], feeds[self.names[k]], None)
        ran = None
        mask_fused = present
        if self.demand and self.scout_kind == "value":
            run = self._stages(tokens, feeds, present, budget)
        elif self.demand:
            scores, gate_runs, candidates = self.scout.run(["scores", "runs", "candidates"],
                                                           {"tokens": tokens, "present": present})
            run = self._choose(scores, gate_runs, candidates, present, budget)
            for j, k in enumerate(self.demand):
                rows = np.flatnonzero(run[:, j])
                if len(rows):  # each on-demand graph runs once, on the rows gathered for it
                    tokens[rows, k] = self._encode(self.names[k], feeds[self.names[k]],
                                                   None if len(rows) == batch else rows)
        if self.demand:
            ran = present.copy()
            ran[:, self.demand] = run
            mask_fused = ran
        names = ["probs", *self.manifest["heads"], "kept"]
        values = dict(zip(names, self.fusion.run(names, {"tokens": tokens, "mask": mask_fused})))
        cost = (mask_fused.astype(np.float64) * self.costs).sum(1)
        order, sal = self._decode(values)
        return RuntimeOutput(probs=values["probs"], ran=ran, cost=cost, answers=from_order(order, sal, self.labels),
                             kept=values["kept"], presence=values.get("presence"), salience=values.get("salience"))

    def embed(self, inputs: Mapping[str, np.ndarray], towers: list[str] | None = None, *,
              lengths: Mapping[str, np.ndarray] | None = None,
              masks: Mapping[str, np.ndarray] | None = None) -> dict[str, np.ndarray]:
        """A two-tower export's L2-normalised embeddings ``[B, E]``, per tower of ``towers`` (default: every tower),
        each from its own encoders' arrays in ``inputs`` (and ``masks[tower]`` ``[B, K_t]``: False where missing)."""
        if not self.towers:
            raise DeploymentError(f"{self.folder}: a fusion export predicts (predict()); only a two-tower export embeds")
        unknown = [t for t in towers or () if t not in self.towers]
        if unknown:
            raise DeploymentError(f"towers {unknown}: the export has {list(self.towers)}")
        out = {}
        for name in towers or list(self.towers):
            names = self.towers[name]["encoders"]
            feeds, present = self._inputs(inputs, lengths, (masks or {}).get(name), names)
            tokens = np.stack([self._encode(n, feeds[n], None) for n in names], axis=1)
            out[name] = self.tower_sessions[name].run(["embedding"], {"tokens": tokens, "mask": present})[0]
        return out

    def _decode(self, values: Mapping[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        decoder, neutral = self.manifest["decoder"], self.manifest.get("neutral")
        if decoder["type"] == "blemore":
            return blemore_decode(values["probs"].astype(np.float64), decoder["alpha"], decoder["beta"], neutral)
        if decoder["type"] == "presence_salience":
            return presence_salience_decode(values["presence"].astype(np.float64),
                                            values["salience"].astype(np.float64), decoder["threshold"],
                                            decoder["beta"], neutral)
        raise DeploymentError(f"decoder {decoder['type']!r}: the runtime applies blemore and presence_salience only")


def load(folder: str | Path, providers: list[str] | None = None, threads: int | None = None) -> RuntimeModel:
    """Load an export (``fusionkit export RUN --out DIR``) for prediction; its graphs' hashes are checked first.
    ``providers``: onnxruntime's execution providers (default: the CPU); ``threads``: the threads each graph runs
    on (default: onnxruntime's, every core)."""
    return RuntimeModel(folder, providers, threads)
