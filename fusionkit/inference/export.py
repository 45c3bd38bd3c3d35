"""Export a fusion model to ONNX as split graphs that keep conditional execution (docs/deployment.md).

One graph cannot choose per row which encoders run, so an export is a folder of graphs and a manifest that says how
to drive them, as Hugging Face Optimum splits an encoder-decoder::

    DIR/manifest.json        encoders (inputs, costs, when they run), decoder and its thresholds, a fitted mean
                             budget, the spec, versions, opset, and each graph's SHA-256
    DIR/encoders/NAME.onnx   one encoder with its projector: inputs -> its token [B, d] (dynamic batch)
    DIR/scout.onnx           the always-run tokens -> the scout's scores, the gate's own choice of on-demand
                             encoders and those that could enter each row's top-n (on-demand encoders, gate scout)
    DIR/value.onnx           the tokens computed so far, which encoders are present and which on-demand ones ran ->
                             each on-demand encoder's predicted value (the value scout, run once per stage)
    DIR/fusion.onnx          every token and which are present -> gate, top-n, fusion, heads and combiner

The runtime (:mod:`fusionkit.runtime`) runs them with numpy and onnxruntime alone. Any encoder exports when its class
gives :meth:`fusionkit.interfaces.Encoder.export_inputs` (and a live one
:meth:`fusionkit.interfaces.LiveEncoder.export_preprocessing`, how the runtime reads its files); one that does not is
refused, named.
"""

from __future__ import annotations

import importlib.util
import inspect
import json
import os
import warnings
from collections.abc import Callable
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from fusionkit.answers import from_order
from fusionkit.budget import Budget
from fusionkit.data.store import FeatureStore
from fusionkit.errors import FusionkitError
from fusionkit.files import check_replaceable, folder_lock, recover_directory, sha256_file, write_directory
from fusionkit.inference.outputs import collect_outputs
from fusionkit.interfaces import LiveEncoder
from fusionkit.models.conditional import kept_by
from fusionkit.models.fusion import FusionModel, Trunk
from fusionkit.models.towers import Tower, TwoTowerModel
from fusionkit.plugins import loaded
from fusionkit.runtime.images import check_reads
from fusionkit.runtime.manifest import DECODERS, EXPORT_FORMAT, MANIFEST_FILE, foreign_entries
from fusionkit.runtime.model import RuntimeModel, load
from fusionkit.runtime.store import StoreRows

__all__ = ["EXPORT_FORMAT", "MANIFEST_FILE", "OPSET", "EXPORTERS", "DECODERS", "CHECK_ROWS", "CHECK_BUDGETS",
           "export_model", "check_export", "ExportError"]

#: The ONNX opset the graphs are written in.
OPSET = 18
#: The exporters ``export_model`` can write the graphs with: torch's TorchScript exporter (the default: fast, and
#: exact for these modules; torch deprecates it) and its ``torch.export`` one (``dynamo=True``; needs onnxscript,
#: and takes seconds per graph).
EXPORTERS = ("torchscript", "dynamo")


class ExportError(FusionkitError):
    """A model, or one of its parts, that cannot be exported; the message names it and says why."""


class _EncoderGraph(nn.Module):
    """One encoder and its projector: ``(x[, lengths]) -> token [B, d]`` (the identity embedding is the fusion's)."""

    def __init__(self, encoder: nn.Module, projector: nn.Module, sequences: bool) -> None:
        super().__init__()
        self.encoder, self.projector, self.sequences = encoder, projector, sequences

    def forward(self, x: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
        return self.projector(self.encoder(x, lengths if self.sequences else None))


class _ScoutGraph(nn.Module):
    """``(tokens [B, K, d], present [B, K]) -> (scores [B, K], runs [B, m], candidates [B, m])``: the scout's scores
    from the tokens that ran (zeros stand for the on-demand ones), the on-demand encoders the gate's own rule keeps,
    and those that could enter the row's top-n (the only ones a budget may run)."""

    def __init__(self, model: FusionModel) -> None:
        super().__init__()
        self.model = model

    def forward(self, tokens: torch.Tensor, present: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        model = self.model
        scores = model.gate.score(tokens + model.identity, present)
        available = present[:, list(model.on_demand)]
        runs = kept_by(model.gate.select(scores, model.fusable_of(present)).kept, model.on_demand) & available
        return scores, runs, model._candidates(scores, present) & available


class _ValueGraph(nn.Module):
    """``(tokens [B, K, d], present [B, K], ran [B, m]) -> values [B, m]``: the value scout's predicted loss drop of
    each on-demand encoder, from the tokens computed so far (zeros for the rest); the runtime calls it once per
    stage."""

    def __init__(self, model: FusionModel) -> None:
        super().__init__()
        self.model = model

    def forward(self, tokens: torch.Tensor, present: torch.Tensor, ran: torch.Tensor) -> torch.Tensor:
        return self.model.value_head(tokens, present, ran)


class _FusionGraph(nn.Module):
    """``(tokens [B, K, d], mask [B, K]) -> probs [B, L], presence, salience, kept [B, n]``: the model's fusion of
    the tokens present (a missing or skipped encoder holds zeros and is masked out)."""

    def __init__(self, model: FusionModel) -> None:
        super().__init__()
        self.model = model

    def forward(self, tokens: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, ...]:
        model = self.model
        first = model._demanded(mask) if model.on_demand else None  # an on-demand encoder that ran is fused
        encoded = model._fuse(tokens + model.identity, mask, None, None, {}, first=first)
        probs = {role: head.probabilities(head(encoded.fused)) for role, head in model.heads.items()}
        combined = model.combiner(probs.get("presence"), probs.get("salience"))
        outputs = [combined, *(probs[role] for role in _roles(model)), encoded.selection.kept]
        return tuple(outputs)


class _TowerGraph(nn.Module):
    """``(tokens [B, K_t, d], mask [B, K_t]) -> embedding [B, E], kept``: one tower of a two-tower model (its gate,
    selection, fusion and L2-normalised embedding) over its encoders' tokens."""

    def __init__(self, tower: Tower) -> None:
        super().__init__()
        self.tower = tower

    def forward(self, tokens: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        tower = self.tower
        encoded = tower._fuse(tokens + tower.identity, mask, None, None, {})
        return torch.nn.functional.normalize(tower.embed(encoded.fused), dim=-1), encoded.selection.kept


def _roles(model: FusionModel) -> list[str]:
    return [role for role in ("presence", "salience") if role in model.heads]


def _exportable(model: Any) -> FusionModel | TwoTowerModel:
    """The model, after refusing what the runtime cannot run, naming it."""
    if not isinstance(model, (FusionModel, TwoTowerModel)):
        raise ExportError(f"{type(model).__name__}: not a fusionkit model (a fusion or two-tower model)")
    trunks = [model] if isinstance(model, FusionModel) else list(model.towers.values())
    for trunk in trunks:
        for name in trunk.encoder_names:
            encoder = trunk.encoders[name]
            if isinstance(encoder, LiveEncoder) and _reads(encoder, name) is None:
                raise ExportError(f"encoder {name!r} ({type(encoder).__name__}) is live and declares no "
                                  "export_preprocessing(): the runtime cannot read its raw inputs "
                                  f"({encoder.modality}; it reads images). Extract its features into a store "
                                  "(`fusionkit extract`) and export a model that reads them")
            if encoder.export_inputs() is None:
                raise ExportError(f"encoder {name!r} ({type(encoder).__name__}) declares no export_inputs(), so its "
                                  "graph cannot be traced; its plugin can add one (docs/deployment.md)")
        if len(trunk.domains) > 1:
            raise ExportError("the model keeps per-domain statistics (data.standardize_per_domain or "
                              "projector.domain_norm for a target domain); an export holds one domain's: not built yet")
    if isinstance(model, FusionModel) and model.spec.decoder.type not in DECODERS:
        raise ExportError(f"decoder {model.spec.decoder.type!r}: the runtime applies the built-in decoders "
                          f"({', '.join(DECODERS)}) only")
    return model


def _reads(encoder: LiveEncoder, name: str) -> dict[str, Any] | None:
    """A live encoder's preprocessing for the manifest, checked as the runtime will read it; refusals name it."""
    try:
        reads = encoder.export_preprocessing()
        if reads is not None:
            check_reads(reads, f"encoder {name!r} ({type(encoder).__name__}).export_preprocessing()")
    except FusionkitError as exc:
        raise ExportError(str(exc)) from None
    return reads


def _onnx_export(module: nn.Module, args: tuple, path: Path, inputs: list[str], outputs: list[str],
                 dynamic: dict[str, dict[int, str]], what: str, exporter: str) -> None:
    """One graph with its dynamic axes, by the ``exporter`` of :data:`EXPORTERS`."""
    module.eval()  # the exporter restores the wrapper's mode afterwards, recursively: a new wrapper is in training
    fastpath = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)  # the fused attention kernels have no ONNX form; the math is equal
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if exporter == "dynamo":
                # torch.export names no axes: each dynamic one must stay dynamic (Dim.DYNAMIC refuses to specialise)
                params = list(inspect.signature(module.forward).parameters)[:len(args)]
                shapes = {param: {axis: torch.export.Dim.DYNAMIC for axis in dynamic.get(name, {})} or None
                          for param, name in zip(params, inputs)}
                torch.onnx.export(module, args, str(path), input_names=inputs, output_names=outputs,
                                  dynamic_shapes=shapes, opset_version=OPSET, dynamo=True, verbose=False)
            else:
                torch.onnx.export(module, args, str(path), input_names=inputs, output_names=outputs,
                                  dynamic_axes=dynamic, opset_version=OPSET, dynamo=False)
    except Exception as exc:  # noqa: BLE001 - what the exporter raised, named with the part that failed
        raise ExportError(f"{what}: the ONNX exporter ({exporter}) failed: {type(exc).__name__}: "
                          f"{str(exc)[:500]}") from exc
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)


def _encoder_entry(model: FusionModel | TwoTowerModel, trunk: Trunk, name: str, folder: Path,
                   exporter: str) -> dict[str, Any]:
    """One encoder's graph (the encoder and its projector, in ``trunk``) and its manifest entry."""
    encoder = trunk.encoders[name]
    x, lengths = encoder.export_inputs()
    sequences = lengths is not None
    graph = _EncoderGraph(encoder, trunk.projectors[name], sequences).eval()
    path = folder / "encoders" / f"{name}.onnx"
    args = (x, lengths) if sequences else (x,)
    inputs = ["x", "lengths"] if sequences else ["x"]
    dynamic = {"x": {0: "batch", **({1: "frames"} if sequences else {})}, "token": {0: "batch"},
               **({"lengths": {0: "batch"}} if sequences else {})}
    _onnx_export(graph, args, path, inputs, ["token"], dynamic, f"encoder {name!r} ({type(encoder).__name__})",
                 exporter)
    spec = model.spec.encoders[model.spec.encoder_names.index(name)]
    shape = ["batch", "frames", int(x.shape[-1])] if sequences else ["batch", *(int(n) for n in x.shape[1:])]
    entry = {"name": name, "type": spec.type, "run": spec.run, "cost_gflops": trunk.encoder_costs()[name],
             "fused": spec.fused, **({"preview_of": spec.preview_of} if spec.preview_of else {}),
             "graph": f"encoders/{name}.onnx",
             "inputs": {"x": {"shape": shape, "dtype": str(x.dtype).removeprefix("torch.")},
                        **({"lengths": {"shape": ["batch"], "dtype": "int64"}} if sequences else {})}}
    if isinstance(encoder, LiveEncoder):
        entry["reads"] = _reads(encoder, name)
    return entry


def export_model(model: FusionModel | TwoTowerModel, out: str | os.PathLike, *,
                 budget: Budget | list[Budget] | None = None,
                 overwrite: bool = False, exporter: str = "torchscript",
                 check: Callable[[Path], Any] | None = None) -> Path:
    """Write ``model`` to the folder ``out`` as split ONNX graphs and a manifest; returns the folder. A two-tower
    model writes each tower's graph (``towers/NAME.onnx``) beside its encoders', for ``RuntimeModel.embed``.

    ``budget``: a mean budget with its fitted threshold (:func:`fusionkit.inference.fit_mean_budget`), or a list of
    them, stored so that the runtime applies each by its name (``budget="mean:40%"``; ``"mean"`` when one). ``exporter``: one of :data:`EXPORTERS`. ``check``: called
    with the finished folder before it takes ``out``'s place (e.g. :func:`check_export`); when it raises, nothing
    is replaced and nothing is left behind.

    ``out`` must be new or empty, or, with ``overwrite``, an earlier export that holds nothing but what its export
    wrote (its manifest's SHA-256s cover every file; a user's file inside is refused, named). One process writes
    ``out`` at a time (a lock beside it, ``.NAME.lock``); the temporaries of a killed export are removed by the
    next. The folder is written atomically.
    """
    if exporter not in EXPORTERS:
        raise ExportError(f"exporter {exporter!r}: expected one of {', '.join(EXPORTERS)}")
    if exporter == "dynamo" and importlib.util.find_spec("onnxscript") is None:
        raise ExportError("exporter 'dynamo' needs onnxscript: pip install 'fusionkit[export]' (or onnxscript)")
    model = _exportable(model)
    budgets = [] if budget is None else list(budget) if isinstance(budget, (list, tuple)) else [budget]
    for one in budgets:
        if not isinstance(one, Budget) or not one.mean or one.threshold is None or one.seconds is not None:
            raise ExportError(f"budget {one.describe() if isinstance(one, Budget) else one!r}: an export stores mean "
                              "budgets in GFLOPs with their fitted thresholds (fusionkit.inference.fit_mean_budget); a "
                              "cap needs nothing stored: give it at predict time")
    if len({one.describe() for one in budgets}) != len(budgets):
        raise ExportError(f"budgets {[one.describe() for one in budgets]}: each mean budget is stored once, by its name")
    if budgets and (isinstance(model, TwoTowerModel) or not model.on_demand):
        raise ExportError("a budget needs on-demand encoders (run: on_demand); this model runs every encoder")
    target = Path(out)
    with folder_lock(target, "model export", "Wait for it to finish, or choose another --out."):
        recover_directory(target)  # a killed export's temporaries: no live writer holds them while we hold the lock
        _check_target(target, overwrite)

        def fill(folder: Path) -> None:
            if isinstance(model, TwoTowerModel):
                _write_towers(model, folder, exporter)
            else:
                _write(model, folder, budgets, exporter)
            if check is not None:
                check(folder)

        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                write_directory(target, fill)
        finally:
            model.train(was_training)
    return target


def _check_target(target: Path, overwrite: bool) -> None:
    """Refuse ``target`` unless it is absent, empty, or (with ``overwrite``) an intact earlier export holding only
    what its export wrote; the refusal names what is there."""
    if target.is_dir() and not target.is_symlink() and any(target.iterdir()):
        foreign = foreign_entries(target)
        if foreign is not None:
            raise ExportError(f"{target}: not replaced: {foreign}. An export replaces only an earlier export that "
                              "holds nothing else; move your files away or choose another --out")
        if not overwrite:
            raise ExportError(f"{target}: holds an earlier export; give --overwrite to replace it")
    check_replaceable(target, "model export", lambda folder: True)


def _hashes(folder: Path) -> dict[str, str]:
    """The SHA-256 of every file written into ``folder`` (the graphs and any data they read), by relative path."""
    return {path.relative_to(folder).as_posix(): sha256_file(path)
            for path in sorted(folder.rglob("*")) if path.is_file() and path.name != MANIFEST_FILE}


def _write(model: FusionModel, folder: Path, budgets: list[Budget], exporter: str) -> None:
    (folder / "encoders").mkdir()
    encoders = [_encoder_entry(model, model, name, folder, exporter) for name in model.encoder_names]
    K, d = len(model.encoder_names), model.spec.latent_dim
    tokens, mask = torch.zeros(2, K, d), torch.ones(2, K, dtype=torch.bool)
    roles = _roles(model)
    _onnx_export(_FusionGraph(model), (tokens, mask), folder / "fusion.onnx", ["tokens", "mask"],
                 ["probs", *roles, "kept"], {n: {0: "batch"} for n in ["tokens", "mask", "probs", *roles, "kept"]},
                 "the fusion (gate, selection, fusion, heads, combiner)", exporter)
    if model.value_head is not None:
        ran = torch.zeros(2, len(model.on_demand), dtype=torch.bool)
        _onnx_export(_ValueGraph(model), (tokens, mask, ran), folder / "value.onnx", ["tokens", "present", "ran"],
                     ["values"], {n: {0: "batch"} for n in ("tokens", "present", "ran", "values")},
                     "the value scout (conditional.scout: value)", exporter)
    elif model.on_demand:
        _onnx_export(_ScoutGraph(model), (tokens, mask), folder / "scout.onnx", ["tokens", "present"],
                     ["scores", "runs", "candidates"],
                     {n: {0: "batch"} for n in ("tokens", "present", "scores", "runs", "candidates")},
                     f"the scout ({model.spec.gate.type} gate)", exporter)
    decoder = model.spec.decoder
    stored = [{"describe": b.describe(), "share": b.share, "gflops": b.gflops, "threshold": b.threshold}
              for b in budgets]
    manifest = {
        **_manifest_head(model, exporter), "kind": "fusion", "neutral": model.decoder.context.neutral_index,
        "encoders": encoders, "on_demand": [model.encoder_names[k] for k in model.on_demand],
        "scout": None if not model.on_demand else model.spec.conditional.scout, "slots": model.top_n,
        "nan_policy": model.spec.data.nan_policy, "heads": roles,
        "decoder": {"type": decoder.type, **{key: float(getattr(decoder.config, key)) for key in DECODERS[decoder.type]}},
        "budget": stored[0] if stored else None, "budgets": stored,
        "sha256": _hashes(folder),
    }
    (folder / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")


def _manifest_head(model: FusionModel | TwoTowerModel, exporter: str) -> dict[str, Any]:
    """What every manifest says first: its format, the versions, the exporter, the labels and the latent size, the
    spec."""
    return {"format": EXPORT_FORMAT, "fusionkit": _version(), "opset": OPSET, "torch": torch.__version__,
            "exporter": exporter,
            "labels": list(model.labels), "latent_dim": model.spec.latent_dim, "spec": model.spec.to_dict(),
            "plugins": _plugin_versions()}


def _write_towers(model: TwoTowerModel, folder: Path, exporter: str) -> None:
    """Each tower's encoders and its tower graph, and a manifest that names which encoders feed which tower."""
    (folder / "encoders").mkdir()
    (folder / "towers").mkdir()
    encoders, towers = [], {}
    for name, tower in model.towers.items():
        encoders += [_encoder_entry(model, tower, n, folder, exporter) for n in tower.encoder_names]
        k, d = len(tower.encoder_names), model.spec.latent_dim
        _onnx_export(_TowerGraph(tower), (torch.zeros(2, k, d), torch.ones(2, k, dtype=torch.bool)),
                     folder / "towers" / f"{name}.onnx", ["tokens", "mask"], ["embedding", "kept"],
                     {n: {0: "batch"} for n in ("tokens", "mask", "embedding", "kept")}, f"tower {name!r}", exporter)
        towers[name] = {"encoders": list(tower.encoder_names), "graph": f"towers/{name}.onnx",
                        "embed_dim": tower.embed_dim}
    manifest = {**_manifest_head(model, exporter), "kind": "two_tower", "encoders": encoders, "towers": towers,
                "logit_scale": float(model.logit_scale.exp()), "nan_policy": model.spec.data.nan_policy,
                "sha256": _hashes(folder)}
    (folder / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")


def _version() -> str | None:
    try:
        return metadata.version("fusionkit")
    except metadata.PackageNotFoundError:
        return None


def _plugin_versions() -> dict[str, str | None]:
    return loaded().versions()


#: How many of a store's rows ``check_export`` compares (the first ones).
CHECK_ROWS = 512
#: The budgets ``check_export`` compares at, beside the gate's own rule and an export's stored mean budget.
CHECK_BUDGETS = ("0%", "25%", "50%", "100%")


def check_export(model: FusionModel | TwoTowerModel, folder: str | os.PathLike, store: FeatureStore, index: np.ndarray | None = None,
                 atol: float = 1e-4) -> list[dict[str, Any]]:
    """Run the export in ``folder`` (without torch) and ``model`` on the rows ``index`` of ``store`` (default: its
    first :data:`CHECK_ROWS`) at the gate's own rule, several caps and the stored mean budget, and compare: the
    probabilities within ``atol``, the same encoders run on the same rows, the same answers except on exact ties.
    Returns one line per budget; a mismatch is an :class:`ExportError` that names the graph at fault."""
    runtime = load(folder)
    index = np.arange(min(len(store), CHECK_ROWS)) if index is None else np.asarray(index)
    raw = None if store.raw is None or Path(store.raw.path) == Path(store.path) else store.raw.path
    rows = runtime.read(store.path, raw).take(index)
    _check_tokens(model, runtime, store, index, rows, atol)
    if isinstance(model, TwoTowerModel):
        return _check_towers(model, runtime, store, index, rows, atol)
    budgets: list[Any] = [None, *(CHECK_BUDGETS if runtime.demand else ())]
    stored = [b.describe() for b in runtime.stored_budgets]
    budgets += ["mean"] if len(stored) == 1 else stored
    if runtime.demand:  # every kind at once, one per row: each row decided as if alone
        budgets.append([[None, *CHECK_BUDGETS, *stored][n % (len(CHECK_BUDGETS) + 1 + len(stored))]
                        for n in range(len(index))])
    report = []
    for given in budgets:
        budget = (runtime.row_budgets(given, len(index)) if isinstance(given, list) else runtime.budget(given))
        expected = collect_outputs(model, store, index, budget=budget)
        got = runtime.predict(rows.inputs, given, lengths=rows.lengths)
        where = "a budget per row" if isinstance(given, list) else f"budget {given or 'the gate rule'}"
        if runtime.demand and not np.array_equal(expected["ran"].astype(bool), got.ran):
            rows_off = np.flatnonzero((expected["ran"].astype(bool) != got.ran).any(axis=1))
            raise ExportError(f"{runtime.scout_graph} ({where}): the runtime runs other encoders than the model on "
                              f"{len(rows_off)} of {len(index)} rows (e.g. {[rows.ids[i] for i in rows_off[:3]]})")
        diff = float(np.abs(expected["probs"] - got.probs).max())
        if diff > atol:
            raise ExportError(f"fusion.onnx ({where}): probabilities differ from the model's by up to {diff:.3g} "
                              f"(more than {atol:g})")
        order, sal = model.decoder.decode(expected)
        wrong = [i for i, (a, b) in enumerate(zip(from_order(order, sal, model.labels), got.answers))
                 if a != b and not _tied(expected, i)]
        if wrong:
            raise ExportError(f"the decoder ({where}): {len(wrong)} answers differ from the model's, e.g. "
                              f"{rows.ids[wrong[0]]}")
        report.append({"budget": "per row" if isinstance(given, list) else given, "rows": int(len(index)),
                       "max_prob_diff": diff,
                       "mean_gflops": float(got.cost.mean())})
    return report


def _tied(outputs: dict[str, np.ndarray], row: int, tolerance: float = 1e-6) -> bool:
    """Whether a row's decoding rests on an exact tie (two top probabilities within ``tolerance``)."""
    for key in ("probs", "presence", "salience"):
        if key in outputs:
            top = np.sort(outputs[key][row])[::-1]
            if len(top) > 2 and (abs(top[0] - top[1]) <= tolerance or abs(top[1] - top[2]) <= tolerance):
                return True
    return False


def _check_tokens(model: FusionModel | TwoTowerModel, runtime: RuntimeModel, store: FeatureStore, index: np.ndarray,
                  rows: StoreRows, atol: float) -> None:
    """Each encoder graph against the model's encoder and projector on the same rows, so that a mismatch names the
    encoder's graph rather than the fusion."""
    inputs, lengths, mask = store.inputs_for(model, index)
    feeds, present = runtime._inputs(rows.inputs, rows.lengths, None)
    trunks = [model] if isinstance(model, FusionModel) else list(model.towers.values())
    with torch.no_grad():
        for trunk in trunks:
            for name in trunk.encoder_names:
                k = model.encoder_names.index(name)
                expected = trunk.projectors[name](trunk.encoders[name](inputs[name], lengths.get(name))).cpu().numpy()
                got = runtime._encode(name, feeds[name], None)
                valid = mask[:, k].cpu().numpy() & present[:, runtime.names.index(name)]
                diff = float(np.abs(expected[valid] - got[valid]).max()) if valid.any() else 0.0
                if diff > atol:
                    raise ExportError(f"encoders/{name}.onnx: its tokens differ from the model's by up to {diff:.3g} "
                                      f"(more than {atol:g})")


def _check_towers(model: TwoTowerModel, runtime: RuntimeModel, store: FeatureStore, index: np.ndarray,
                  rows: StoreRows, atol: float) -> list[dict[str, Any]]:
    """Each tower's embeddings from the export against the model's."""
    inputs, lengths, mask = store.inputs_for(model, index)
    with torch.no_grad():
        expected = model(inputs, lengths, mask).embeddings
    got = runtime.embed(rows.inputs, lengths=rows.lengths)
    report = []
    for name, value in expected.items():
        diff = float(np.abs(value.cpu().numpy() - got[name]).max())
        if diff > atol:
            raise ExportError(f"towers/{name}.onnx: its embeddings differ from the model's by up to {diff:.3g} "
                              f"(more than {atol:g})")
        report.append({"tower": name, "rows": int(len(index)), "max_embedding_diff": diff})
    return report
