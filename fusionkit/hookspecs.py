"""The hooks a fusionkit plugin can implement: one per component kind.

Every hook receives a ``register`` callable (the "register callback" style of
pluggy-based tools such as ``llm``)::

    @fusionkit.hookimpl
    def register_encoders(register):
        register("my_encoder", MyEncoder, config=MyEncoderConfig,
                 description="What it is, in one line.")

``register(name, factory, *, config, description)`` records the component under
``name`` (what a spec writes in ``type:``). ``factory(config, context)`` builds it;
``config`` is an attrs class describing its parameters. Import heavy optional
libraries inside the factory, never at module import time.
"""

from __future__ import annotations

import pluggy

__all__ = ["PROJECT_NAME", "hookspec", "hookimpl", "register_encoders", "register_gates", "register_scouts", "register_fusions",
           "register_heads", "register_combiners", "register_decoders", "register_adaptation_losses",
           "register_distill_losses", "register_distill_presets", "register_datasets", "KIND_HOOKS", "kind_plural"]

PROJECT_NAME = "fusionkit"

hookspec = pluggy.HookspecMarker(PROJECT_NAME)
hookimpl = pluggy.HookimplMarker(PROJECT_NAME)


@hookspec
def register_encoders(register):
    """Register encoders: turn one input (features or raw data) into a vector [B, D]."""


@hookspec
def register_gates(register):
    """Register gates: score every encoder for every sample."""


@hookspec
def register_scouts(register):
    """Register scouts: decide, per sample, which on-demand encoders run (:class:`fusionkit.interfaces.Scout`)."""


@hookspec
def register_fusions(register):
    """Register fusions: combine the kept, rank-ordered encoder slots into one vector."""


@hookspec
def register_heads(register):
    """Register prediction heads: fused vector -> probabilities over the labels."""


@hookspec
def register_combiners(register):
    """Register combiners: fuse the heads' probabilities into one distribution."""


@hookspec
def register_decoders(register):
    """Register decoders: probabilities -> BlEmoRE-style predictions."""


@hookspec
def register_adaptation_losses(register):
    """Register unsupervised domain adaptation losses."""


@hookspec
def register_distill_losses(register):
    """Register relational distillation losses."""


@hookspec
def register_distill_presets(register):
    """Register distillation presets: named, published sets of distillation loss blocks.

    ``register(name, losses, *, description)``: ``losses`` is a non-empty list of loss blocks, each
    ``{"type": <a registered distill_loss>, ...options}``, as a spec writes them under ``distill.losses``.
    A bare loss name stands for ``{"type": name}``. A spec's ``distill.preset: name`` (compared without case) puts
    them before its own ``distill.losses``; each block is validated once every plugin has registered, and a preset
    that names an unknown loss or a bad option fails its plugin.
    """


@hookspec
def register_datasets(register):
    """Register datasets: builders of feature stores.

    A dataset factory takes only its config and returns a :class:`fusionkit.interfaces.Dataset`, whose
    ``generate()`` gives its samples and features and ``labels()`` its labels;
    ``fusionkit.components.datasets.build_dataset`` (and ``fusionkit data build``) writes them as a store.
    """


#: Component kind -> the hook that registers it. The kind names are the keys a
#: registry lookup and ``fusionkit plugins --json`` use.
KIND_HOOKS: dict[str, str] = {
    "encoder": "register_encoders",
    "gate": "register_gates",
    "scout": "register_scouts",
    "fusion": "register_fusions",
    "head": "register_heads",
    "combiner": "register_combiners",
    "decoder": "register_decoders",
    "adaptation_loss": "register_adaptation_losses",
    "distill_loss": "register_distill_losses",
    "dataset": "register_datasets",
}


def kind_plural(kind: str) -> str:
    """A kind's plural for messages ("Known adaptation losses: ..."), read from its hook's name."""
    return KIND_HOOKS[kind].removeprefix("register_").replace("distill_", "distillation_").replace("_", " ")
