"""The declarative spec: what a model is made of, as validated attrs classes.

A spec is written in YAML, TOML or JSON (or given as a dict). Every component
block names a registered component in ``type:``; its other keys are checked
against that component's attrs config class. A spec never names an import path,
so loading one cannot execute code.
"""

from __future__ import annotations

import contextvars
import difflib
import json
import math
import re
import tomllib
import typing
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

import attrs
import yaml

from fusionkit import config as cfg
from fusionkit.blemore.answers import BLEMORE_LABELS
from fusionkit.config import key_text, non_negative, option, positive, seed_range, short_repr, unit_interval
from fusionkit.errors import DuplicateComponentError, SpecError, UnknownComponentError
from fusionkit.files import atomic_write_text
from fusionkit.interfaces import SCOUT_VALUES_FROM, Gate, GateConfig, Scout, ScoutConfig
from fusionkit.moved import moved_names
from fusionkit.plugins import get_registry
from fusionkit.registry import Registry
from fusionkit.spec.yaml_reader import MAX_DEPTH, MAX_INT_DIGITS, check_bounds, load_yaml

__all__ = ["SPEC_VERSION", "BLEMORE_LABELS", "HEAD_ROLES", "ENCODER_NAME", "MAX_LATENT_DIM", "encoder_name_problem",
           "Component", "EncoderSpec", "ProjectorConfig", "DataConfig", "TrainConfig", "ContrastiveConfig",
           "Checked", "Block", "Blocks", "Keyed", "TowerSpec", "DistillBlock", "DistillSpec", "Spec", "TOP_LEVEL_KEYS",
           "SPEC_CHECKS", "read_spec_file", "load_spec", "spec_from_dict", "dump_spec", "structure_component",
           "spec_differences"]

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


# a block nested in a config (conditional.scout) is written as the spec writes it: {type: name, ...options}
cfg.converter.register_unstructure_hook(Component, Component.to_dict)


@attrs.frozen(kw_only=True)
class EncoderRun:
    """When an encoder runs, and what it costs: options every encoder block has, beside its type's own."""

    run: Literal["always", "on_demand"] = option(
        "always", doc="always: the encoder runs on every sample; on_demand: only on the samples whose gate keeps it, "
        "scored before it runs from the always-run encoders (see docs/conditional.md).")
    cost_gflops: float | None = option(
        None, doc="GFLOPs per sample that a deployment pays to run (or extract) this encoder; null: measured for a "
        "live encoder, 0 for pre-extracted features.", validator=non_negative)
    preview_of: str | None = option(
        None, doc="This encoder is a cheap look at the on-demand encoder named here (a thumbnail of its image, a "
        "slice or projection of its features): it runs always, the scout sees it before choosing, and its cost counts "
        "in every budget (see docs/conditional.md#previews).")
    fused: bool = option(
        True, doc="Whether the fusion may keep this encoder's token; false: only the scout sees it (a preview that "
        "informs the choice without entering the answer).")


@attrs.frozen
class EncoderSpec:
    """One encoder: the name inputs are keyed by, its registered type and config, and when it runs."""

    name: str
    type: str
    config: Any
    run: str = "always"
    cost_gflops: float | None = None
    preview_of: str | None = None
    fused: bool = True

    @property
    def on_demand(self) -> bool:
        return self.run == "on_demand"

    def to_dict(self) -> dict[str, Any]:
        extra = {**({"run": self.run} if self.run != "always" else {}),
                 **({"cost_gflops": self.cost_gflops} if self.cost_gflops is not None else {}),
                 **({"preview_of": self.preview_of} if self.preview_of is not None else {}),
                 **({"fused": False} if not self.fused else {})}
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

    scout: Annotated[Component, Block("scout")] = option(
        Component("gate", ScoutConfig()), doc="What decides which on-demand encoders run for a sample: a registered "
        "scout (fusionkit plugins lists them), a name or {type: name, ...options}. gate: the gate's own scores before "
        "they run, taught the gate's scores with every token, in the scout's order. value: a small value head that "
        "predicts, from the tokens computed so far, how much this sample's loss drops when each on-demand encoder's "
        "token joins the fusion, taught on the rows where everything ran; it decides in stages (one encoder per row "
        "at each stage, the rest re-scored with its token) by predicted value per unit of cost. quality: judges from each "
        "on-demand encoder's preview whether its input agrees with the rest of the sample (never told which inputs "
        "are bad), its values fitted on the validation rows, and decides in stages from those verdicts. A plugin's "
        "scout decides as the value scout does (docs/writing-a-plugin.md#scouts).")
    value_hidden: int = option(64, doc="Hidden width of the value scout's MLP, unless its block sets hidden.",
                               validator=positive)
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
    full_budget_weight: float = option(
        3.0, doc="Weight w of a second, full-budget pass in training (the sandwich rule of slimmable networks): each "
        "row whose every on-demand encoder ran for the scout (scout_rows) is also fused with all of them and "
        "supervised by its labels, beside the budget-sampled pass, so that the full cost learns what keep-all "
        "learns while every lower budget is still trained. The two passes' label losses are averaged, weighted "
        "1 and w over 1 + w. Costs one more gate, fusion and heads per step (the encoders' tokens are shared). "
        "0: off, the budget-sampled pass alone.", validator=non_negative)
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


@attrs.frozen(eq=False)  # hashed by identity: cattrs caches its hooks by field type, and a schema is a dict
class Checked:
    """``Annotated[T, Checked(parse, schema)]``: ``parse(value)`` gives the structured value, or raises
    ValueError(why); ``schema`` is the JSON Schema of what it accepts (``fusionkit spec schema``)."""

    parse: Callable[[Any], Any]
    schema: dict[str, Any]


@attrs.frozen
class Block:
    """``Annotated[Component, Block(kind)]``: one ``{type: name, ...options}`` block, structured by its registered
    ``type`` (a bare string names the type)."""

    kind: str


@attrs.frozen
class Blocks:
    """``Annotated[tuple[Component, ...], Blocks(kind, what)]``: a list of blocks of one kind; ``what`` names
    the list in messages ("a list of adaptation loss blocks"; ``{presets}`` stands for the registered presets)."""

    kind: str
    what: str


@attrs.frozen
class Keyed:
    """``Annotated[..., Keyed(name)]``: a value with its own structure hook, e.g. ``encoders`` or ``towers``."""

    name: str


_SIZE_SCHEMA = {"type": "integer", "minimum": 1, "maximum": MAX_LATENT_DIM}
_NAMES_SCHEMA = {"type": "array", "items": {"type": "string"}, "minItems": 1}
_LABELS_SCHEMA = {"type": "array", "items": {"type": "string", "minLength": 1}, "minItems": 2, "uniqueItems": True}


def _int_in(low: int, high: int) -> Callable[[Any], int]:
    def parse(value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            raise ValueError(f"expected an int in [{low}, {high}], found {short_repr(value)}")
        return value

    return parse


def _spec_version(value: Any) -> int:
    if value != SPEC_VERSION or isinstance(value, bool):
        raise ValueError(f"expected {SPEC_VERSION}, found {short_repr(value)}")
    return value


def _labels(value: Any) -> tuple[str, ...]:
    if not isinstance(value, list) or len(value) < 2 or not all(isinstance(x, str) and x for x in value):
        raise ValueError(f"expected a list of at least two label names, found {short_repr(value)}")
    if len(set(value)) != len(value):
        raise ValueError(f"names must be unique, found {short_repr(value)}")
    return tuple(value)


def _default_neutral(values: dict[str, Any]) -> Any:
    labels = values.get("labels", BLEMORE_LABELS)
    return "neu" if labels is not cfg.FAILED and "neu" in labels else None


def _teacher(value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise ValueError(f"expected the path of a teacher checkpoint directory, found {short_repr(value)}")
    return value


def _encoder_names(value: Any) -> tuple[str, ...]:
    if not isinstance(value, list) or not value or not all(isinstance(n, str) for n in value):
        raise ValueError(f"expected a non-empty list of encoder names, found {short_repr(value)}")
    return tuple(value)


def _tower_gate(values: dict[str, Any]) -> Any:
    names = values.get("encoders", cfg.FAILED)
    return cfg.NOTHING if names is cfg.FAILED else {"type": "uniform", "top_n": len(names)}


@attrs.frozen(kw_only=True)
class TowerSpec:
    """One tower of a two-tower model: its encoders, gate, fusion, and embedding size."""

    __option_noun__ = "tower"

    encoders: Annotated[tuple[str, ...], Checked(_encoder_names, _NAMES_SCHEMA)] = option(
        doc="The names of the spec's encoders this tower fuses (each encoder feeds one tower).", data_default=None)
    gate: Annotated[Component, Block("gate")] = option(
        doc="The tower's gate; by default a uniform gate that keeps every encoder.", data_default=_tower_gate)
    fusion: Annotated[Component, Block("fusion")] = option(
        doc="The tower's fusion.", data_default={"type": "weighted_sum"})
    embed_dim: Annotated[int, Checked(_int_in(1, MAX_LATENT_DIM), _SIZE_SCHEMA)] = option(
        128, doc="Width of the tower's embedding, where the CLIP loss compares the towers.")

    def to_dict(self) -> dict[str, Any]:
        return {"encoders": list(self.encoders), "gate": self.gate.to_dict(), "fusion": self.fusion.to_dict(),
                "embed_dim": self.embed_dim}


_LOSSES = "a non-empty list of distillation loss blocks (or a preset: {presets})"


def _default_distill_losses(values: dict[str, Any]) -> Any:
    preset = values.get("preset")
    return cfg.NOTHING if preset is cfg.FAILED else ([] if preset else None)


@attrs.frozen(kw_only=True)
class DistillBlock:
    """The ``distill`` block as written: a teacher, and a preset and/or loss blocks (see :class:`DistillSpec`)."""

    __option_noun__ = "distill"

    teacher: Annotated[str, Checked(_teacher, {"type": "string", "minLength": 1})] = option(
        doc="The teacher's checkpoint directory (a run's best/ or the run itself).", data_default=None)
    preset: Annotated[str | None, Keyed("preset")] = option(
        None, doc="A registered preset of published loss sets (clip-kd, clip-rd), put before the losses.")
    losses: Annotated[tuple[Component, ...], Blocks("distill_loss", _LOSSES)] = option(
        doc="Distillation loss blocks (after the preset's).", data_default=_default_distill_losses)


@attrs.frozen
class DistillSpec:
    """Distillation: a frozen teacher checkpoint and the losses that pull the student towards it (a preset's
    first, then the spec's own)."""

    teacher: str
    losses: tuple[Component, ...]

    def to_dict(self) -> dict[str, Any]:
        return {"teacher": self.teacher, "losses": [c.to_dict() for c in self.losses]}


@attrs.frozen(kw_only=True)
class Spec:
    """A whole model: labels, encoders, and one component per stage of the data flow.

    The fields are the spec's top-level keys. :func:`spec_from_dict` structures a document into it
    through a converter whose hooks dispatch each component block on its ``type`` through the
    registry (``Block``/``Blocks``), and then runs the checks that relate fields (:data:`SPEC_CHECKS`).
    """

    spec_version: Annotated[int, Checked(_spec_version, {"const": SPEC_VERSION})] = option(
        SPEC_VERSION, doc="The spec format's version.")
    labels: Annotated[tuple[str, ...], Checked(_labels, _LABELS_SCHEMA)] = option(
        BLEMORE_LABELS, doc="The label names, in the order of the model's outputs (default: BlEmoRE's six).")
    neutral: Any = option(doc="The label that never appears in a blend, or null.", data_default=_default_neutral)
    latent_dim: Annotated[int, Checked(_int_in(1, MAX_LATENT_DIM), _SIZE_SCHEMA)] = option(
        256, doc="Width of the shared latent space every encoder is projected into.")
    encoders: Annotated[tuple[EncoderSpec, ...], Keyed("encoders")] = option(
        doc="Encoder blocks: name, type, the type's options, and run/cost_gflops.", data_default=None)
    projector: ProjectorConfig = option(factory=ProjectorConfig, doc="The per-encoder projection.")
    gate: Annotated[Component, Block("gate")] = option(doc="Scores every encoder per sample and keeps the top ones.",
                                                       data_default={"type": "attention"})
    fusion: Annotated[Component, Block("fusion")] = option(doc="Fuses the kept, rank-ordered encoders.",
                                                           data_default={"type": "rank_concat"})
    heads: Annotated[dict[str, Component], Keyed("heads")] = option(
        doc="Head blocks by role (presence, salience).",
        data_default={"presence": {"type": "presence"}, "salience": {"type": "salience"}})
    combiner: Annotated[Component, Block("combiner")] = option(doc="Fuses the heads' probabilities.",
                                                               data_default={"type": "product"})
    decoder: Annotated[Component, Block("decoder")] = option(doc="Turns probabilities into answers.",
                                                             data_default={"type": "presence_salience"})
    towers: Annotated[dict[str, TowerSpec], Keyed("towers")] = option(
        factory=dict, doc="Two towers (name -> encoders, gate, fusion, embed_dim) make a two-tower model.")
    contrastive: ContrastiveConfig = option(factory=ContrastiveConfig, doc="A two-tower model's CLIP objective.")
    adaptation: Annotated[tuple[Component, ...], Blocks("adaptation_loss", "a list of adaptation loss blocks")] = option(
        (), doc="Unsupervised domain adaptation loss blocks.")
    distill: Annotated[DistillSpec | None, Keyed("distill")] = option(
        None, doc="A teacher checkpoint and the losses (or a preset) that distil it into this model.")
    data: DataConfig = option(factory=DataConfig, doc="How features are read and prepared.")
    train: TrainConfig = option(factory=TrainConfig, doc="Optimisation settings.")
    conditional: ConditionalConfig = option(factory=ConditionalConfig,
                                            doc="How a model with on-demand encoders trains its scout.")

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
            data = tomllib.loads(text)
        elif suffix == ".json":
            data = json.loads(text, parse_int=_bounded_int)
        else:
            return load_yaml(text)
        check_bounds(data)
        return data
    except (yaml.YAMLError, json.JSONDecodeError, tomllib.TOMLDecodeError) as exc:
        raise SpecError([f"cannot parse {path.name}: {str(exc)[:1000]}"], source=str(path)) from None
    except RecursionError:
        raise SpecError([f"cannot parse {path.name}: mappings and lists nest more than {MAX_DEPTH} deep; a spec "
                         "nests a few levels"], source=str(path)) from None
    except ValueError as exc:  # an integer too long to convert, or nesting too deep
        why = str(exc)[:1000] if not str(exc).startswith("Exceeds the limit") else (
            f"an integer too long to read; no spec value has more than {MAX_INT_DIGITS} digits")
        raise SpecError([f"cannot parse {path.name}: {why}"], source=str(path)) from None


def _bounded_int(text: str) -> int:
    """A JSON integer, refused past :data:`fusionkit.spec.yaml_reader.MAX_INT_DIGITS` digits."""
    if len(text.lstrip("-")) > MAX_INT_DIGITS:
        raise ValueError(f"an integer of {len(text.lstrip('-'))} digits; no spec value has more than "
                         f"{MAX_INT_DIGITS} digits")
    return int(text)


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


#: The spec's top-level keys: the fields of :class:`Spec`.
TOP_LEVEL_KEYS = tuple(f.name for f in attrs.fields(Spec))


def _structure_spec(data: Any, registry: Registry, problems: list[str]) -> Spec | None:
    if not isinstance(data, Mapping):
        problems.append(f"spec: expected a mapping at the top level, found {type(data).__name__}")
        return None
    for key in data:
        if key not in TOP_LEVEL_KEYS:
            close = difflib.get_close_matches(str(key), TOP_LEVEL_KEYS, n=2, cutoff=0.6)
            hint = f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
            problems.append(f"{key_text(key)}: unknown top-level key{hint}{' ' if hint else '. '}"
                            f"Keys: {', '.join(TOP_LEVEL_KEYS)}")
    written = {k: v for k, v in data.items() if k in TOP_LEVEL_KEYS}
    token = _REGISTRY.set(registry)
    try:
        values = cfg.structure_fields(Spec, written, "", problems, CONVERTER)
    finally:
        _REGISTRY.reset(token)
    for check in SPEC_CHECKS:
        check(values, written, registry, problems)
    if problems:
        return None
    return Spec(**values)


#: The registry a spec is structured against, for the converter's hooks (set by :func:`_structure_spec`).
_REGISTRY: contextvars.ContextVar[Registry] = contextvars.ContextVar("fusionkit_spec_registry")


def _hook(value: Any, tp: Any) -> Any:
    """Structure one ``Annotated[..., marker]`` field of a spec, at the path :func:`fusionkit.config.where` gives."""
    marker = typing.get_args(tp)[1]
    path, problems = cfg.where()
    registry = _REGISTRY.get()
    start = len(problems)
    if isinstance(marker, Checked):
        try:
            return marker.parse(value)
        except ValueError as exc:
            problems.append(f"{path}: {exc}")
            raise cfg.Reported from None
    if isinstance(marker, Block):
        made = structure_component(marker.kind, value, path, registry, problems)
    elif isinstance(marker, Blocks):
        made = _structure_blocks(marker, value, path, registry, problems)
    else:
        made = _KEYED[marker.name](value, path, registry, problems)
    if len(problems) > start:
        raise cfg.Reported
    return made


def _is_marked(tp: Any) -> bool:
    return typing.get_origin(tp) is Annotated and isinstance(typing.get_args(tp)[1], (Checked, Block, Blocks, Keyed))


#: The spec's converter: fusionkit.config's, with nested attrs classes structured at their paths, and the spec's
#: hooks (component blocks dispatch on ``type`` through the registry of the spec being read).
CONVERTER = cfg.nest_attrs(cfg.converter.copy())
CONVERTER.register_structure_hook_func(_is_marked, _hook)


def _structure_blocks(marker: Blocks, blocks: Any, path: str, registry: Registry,
                      problems: list[str]) -> tuple[Component, ...]:
    if not isinstance(blocks, list):
        problems.append(f"{path}: expected {marker.what.format(presets=', '.join(registry.preset_names()))}, "
                        f"found {short_repr(blocks)}")
        return ()
    return tuple(structure_component(marker.kind, block, f"{path}[{i}]", registry, problems)
                 for i, block in enumerate(blocks))


def _structure_encoders(blocks: Any, path: str, registry: Registry, problems: list[str]) -> tuple[EncoderSpec, ...]:
    if not isinstance(blocks, list) or not blocks:
        problems.append(f"{path}: expected a non-empty list of encoder blocks, found {short_repr(blocks)}")
        return ()
    out: list[EncoderSpec] = []
    seen: dict[str, int] = {}
    for i, block in enumerate(blocks):
        where = f"{path}[{i}]"
        if not isinstance(block, Mapping):
            problems.append(f"{where}: expected a mapping with name and type, found {short_repr(block)}")
            continue
        name = block.get("name")
        why = encoder_name_problem(name)
        if why:
            problems.append(f"{where}.name: {why}")
            continue
        if name in seen:
            problems.append(f"{where}.name: {name!r} is already the name of {path}[{seen[name]}]; names must be unique")
        seen.setdefault(name, i)
        rest = {k: v for k, v in block.items() if k != "name" and k not in _RUN_OPTIONS}
        running = cfg.structure(EncoderRun, {k: v for k, v in block.items() if k in _RUN_OPTIONS}, where, problems)
        comp = structure_component("encoder", rest, where, registry, problems)
        if comp is not None and running is not None:
            out.append(EncoderSpec(name, comp.type, comp.config, running.run, running.cost_gflops,
                                   running.preview_of, running.fused))
    return tuple(out)


_RUN_OPTIONS = tuple(f.name for f in attrs.fields(EncoderRun))


def _structure_heads(blocks: Any, path: str, registry: Registry, problems: list[str]) -> dict[str, Component]:
    if not isinstance(blocks, Mapping) or not blocks:
        problems.append(f"{path}: expected a mapping of role -> head block (roles: {', '.join(HEAD_ROLES)}), "
                        f"found {short_repr(blocks)}")
        return {}
    out: dict[str, Component] = {}
    for role, block in blocks.items():
        if role not in HEAD_ROLES:
            problems.append(f"{path}.{key_text(role)}: unknown head role; roles are {', '.join(HEAD_ROLES)}")
            continue
        comp = structure_component("head", block, f"{path}.{role}", registry, problems)
        if comp is not None:
            out[role] = comp
    return out


def _structure_towers(blocks: Any, path: str, registry: Registry, problems: list[str]) -> dict[str, TowerSpec]:
    if blocks in ({}, None):
        return {}
    if not isinstance(blocks, Mapping) or len(blocks) != 2:
        problems.append(f"{path}: expected a mapping of exactly two towers (name -> {{encoders, gate, fusion, "
                        f"embed_dim}}), found {short_repr(blocks)}")
        return {}
    out: dict[str, TowerSpec] = {}
    for name, block in blocks.items():
        where = f"{path}.{key_text(name)}"
        if encoder_name_problem(name):
            problems.append(f"{where}: a tower name is {encoder_name_problem(name)}")
        elif not isinstance(block, Mapping):
            problems.append(f"{where}: expected a mapping with encoders, gate, fusion and embed_dim, found "
                            f"{short_repr(block)}")
        else:
            tower = cfg.structure(TowerSpec, block, where, problems, CONVERTER)
            if tower is not None:
                out[str(name)] = tower
    return out


def _preset_name(value: Any, path: str, registry: Registry, problems: list[str]) -> str | None:
    if value is not None and (not isinstance(value, str) or registry.preset(value) is None):
        problems.append(f"{path}: expected one of {', '.join(registry.preset_names())} (one preset; further terms "
                        f"go under losses), found {short_repr(value)}.{registry.failure_note()}")
    return value


def _structure_distill(block: Any, path: str, registry: Registry, problems: list[str]) -> DistillSpec | None:
    """The written block (:class:`DistillBlock`) with its preset's loss blocks put before its own."""
    if block is None:
        return None
    if not isinstance(block, Mapping):
        problems.append(f"{path}: expected a mapping with teacher and losses (or a preset), found {short_repr(block)}")
        return None
    written = cfg.structure(DistillBlock, block, path, problems, CONVERTER)
    if written is None:
        return None
    if not written.losses and not written.preset:
        problems.append(f"{path}.losses: expected {_LOSSES.format(presets=', '.join(registry.preset_names()))}, found []")
        return None
    preset = registry.preset(written.preset) if written.preset else None
    given = tuple(structure_component("distill_loss", b, f"{path}.preset ({preset.name}) [{i}]", registry, problems)
                  for i, b in enumerate(preset.losses)) if preset else ()
    return DistillSpec(written.teacher, (*given, *written.losses))


#: The hooks of the ``Keyed`` fields, by name: ``hook(value, path, registry, problems)``.
_KEYED: dict[str, Callable[[Any, str, Registry, list[str]], Any]] = {
    "encoders": _structure_encoders, "heads": _structure_heads, "towers": _structure_towers,
    "distill": _structure_distill, "preset": _preset_name}


# -- checks that relate fields: each gets the fields that structured, the written keys, the registry, the problems


def _check_neutral(values: dict[str, Any], written: Mapping[str, Any], registry: Registry, problems: list[str]) -> None:
    labels = values.get("labels", () if "labels" in written else BLEMORE_LABELS)
    neutral = values.get("neutral")
    if neutral is not None and (not isinstance(neutral, str) or neutral not in labels):
        problems.append(f"neutral: expected one of the labels or null, found {short_repr(neutral)}")


def _check_gates(values: dict[str, Any], written: Mapping[str, Any], registry: Registry, problems: list[str]) -> None:
    _check_gate_counts(values.get("gate"), len(values.get("encoders", ())), "gate", problems)
    for name, tower in values.get("towers", {}).items():
        _check_gate_counts(tower.gate, len(tower.encoders), f"towers.{name}.gate", problems)


def _check_model_kind(values: dict[str, Any], written: Mapping[str, Any], registry: Registry,
                      problems: list[str]) -> None:
    """Contrastive settings need towers; adaptation losses need a fusion model."""
    if "contrastive" in written and not written.get("towers"):
        problems.append("contrastive: only a two-tower spec (with a 'towers' block) trains contrastively")
    if written.get("towers") and written.get("adaptation"):
        problems.append("adaptation: adaptation losses apply to classification models, not to two-tower ones")


def _check_tower_encoders(values: dict[str, Any], written: Mapping[str, Any], registry: Registry,
                          problems: list[str]) -> None:
    """Each tower names the spec's encoders, and each encoder feeds exactly one tower."""
    towers = values.get("towers")
    if not towers or "encoders" not in values:
        return
    known = {e.name for e in values["encoders"]}
    owner: dict[str, str] = {}
    start = len(problems)
    for name, tower in towers.items():
        for n in tower.encoders:
            if n not in known:
                problems.append(f"towers.{name}.encoders: {n!r} is not one of the spec's encoders {sorted(known)}")
            elif n in owner:
                problems.append(f"towers.{name}.encoders: {n!r} already belongs to tower {owner[n]!r}; a store's "
                                "encoder feeds one tower")
            owner.setdefault(n, name)
    missing = known - set(owner)
    if missing and len(towers) == 2 and len(problems) == start:
        problems.append(f"towers: encoders {sorted(missing)} belong to no tower; assign each to one")


def _check_conditional(values: dict[str, Any], written: Mapping[str, Any], registry: Registry,
                       problems: list[str]) -> None:
    """On-demand encoders need a gate that scores an encoder before it runs, and something that runs always."""
    encoders = values.get("encoders", ())
    demand = [i for i, e in enumerate(encoders) if e.on_demand]
    if "conditional" in written and not demand:
        problems.append("conditional: configures on-demand encoders, but no encoder has run: on_demand")
    if not demand:
        return
    declared = [e.cost_gflops for e in encoders if e.cost_gflops is not None]
    if declared and not math.isfinite(sum(declared)):
        problems.append(f"encoders[*].cost_gflops: the declared costs add up to more than a float holds "
                        f"({', '.join(f'{c:g}' for c in declared[:4])}...); a budget is a share of their total, so "
                        "declare costs in a unit that keeps it finite (GFLOPs per sample)")
    if len(demand) == len(encoders):
        problems.append(f"encoders[{demand[0]}].run: every encoder is on_demand, but the gate scores on-demand "
                        "encoders from what has already run; let at least one encoder run always")
    if values.get("towers"):
        problems.append(f"encoders[{demand[0]}].run: on_demand is for fusion models; a two-tower model runs every "
                        "encoder of each tower")
    gate = values.get("gate")
    if gate is not None and not gate_scouts(registry.get("gate", gate.type).factory):
        problems.append(f"gate.type: gate {gate.type!r} cannot score an encoder before it runs (it needs every "
                        f"token), so encoders[{demand[0]}] cannot be on_demand; use a scout gate (attention, "
                        "static) or run every encoder always")


def _check_previews(values: dict[str, Any], written: Mapping[str, Any], registry: Registry,
                    problems: list[str]) -> None:
    """A preview looks at an on-demand encoder and runs always; something must be left for the fusion to keep."""
    encoders = values.get("encoders", ())
    names = {e.name: e for e in encoders}
    for i, encoder in enumerate(encoders):
        target = encoder.preview_of
        if target is None:
            continue
        if target not in names or target == encoder.name:
            problems.append(f"encoders[{i}].preview_of: {target!r} names no other encoder; a preview names the "
                            f"on-demand encoder it looks at (one of {sorted(n for n in names if n != encoder.name)})")
        elif not names[target].on_demand:
            problems.append(f"encoders[{i}].preview_of: {target!r} runs always; a preview looks at an on-demand "
                            "encoder before the scout chooses whether to run it")
        if encoder.on_demand:
            problems.append(f"encoders[{i}].run: a preview runs always (the scout sees it before choosing); remove "
                            "run: on_demand, or preview_of")
    if any(not e.fused for e in encoders) and not any(e.on_demand for e in encoders):
        problems.append("encoders[*].fused: fused: false leaves a token that only the scout reads, and no encoder is "
                        "on demand (run: on_demand), so nothing would read it")
    for i, encoder in enumerate(encoders):
        if not encoder.fused and encoder.on_demand:
            problems.append(f"encoders[{i}].fused: an on-demand encoder runs to be fused; fused: false is for an "
                            "always-run look that only the scout reads (a preview)")
    if values.get("towers") and any(e.preview_of or not e.fused for e in encoders):
        problems.append("encoders[*].preview_of: previews and fused: false are for fusion models with on-demand "
                        "encoders; a two-tower model fuses every encoder of each tower")


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


#: The checks that relate a spec's fields, run after the fields are structured (each sees what did structure).
SPEC_CHECKS: tuple[Callable[[dict[str, Any], Mapping[str, Any], Registry, list[str]], None], ...] = (
    _check_neutral, _check_gates, _check_model_kind, _check_tower_encoders, _check_conditional, _check_previews)


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
    if kind == "gate" and not isinstance(reg.factory, type):
        warnings.warn(f"gate {name!r} ({reg.provider.describe()}) is registered with a factory function, as fusionkit "
                      "0.1.0 allowed; register the Gate subclass itself (register(name, MyGate, config=...)), so "
                      "that its class declares whether it scouts. Factory functions for gates stop working in "
                      "fusionkit 0.3.0.", DeprecationWarning, stacklevel=2)
    if kind == "scout" and not (isinstance(reg.factory, type) and issubclass(reg.factory, Scout)
                                and issubclass(reg.config, ScoutConfig)):
        problems.append(f"{path}.type: scout {name!r} ({reg.provider.describe()}) must register a subclass of "
                        "fusionkit.interfaces.Scout with a config that derives from ScoutConfig (see "
                        "docs/writing-a-plugin.md#scouts). Fix the plugin, or block it with FUSIONKIT_DISABLE_PLUGINS")
        return None
    if kind == "scout" and reg.factory.values_from not in SCOUT_VALUES_FROM:
        problems.append(f"{path}.type: scout {name!r} ({reg.provider.describe()}) sets values_from = "
                        f"{reg.factory.values_from!r}; it must be one of {', '.join(map(repr, SCOUT_VALUES_FROM))} "
                        "(docs/writing-a-plugin.md#scouts). Fix the plugin, or block it with FUSIONKIT_DISABLE_PLUGINS")
        return None
    options = {k: v for k, v in block.items() if k != "type"}
    config = cfg.structure(reg.config, options, path, problems)
    return None if config is None else Component(name, config)


def _is_gate(factory: Any, config: type) -> bool:
    """The gate contract: the class says whether it scouts and what its gradients reach; the config says what
    is kept. A factory function (0.1.0's style, deprecated) passes on its config; what it builds is checked when
    the model is built, and it never scouts (:func:`gate_scouts`)."""
    if not isinstance(factory, type):
        return callable(factory) and issubclass(config, GateConfig)
    return issubclass(factory, Gate) and issubclass(config, GateConfig)


def gate_scouts(factory: Any) -> bool:
    """Whether a registered gate can score an on-demand encoder before it runs: its class says so
    (:attr:`Gate.scouts`); a 0.1.0-style factory function does not."""
    return isinstance(factory, type) and factory.scouts


def spec_differences(old: Any, new: Any, path: str = "") -> list[str]:
    """Human-readable differences between two plain-data specs, e.g. ``train.seed: 0 -> 1``."""
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for key in [*old, *(k for k in new if k not in old)]:
            out += spec_differences(old.get(key), new.get(key), f"{path}.{key}" if path else str(key))
        return out
    return [] if old == new else [f"{path or 'spec'}: {old!r} -> {new!r}"]


__getattr__ = moved_names(__name__, {"DISTILL_PRESETS": "fusionkit.components.distillation"})
