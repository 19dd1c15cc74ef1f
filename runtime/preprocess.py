"""Images (files, PIL images, numpy arrays) to the head's input, as the bundle's manifest says.

The manifest's ``input.preprocess`` (see :class:`protocol.manifest.Preprocess`)
is followed step by step with Pillow:

1. open the file (EXIF orientation applied, so a phone photo is upright) and
   ``convert(color_mode)``;
2. when the size differs, resize to ``resize`` with ``resample``: stretched to it, or
   (``fit = "cover"``) keeping the aspect ratio and cutting the overflow (``ImageOps.fit``);
3. the centred ``crop`` window, when the manifest has one;
4. uint8 pixels → ``InputSpec.pixels_to_input`` (``(pixels - mean) / std`` in
   float32), the same function the converter and auditor use.

The converter decodes the user's images (calibration, parity, the audit) with this very
class, so what the device computes from a file is what the model was checked on.

Arrays are accepted too: uint8 arrays are pixels (steps 2–3), float arrays are
taken as the head's input already (e.g. MNIST images in [0, 1]) and only
reshaped and range-checked.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Iterable

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from protocol.errors import UsageError

log = logging.getLogger(__name__)

_RESAMPLE = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
    "box": Image.Resampling.BOX,
    "hamming": Image.Resampling.HAMMING,
}

# Float input may sit a hair outside value_range after someone's own arithmetic.
_RANGE_SLACK = 1e-4


class Preprocessor:
    """Turns one input into the head's input for one bundle (``spec``: the manifest's ``input``).

    ``p(item)`` returns one float32 array of ``spec.shape`` (no batch axis);
    ``p.batch(items)`` stacks several; ``p.arrays(x)`` takes a numpy batch.
    """

    def __init__(self, spec):
        self.spec = spec
        self.shape = tuple(int(d) for d in spec.shape)          # (height, width, channels)
        self.pre = spec.preprocess
        self.size = (self.shape[1], self.shape[0])              # PIL speaks (width, height)
        self.resize = tuple(int(d) for d in self.pre.resize)    # before the crop, if any
        self.resample = _RESAMPLE[self.pre.resample]
        self.value_range = (float(self.pre.value_range[0]), float(self.pre.value_range[1]))

    def __repr__(self) -> str:
        return f"Preprocessor(shape={self.shape}, {self.pre.describe()})"

    # ------------------------------------------------------------- images
    def open_image(self, path: str | os.PathLike) -> Image.Image:
        """Open an image file as a PIL image in the manifest's colour mode (steps 1)."""
        path = Path(path)
        try:
            with Image.open(path) as img:
                img = ImageOps.exif_transpose(img)
                return self._convert(img)
        except FileNotFoundError:
            raise UsageError(f"image {path} does not exist", fix="check the path") from None
        except (UnidentifiedImageError, OSError, ValueError) as exc:
            raise UsageError(f"cannot read {path} as an image ({exc})",
                             fix="give a PNG, JPEG, BMP, GIF, TIFF or WebP file") from None

    def _convert(self, img: Image.Image) -> Image.Image:
        mode = self.pre.color_mode
        if img.mode in ("I;16", "I;16B", "I;16L", "I"):
            # 16-bit greyscale: convert("L") would clip, not scale; keep the top 8 bits.
            a = np.asarray(img, dtype=np.uint32)
            img = Image.fromarray((a >> 8).astype(np.uint8) if a.max() > 255 else a.astype(np.uint8), "L")
        return img if img.mode == mode else img.convert(mode)

    def image_pixels(self, img: Image.Image) -> np.ndarray:
        """A PIL image → uint8 pixels of shape (H, W, C), resized when needed (steps 1–2)."""
        img = self._convert(img)
        if img.size != self.resize:
            if self.pre.fit == "cover":
                img = ImageOps.fit(img, self.resize, method=self.resample)
            else:
                img = img.resize(self.resize, self.resample)
        if self.pre.crop is not None:
            (cw, ch), (w, h) = self.pre.crop, img.size
            left, top = int(round((w - cw) / 2.0)), int(round((h - ch) / 2.0))
            img = img.crop((left, top, left + cw, top + ch))
        return np.asarray(img, dtype=np.uint8).reshape(self.shape)

    def pixels(self, p: np.ndarray) -> np.ndarray:
        """uint8 pixels → float32 head input (step 3)."""
        return self.spec.pixels_to_input(p)[0]

    # ------------------------------------------------------------- arrays
    def array(self, a: np.ndarray) -> np.ndarray:
        """One numpy image → head input.  uint8: pixels; float: already the head's input."""
        a = np.asarray(a)
        if a.dtype == np.uint8:
            if a.size != int(np.prod(self.shape)):
                img = Image.fromarray(a.squeeze(axis=-1) if a.ndim == 3 and a.shape[-1] == 1 else a)
                return self.pixels(self.image_pixels(img))
            return self.pixels(a.reshape(self.shape))
        if a.dtype.kind == "f":
            if a.size != int(np.prod(self.shape)):
                raise UsageError(f"a float image of shape {a.shape} does not fit the head's input {list(self.shape)}",
                                 fix="resize it first, or pass uint8 pixels (resized with Pillow)")
            x = a.reshape(self.shape).astype(np.float32, copy=False)
            self._check_range(x)
            return x
        raise UsageError(f"image arrays must be uint8 pixels or float input, got dtype {a.dtype}")

    def arrays(self, x: np.ndarray) -> np.ndarray:
        """A batch of numpy images (N, ...) → (N, H, W, C) float32 head input."""
        x = np.asarray(x)
        n_px = int(np.prod(self.shape))
        if x.dtype.kind == "f" and x.ndim >= 1 and x.size == x.shape[0] * n_px:
            out = x.reshape((x.shape[0],) + self.shape).astype(np.float32, copy=False)
            self._check_range(out)
            return out
        if x.dtype == np.uint8 and x.ndim >= 1 and x.size == x.shape[0] * n_px:
            return self.spec.pixels_to_input(x.reshape((x.shape[0],) + self.shape))
        return np.stack([self.array(a) for a in x]) if len(x) else np.zeros((0,) + self.shape, np.float32)

    def _check_range(self, x: np.ndarray) -> None:
        lo, hi = self.value_range
        if x.size == 0:
            return
        xmin, xmax = float(np.min(x)), float(np.max(x))
        if not (np.isfinite(xmin) and np.isfinite(xmax)):
            raise UsageError("a float image holds NaN or infinity")
        slack = _RANGE_SLACK * max(1.0, hi - lo)
        if xmin < lo - slack or xmax > hi + slack:
            hint = " (it looks like 0..255 pixels: pass them as uint8)" if xmax > 2 * hi + 1 else ""
            raise UsageError(f"float image values span {xmin:g}..{xmax:g}, outside the head's input range "
                             f"{lo:g}..{hi:g}{hint}", fix="pass uint8 pixels, or floats already scaled as the "
                                                          "manifest's input.preprocess says")

    # ------------------------------------------------------------- any input
    def __call__(self, item: Any) -> np.ndarray:
        """A path, PIL image, numpy array or :class:`device.sources.Sample` → head input (H, W, C) float32."""
        data = getattr(item, "data", item)
        if isinstance(data, (str, os.PathLike)):
            return self.pixels(self.image_pixels(self.open_image(data)))
        if isinstance(data, Image.Image):
            return self.pixels(self.image_pixels(data))
        if isinstance(data, np.ndarray):
            return self.array(data)
        raise UsageError(f"cannot preprocess a {type(data).__name__}",
                         fix="give an image path, a PIL image or a numpy array")

    def batch(self, items: Iterable[Any]) -> np.ndarray:
        """Several inputs → (N, H, W, C) float32."""
        out = [self(i) for i in items]
        return np.stack(out) if out else np.zeros((0,) + self.shape, np.float32)


def preprocess_file(spec, path: str | os.PathLike) -> np.ndarray:
    """One image file → the head's input (H, W, C) float32, for ``spec`` = a manifest's ``input``."""
    return Preprocessor(spec)(path)
