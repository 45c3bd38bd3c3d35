"""An exported model driven by numpy and onnxruntime: the always-run graphs, the scout, each on-demand graph on
the rows that keep it (gathered and scattered in numpy), then the fusion, and the decoded answers.

Nothing here imports torch: a deployment installs numpy, onnxruntime and safetensors (docs/deployment.md).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fusionkit.blemore.answers import Prediction, from_order
from fusionkit.blemore.decoding import blemore_decode, presence_salience_decode
from fusionkit.conditional import numpy_rules
from fusionkit.conditional.budget import CAP, MEAN, Budget, RowBudgets
from fusionkit.errors import FusionkitError
from fusionkit.export.manifest import (
    EXPORT_FORMAT,
    MANIFEST_FILE,
    SCOUTS,
    DeploymentError,
    graph_bytes,
    graph_io,
    read_manifest,
)
from fusionkit.moved import moved_names
from fusionkit.runtime.images import check_reads, read_images
from fusionkit.runtime.store import StoreRows, read_inputs

__all__ = ["EXPORT_FORMAT", "MANIFEST_FILE", "DeploymentError", "RuntimeOutput", "RuntimeModel", "load",
           "check_threads"]


def check_threads(threads: Any) -> int:
    """``threads`` as onnxruntime's intra-op thread count: a whole number from 1 to the cores this process may use
    (more only contend for them); anything else is a :class:`DeploymentError` that says what to give."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if isinstance(threads, bool) or not isinstance(threads, (int, np.integer)) or not 1 <= threads <= cores:
        raise DeploymentError(f"threads {threads!r}: give a whole number from 1 to {cores} (the cores this process may "
                              "use), or None for onnxruntime's default")
    return int(threads)

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


def _is_paths(value: Any) -> bool:
    """Whether an input is a sequence of file paths (an image encoder's, read by the runtime) rather than an array."""
    if isinstance(value, np.ndarray):
        return value.dtype == object or value.dtype.kind == "U"
    return isinstance(value, (list, tuple)) and all(isinstance(v, (str, os.PathLike, bytes)) for v in value)


class _Graph:
    """One loaded graph: onnxruntime's session, whose run errors name the graph in one line."""

    def __init__(self, session: Any, path: Path) -> None:
        self.session, self.path = session, path

    def run(self, outputs: list[str], feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        try:
            return self.session.run(outputs, dict(feeds))
        except Exception as exc:  # noqa: BLE001 - onnxruntime's errors carry no type of their own to catch
            first = str(exc).splitlines()[0][:300] if str(exc) else type(exc).__name__
            raise DeploymentError(f"{self.path}: onnxruntime failed to run it ({first})") from None


class RuntimeModel:
    """An export loaded for prediction (:func:`load`). Each graph's SHA-256 is checked against the manifest first,
    so a tampered or mismatched graph is refused before it runs."""

    def __init__(self, folder: str | Path, providers: list[str] | None = None, threads: int | None = None) -> None:
        self.folder = Path(folder)
        self.manifest = manifest = read_manifest(self.folder)
        self.labels: tuple[str, ...] = tuple(manifest["labels"])
        self._threads = None if threads is None else check_threads(threads)
        self._providers = providers or ["CPUExecutionProvider"]
        self.encoders: list[dict[str, Any]] = manifest["encoders"]
        self.names = [e["name"] for e in self.encoders]
        for entry in self.encoders:
            if "reads" in entry:
                try:
                    check_reads(entry["reads"], f"{self.folder / MANIFEST_FILE}: encoder {entry['name']!r}")
                except FusionkitError as exc:
                    raise DeploymentError(str(exc)) from None
        self.demand = [self.names.index(n) for n in manifest.get("on_demand", [])]
        self.costs = np.array([float(e["cost_gflops"] or 0.0) for e in self.encoders], dtype=np.float64)
        self.sessions = {e["name"]: self._session(e["graph"], *graph_io("encoder", sequences="lengths" in e["inputs"]))
                         for e in self.encoders}
        self.towers: dict[str, dict[str, Any]] = manifest.get("towers") or {}
        self.tower_sessions = {name: self._session(t["graph"], *graph_io("tower")) for name, t in self.towers.items()}
        self.fusion = None if self.towers else self._session("fusion.onnx",
                                                             *graph_io("fusion", heads=tuple(manifest["heads"])))
        #: Which scout decides what runs: "gate" (scout.onnx) or "value" (value.onnx, in stages); None without
        #: on-demand encoders.
        self.scout_kind: str | None = manifest.get("scout") if self.demand else None
        self.scout_graph = SCOUTS.get(self.scout_kind or "gate")
        self.scout = None
        if self.demand:
            self.scout = self._session(self.scout_graph, *graph_io(self.scout_kind))
        self.slots = int(manifest.get("slots") or len(self.names))
        #: The mean budgets the export stores (fitted at export), by which a request may name one.
        self.stored_budgets: list[Budget] = [
            Budget(gflops=b["gflops"], share=b["share"], mean=True, threshold=b["threshold"])
            for b in manifest.get("budgets", [manifest["budget"]] if manifest.get("budget") else [])]

    def _session(self, relative: str, inputs: tuple[str, ...], outputs: tuple[str, ...]) -> _Graph:
        """The graph ``relative`` loaded from the bytes its SHA-256 was checked on, its inputs, outputs and width
        checked against what the manifest says it is."""
        import onnxruntime as ort  # the one heavy import, deferred: importing fusionkit.runtime stays cheap

        data = graph_bytes(self.folder, self.manifest, relative)  # what runs is what was hashed
        options = ort.SessionOptions()
        options.log_severity_level = 3
        if self._threads is not None:
            options.intra_op_num_threads = self._threads
        options.add_session_config_entry("session.model_external_initializers_file_folder_path",
                                         str((self.folder / relative).parent))
        try:
            made = ort.InferenceSession(data, options, providers=self._providers)
        except Exception as exc:  # noqa: BLE001 - onnxruntime's own errors, named with the graph
            raise DeploymentError(f"{self.folder / relative}: onnxruntime cannot load it "
                                  f"({str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__}); "
                                  "export the model again") from None
        self._check_io(made, relative, inputs, outputs)
        return _Graph(made, self.folder / relative)

    def _check_io(self, made: Any, relative: str, inputs: tuple[str, ...], outputs: tuple[str, ...]) -> None:
        """Refuse a graph whose inputs, outputs or first output's width are not the manifest's (swapped graphs)."""
        found = (tuple(i.name for i in made.get_inputs()), tuple(o.name for o in made.get_outputs()))
        if found[0][:1] != inputs[:1] or set(found[0]) - set(inputs) or found[1] != outputs:
            raise DeploymentError(f"{self.folder / relative}: takes {list(found[0])} and gives {list(found[1])}, "
                                  f"where the manifest's {relative} takes {list(inputs)} and gives "
                                  f"{list(outputs)}; the graphs were swapped or replaced: export the model again")
        width = made.get_outputs()[0].shape[-1]
        expected = len(self.labels) if outputs[0] == "probs" else (
            int(self.manifest["latent_dim"]) if outputs[0] == "token" else None)
        if expected is not None and isinstance(width, int) and width != expected:
            raise DeploymentError(f"{self.folder / relative}: gives {outputs[0]} of width {width}, where the "
                                  f"manifest says {expected} ({'labels' if outputs[0] == 'probs' else 'latent_dim'}"
                                  "); the manifest or the graph was changed: export the model again")

    # --- budgets ------------------------------------------------------------------------------------------------

    def budget(self, value: Budget | str | float | None) -> Budget | None:
        """``value`` as a Budget: a cap (``"40%"``, ``2.5``), or a mean budget the export stores, by its name
        (``"mean:40%"``; ``"mean"`` when it stores one), with the threshold it fitted."""
        if value is None:
            return None
        if isinstance(value, str) and value.strip().lower().startswith("mean"):
            stored = {b.describe().lower(): b for b in self.stored_budgets}
            names = ", ".join(b.describe() for b in self.stored_budgets)
            if not stored:
                raise DeploymentError(f"budget {value}: this export stores no mean budget; export it with --budget "
                                      "mean:S% to fit its threshold on the run's validation fold, or give a cap (40%)")
            wanted = value.strip().lower()
            if wanted == "mean" and len(stored) == 1:
                return next(iter(stored.values()))
            if wanted not in stored:
                raise DeploymentError(f"budget {value}: this export stores the mean budget(s) {names}; give one of "
                                      f"them{' (or mean)' if len(stored) == 1 else ''}, or a cap")
            return stored[wanted]
        try:
            budget = Budget.parse(value)
        except FusionkitError as exc:
            raise DeploymentError(str(exc)) from None
        if budget.seconds is not None:
            raise DeploymentError("a budget over measured time is not supported by the runtime; give a share or GFLOPs")
        if budget.mean and budget.threshold is None:
            raise DeploymentError(f"budget {budget.describe()}: a mean budget needs its fitted threshold")
        return budget

    def row_budgets(self, value: Any, rows: int) -> RowBudgets:
        """``value`` as one budget per row: a list of ``rows`` budgets (each as :meth:`budget` reads it), or one budget
        for every row. Each row is decided as if it were alone, whatever budgets its neighbours have."""
        if isinstance(value, RowBudgets):
            budgets = list(value.budgets)
        elif isinstance(value, (list, tuple, np.ndarray)):
            budgets = list(value)
        else:
            budgets = [value] * rows
        if len(budgets) != rows:
            raise DeploymentError(f"budget: {len(budgets)} budgets for {rows} rows; give one per row, or one for all")
        resolved: dict[str, Budget | None] = {}  # each distinct budget read once, however many rows ask for it
        for value in budgets:
            if repr(value) not in resolved:
                resolved[repr(value)] = self.budget(value)
        chosen = [resolved[repr(value)] for value in budgets]
        if self.demand or all(b is None for b in chosen):
            return RowBudgets(chosen)
        raise DeploymentError("a budget needs on-demand encoders; this export runs every encoder always")

    # --- prediction -----------------------------------------------------------------------------------------------

    def feeds(self, inputs: Mapping[str, np.ndarray], lengths: Mapping[str, np.ndarray] | None,
                mask: np.ndarray | None, names: list[str] | None = None
                ) -> tuple[dict[str, dict[str, np.ndarray]], np.ndarray]:
        """The graph inputs of the encoders ``names`` (default: every encoder) and their ``[B, len(names)]``
        availability (NaN rows missing, or refused)."""
        if not isinstance(inputs, Mapping):
            raise DeploymentError(f"inputs: expected a mapping of encoder name to array, found {type(inputs).__name__}")
        lengths = lengths or {}
        if not isinstance(lengths, Mapping):
            raise DeploymentError(f"lengths: expected a mapping of encoder name to [B] frame counts, found "
                                  f"{type(lengths).__name__}")
        names = self.names if names is None else names
        missing = [n for n in names if n not in inputs]
        if missing:
            raise DeploymentError(f"inputs: no array for encoder(s) {missing}; the export reads {names}")
        for name in names:
            given = inputs[name]
            if (given is None or isinstance(given, (str, bytes, int, float, complex, bool, np.generic))
                    or (isinstance(given, np.ndarray) and given.ndim == 0) or not hasattr(given, "__len__")):
                raise DeploymentError(f"inputs[{name!r}]: expected an array with a row per sample (or a list of "
                                      f"image paths), found {type(given).__name__}")
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
                paths = np.empty(batch, dtype=object)  # a path, or an image file's bytes (an upload)
                paths[:] = [p if isinstance(p, bytes) else os.fspath(p) for p in given]
                feeds[name] = {"paths": paths}
                continue
            x, bad = self._array(name, entry, given, batch)
            present[bad, k] = False
            feed = {"x": x}
            if "lengths" in entry["inputs"]:
                steps = self._frames(name, lengths.get(name), batch, x.shape[1])
                present[steps == 0, k] = False
                feed["lengths"] = np.maximum(steps, 1) if (steps == 0).any() else steps
            feeds[name] = feed
        return feeds, present

    def _array(self, name: str, entry: Mapping[str, Any], given: Any, batch: int) -> tuple[np.ndarray, np.ndarray]:
        """Encoder ``name``'s input as its graph takes it (dtype and shape checked, one sample without its batch axis
        named as such), and ``[B]``: the rows with NaN or inf, zeroed when the model's ``nan_policy`` is ``mask``."""
        spec = entry["inputs"]["x"]
        dtype = np.dtype(spec.get("dtype", "float32"))
        if dtype == np.uint8 and np.asarray(given).dtype != np.uint8:
            raise DeploymentError(f"inputs[{name!r}]: expected uint8 pixels (fusionkit.runtime.images.read_images "
                                  f"gives them) or a list of image paths, found {np.asarray(given).dtype}")
        try:
            x = np.asarray(given, dtype=dtype)
        except (TypeError, ValueError) as exc:
            raise DeploymentError(f"inputs[{name!r}]: not an array of numbers ({str(exc)[:120]})") from None
        shape = spec["shape"]
        fixed = [(x.shape[n], size) for n, size in enumerate(shape) if isinstance(size, int) and n < x.ndim]
        if x.ndim == len(shape) - 1 and all(a == b for a, b in zip(x.shape, shape[1:]) if isinstance(b, int)):
            raise DeploymentError(f"inputs[{name!r}]: found one sample's {list(x.shape)} without its batch axis; "
                                  f"give [{', '.join(map(str, ['B', *shape[1:]]))}], e.g. x[None] for one sample")
        if x.ndim != len(shape) or any(a != b for a, b in fixed) or len(x) != batch:
            raise DeploymentError(f"inputs[{name!r}]: expected {shape} with {batch} rows (one per sample), "
                                  f"found {list(x.shape)}")
        bad = ~np.isfinite(x).all(axis=tuple(range(1, x.ndim)))
        if bad.any():
            if self.manifest.get("nan_policy") != "mask":
                raise DeploymentError(f"inputs[{name!r}]: NaN or inf in rows {np.flatnonzero(bad)[:5].tolist()}; the "
                                      "model's nan_policy is 'error' (with 'mask' such rows count as missing)")
            x = np.where(bad.reshape((batch,) + (1,) * (x.ndim - 1)), np.float32(0.0), x)
        return np.ascontiguousarray(x), bad

    @staticmethod
    def _frames(name: str, given: Any, batch: int, frames: int) -> np.ndarray:
        """``[B]`` int64: each row's frame count of a sequence encoder (every frame when ``given`` is None), each a
        whole number from 0 to the ``frames`` given."""
        try:
            steps = np.full(batch, frames, dtype=np.int64) if given is None else np.asarray(given, dtype=np.float64)
        except (TypeError, ValueError):
            steps = np.zeros(0)
        if (steps.shape != (batch,) or not np.isfinite(steps).all() or (steps != np.round(steps)).any()
                or (steps < 0).any() or (steps > frames).any()):
            raise DeploymentError(f"lengths[{name!r}]: expected [{batch}] whole frame counts from 0 to {frames} (the "
                                  f"frames given), found {np.asarray(given)!r:.80}")
        return steps.astype(np.int64)

    def check_inputs(self, inputs: Mapping[str, Any], lengths: Mapping[str, np.ndarray] | None = None,
                     mask: np.ndarray | None = None) -> np.ndarray:
        """Check a batch's inputs as :meth:`predict` checks them (names, shapes, dtypes, frame counts, NaN under the
        model's ``nan_policy``) without running a graph or reading an image; returns ``[B, K]``: which encoders each
        row has. A :class:`DeploymentError` names what is wrong."""
        return self.feeds(inputs, lengths, mask)[1]

    def encode(self, name: str, feed: Mapping[str, np.ndarray], rows: np.ndarray | None) -> np.ndarray:
        """Encoder ``name``'s tokens ``[rows, d]`` from its graph inputs ``feed`` (of :meth:`feeds`), on ``rows`` (None: all)."""
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

    def _limits(self, present: np.ndarray, budgets: RowBudgets) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Per row: the rule that decides (:data:`~fusionkit.conditional.budget.CAP`, ``MEAN`` or the gate's), the GFLOPs left
        for the on-demand encoders under a cap (+inf elsewhere), and a mean budget's threshold (float32, NaN
        elsewhere)."""
        kind, cap, threshold = budgets.rules(float(self.costs.sum()))
        available = present[:, self.demand]
        paid = (self.costs * present).sum(1) - (self.costs[self.demand] * available).sum(1)
        return kind, np.where(kind == CAP, cap - paid, np.inf), threshold.astype(np.float32)

    def _choose(self, scores: np.ndarray, gate_runs: np.ndarray, candidates: np.ndarray, present: np.ndarray,
                budgets: RowBudgets) -> np.ndarray:
        """Which on-demand encoders run for each row, by its own budget: the gate's own rule, or a budget over the
        ``candidates`` (those that could enter the row's top-n, so that every encoder run is fused), as the PyTorch
        model chooses."""
        available = present[:, self.demand]
        kind, limit, threshold = self._limits(present, budgets)
        candidates = candidates.astype(bool) & available
        by_cap = numpy_rules.within_budget(scores[:, self.demand], candidates, self.costs[self.demand], limit)
        with np.errstate(invalid="ignore"):
            by_mean = (numpy_rules.value_per_cost(scores, present, self.costs, self.demand) >= threshold[:, None]) & candidates
        rule = kind[:, None]
        return np.where(rule == CAP, by_cap, np.where(rule == MEAN, by_mean, gate_runs.astype(bool) & available))

    def _stages(self, tokens: np.ndarray, feeds: Mapping[str, Mapping[str, np.ndarray]], present: np.ndarray,
                budgets: RowBudgets) -> np.ndarray:
        """The value scout's decisions, in stages, as :meth:`fusionkit.models.fusion.Trunk._stages` makes them: each
        row still going picks the on-demand encoder of most predicted value per unit of cost among those left (that
        fit its cap), runs it when that value reaches its threshold (0 under the gate's own rule, the stored one
        under a mean budget, any under a cap), and the rest are re-scored with its token, written into ``tokens``."""
        demand, batch, m = self.demand, len(present), len(self.demand)
        available = present[:, demand]
        relative = numpy_rules.relative_costs(self.costs, demand)
        kind, limit, mean_threshold = self._limits(present, budgets)
        threshold = np.where(kind == CAP, -np.inf, np.where(kind == MEAN, mean_threshold, 0.0)).astype(np.float32)
        run = np.zeros((batch, m), dtype=bool)
        going = available.any(axis=1)
        for _ in range(m):
            values = self.scout.run(["values"], {"tokens": tokens, "present": present, "ran": run})[0]
            eligible = available & ~run & (going & (run.sum(1) < self.slots))[:, None]
            eligible &= self.costs[demand][None, :] <= limit[:, None] + 1e-9
            pick, _, going = numpy_rules.stage_pick(values, relative, eligible, threshold)
            for j, k in enumerate(demand):
                rows = np.flatnonzero(going & (pick == j))
                if len(rows):  # each stage runs each on-demand graph once, on the rows that picked it
                    tokens[rows, k] = self.encode(self.names[k], feeds[self.names[k]],
                                                   None if len(rows) == batch else rows)
            run[np.flatnonzero(going), pick[going]] = True
            limit = limit - np.where(going, self.costs[demand][pick], 0.0)
        return run

    def predict(self, inputs: Mapping[str, np.ndarray], budget: Any = None, *,
                lengths: Mapping[str, np.ndarray] | None = None, mask: np.ndarray | None = None) -> RuntimeOutput:
        """Predict a batch: ``inputs`` maps every encoder name to ``[B, D]`` (or ``[B, T, D]`` frames, with
        ``lengths``), a live image encoder's to ``B`` image paths (read only for the rows that run it) or its
        ``uint8`` ``[B, C, H, W]`` pixels (:func:`fusionkit.runtime.images.read_images`); ``mask`` ``[B, K]`` is
        False where an encoder is missing. ``budget``: None (the gate's own rule), a cap (``"40%"``, ``2.5``
        GFLOPs) or a mean budget the export stores (``"mean:40%"``, or ``"mean"``); or a list of those, one per
        row, each row decided exactly as if it were alone (:meth:`row_budgets`)."""
        if self.towers:
            raise DeploymentError(f"{self.folder}: a two-tower export embeds and predicts no answers; use embed()")
        feeds, present = self.feeds(inputs, lengths, mask)
        budgets = self.row_budgets(budget, len(present))
        batch, d = len(present), int(self.manifest["latent_dim"])
        if batch == 0:  # what the model gives for no rows: empty arrays of the right widths
            heads = {role: np.zeros((0, len(self.labels)), np.float32) for role in self.manifest["heads"]}
            return RuntimeOutput(probs=np.zeros((0, len(self.labels)), np.float32),
                                 ran=np.zeros((0, len(self.names)), bool) if self.demand else None,
                                 cost=np.zeros(0), answers=[], kept=np.zeros((0, self.slots), np.int64),
                                 presence=heads.get("presence"), salience=heads.get("salience"))
        tokens = np.zeros((batch, len(self.names), d), dtype=np.float32)
        always = [k for k in range(len(self.names)) if k not in self.demand]
        for k in always:
            tokens[:, k] = self.encode(self.names[k], feeds[self.names[k]], None)
        ran = None
        mask_fused = present
        if self.demand and self.scout_kind == "value":
            run = self._stages(tokens, feeds, present, budgets)
        elif self.demand:
            scores, gate_runs, candidates = self.scout.run(["scores", "runs", "candidates"],
                                                           {"tokens": tokens, "present": present})
            run = self._choose(scores, gate_runs, candidates, present, budgets)
            for j, k in enumerate(self.demand):
                rows = np.flatnonzero(run[:, j])
                if len(rows):  # each on-demand graph runs once, on the rows gathered for it
                    tokens[rows, k] = self.encode(self.names[k], feeds[self.names[k]],
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
            feeds, present = self.feeds(inputs, lengths, (masks or {}).get(name), names)
            if len(present) == 0:
                out[name] = np.zeros((0, int(self.towers[name]["embed_dim"])), np.float32)
                continue
            tokens = np.stack([self.encode(n, feeds[n], None) for n in names], axis=1)
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


__getattr__ = moved_names(__name__, dict.fromkeys(("within_budget", "value_per_cost"),
                                                  "fusionkit.conditional.numpy_rules"))
