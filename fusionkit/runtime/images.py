"""Images read as an exported live encoder's graph takes them, with PIL and numpy alone (no torch, no torchvision).

A live image encoder's export stores how one image becomes the graph's input in the manifest (its ``reads`` entry,
written by :meth:`fusionkit.interfaces.LiveEncoder.export_preprocessing`)::

    {"kind": "image", "mode": "RGB",
     "steps": [{"op": "resize", "size": 235, "interpolation": "bicubic"},
               {"op": "center_crop", "size": [224, 224]}]}

``mode`` is PIL's (``RGB``, or ``L`` for one channel). The steps are those of torchvision's eval transforms on PIL
images, with their exact rules, so that the pixels equal what the PyTorch model read:

- ``resize``: ``size`` an integer resizes the shorter side to it (the longer one to ``int(size * long / short)``),
  ``[h, w]`` resizes to exactly that; ``interpolation`` is one of :data:`INTERPOLATIONS` (PIL's filters, which
  torchvision calls on PIL images); an image already of the new size is left as it is.
- ``center_crop``: ``[h, w]``; an image smaller than that is first padded with zeros (``(crop - size) // 2``
  before, the rest after), then the crop starts at ``round((size - crop) / 2)``.

The result is ``uint8`` ``[C, H, W]``: the graph converts it to float and normalises it itself.
"""

from __future__ import annotations

import io
import os
import stat
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from fusionkit.errors import DataError

__all__ = ["INTERPOLATIONS", "STEPS", "MAX_ASPECT", "MAX_RESIZED_PIXELS", "check_reads", "check_image_size",
           "preprocess", "read_image", "read_images"]

#: Interpolation names (torchvision's ``InterpolationMode`` values) and the PIL filters they stand for.
INTERPOLATIONS = {"nearest": 0, "nearest-exact": 0, "bilinear": 2, "bicubic": 3, "box": 4, "hamming": 5, "lanczos": 1}
#: The preprocessing steps the runtime knows.
STEPS = ("resize", "center_crop")
#: The widest aspect ratio read (long side over short side): a 1 x 400,000 strip passes PIL's decompression-bomb
#: check in a few hundred bytes, and a resize of its short side to 224 would need gigabytes.
MAX_ASPECT = 100
#: The most pixels a resize step may make (an 8,192 x 8,192 image).
MAX_RESIZED_PIXELS = 8192 * 8192


def _pair(value: Any, where: str) -> tuple[int, int]:
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return value, value
    if (isinstance(value, (list, tuple)) and len(value) == 2
            and all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in value)):
        return int(value[0]), int(value[1])
    raise DataError(f"{where}: size must be a positive integer or [h, w], found {value!r}")


def check_reads(reads: Any, where: str) -> None:
    """Refuse a ``reads`` entry the runtime cannot follow, naming ``where`` (the manifest and the encoder)."""
    if not isinstance(reads, Mapping) or reads.get("kind") != "image":
        raise DataError(f"{where}: reads {reads!r}: the runtime reads images only (kind: image)")
    if reads.get("mode") not in ("RGB", "L"):
        raise DataError(f"{where}: reads.mode {reads.get('mode')!r}: expected RGB or L")
    steps = reads.get("steps")
    if not isinstance(steps, list):
        raise DataError(f"{where}: reads.steps must be a list of steps ({', '.join(STEPS)})")
    for n, step in enumerate(steps):
        op = step.get("op") if isinstance(step, Mapping) else None
        if op not in STEPS:
            raise DataError(f"{where}: reads.steps[{n}]: unknown step {step!r}; the runtime knows {', '.join(STEPS)}")
        if op == "resize":
            if isinstance(step.get("size"), list) and len(step["size"]) == 1:
                _pair(step["size"][0], f"{where}: reads.steps[{n}]")
            else:
                _pair(step.get("size"), f"{where}: reads.steps[{n}]")
            if step.get("interpolation") not in INTERPOLATIONS:
                raise DataError(f"{where}: reads.steps[{n}]: interpolation {step.get('interpolation')!r}; expected one "
                                f"of {', '.join(INTERPOLATIONS)}")
        else:
            _pair(step.get("size"), f"{where}: reads.steps[{n}]")


def _resized(width: int, height: int, size: Any) -> tuple[int, int]:
    """``(width, height)`` after a resize step of ``size`` (torchvision's rule: an integer is the shorter side)."""
    if isinstance(size, list) and len(size) == 1:
        size = size[0]
    if isinstance(size, int):
        short, long = (width, height) if width <= height else (height, width)
        new_short, new_long = size, int(size * long / short)
        return (new_short, new_long) if width <= height else (new_long, new_short)
    return size[1], size[0]


def check_image_size(width: int, height: int, reads: Mapping[str, Any] | None, where: str) -> None:
    """Refuse an image of ``width`` x ``height`` pixels before it is decoded and resized, when its aspect ratio is over
    :data:`MAX_ASPECT` or a resize step of ``reads`` would make over :data:`MAX_RESIZED_PIXELS` pixels; the
    :class:`DataError` names ``where`` (the file). The runtime and the timm plugin both call it, so both refuse
    alike."""
    if width < 1 or height < 1:
        raise DataError(f"{where}: an image of {width} x {height} pixels holds nothing to read")
    if max(width, height) > MAX_ASPECT * min(width, height):
        raise DataError(f"{where}: {width} x {height} pixels, an aspect ratio over {MAX_ASPECT}:1, which no image "
                        "encoder reads; crop it or replace it")
    for step in (reads or {}).get("steps", ()):
        if step.get("op") == "resize":
            new_w, new_h = _resized(width, height, step["size"])
            if new_w * new_h > MAX_RESIZED_PIXELS:
                raise DataError(f"{where}: {width} x {height} pixels would be resized to {new_w} x {new_h}, over "
                                f"{MAX_RESIZED_PIXELS:,} pixels; crop it or replace it")
            width, height = new_w, new_h


def _resize(image: Any, size: Any, interpolation: str) -> Any:
    width, height = image.size
    new_w, new_h = _resized(width, height, size)
    if (new_h, new_w) == (height, width):
        return image
    return image.resize((new_w, new_h), INTERPOLATIONS[interpolation])


def _center_crop(pixels: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    crop_h, crop_w = size
    height, width = pixels.shape[:2]
    if crop_h > height or crop_w > width:
        top, left = max(crop_h - height, 0) // 2, max(crop_w - width, 0) // 2
        pad = [(top, max(crop_h - height, 0) - top), (left, max(crop_w - width, 0) - left)]
        pixels = np.pad(pixels, pad + [(0, 0)] * (pixels.ndim - 2))
        height, width = pixels.shape[:2]
    top, left = int(round((height - crop_h) / 2.0)), int(round((width - crop_w) / 2.0))
    return pixels[top:top + crop_h, left:left + crop_w]


def preprocess(image: Any, reads: Mapping[str, Any]) -> np.ndarray:
    """A PIL image -> ``uint8`` ``[C, H, W]`` as ``reads`` describes (converted to its mode, then each step)."""
    image = image.convert(reads["mode"])
    pixels = None
    for step in reads["steps"]:
        if step["op"] == "resize":
            if pixels is not None:
                raise DataError("reads.steps: a resize after a crop is not supported; export the model again")
            image = _resize(image, step["size"], step["interpolation"])
        else:
            pixels = _center_crop(np.asarray(image, dtype=np.uint8) if pixels is None else pixels,
                                  _pair(step["size"], "reads"))
    pixels = np.asarray(image, dtype=np.uint8) if pixels is None else pixels
    return np.ascontiguousarray(pixels[None] if pixels.ndim == 2 else pixels.transpose(2, 0, 1))


def read_image(path: str | os.PathLike | bytes, reads: Mapping[str, Any]) -> np.ndarray:
    """The image file at ``path`` (or an image file's ``bytes``, e.g. an upload) as the graph takes it
    (:func:`preprocess`); an unreadable file is a :class:`DataError` that names it. PIL is imported here: only an
    export of a live image encoder needs it."""
    try:
        from PIL import Image, UnidentifiedImageError
    except ImportError:
        raise DataError("reading images needs Pillow: pip install 'fusionkit[runtime]' (or pillow)") from None
    if isinstance(path, bytes):
        source: Any = io.BytesIO(path)
        path = f"an image of {len(path)} bytes"
    else:
        source = path = os.fspath(path)
        try:
            mode = os.stat(path).st_mode
        except OSError as exc:
            raise DataError(f"{path}: not a readable image ({exc.strerror or exc})") from None
        if stat.S_ISDIR(mode):
            raise DataError(f"{path}: a folder (a clip's frames); the runtime reads one image per sample, not clips")
        if not stat.S_ISREG(mode):  # a FIFO or a device would block, or never end
            raise DataError(f"{path}: not a regular file")
    try:
        with Image.open(source) as image:
            check_image_size(*image.size, reads, path)
            return preprocess(image, reads)
    except (OSError, UnidentifiedImageError, ValueError, Image.DecompressionBombError) as exc:
        raise DataError(f"{path}: not a readable image ({type(exc).__name__}: {exc})") from None


def read_images(paths: Sequence[str | os.PathLike | bytes], reads: Mapping[str, Any]) -> np.ndarray:
    """Image files (paths, or their bytes) -> ``uint8`` ``[N, C, H, W]`` (every image comes out the size its last step gives)."""
    images = [read_image(path, reads) for path in paths]
    shapes = {image.shape for image in images}
    if len(shapes) > 1:
        raise DataError(f"images of different sizes after preprocessing ({sorted(shapes)[:3]}): the steps must end in "
                        "a fixed size (a center_crop or a resize to [h, w])")
    return np.stack(images)
