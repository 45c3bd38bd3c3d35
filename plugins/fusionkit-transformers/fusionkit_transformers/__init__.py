"""fusionkit-transformers: the encoder ``transformer``, a transformers model built from a local config.

transformers is imported when such an encoder is built, never at registration.
Weights come from a local directory (``path``) or are random (``model_type``):
nothing is fetched from a hub.
"""

from __future__ import annotations

import attrs

import fusionkit
from fusionkit.config import option


@attrs.frozen(kw_only=True)
class TransformerEncoderConfig:
    """A transformers encoder over [B, T, D] input embeddings, mean-pooled over valid frames."""

    model_type: str = option("bert", doc="transformers model type for a randomly initialised model.")
    path: str = option("", doc="A local directory with config.json and weights; overrides model_type.")
    hidden_size: int = option(256, doc="Hidden size of a randomly initialised model.")
    num_hidden_layers: int = option(2, doc="Layers of a randomly initialised model.")


def build(config: TransformerEncoderConfig, context):
    try:
        import transformers
    except ImportError as exc:
        raise ImportError(
            f"encoder {context.encoder_name!r} of type 'transformer' needs transformers: "
            "pip install 'fusionkit-transformers[transformers]'"
        ) from exc
    import torch

    from fusionkit.interfaces import Encoder

    if config.path:
        model = transformers.AutoModel.from_pretrained(config.path, local_files_only=True)
    else:
        hf_config = transformers.AutoConfig.for_model(
            config.model_type, hidden_size=config.hidden_size, num_hidden_layers=config.num_hidden_layers,
            num_attention_heads=max(1, config.hidden_size // 64), intermediate_size=2 * config.hidden_size,
        )
        model = transformers.AutoModel.from_config(hf_config)

    class TransformerEncoder(Encoder):
        def __init__(self) -> None:
            super().__init__()
            self.model = model
            self.out_dim = model.config.hidden_size

        def forward(self, x, lengths=None):
            steps = torch.arange(x.shape[1], device=x.device)
            valid = torch.ones(x.shape[:2], dtype=torch.bool, device=x.device) if lengths is None else steps < lengths[:, None]
            hidden = self.model(inputs_embeds=x, attention_mask=valid.long()).last_hidden_state
            return (hidden * valid[..., None]).sum(1) / valid.sum(1, keepdim=True).clamp_min(1)

    return TransformerEncoder()


@fusionkit.hookimpl
def register_encoders(register):
    register("transformer", build, config=TransformerEncoderConfig,
             description="A transformers encoder over input embeddings (local or random weights).")
