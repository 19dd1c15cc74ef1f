"""The image a bundle's head takes: the preprocessing steps (:class:`Preprocess`) and the input (:class:`InputSpec`).

Part of the bundle contract (``protocol.manifest`` holds them as ``manifest.input``): what a device
does, with Pillow and numpy, to turn an image file into the head's input.  ``runtime.preprocess``
follows these steps on the device, and the converter decodes the user's images with it too.
No TensorFlow here.
"""
from __future__ import annotations

import math
from typing import Annotated, Literal, Optional, Union

import msgspec
import numpy as np

_Dim = Annotated[int, msgspec.Meta(ge=1, le=1 << 24)]


class Preprocess(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """How a device turns an image file into the head's input, step by step.

    1. ``PIL.Image.open(f)`` (EXIF orientation applied), ``.convert(color_mode)``;
    2. unless it already has that size, resize to ``resize`` (width, height) with ``resample``:
       ``fit`` ``stretch`` resizes to exactly that size, ``cover`` keeps the aspect ratio, scaling
       until the image covers it and cutting the overflow equally from both sides
       (Pillow's ``ImageOps.fit``);
    3. when ``crop`` (width, height) is set, keep the centred window of that size;
    4. ``np.asarray(img, np.float32)``, shaped like ``InputSpec.shape``;
    5. ``(pixels - mean) / std`` in float32 (per channel when lists), which lands in ``value_range``.
    """

    color_mode: Literal["L", "RGB"]
    resize: tuple[_Dim, _Dim]
    resample: Literal["nearest", "bilinear", "bicubic", "lanczos", "box", "hamming"] = "bilinear"
    mean: Union[float, list[float]] = 0.0
    std: Union[float, list[float]] = 255.0
    value_range: tuple[float, float] = (0.0, 1.0)
    fit: Literal["stretch", "cover"] = "stretch"          # schema 2
    crop: Optional[tuple[_Dim, _Dim]] = None              # schema 2

    def __post_init__(self):
        channels = 1 if self.color_mode == "L" else 3
        for name in ("mean", "std"):
            v = getattr(self, name)
            if isinstance(v, list) and len(v) not in (1, channels):
                raise ValueError(f"{name} has {len(v)} values but color_mode {self.color_mode} has {channels} channel(s)")
            if any(not math.isfinite(x) for x in np.atleast_1d(v)):
                raise ValueError(f"{name} must be finite")
        if any(x == 0 for x in np.atleast_1d(self.std)):
            raise ValueError("std must not be 0")
        lo, hi = self.bounds()
        lo, hi = float(np.min(lo)), float(np.max(hi))
        if not (abs(lo - self.value_range[0]) <= 1e-6 * max(1, abs(lo))
                and abs(hi - self.value_range[1]) <= 1e-6 * max(1, abs(hi))):
            raise ValueError(f"value_range {list(self.value_range)} does not follow from mean/std "
                             f"(pixels 0..255 give {lo:g}..{hi:g})")
        if self.crop is not None and (self.crop[0] > self.resize[0] or self.crop[1] > self.resize[1]):
            raise ValueError(f"crop {list(self.crop)} is larger than resize {list(self.resize)}")

    @property
    def size(self) -> tuple[int, int]:
        """(width, height) of the image at the end: the crop, or the resize when there is none."""
        return tuple(self.crop) if self.crop is not None else tuple(self.resize)

    def bounds(self) -> tuple[np.ndarray, np.ndarray]:
        """Per-channel (low, high) of the head's input for pixels 0..255 (float64 arrays of 1 or C values)."""
        a = (0.0 - np.asarray(self.mean, np.float64)) / np.asarray(self.std, np.float64)
        b = (255.0 - np.asarray(self.mean, np.float64)) / np.asarray(self.std, np.float64)
        return np.atleast_1d(np.minimum(a, b)), np.atleast_1d(np.maximum(a, b))

    def to_pixels(self, x: np.ndarray) -> np.ndarray:
        """Head input -> pixels in [0, 1] (float32, per channel): the inverse of step 5, divided by 255.

        What the auditor shows and scores reconstructions in.
        """
        x = np.asarray(x, np.float32)
        if self.mean == 0.0 and self.std == 255.0:   # already pixel / 255 (MNIST): exactly as it is
            return np.clip(x, 0.0, 1.0)
        p = x * np.asarray(self.std, np.float32) + np.asarray(self.mean, np.float32)
        return np.clip(p / np.float32(255.0), 0.0, 1.0).astype(np.float32, copy=False)

    def describe(self) -> str:
        """One line for people, e.g. ``RGB, resize to 96x96 (bilinear), (pixel - 127.5) / 127.5 -> [-1, 1]``."""
        w, h = self.resize
        geo = f"resize to {w}x{h} ({self.resample}{', keep aspect, crop overflow' if self.fit == 'cover' else ''})"
        if self.crop is not None:
            geo += f", centre crop {self.crop[0]}x{self.crop[1]}"

        def num(v):
            return "/".join(f"{x:g}" for x in v) if isinstance(v, list) else f"{v:g}"

        lo, hi = self.value_range
        return f"{self.color_mode}, {geo}, (pixel - {num(self.mean)}) / {num(self.std)} -> [{lo:g}, {hi:g}]"

    def to_option(self) -> str:
        """The ``--preprocess`` text that gives this spec (with the model's input size)."""
        def num(v):
            return ":".join(f"{x:.10g}" for x in v) if isinstance(v, list) else f"{v:.10g}"

        parts = [f"mean={num(self.mean)}", f"std={num(self.std)}", f"resample={self.resample}"]
        if self.fit != "stretch":
            parts.append(f"fit={self.fit}")
        if self.crop is not None:
            parts.append(f"resize={self.resize[0]}x{self.resize[1]}")
        return ",".join(parts)


class InputSpec(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """The head's input: one image, shape (height, width, channels) without the batch axis."""

    shape: tuple[_Dim, _Dim, _Dim]
    dtype: Literal["float32"]
    preprocess: Preprocess

    def __post_init__(self):
        h, w, c = self.shape
        channels = 1 if self.preprocess.color_mode == "L" else 3
        if c != channels:
            raise ValueError(f"shape {list(self.shape)} has {c} channel(s) but color_mode is "
                             f"{self.preprocess.color_mode}")
        if self.preprocess.crop is not None:
            if tuple(self.preprocess.crop) != (w, h):
                raise ValueError(f"preprocess.crop {list(self.preprocess.crop)} must be [width, height] = [{w}, {h}]")
        elif tuple(self.preprocess.resize) != (w, h):
            raise ValueError(f"preprocess.resize {list(self.preprocess.resize)} must be [width, height] = [{w}, {h}]")

    def pixels_to_input(self, pixels: np.ndarray) -> np.ndarray:
        """uint8 pixels (H, W) or (H, W, C), or a batch of them -> float32 head input with a batch axis.

        The Pillow part (open, convert, resize, crop) is the device's; this is the rest,
        so that it is computed the same way everywhere.
        """
        p = np.asarray(pixels)
        h, w, c = self.shape
        if p.shape in ((h, w), (h, w, c)):
            p = p.reshape(1, h, w, c)
        elif p.ndim in (3, 4) and p.shape[1:3] == (h, w) and p.size == p.shape[0] * h * w * c:
            p = p.reshape(p.shape[0], h, w, c)
        else:
            raise ValueError(f"pixels of shape {p.shape} do not fit the input shape {list(self.shape)}")
        pre = self.preprocess
        x = (p.astype(np.float32) - np.asarray(pre.mean, np.float32)) / np.asarray(pre.std, np.float32)
        return x.astype(np.float32, copy=False)
