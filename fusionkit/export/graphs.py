"""Export a fusion model to ONNX as split graphs that keep conditional execution (docs/deployment.md).

One graph cannot choose per row which encoders run, so an export is a folder of graphs and a manifest that says how
to drive them, as Hugging Face Optimum splits an encoder-decoder::

    DIR/manifest.json        encoders (inputs, costs, when they run), decoder and its thresholds, a fitted mean
                             budget, the spec, versions, opset, and each graph's SHA-256
    DIR/encoders/NAME.onnx   one encoder with its projector: inputs -> its token [B, d] (dynamic batch)
    DIR/scout.onnx           the always-run tokens -> the scout's scores, the gate's own choice of on-demand
                             encoders and those that could enter each row's top-n (on-demand encoders, gate scout)
    DIR/value.onnx           the tokens computed so far, which encoders are present and which on-demand ones ran ->
                             each on-demand encoder's predicted value (a staged scout: the value scout or a
                             plugin's, run once per stage)
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

from fusionkit.errors import FusionkitError, require_torch

require_torch("fusionkit.export")

import torch  # noqa: E402 - after the check that torch is there
from torch import nn  # noqa: E402

from fusionkit.conditional.budget import Budget  # noqa: E402
from fusionkit.conditional.rules import kept_by  # noqa: E402
from fusionkit.export.manifest import DECODERS, EXPORT_FORMAT, MANIFEST_FILE, SCOUTS, foreign_entries, graph_io  # noqa: E402
from fusionkit.files import check_replaceable, folder_lock, recover_directory, sha256_file, write_directory  # noqa: E402
from fusionkit.interfaces import LiveEncoder  # noqa: E402
from fusionkit.models.fusion import FusionModel, Trunk  # noqa: E402
from fusionkit.models.towers import Tower, TwoTowerModel  # noqa: E402
from fusionkit.moved import moved_names  # noqa: E402
from fusionkit.plugins import loaded  # noqa: E402
from fusionkit.runtime.images import check_reads  # noqa: E402

__all__ = ["EXPORT_FORMAT", "MANIFEST_FILE", "OPSET", "EXPORTERS", "DECODERS", "export_model", "ExportError"]

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
        return scores, runs, model.candidates(scores, present) & available


class _ValueGraph(nn.Module):
    """``(tokens [B, K, d], present [B, K], ran [B, m]) -> values [B, m]``: a staged scout's predicted loss drop of
    each on-demand encoder (:meth:`fusionkit.interfaces.Scout.forward`), from the tokens computed so far (zeros for
    the rest); the runtime calls it once per stage."""

    def __init__(self, model: FusionModel) -> None:
        super().__init__()
        self.model = model

    def forward(self, tokens: torch.Tensor, present: torch.Tensor, ran: torch.Tensor) -> torch.Tensor:
        # a term of zero that reads every input, so that a scout that ignores one still exports a graph that takes it
        unused = (tokens.sum((1, 2)) + present.float().sum(1) + ran.float().sum(1)).unsqueeze(1) * 0.0
        return self.model.scout(tokens, present, ran) + unused


class _FusionGraph(nn.Module):
    """``(tokens [B, K, d], mask [B, K]) -> probs [B, L], presence, salience, kept [B, n]``: the model's fusion of
    the tokens present (a missing or skipped encoder holds zeros and is masked out)."""

    def __init__(self, model: FusionModel) -> None:
        super().__init__()
        self.model = model

    def forward(self, tokens: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, ...]:
        model = self.model
        first = model.demanded(mask) if model.on_demand else None  # an on-demand encoder that ran is fused
        encoded = model.fuse(tokens + model.identity, mask, None, None, {}, first=first)
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
        encoded = tower.fuse(tokens + tower.identity, mask, None, None, {})
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


def _batch_axes(inputs: tuple[str, ...], outputs: tuple[str, ...]) -> dict[str, dict[int, str]]:
    """Axis 0 of every input and output is the batch (dynamic)."""
    return {name: {0: "batch"} for name in (*inputs, *outputs)}


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
    inputs, outputs = graph_io("encoder", sequences=sequences)
    dynamic = {**_batch_axes(inputs, outputs), **({"x": {0: "batch", 1: "frames"}} if sequences else {})}
    _onnx_export(graph, args, path, inputs, outputs, dynamic, f"encoder {name!r} ({type(encoder).__name__})",
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
    with the finished folder before it takes ``out``'s place (e.g. :func:`fusionkit.export.check.check_export`); when it raises, nothing
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
    inputs, outputs = graph_io("fusion", heads=tuple(roles))
    _onnx_export(_FusionGraph(model), (tokens, mask), folder / "fusion.onnx", inputs, outputs,
                 _batch_axes(inputs, outputs), "the fusion (gate, selection, fusion, heads, combiner)", exporter)
    if model.staged:
        ran = torch.zeros(2, len(model.on_demand), dtype=torch.bool)
        inputs, outputs = graph_io("value")
        _onnx_export(_ValueGraph(model), (tokens, mask, ran), folder / SCOUTS["value"], inputs, outputs,
                     _batch_axes(inputs, outputs), f"the scout ({model.spec.conditional.scout.type})", exporter)
    elif model.on_demand:
        inputs, outputs = graph_io("gate")
        _onnx_export(_ScoutGraph(model), (tokens, mask), folder / SCOUTS["gate"], inputs, outputs,
                     _batch_axes(inputs, outputs), f"the scout ({model.spec.gate.type} gate)", exporter)
    decoder = model.spec.decoder
    stored = [{"describe": b.describe(), "share": b.share, "gflops": b.gflops, "threshold": b.threshold}
              for b in budgets]
    manifest = {
        **_manifest_head(model, exporter), "kind": "fusion", "neutral": model.decoder.context.neutral_index,
        "encoders": encoders, "on_demand": [model.encoder_names[k] for k in model.on_demand],
        "scout": None if not model.on_demand else "value" if model.staged else "gate",
        "scout_type": None if not model.on_demand else model.spec.conditional.scout.type, "slots": model.top_n,
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
        inputs, outputs = graph_io("tower")
        _onnx_export(_TowerGraph(tower), (torch.zeros(2, k, d), torch.ones(2, k, dtype=torch.bool)),
                     folder / "towers" / f"{name}.onnx", inputs, outputs, _batch_axes(inputs, outputs),
                     f"tower {name!r}", exporter)
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


__getattr__ = moved_names(__name__, dict.fromkeys(("check_export", "CHECK_ROWS", "CHECK_BUDGETS"),
                                                  "fusionkit.export.check"))
