"""A fusionkit plugin: registers the encoder ``example_mlp``.

Keep this module cheap to import: fusionkit imports it to learn what the plugin
provides. Import heavy libraries inside the factory (see ``build``).
"""

from __future__ import annotations

import attrs

import fusionkit
from fusionkit.config import option, positive


@attrs.frozen(kw_only=True)
class ExampleMlpConfig:
    """A two-layer MLP over pre-extracted vectors."""

    dim: int = option(doc="Input feature size.", validator=positive)
    hidden: int = option(64, doc="Hidden layer size.", validator=positive)
    out_dim: int = option(32, doc="Size of the encoded vector.", validator=positive)


def build(config: ExampleMlpConfig, context):
    """Factory: called with the validated config and the build context."""
    import torch
    from torch import nn

    from fusionkit.interfaces import Encoder

    class ExampleMlpEncoder(Encoder):
        def __init__(self) -> None:
            super().__init__()
            self.out_dim = config.out_dim
            self.net = nn.Sequential(nn.Linear(config.dim, config.hidden), nn.GELU(), nn.Linear(config.hidden, config.out_dim))

        def forward(self, x, lengths=None):
            return self.net(x)

        def export_inputs(self):
            """Two rows as a deployment gives them: with this, `fusionkit export` exports the encoder."""
            return torch.zeros(2, config.dim), None

    return ExampleMlpEncoder()


@fusionkit.hookimpl
def register_encoders(register):
    register("example_mlp", build, config=ExampleMlpConfig, description="An MLP over feature vectors.")
