"""fusionkit-timm: the encoder ``timm``, any timm image model as a live encoder.

timm is imported when such an encoder is built, never at registration, so
``fusionkit --help`` and ``fusionkit plugins`` stay fast.
"""

from __future__ import annotations

import attrs

import fusionkit
from fusionkit.config import option, positive


@attrs.frozen(kw_only=True)
class TimmEncoderConfig:
    """A timm backbone on images [B, C, H, W] (or [B, H*W] vectors with image_size set)."""

    model: str = option(doc="timm model name, e.g. resnet18.")
    pretrained: bool = option(False, doc="Load pretrained weights (needs them in the local cache; nothing is fetched in tests).")
    in_chans: int = option(3, doc="Input channels.", validator=positive)
    image_size: list[int] = option(factory=list, doc="[H, W] to reshape flat vector inputs into images; empty for image inputs.")


def build(config: TimmEncoderConfig, context):
    try:
        import timm
    except ImportError as exc:
        raise ImportError(
            f"encoder {context.encoder_name!r} of type 'timm' needs the timm package: pip install 'fusionkit-timm[timm]'"
        ) from exc
    from fusionkit.interfaces import Encoder

    backbone = timm.create_model(config.model, pretrained=config.pretrained, num_classes=0, in_chans=config.in_chans)

    class TimmEncoder(Encoder):
        def __init__(self) -> None:
            super().__init__()
            self.backbone = backbone
            self.out_dim = backbone.num_features

        def forward(self, x, lengths=None):
            if config.image_size:
                x = x.reshape(x.shape[0], config.in_chans, *config.image_size)
            return self.backbone(x)

    return TimmEncoder()


@fusionkit.hookimpl
def register_encoders(register):
    register("timm", build, config=TimmEncoderConfig, description="Any timm image model as a live encoder.")
