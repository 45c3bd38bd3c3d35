"""``fusionkit plugin new NAME``: a new, clean plugin distribution from the template.

The repository's ``plugins/fusionkit-example-encoder`` is this command's own output
(``fusionkit plugin new example-encoder --component example_mlp --out plugins``); a test
keeps the two identical. Generating rather than copying means a new plugin never carries
the template's ``build/`` or ``*.egg-info`` folders into its first wheel.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path
from string import Template

from fusionkit.errors import FusionkitError
from fusionkit.files import make_temp_dir
from fusionkit.hookspecs import KIND_HOOKS

__all__ = ["NAME", "PYPROJECT", "MODULE", "README", "ENCODER_USAGE", "OTHER_MODULE", "KINDS", "PLUGIN_KINDS",
           "new_plugin"]

NAME = re.compile(r"^[a-z][a-z0-9]*(-[a-z0-9]+)*$")

PYPROJECT = Template('''\
# A fusionkit plugin, made by `fusionkit plugin new $name`.
[build-system]
requires = ["setuptools>=68"]
build-backend = "setuptools.build_meta"

[project]
name = "$dist"
version = "0.1.0"
description = "fusionkit plugin: the $kind_words $component"
requires-python = ">=3.11"
dependencies = ["fusionkit[torch]"]

# The one line that makes fusionkit find the plugin: group "fusionkit",
# any entry name, value = the module holding the hook implementations.
[project.entry-points.fusionkit]
$entry = "$module"

[tool.setuptools]
packages = ["$module"]
''')

MODULE = Template('''\
"""A fusionkit plugin: registers the encoder ``$component``.

Keep this module cheap to import: fusionkit imports it to learn what the plugin
provides. Import heavy libraries inside the factory (see ``build``).
"""

from __future__ import annotations

import attrs

import fusionkit
from fusionkit.config import option, positive


@attrs.frozen(kw_only=True)
class ${cls}Config:
    """A two-layer MLP over pre-extracted vectors."""

    dim: int = option(doc="Input feature size.", validator=positive)
    hidden: int = option(64, doc="Hidden layer size.", validator=positive)
    out_dim: int = option(32, doc="Size of the encoded vector.", validator=positive)


def build(config: ${cls}Config, context):
    """Factory: called with the validated config and the build context."""
    import torch
    from torch import nn

    from fusionkit.interfaces import Encoder

    class ${cls}Encoder(Encoder):
        def __init__(self) -> None:
            super().__init__()
            self.out_dim = config.out_dim
            self.net = nn.Sequential(nn.Linear(config.dim, config.hidden), nn.GELU(), nn.Linear(config.hidden, config.out_dim))

        def forward(self, x, lengths=None):
            return self.net(x)

        def export_inputs(self):
            """Two rows as a deployment gives them: with this, `fusionkit export` exports the encoder."""
            return torch.zeros(2, config.dim), None

    return ${cls}Encoder()


@fusionkit.hookimpl
def register_encoders(register):
    register("$component", build, config=${cls}Config, description="An MLP over feature vectors.")
''')

README = Template('''\
# $dist

A fusionkit plugin: it registers the $kind_words `$component` ($summary). It was made by
`fusionkit plugin new $name`; fusionkit's guide
`docs/writing-a-plugin.md` walks through making it your own, and covers every component kind.

```bash
pip install ./$dist
fusionkit plugins          # $entry ($dist 0.1.0)  $kind: $component
```

$usage
''')

ENCODER_USAGE = """In a spec:

```yaml
encoders:
  - {name: audio, type: $component, dim: 1024, hidden: 128, out_dim: 64}
```"""

#: Every other kind's module: the same shape as the encoder's, with that kind's base class and hook.
OTHER_MODULE = Template('''\
"""A fusionkit plugin: registers the $kind_words ``$component``.

Keep this module cheap to import: fusionkit imports it to learn what the plugin
provides. torch is loaded with fusionkit anyway; import heavier libraries inside the component.
"""

from __future__ import annotations

import attrs
$imports

import fusionkit
from fusionkit.config import option, positive
$base_import


@attrs.frozen(kw_only=True)
class ${cls}Config$config_base:
    """$summary_cap."""

$body

@fusionkit.hookimpl
def $hook(register):
    register("$component", $factory, config=${cls}Config, description="$summary_cap.")
''')

#: kind -> (base import, config base, imports, body, factory, summary, usage in a spec)
KINDS: dict[str, dict[str, str]] = {
    "gate": dict(
        base_import="from fusionkit.interfaces import Gate, GateConfig", config_base="(GateConfig)",
        imports="import torch\nfrom torch import nn",
        body='''    hidden: int = option(32, doc="Hidden size of the scoring MLP.", validator=positive)


class ${cls}(Gate):
    """Scores each encoder token alone; top-n selection, warm-up and noise come from Gate.forward."""

    def __init__(self, config: ${cls}Config, context) -> None:
        super().__init__(config)
        self.net = nn.Sequential(nn.Linear(context.latent_dim, config.hidden), nn.GELU(), nn.Linear(config.hidden, 1))

    def score(self, tokens: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        return self.net(tokens).squeeze(-1)
''', factory="${cls}", summary="a gate scoring each encoder token with an MLP",
        usage="In a spec:\n\n```yaml\ngate: {type: $component, top_n: 2, hidden: 32}\n```"),
    "scout": dict(
        base_import="from fusionkit.interfaces import Scout, ScoutConfig", config_base="(ScoutConfig)",
        imports="import torch\nfrom torch import nn",
        body='''    hidden: int = option(16, doc="Hidden size of the MLP.", validator=positive)


class ${cls}(Scout):
    """Each on-demand encoder's predicted loss drop from the mean of the tokens a sample has and what already ran;
    fusionkit decides in stages, trains it on measured drops, fits mean budgets and exports it."""

    def __init__(self, config: ${cls}Config, context) -> None:
        super().__init__(config, context)
        demand = len(context.on_demand)
        self.net = nn.Sequential(nn.Linear(context.latent_dim + demand, config.hidden), nn.GELU(),
                                 nn.Linear(config.hidden, demand))

    def forward(self, tokens: torch.Tensor, present: torch.Tensor, ran: torch.Tensor) -> torch.Tensor:
        weight = present.unsqueeze(-1).float()
        mean = (tokens.detach().float() * weight).sum(1) / weight.sum(1).clamp_min(1.0)
        return self.net(torch.cat([mean, ran.float()], dim=1))
''', factory="${cls}", summary="a scout predicting each on-demand encoder's loss drop with an MLP",
        usage="In a spec with on-demand encoders:\n\n```yaml\nconditional: {scout: {type: $component, hidden: 16}}\n```"),
    "fusion": dict(
        base_import="from fusionkit.interfaces import Fusion", config_base="",
        imports="import torch",
        body='''    scale: float = option(1.0, doc="Factor applied to the fused vector.", validator=positive)


class ${cls}(Fusion):
    """Element-wise maximum over the kept slots (empty slots ignored)."""

    def __init__(self, config: ${cls}Config, context) -> None:
        super().__init__()
        self.scale = config.scale
        self.out_dim = context.latent_dim

    def forward(self, slots: torch.Tensor, weights: torch.Tensor, slot_mask: torch.Tensor) -> torch.Tensor:
        fused = slots.masked_fill(~slot_mask.unsqueeze(-1), float("-inf")).amax(dim=1).nan_to_num(0.0)
        return self.scale * fused.clamp_min(-1e4)
''', factory="${cls}", summary="a fusion taking the element-wise maximum of the kept slots",
        usage="In a spec:\n\n```yaml\nfusion: {type: $component}\n```"),
    "head": dict(
        base_import="from fusionkit.interfaces import Head", config_base="",
        imports="import torch\nfrom torch import nn",
        body='''    dropout: float = option(0.1, doc="Dropout before the linear layer.")


class ${cls}(Head):
    """A linear layer over the fused vector; softmax over labels (set activation to sigmoid for presence)."""

    activation = "softmax"

    def __init__(self, config: ${cls}Config, context) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Dropout(config.dropout), nn.Linear(context.in_dim, context.num_labels))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.net(h)
''', factory="${cls}", summary="a linear salience head",
        usage="In a spec:\n\n```yaml\nheads: {salience: {type: $component, dropout: 0.1}}\n```"),
    "combiner": dict(
        base_import="from fusionkit.interfaces import Combiner", config_base="",
        imports="import torch",
        body='''    presence_weight: float = option(0.5, doc="Weight of the normalised presence probabilities.")


class ${cls}(Combiner):
    """A weighted mean of the salience and the normalised presence probabilities."""

    def __init__(self, config: ${cls}Config, context) -> None:
        super().__init__()
        self.w = config.presence_weight

    def forward(self, presence: torch.Tensor | None, salience: torch.Tensor | None) -> torch.Tensor:
        if presence is None or salience is None:
            return salience if presence is None else presence / presence.sum(-1, keepdim=True).clamp_min(1e-8)
        return self.w * presence / presence.sum(-1, keepdim=True).clamp_min(1e-8) + (1 - self.w) * salience
''', factory="${cls}", summary="a combiner mixing presence and salience probabilities",
        usage="In a spec:\n\n```yaml\ncombiner: {type: $component, presence_weight: 0.5}\n```"),
    "decoder": dict(
        base_import="from fusionkit.interfaces import Decoder", config_base="",
        imports="import numpy as np",
        body='''    blend_ratio: float = option(0.5, doc="Second emotion's share of the first's above which a blend is predicted "
                                         "(fitted on validation).", validator=positive)


class ${cls}(Decoder):
    """Top emotion alone, or a 50/50 blend when the second is close enough; the ratio is fitted on validation."""

    def decode(self, outputs: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        probs = outputs["probs"]
        order = np.argsort(-probs, axis=1, kind="stable")[:, :2]
        top = np.take_along_axis(probs, order, axis=1)
        blend = top[:, 1] >= self.config.blend_ratio * top[:, 0]
        saliences = np.where(blend[:, None], [50.0, 50.0], [100.0, 0.0])
        order[~blend, 1] = -1
        return order, saliences

    def fit(self, outputs: dict[str, np.ndarray], truth: np.ndarray) -> ${cls}Config:
        from fusionkit.blemore.answers import order_to_matrix
        from fusionkit.blemore.metrics import scores_from_matrices

        best = (-1.0, self.config)
        for ratio in np.linspace(0.1, 1.0, 19):
            config = attrs.evolve(self.config, blend_ratio=float(ratio))
            order, sal = type(self)(config, self.context).decode(outputs)
            score = scores_from_matrices(order_to_matrix(order, sal, truth.shape[1]), truth)["score"]
            best = max(best, (score, config), key=lambda x: x[0])
        return best[1]
''', factory="${cls}", summary="a decoder predicting a single emotion or a 50/50 blend",
        usage="In a spec:\n\n```yaml\ndecoder: {type: $component}\n```"),
    "adaptation_loss": dict(
        base_import="from fusionkit.interfaces import AdaptationConfig, AdaptationLoss",
        config_base="(AdaptationConfig)", imports="import torch",
        body='''    power: float = option(2.0, doc="Exponent of the distance between the feature means.", validator=positive)


class ${cls}(AdaptationLoss):
    """The distance between the source and target feature means (no labels of the target are read)."""

    def __init__(self, config: ${cls}Config, context) -> None:
        super().__init__(config)

    def discrepancy(self, source: torch.Tensor, target: torch.Tensor, progress: float) -> torch.Tensor:
        return (source.mean(0) - target.mean(0)).abs().pow(self.config.power).sum()
''', factory="${cls}", summary="an adaptation loss between source and target feature means",
        usage="In a spec:\n\n```yaml\nadaptation: [{type: $component, weight: 0.1}]\n```"),
    "distill_loss": dict(
        base_import="from fusionkit.interfaces import DistillBatch, DistillConfig, DistillLoss",
        config_base="(DistillConfig)", imports="import torch",
        body='''    margin: float = option(0.0, doc="Cosine distance below which a pair costs nothing.")


class ${cls}(DistillLoss):
    """Pulls each student embedding towards its teacher's: mean cosine distance over every view."""

    needs = "views"

    def __init__(self, config: ${cls}Config, context) -> None:
        super().__init__(config)

    def forward(self, batch: DistillBatch) -> torch.Tensor:
        distances = [(1 - (s * t).sum(-1) - self.config.margin).clamp_min(0).mean() for s, t in batch.views.values()]
        return torch.stack(distances).mean()
''', factory="${cls}", summary="a distillation loss on the cosine distance of student and teacher embeddings",
        usage="In a spec:\n\n```yaml\ndistill: {teacher: runs/teacher/best, losses: [{type: $component}]}\n```"),
    "dataset": dict(
        base_import="from fusionkit.interfaces import Dataset, Sample",
        config_base="", imports="import numpy as np",
        body='''    samples: int = option(100, doc="Number of samples.", validator=positive)
    seed: int = option(0, doc="Random seed.")


class ${cls}(Dataset):
    """Two classes, one encoder of 8 features; groups and folds so that runs are group-disjoint."""

    def labels(self) -> tuple[str, ...]:
        return ("low", "high")

    def generate(self):
        rng = np.random.default_rng(self.config.seed)
        classes = np.arange(self.config.samples) % 2
        samples = [Sample(id=f"x{i}", labels=[{"emotion": self.labels()[c], "salience": 100.0}], group=f"g{i % 10}",
                          fold=i % 5) for i, c in enumerate(classes)]
        return samples, {"features": (rng.normal(size=(self.config.samples, 8)) + classes[:, None]).astype("float32")}
''', factory="${cls}", summary="a dataset of two classes",
        usage="Build a store:\n\n```bash\nfusionkit data build $component --out store --set samples=200\n```"),
}

#: The kinds `fusionkit plugin new --kind` writes: every kind of the one table, hookspecs.KIND_HOOKS.
PLUGIN_KINDS = tuple(KIND_HOOKS)


def new_plugin(name: str, out: str | Path = ".", component: str | None = None, kind: str = "encoder") -> Path:
    """Write the distribution ``fusionkit-NAME`` under ``out``, registering one component of ``kind``; returns
    its directory.

    ``name`` is lower-case words joined by ``-`` (``my-encoder``); ``component`` is the name
    specs write in ``type:`` (default: ``name`` with ``_`` for ``-``).
    """
    if kind not in PLUGIN_KINDS:
        raise FusionkitError(f"--kind {kind!r}: one of {', '.join(PLUGIN_KINDS)}")
    if not NAME.match(name):
        raise FusionkitError(f"plugin name {name!r}: use lower-case letters and digits, words joined by '-' "
                             "(e.g. my-encoder)")
    snake = name.replace("-", "_")
    component = component or snake
    if not re.match(r"^[a-z][a-z0-9_]*$", component):
        raise FusionkitError(f"component name {component!r}: use lower-case letters, digits and '_'")
    values = {"name": name, "dist": f"fusionkit-{name}", "module": f"fusionkit_{snake}", "entry": snake,
              "component": component, "cls": "".join(part.title() for part in component.split("_")), "kind": kind,
              "kind_words": kind.replace("_", " "), "hook": KIND_HOOKS[kind]}
    if kind == "encoder":
        module = MODULE.substitute(values)
        values |= {"summary": "a two-layer MLP over\npre-extracted vectors",
                   "usage": Template(ENCODER_USAGE).substitute(values)}
    else:
        parts = {k: Template(v).substitute(values) for k, v in KINDS[kind].items()}
        values |= {"summary": parts["summary"], "usage": parts["usage"]}
        module = OTHER_MODULE.substitute(values, **{k: v for k, v in parts.items() if k not in ("summary", "usage")},
                                         summary_cap=parts["summary"][0].upper() + parts["summary"][1:])
    target = Path(out) / values["dist"]
    if target.exists():
        raise FusionkitError(f"{target}: already exists; nothing was written. Choose another name or --out.")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = make_temp_dir(target.parent, target.name)
    try:
        (tmp / values["module"]).mkdir()
        (tmp / "pyproject.toml").write_text(PYPROJECT.substitute(values), encoding="utf-8")
        (tmp / values["module"] / "__init__.py").write_text(module, encoding="utf-8")
        (tmp / "README.md").write_text(README.substitute(values), encoding="utf-8")
        tmp.rename(target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target
