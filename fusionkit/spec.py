"""The declarative spec: what a model is made of, as validated attrs classes.

A spec is written in YAML, TOML or JSON (or given as a dict). Every component
block names a registered component in ``type:``; its other keys are checked
against that component's attrs config class. A spec never names an import path,
so loading one cannot execute code.
"""

from __future__ import annotations

import difflib
import json
import re
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import attrs
import yaml

from fusionkit import config as cfg
from fusionkit.answers import BLEMORE_LABELS
from fusionkit.config import key_text, non_negative, option, positive, seed_range, short_repr, unit_interval
from fusionkit.errors import DuplicateComponentError, SpecError, UnknownComponentError
from fusionkit.files import atomic_write_text
from fusionkit.interfaces import Gate, GateConfig
from fusionkit.plugins import get_registry
from fusionkit.registry import Registry
from fusionkit.yaml_reader import load_yaml

__all__ = ["SPEC_VERSION", "BLEMORE_LABELS", "HEAD_ROLES", "ENCODER_NAME", "MAX_LATENT_DIM", "encoder_name_problem",
           "Component", "EncoderSpec", "ProjectorConfig", "DataConfig", "TrainConfig", "ContrastiveConfig",
           "TowerSpec", "DistillSpec", "Spec", "read_spec_file", "load_spec", "spec_from_dict", "dump_spec",
           "DISTILL_PRESETS", "structure_component", "spec_differences"]

SPEC_VERSION = 1
HEAD_ROLES = ("presence", "salience")
#: Encoder names key model inputs, module names and feature files: a letter, then letters,
#: digits, ``_`` or ``-`` (64 at most).
ENCODER_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_-]{0,63}$")
MAX_LATENT_DIM = 1 << 16


def encoder_name_problem(name: Any) -> str | None:
    """Why ``name`` cannot name an encoder, or None when it can."""
    if not isinstance(name, str) or not ENCODER_NAME.match(name):
        return (f"expected a name of a letter then letters, digits, '_' or '-' (at most 64), "
                f"found {short_repr(name)}")
    from torch import nn

    if hasattr(nn.ModuleDict(), name):
        return f"{name!r} is reserved (an attribute of torch modules); choose another name"
    return None


@attrs.frozen
class Component:
    """A component block: the registered ``type`` and its structured config."""

    type: str
    config: Any

    def to_dict(self) -> dict[str, Any]:
        return {"type": self.type, **cfg.unstructure(self.config)}


@attrs.frozen(kw_only=True)
class EncoderRun:
    """When an encoder runs, and what it costs: options every encoder block has, beside its type's own."""

    run: Literal["always", "on_demand"] = option(
        "always", doc="always: the encoder runs on every sample; on_demand: only on the samples whose gate keeps it, "
        "scored before it runs from the always-run encoders (see docs/conditional.md).")
    cost_gflops: float | None = option(
        None, doc="GFLOPs per sample that a deployment pays to run (or extract) this encoder; null: measured for a "
        "live encoder, 0 for pre-extracted features.", validator=non_negative)


@attrs.frozen
class EncoderSpec:
    """One encoder: the name inputs are keyed by, its registered type and config, and when it runs."""

    name: str
    type: str
    config: Any
    run: str = "always"
    cost_gflops: float | None = None

    @property
    def on_demand(self) -> bool:
        return self.run == "on_demand"

    def to_dict(self) -> dict[str, Any]:
        extra = {**({"run": self.run} if self.run != "always" else {}),
                 **({"cost_gflops": self.cost_gflops} if self.cost_gflops is not None else {})}
        return {"name": self.name, "type": self.type, **cfg.unstructure(self.config), **extra}


@attrs.frozen(kw_only=True)
class ProjectorConfig:
    """Per-encoder projection to the shared latent space."""

    hidden: int = option(0, doc="Hidden size of a two-layer MLP projector; 0 means one linear layer.", validator=non_negative)
    dropout: float = option(0.1, doc="Dropout after the projection.", validator=unit_interval)
    norm: bool = option(True, doc="LayerNorm on the projected vector.")
    domain_norm: bool = option(False, doc="AdaBN-style normalisation of the projected vector with statistics per "
                                          "domain: source from training batches, target from its unlabelled rows; "
                                          "evaluation and predict use the statistics of each sample's domain.")


@attrs.frozen(kw_only=True)
class DataConfig:
    """How features are read and prepared."""

    nan_policy: Literal["error", "mask"] = option(
        "error", doc="NaN/inf in a sample's features: an error naming the samples, or treat that encoder as missing."
    )
    standardize: bool = option(True, doc="Standardise each encoder's inputs with statistics of the training rows only.")
    standardize_per_domain: bool = option(
        False, doc="Also keep target-domain input statistics, from the target's unlabelled rows (never its labels); "
        "evaluation and predict standardise each sample with its own domain's statistics.")


@attrs.frozen(kw_only=True)
class TrainConfig:
    """Optimisation settings."""

    epochs: int = option(50, doc="Maximum number of epochs.", validator=positive)
    batch_size: int = option(64, doc="Samples per batch.", validator=positive)
    lr: float = option(1e-3, doc="Peak learning rate of AdamW.", validator=positive)
    weight_decay: float = option(1e-2, doc="AdamW weight decay.", validator=non_negative)
    seed: int = option(0, doc="Seed of every random choice of a run.", validator=seed_range)
    grad_clip: float = option(1.0, doc="Gradient norm clip; 0 disables it.", validator=non_negative)
    patience: int = option(10, doc="Early stopping: validations without a better Score.", validator=positive)
    eval_every: int = option(1, doc="Validate every this many epochs (and after the last).", validator=positive)
    salience_weight: float = option(1.0, doc="Weight of the salience KL loss.", validator=non_negative)
    presence_weight: float = option(1.0, doc="Weight of the presence BCE loss.", validator=non_negative)
    schedule: Literal["cosine", "constant"] = option("cosine", doc="Learning-rate schedule after a linear warm-up.")
    warmup_fraction: float = option(0.05, doc="Share of the steps spent warming the learning rate up.", validator=unit_interval)
    device: str = option("auto", doc="Where training runs: auto (CUDA when present, else the CPU), cpu, cuda or "
                                     "cuda:K; under torchrun each rank uses its local GPU. --device overrides it.")
    train_fraction: float = option(
        1.0, doc="Share of the training rows used: the first of one fixed shuffle of them (the same for every seed, "
        "and a smaller share is a subset of a larger one). For learning curves, and for a distilled student that "
        "sees less data than its teacher did, as in CLIP-KD/CLIP-RD. Validation and test rows are never cut.",
        validator=unit_interval)
    log_to: list[Literal["tensorboard"]] = option(
        factory=list, doc="Loggers that receive every epoch's record besides log.jsonl: tensorboard writes event files "
        "under RUN/tensorboard (losses, every objective term, learning rate, validation metrics, encoders used and kept "
        "per epoch, a two-tower model's logit scale); needs pip install 'fusionkit[tensorboard]'.")
    precision: Literal["32", "bf16", "16"] = option(
        "32", doc="32: float32; bf16: bfloat16 autocast (GPUs since Ampere, and CPUs); 16: float16 autocast with a "
        "gradient scaler (GPUs). Softmaxes, KLs, gate scores and per-domain statistics stay in float32.")


@attrs.frozen(kw_only=True)
class ConditionalConfig:
    """How a model with on-demand encoders trains its scout (see docs/conditional.md)."""

    scout_rows: float = option(
        1.0, doc="Share of each training batch on which every on-demand encoder runs, so the scout learns what the "
        "gate would score with every token (1: every row; less is cheaper, and teaches the scout from fewer rows).",
        validator=unit_interval)
    scout_weight: float = option(1.0, doc="Weight of the scout loss: the KL from the gate's scores with every token "
                                          "to its scores before the on-demand encoders ran.", validator=non_negative)
    budget_sampling: bool = option(
        True, doc="In training, each sample keeps its on-demand encoders in the scout's order up to a random share "
        "of their cost, so one model learns to fuse whatever a budget at inference leaves it.")
    full_budget_rows: float = option(
        0.0, doc="With budget_sampling: the share of training rows that keep the full budget (every on-demand encoder "
        "runs), so that the fusion also learns the full-cost case that a 100% budget at inference asks for.",
        validator=unit_interval)
    budget_gflops: float | None = option(
        None, doc="The compute objective term: the mean GFLOPs per sample that the gate's own rule (no budget at "
        "inference) should spend; the expected cost above it is a hinge loss. null: no such term.",
        validator=non_negative)
    compute_weight: float = option(1.0, doc="Weight of the compute term (its loss is relative to the full cost).",
                                   validator=non_negative)


@attrs.frozen(kw_only=True)
class ContrastiveConfig:
    """The CLIP objective of a two-tower model."""

    temperature: float = option(0.07, doc="Initial temperature: the logit scale starts at ln(1 / temperature).",
                                validator=positive)
    max_scale: float = option(100.0, doc="The logit scale is clamped to at most ln(max_scale) after each step.",
                              validator=positive)
    learn_scale: bool = option(True, doc="Learn the logit scale (else it stays at its initial value).")
    local_loss: bool = option(False, doc="Under torchrun: each rank scores its own rows against every rank's "
                                         "columns, instead of the whole global similarity matrix (less memory at "
                                         "large world sizes, the same gradient). Without torchrun it changes nothing.")


@attrs.frozen
class TowerSpec:
    """One tower of a two-tower model: its encoders, gate, fusion, and embedding size."""

    encoders: tuple[str, ...]
    gate: Component
    fusion: Component
    embed_dim: int

    def to_dict(self) -> dict[str, Any]:
        return {"encoders": list(self.encoders), "gate": self.gate.to_dict(), "fusion": self.fusion.to_dict(),
                "embed_dim": self.embed_dim}


@attrs.frozen
class DistillSpec:
    """Distillation: a frozen teacher checkpoint and the losses that pull the student towards it."""

    teacher: str
    losses: tuple[Component, ...]

    def to_dict(self) -> dict[str, Any]:
        return {"teacher": self.teacher, "losses": [c.to_dict() for c in self.losses]}


_TOP_LEVEL = (
    "spec_version", "labels", "neutral", "latent_dim", "encoders", "projector", "gate", "fusion",
    "heads", "combiner", "decoder", "towers", "contrastive", "adaptation", "distill", "data", "train", "conditional",
)
_DEFAULT_BLOCKS: dict[str, Any] = {
    "gate": {"type": "attention"},
    "fusion": {"type": "rank_concat"},
    "heads": {"presence": {"type": "presence"}, "salience": {"type": "salience"}},
    "combiner": {"type": "product"},
    "decoder": {"type": "presence_salience"},
}


@attrs.frozen(kw_only=True)
class Spec:
    """A whole model: labels, encoders, and one component per stage of the data flow."""

    spec_version: int = SPEC_VERSION
    labels: tuple[str, ...] = BLEMORE_LABELS
    neutral: str | None = "neu"
    latent_dim: int = 256
    encoders: tuple[EncoderSpec, ...]
    projector: ProjectorConfig = ProjectorConfig()
    gate: Component
    fusion: Component
    heads: dict[str, Component]
    combiner: Component
    decoder: Component
    towers: dict[str, TowerSpec] = attrs.field(factory=dict)
    contrastive: ContrastiveConfig = ContrastiveConfig()
    adaptation: tuple[Component, ...] = ()
    distill: DistillSpec | None = None
    data: DataConfig = DataConfig()
    train: TrainConfig = TrainConfig()
    conditional: ConditionalConfig = ConditionalConfig()

    @property
    def encoder_names(self) -> tuple[str, ...]:
        return tuple(e.name for e in self.encoders)

    @property
    def on_demand(self) -> tuple[str, ...]:
        """The names of the encoders that run on demand."""
        return tuple(e.name for e in self.encoders if e.on_demand)

    @property
    def task(self) -> str:
        """``contrastive`` for a two-tower model (a ``towers`` block), else ``classification``."""
        return "contrastive" if self.towers else "classification"

    def to_dict(self) -> dict[str, Any]:
        """The resolved spec (every default filled in) as plain data."""
        return {
            "spec_version": self.spec_version,
            "labels": list(self.labels),
            "neutral": self.neutral,
            "latent_dim": self.latent_dim,
            "encoders": [e.to_dict() for e in self.encoders],
            "projector": cfg.unstructure(self.projector),
            "gate": self.gate.to_dict(),
            "fusion": self.fusion.to_dict(),
            "heads": {role: c.to_dict() for role, c in self.heads.items()},
            "combiner": self.combiner.to_dict(),
            "decoder": self.decoder.to_dict(),
            **({"towers": {name: t.to_dict() for name, t in self.towers.items()},
                "contrastive": cfg.unstructure(self.contrastive)} if self.towers else {}),
            "adaptation": [c.to_dict() for c in self.adaptation],
            **({"distill": self.distill.to_dict()} if self.distill else {}),
            "data": cfg.unstructure(self.data),
            "train": cfg.unstructure(self.train),
            **({"conditional": cfg.unstructure(self.conditional)} if self.on_demand else {}),
        }

    def replace(self, **changes: Any) -> Spec:
        return attrs.evolve(self, **changes)


def read_spec_file(path: str | Path) -> Any:
    """Parse a YAML, TOML or JSON file into plain data (never executes code)."""
    path = Path(path)
    if not path.is_file():
        raise SpecError([f"{path}: no such file"], source=str(path))
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise SpecError([f"{path.name}: not UTF-8 text ({exc.reason} at byte {exc.start})"], source=str(path)) from None
    except OSError as exc:
        raise SpecError([f"{path}: cannot be read ({exc.strerror or exc})"], source=str(path)) from None
    suffix = path.suffix.lower()
    try:
        if suffix == ".toml":
            return tomllib.loads(text)
        if suffix == ".json":
            return json.loads(text)
        return load_yaml(text)
    except (yaml.YAMLError, json.JSONDecodeError, tomllib.TOMLDecodeError, RecursionError) as exc:
        raise SpecError([f"cannot parse {path.name}: {str(exc)[:1000]}"], source=str(path)) from None


def load_spec(source: str | Path | Mapping[str, Any] | Spec, registry: Registry | None = None) -> Spec:
    """Load and validate a spec from a file path or a mapping.

    Raises :class:`SpecError` listing every problem, each with its path.
    """
    if isinstance(source, Spec):
        return source
    if isinstance(source, Mapping):
        return spec_from_dict(source, registry=registry)
    data = read_spec_file(source)
    return spec_from_dict(data, registry=registry, source=str(source))


def spec_from_dict(data: Any, registry: Registry | None = None, source: str | None = None) -> Spec:
    if registry is None:
        registry = get_registry()
    problems: list[str] = []
    spec = _structure_spec(data, registry, problems)
    if problems or spec is None:
        raise SpecError(problems, source=source)
    return spec


def dump_spec(spec: Spec, path: str | Path) -> None:
    """Write the resolved spec as YAML (``.yaml``/``.yml``) or JSON (``.json``), atomically."""
    path = Path(path)
    data = spec.to_dict()
    if path.suffix.lower() == ".json":
        text = json.dumps(data, indent=2) + "\n"
    elif path.suffix.lower() in {".yaml", ".yml"}:
        text = yaml.safe_dump(data, sort_keys=False)
    else:
        raise ValueError(f"cannot write a spec as {path.suffix!r}: use .yaml, .yml or .json")
    atomic_write_text(path, text)


def _structure_spec(data: Any, registry: Registry, problems: list[str]) -> Spec | None:
    if not isinstance(data, Mapping):
        problems.append(f"spec: expected a mapping at the top level, found {type(data).__name__}")
        return None
    for key in data:
        if key not in _TOP_LEVEL:
            close = difflib.get_close_matches(str(key), _TOP_LEVEL, n=2, cutoff=0.6)
            hint = f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
            problems.append(f"{key_text(key)}: unknown top-level key{hint}{' ' if hint else '. '}Keys: {', '.join(_TOP_LEVEL)}")

    values: dict[str, Any] = {}
    version = data.get("spec_version", SPEC_VERSION)
    if version != SPEC_VERSION or isinstance(version, bool):
        problems.append(f"spec_version: expected {SPEC_VERSION}, found {short_repr(version)}")

    labels = data.get("labels", list(BLEMORE_LABELS))
    if not isinstance(labels, list) or len(labels) < 2 or not all(isinstance(x, str) and x for x in labels):
        problems.append(f"labels: expected a list of at least two label names, found {short_repr(labels)}")
        labels = []
    elif len(set(labels)) != len(labels):
        problems.append(f"labels: names must be unique, found {short_repr(labels)}")
    else:
        values["labels"] = tuple(labels)
    neutral = data.get("neutral", "neu" if "neu" in labels else None)
    if neutral is not None and (not isinstance(neutral, str) or neutral not in labels):
        problems.append(f"neutral: expected one of the labels or null, found {short_repr(neutral)}")
    values["neutral"] = neutral

    latent = data.get("latent_dim", 256)
    if isinstance(latent, bool) or not isinstance(latent, int) or not 0 < latent <= MAX_LATENT_DIM:
        problems.append(f"latent_dim: expected an int in [1, {MAX_LATENT_DIM}], found {short_repr(latent)}")
    values["latent_dim"] = latent

    values["encoders"] = _structure_encoders(data.get("encoders"), registry, problems)
    values["projector"] = cfg.structure(ProjectorConfig, data.get("projector", {}), "projector", problems)
    values["train"] = cfg.structure(TrainConfig, data.get("train", {}), "train", problems)
    values["data"] = cfg.structure(DataConfig, data.get("data", {}), "data", problems)
    for key, kind in (("gate", "gate"), ("fusion", "fusion"), ("combiner", "combiner"), ("decoder", "decoder")):
        values[key] = structure_component(kind, data.get(key, _DEFAULT_BLOCKS[key]), key, registry, problems)
    values["heads"] = _structure_heads(data.get("heads", _DEFAULT_BLOCKS["heads"]), registry, problems)
    _check_gate_counts(values["gate"], len(values["encoders"]), "gate", problems)
    values["conditional"] = cfg.structure(ConditionalConfig, data.get("conditional", {}), "conditional", problems)
    adaptation = data.get("adaptation", [])
    if not isinstance(adaptation, list):
        problems.append(f"adaptation: expected a list of adaptation loss blocks, found {short_repr(adaptation)}")
        adaptation = []
    values["towers"] = _structure_towers(data.get("towers", {}), values["encoders"], registry, problems)
    values["contrastive"] = cfg.structure(ContrastiveConfig, data.get("contrastive", {}), "contrastive", problems)
    if "contrastive" in data and not values["towers"]:
        problems.append("contrastive: only a two-tower spec (with a 'towers' block) trains contrastively")
    if values["towers"] and data.get("adaptation"):
        problems.append("adaptation: adaptation losses apply to classification models, not to two-tower ones")
    values["distill"] = _structure_distill(data.get("distill"), registry, problems)
    values["adaptation"] = tuple(
        structure_component("adaptation_loss", block, f"adaptation[{i}]", registry, problems)
        for i, block in enumerate(adaptation)
    )
    _check_conditional(values, registry, problems)
    if "conditional" in data and not any(e.on_demand for e in values["encoders"]):
        problems.append("conditional: configures on-demand encoders, but no encoder has run: on_demand")
    if problems:
        return None
    return Spec(spec_version=SPEC_VERSION, **values)


def _structure_encoders(blocks: Any, registry: Registry, problems: list[str]) -> tuple[EncoderSpec, ...]:
    if not isinstance(blocks, list) or not blocks:
        problems.append(f"encoders: expected a non-empty list of encoder blocks, found {short_repr(blocks)}")
        return ()
    out: list[EncoderSpec] = []
    seen: dict[str, int] = {}
    for i, block in enumerate(blocks):
        path = f"encoders[{i}]"
        if not isinstance(block, Mapping):
            problems.append(f"{path}: expected a mapping with name and type, found {short_repr(block)}")
            continue
        name = block.get("name")
        why = encoder_name_problem(name)
        if why:
            problems.append(f"{path}.name: {why}")
            continue
        if name in seen:
            problems.append(f"{path}.name: {name!r} is already the name of encoders[{seen[name]}]; names must be unique")
        seen.setdefault(name, i)
        rest = {k: v for k, v in block.items() if k != "name" and k not in _RUN_OPTIONS}
        running = cfg.structure(EncoderRun, {k: v for k, v in block.items() if k in _RUN_OPTIONS}, path, problems)
        comp = structure_component("encoder", rest, path, registry, problems)
        if comp is not None and running is not None:
            out.append(EncoderSpec(name, comp.type, comp.config, running.run, running.cost_gflops))
    return tuple(out)


_RUN_OPTIONS = tuple(f.name for f in attrs.fields(EncoderRun))


def _check_conditional(values: dict[str, Any], registry: Registry, problems: list[str]) -> None:
    """On-demand encoders need a gate that scores an encoder before it runs, and something that runs always."""
    encoders = values["encoders"]
    demand = [i for i, e in enumerate(encoders) if e.on_demand]
    if not demand:
        return
    if len(demand) == len(encoders):
        problems.append(f"encoders[{demand[0]}].run: every encoder is on_demand, but the gate scores on-demand "
                        "encoders from what has already run; let at least one encoder run always")
    if values["towers"]:
        problems.append(f"encoders[{demand[0]}].run: on_demand is for fusion models; a two-tower model runs every "
                        "encoder of each tower")
    gate = values["gate"]
    if gate is not None:
        if not registry.get("gate", gate.type).factory.scouts:
            problems.append(f"gate.type: gate {gate.type!r} cannot score an encoder before it runs (it needs every "
                            f"token), so encoders[{demand[0]}] cannot be on_demand; use a scout gate (attention, "
                            "static) or run every encoder always")



def _structure_towers(blocks: Any, encoders: tuple[EncoderSpec, ...], registry: Registry,
                      problems: list[str]) -> dict[str, TowerSpec]:
    if blocks in ({}, None):
        return {}
    if not isinstance(blocks, Mapping) or len(blocks) != 2:
        problems.append(f"towers: expected a mapping of exactly two towers (name -> {{encoders, gate, fusion, "
                        f"embed_dim}}), found {short_repr(blocks)}")
        return {}
    known = {e.name for e in encoders}
    owner: dict[str, str] = {}
    out: dict[str, TowerSpec] = {}
    for name, block in blocks.items():
        path = f"towers.{key_text(name)}"
        if encoder_name_problem(name):
            problems.append(f"{path}: a tower name is {encoder_name_problem(name)}")
            continue
        if not isinstance(block, Mapping):
            problems.append(f"{path}: expected a mapping with encoders, gate, fusion and embed_dim, found {short_repr(block)}")
            continue
        for key in block:
            if key not in ("encoders", "gate", "fusion", "embed_dim"):
                problems.append(f"{path}.{key_text(key)}: unknown tower option. Options: encoders, gate, fusion, embed_dim")
        names = block.get("encoders")
        if not isinstance(names, list) or not names or not all(isinstance(n, str) for n in names):
            problems.append(f"{path}.encoders: expected a non-empty list of encoder names, found {short_repr(names)}")
            continue
        for n in names:
            if n not in known:
                problems.append(f"{path}.encoders: {n!r} is not one of the spec's encoders {sorted(known)}")
            elif n in owner:
                problems.append(f"{path}.encoders: {n!r} already belongs to tower {owner[n]!r}; a store's encoder "
                                "feeds one tower")
            owner.setdefault(n, str(name))
        embed = block.get("embed_dim", 128)
        if isinstance(embed, bool) or not isinstance(embed, int) or not 0 < embed <= MAX_LATENT_DIM:
            problems.append(f"{path}.embed_dim: expected an int in [1, {MAX_LATENT_DIM}], found {short_repr(embed)}")
        gate = structure_component("gate", block.get("gate", {"type": "uniform", "top_n": len(names)}), f"{path}.gate",
                                   registry, problems)
        fusion = structure_component("fusion", block.get("fusion", {"type": "weighted_sum"}), f"{path}.fusion",
                                     registry, problems)
        _check_gate_counts(gate, len(names), f"{path}.gate", problems)
        if gate is not None and fusion is not None:
            out[str(name)] = TowerSpec(tuple(names), gate, fusion, embed)
    missing = known - set(owner)
    if missing and not problems:
        problems.append(f"towers: encoders {sorted(missing)} belong to no tower; assign each to one")
    return out


def _check_gate_counts(gate: Component | None, encoders: int, path: str, problems: list[str]) -> None:
    """top-p's min_n and max_n must fit each other and the encoders (they were clamped silently)."""
    if gate is None or gate.config.selection != "top_p" or not encoders:
        return
    min_n, max_n = gate.config.min_n, gate.config.max_n
    if max_n and min_n > max_n:
        problems.append(f"{path}.min_n: {min_n} is more than {path}.max_n ({max_n}); a sample keeps at least min_n "
                        "and at most max_n encoders: lower min_n or raise max_n")
    if min_n > encoders:
        problems.append(f"{path}.min_n: {min_n} is more than the {encoders} encoder(s) the gate ranks; lower it")
    if max_n > encoders:
        problems.append(f"{path}.max_n: {max_n} is more than the {encoders} encoder(s) the gate ranks; lower it, or "
                        "write 0 (all)")


#: ``distill.preset``: the published loss sets, each term in its published form, with the papers' weights. The
#: task's own CLIP loss comes from the two-tower model; a preset adds the distillation terms.
DISTILL_PRESETS: dict[str, tuple[dict[str, Any], ...]] = {
    "clip-kd": ({"type": "crd"}, {"type": "icl", "form": "published"}, {"type": "fd", "form": "published", "weight": 2000.0}),
    "clip-rd": ({"type": "crd"}, {"type": "icl", "form": "published"}, {"type": "fd", "form": "published", "weight": 2000.0},
                {"type": "vrd", "mode": "published"}, {"type": "xrd", "mode": "published"}),
}


def _structure_distill(block: Any, registry: Registry, problems: list[str]) -> DistillSpec | None:
    if block is None:
        return None
    if not isinstance(block, Mapping):
        problems.append(f"distill: expected a mapping with teacher and losses (or a preset), found {short_repr(block)}")
        return None
    for key in block:
        if key not in ("teacher", "losses", "preset"):
            problems.append(f"distill.{key_text(key)}: unknown option. Options: teacher, losses, preset")
    teacher = block.get("teacher")
    if not isinstance(teacher, str) or not teacher:
        problems.append(f"distill.teacher: expected the path of a teacher checkpoint directory, found {short_repr(teacher)}")
    preset = block.get("preset")
    if preset is not None and (not isinstance(preset, str) or preset not in DISTILL_PRESETS):
        problems.append(f"distill.preset: expected one of {', '.join(DISTILL_PRESETS)} (one preset; further terms go "
                        f"under losses), found {short_repr(preset)}")
        return None
    losses = block.get("losses", [] if preset else None)
    if not isinstance(losses, list) or not (losses or preset):
        problems.append(f"distill.losses: expected a non-empty list of distillation loss blocks (or a preset: "
                        f"{', '.join(DISTILL_PRESETS)}), found {short_repr(losses)}")
        return None
    blocks = [*(DISTILL_PRESETS[preset] if preset else ()), *losses]
    first = len(blocks) - len(losses)
    comps = tuple(structure_component("distill_loss", b, f"distill.losses[{i - first}]" if i >= first else
                                      f"distill.preset ({preset}) [{i}]", registry, problems)
                  for i, b in enumerate(blocks))
    if not isinstance(teacher, str) or any(c is None for c in comps):
        return None
    return DistillSpec(teacher, comps)


def _structure_heads(blocks: Any, registry: Registry, problems: list[str]) -> dict[str, Component]:
    if not isinstance(blocks, Mapping) or not blocks:
        problems.append(f"heads: expected a mapping of role -> head block (roles: {', '.join(HEAD_ROLES)}), "
                        f"found {short_repr(blocks)}")
        return {}
    out: dict[str, Component] = {}
    for role, block in blocks.items():
        if role not in HEAD_ROLES:
            problems.append(f"heads.{key_text(role)}: unknown head role; roles are {', '.join(HEAD_ROLES)}")
            continue
        comp = structure_component("head", block, f"heads.{role}", registry, problems)
        if comp is not None:
            out[role] = comp
    return out


def structure_component(kind: str, block: Any, path: str, registry: Registry, problems: list[str]) -> Component | None:
    """Validate one ``{type: name, ...options}`` block against the named plugin's config class."""
    if isinstance(block, str):
        block = {"type": block}
    if not isinstance(block, Mapping):
        problems.append(f"{path}: expected a mapping with a 'type' key, found {short_repr(block)}")
        return None
    name = block.get("type")
    if not isinstance(name, str):
        problems.append(f"{path}.type: expected the name of a registered {kind} ({', '.join(registry.names(kind))}), "
                        f"found {short_repr(name)}")
        return None
    try:
        reg = registry.get(kind, name)
    except (UnknownComponentError, DuplicateComponentError) as exc:
        problems.append(f"{path}.type: {exc}")
        return None
    if kind == "gate" and not _is_gate(reg.factory, reg.config):
        made = f"class {reg.factory.__name__}" if isinstance(reg.factory, type) else "a function"
        problems.append(f"{path}.type: gate {name!r} ({reg.provider.describe()}) registers {made} with config "
                        f"{reg.config.__name__}; a gate must be a subclass of fusionkit.interfaces.Gate with a config "
                        "that derives from GateConfig (see docs/writing-a-plugin.md). Fix the plugin, or block it "
                        "with FUSIONKIT_DISABLE_PLUGINS")
        return None
    options = {k: v for k, v in block.items() if k != "type"}
    config = cfg.structure(reg.config, options, path, problems)
    return None if config is None else Component(name, config)


def _is_gate(factory: Any, config: type) -> bool:
    """The gate contract: the class says whether it scouts and what its gradients reach; the config says what
    is kept."""
    return isinstance(factory, type) and issubclass(factory, Gate) and issubclass(config, GateConfig)


def spec_differences(old: Any, new: Any, path: str = "") -> list[str]:
    """Human-readable differences between two plain-data specs, e.g. ``train.seed: 0 -> 1``."""
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for key in [*old, *(k for k in new if k not in old)]:
            out += spec_differences(old.get(key), new.get(key), f"{path}.{key}" if path else str(key))
        return out
    return [] if old == new else [f"{path or 'spec'}: {old!r} -> {new!r}"]
