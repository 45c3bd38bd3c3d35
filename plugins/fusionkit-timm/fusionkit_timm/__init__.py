"""fusionkit-timm: the encoder ``timm``, any timm image model as a live encoder.

It reads images (one file per sample) or clips (a folder of frame images per sample),
preprocesses them with timm's own data config, and returns the pooled pre-logit features.
timm is imported when such an encoder is built, never at registration, so
``fusionkit --help`` and ``fusionkit plugins`` stay fast. Weights are random, or read from a
local safetensors file: nothing is ever downloaded.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any, Literal

import attrs
import torch

import fusionkit
from fusionkit.config import non_negative, option, unit_interval
from fusionkit.errors import FusionkitError
from fusionkit.files import sha256_file
from fusionkit.interfaces import LiveEncoder, LiveEncoderConfig, freeze_stages, restoring_checkpoint
from fusionkit.pooling import pool_frames
from fusionkit.runtime.images import check_image_size

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")


@attrs.frozen(kw_only=True)
class TimmEncoderConfig(LiveEncoderConfig):
    """A timm backbone on images, or on clips (a folder of frames per sample) pooled over time."""

    model: str = option(doc="timm architecture name, e.g. resnet18 or vit_tiny_patch16_224.")
    pretrained: bool | str = option(False, doc="false: random weights; or the path of a local .safetensors file "
                                               "with the backbone's weights. Nothing is ever downloaded.")
    in_chans: int = option(3, doc="Input channels: 3 reads images as RGB, 1 as grayscale.")
    img_size: list[int] = option(factory=list, doc="[H, W] input size; empty: the architecture's default. "
                                                   "Passed to the architecture where it takes one (ViTs).")
    crop_pct: float = option(0.0, doc="Centre-crop fraction of the resize before cropping; 0: the architecture's "
                                      "default.", validator=unit_interval)
    pooling: Literal["mean", "stats7"] = option("mean", doc="How clips' per-frame features pool over time.")
    seed: int = option(0, doc="Seed of the random initial weights (pretrained: false).", validator=non_negative)


def _timm():
    try:
        import timm
        import timm.data
    except ImportError as exc:
        raise FusionkitError("the encoder 'timm' needs timm (and torchvision): pip install 'fusionkit-timm[timm]'") from exc
    return timm


def create_backbone(config: TimmEncoderConfig, where: str):
    """The timm model with its classifier removed (``num_classes=0``), weights random or from the file."""
    timm = _timm()
    if not timm.models.is_model(config.model):
        close = difflib.get_close_matches(config.model, timm.list_models(), n=3, cutoff=0.6)
        hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
        raise FusionkitError(f"{where}: unknown timm architecture {config.model!r}.{hint} "
                             "List them with: python -c 'import timm; print(timm.list_models())'")
    kwargs: dict[str, Any] = {"num_classes": 0, "in_chans": config.in_chans}
    if config.img_size:
        kwargs["img_size"] = tuple(config.img_size)
    weights = None
    if config.pretrained is True:
        raise FusionkitError(f"{where}: pretrained: true would download weights from a hub, which fusionkit never "
                             "does; give the path of a local .safetensors file, or false for random weights")
    if config.pretrained and not restoring_checkpoint():  # a checkpoint brings its own (fine-tuned) weights
        weights = Path(config.pretrained).expanduser()
        if not weights.is_file():
            raise FusionkitError(f"{where}: pretrained weights file {str(weights)!r} does not exist; give a local "
                                 ".safetensors file (fusionkit never downloads weights)")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        try:
            model = timm.create_model(config.model, pretrained=False, **kwargs)
        except TypeError:
            if "img_size" not in kwargs:
                raise
            del kwargs["img_size"]  # a CNN: any input size works, the transform sets it
            model = timm.create_model(config.model, pretrained=False, **kwargs)
    if weights is not None:
        _load_weights(model, weights, where)
    return model, weights


def _split_transform(transform) -> tuple[Any, tuple[float, ...], tuple[float, ...]]:
    """timm's eval transform (``Compose``: resize and crop, then to-tensor and normalise) as its image steps (one
    image at a time, on PIL images) and the normalisation's mean and std (on the batch)."""
    import torchvision.transforms as T
    from timm.data.transforms import MaybeToTensor

    steps = list(transform.transforms)
    kinds = [type(step) for step in steps[-2:]]
    if len(steps) < 2 or not issubclass(kinds[0], (T.ToTensor, MaybeToTensor)) or kinds[1] is not T.Normalize:
        raise FusionkitError(f"timm {_timm().__version__}'s eval transform does not end in to-tensor and normalise "
                             f"as fusionkit-timm expects: {transform}")
    normalize = steps[-1]
    return T.Compose(steps[:-2]), tuple(float(v) for v in normalize.mean), tuple(float(v) for v in normalize.std)


def _load_weights(model, weights: Path, where: str) -> None:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if weights.suffix != ".safetensors":
        raise FusionkitError(f"{where}: {weights}: weights must be a .safetensors file (pickled checkpoints are "
                             "never loaded)")
    try:
        state = load_file(str(weights))
    except (SafetensorError, OSError) as exc:
        raise FusionkitError(f"{where}: {weights}: not a readable safetensors file ({exc})") from None
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    classifier = model.pretrained_cfg.get("classifier") or "fc"
    unexpected = [k for k in unexpected if not k.startswith(f"{classifier}.")]  # a classifier's weights may ride along
    wrong = [k for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or wrong:
        raise FusionkitError(f"{where}: {weights} does not hold weights of {type(model).__name__} as configured: "
                             f"missing {missing[:3]}, unexpected {unexpected[:3]}, other shapes {wrong[:3]}")
    model.load_state_dict({k: state[k] for k in own})


class TimmEncoder(LiveEncoder):
    """Images ``[B, C, H, W]`` -> ``[B, D]``; clips ``[B, T, C, H, W]`` (+ lengths) -> frames -> pooled ``[B, D]``."""

    def __init__(self, config: TimmEncoderConfig, context) -> None:
        super().__init__()
        timm = _timm()
        where = f"encoder {context.encoder_name!r} (timm {config.model!r})"
        self.name = context.encoder_name
        self.config = config
        self.backbone, self.weights_file = create_backbone(config, where)
        data_config = timm.data.resolve_model_data_config(self.backbone)
        if len(data_config["mean"]) != config.in_chans:  # e.g. grayscale input to an RGB-normalised architecture
            mean, std = data_config["mean"], data_config["std"]
            data_config["mean"] = (sum(mean) / len(mean),) * config.in_chans
            data_config["std"] = (sum(std) / len(std),) * config.in_chans
        if config.img_size:
            data_config["input_size"] = (config.in_chans, *config.img_size)
        else:
            data_config["input_size"] = (config.in_chans, *data_config["input_size"][1:])
        if config.crop_pct:
            data_config["crop_pct"] = config.crop_pct
        self.data_config = data_config
        with torch.device("cpu"):  # image steps on PIL images, on the CPU, whatever device the model is built on
            self.transform = timm.data.create_transform(**data_config, is_training=False)
            self._resize_crop, mean, std = _split_transform(self.transform)
        # the normalisation runs on the batch, on the model's device (not saved: it follows the data config)
        self.register_buffer("_mean", torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1), persistent=False)
        self.register_buffer("_std", torch.tensor(std, dtype=torch.float32).view(-1, 1, 1), persistent=False)
        self.modality = "image"
        self.frame_dim = int(self.backbone.num_features)
        self.out_dim = self.frame_dim * (7 if config.pooling == "stats7" else 1)
        stages = [self.backbone.get_submodule(info["module"]) for info in getattr(self.backbone, "feature_info", [])]
        try:
            freeze_stages(self.backbone, stages, config)
        except ValueError as exc:
            raise FusionkitError(f"{where}: {exc}") from None

    # -- data path (runs in loader workers) --------------------------------------------------------------

    def load(self, value: str, base: Path):
        path = base / value
        if path.is_dir():
            frames = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
            if not frames:
                raise ValueError(f"the clip folder {path} holds no frame images ({', '.join(IMAGE_SUFFIXES)})")
            return torch.stack([self._image(p) for p in frames])  # [T, C, H, W]
        return self._image(path)

    def _image(self, path: Path):
        """One image, resized and cropped as timm's transform does, as uint8 ``[C, H, W]``: its conversion to
        float and its normalisation are left to :meth:`normalize`, once per batch."""
        import numpy as np
        from PIL import Image, UnidentifiedImageError

        try:
            with Image.open(path) as img:
                check_image_size(*img.size, self._reads, str(path))  # as the runtime refuses it, before decoding
                img = img.convert("L" if self.config.in_chans == 1 else "RGB")
        except UnidentifiedImageError as exc:
            raise ValueError(f"not a readable image ({exc})") from None
        pixels = torch.from_numpy(np.array(self._resize_crop(img), dtype=np.uint8))
        return pixels.unsqueeze(0) if pixels.dim() == 2 else pixels.permute(2, 0, 1)

    @property
    def _reads(self) -> dict[str, Any] | None:
        """The resize and crop in the runtime's words, for :func:`check_image_size` (None where it has none)."""
        try:
            return self.export_preprocessing()
        except FusionkitError:
            return None

    def normalize(self, x):
        """Pixels as :meth:`load` gives them (uint8) -> timm's normalised float input, with the very operations of
        its transform (``/ 255``, then ``- mean``, ``/ std``); a float input is taken as normalised already."""
        if x.dtype != torch.uint8:
            return x
        return x.to(self._mean.dtype).div(255).sub_(self._mean).div_(self._std)

    def collate(self, items):
        if len({item.dim() for item in items}) != 1:
            raise ValueError("a batch mixes images and clips; an encoder's column holds one or the other")
        return super().collate(items)

    # -- model ------------------------------------------------------------------------------------------

    def example_input(self):
        """One image of the transform's input size (a clip costs this per frame)."""
        device = next(self.backbone.parameters()).device
        return torch.zeros((1, *self.data_config["input_size"]), dtype=torch.uint8, device=device), None

    def export_inputs(self):
        """Two images of the transform's size as :meth:`load` gives them (``uint8``): the exported graph takes the
        resized and cropped pixels and normalises them itself, as :meth:`normalize` does."""
        device = next(self.backbone.parameters()).device
        return torch.zeros((2, *self.data_config["input_size"]), dtype=torch.uint8, device=device), None

    def export_preprocessing(self) -> dict[str, Any] | None:
        """timm's resize and crop (:attr:`_resize_crop`) in the words of ``fusionkit.runtime.images``; a step it
        has no word for (e.g. timm's ResizeKeepRatio, for a non-square ``crop_mode: center``) raises, naming it."""
        import torchvision.transforms as T

        steps = []
        for step in self._resize_crop.transforms:
            if type(step) is T.Resize and step.max_size is None:
                size = step.size if isinstance(step.size, int) else [int(v) for v in step.size]
                steps.append({"op": "resize", "size": size, "interpolation": step.interpolation.value})
            elif type(step) is T.CenterCrop:
                steps.append({"op": "center_crop", "size": [int(v) for v in step.size]})
            else:
                raise FusionkitError(f"encoder {self.name!r}: timm's preprocessing step {step} has no counterpart in "
                                     "the runtime (it knows resize and center_crop); extract features instead")
        return {"kind": "image", "mode": "L" if self.config.in_chans == 1 else "RGB", "steps": steps}

    def embed(self, x, lengths=None):
        if x.dim() == 4:
            return self.backbone(self.normalize(x)), None
        if x.dim() != 5:
            raise FusionkitError(f"encoder {self.name!r}: timm takes images [B, C, H, W] or clips [B, T, C, H, W], "
                                 f"found shape {tuple(x.shape)}")
        b, t = x.shape[:2]
        valid = torch.ones(b, t, dtype=torch.bool, device=x.device) if lengths is None else \
            torch.arange(t, device=x.device) < lengths.to(x.device)[:, None]
        computed = self.backbone(self.normalize(x[valid]))  # padding frames never go through the backbone
        frames = computed.new_zeros((b, t, self.frame_dim))
        frames[valid] = computed
        return frames, valid.sum(1)

    def forward(self, x, lengths=None):
        features, frame_lengths = self.embed(x, lengths)
        if features.dim() == 2:
            return features

        return pool_frames(features, frame_lengths, self.config.pooling)

    def provenance(self) -> dict[str, Any]:
        return {
            "model": self.config.model,
            "weights_file": None if self.weights_file is None else str(self.weights_file.resolve()),
            "weights_file_sha256": None if self.weights_file is None else sha256_file(self.weights_file),
            "preprocessing": {k: list(v) if isinstance(v, tuple) else v for k, v in self.data_config.items()},
            "timm": _timm().__version__,
        }


@fusionkit.hookimpl
def register_encoders(register):
    register("timm", TimmEncoder, config=TimmEncoderConfig,
             description="Any timm image model on images or clips (live; random or local safetensors weights).")
