"""The defence a bundle declares at its cut, and the one way to apply it to a head's output.

A hardened bundle's ``head.tflite`` computes the clean features; what must happen
before they leave the device (noise, a dropout mask) is declared here, in the
manifest's ``defence`` block, and applied by :meth:`DefenceSpec.apply` with a fresh
random generator for every input.  The cloud only ever receives the defended tensor.

* ``op = "noise"``: add noise of standard deviation ``scale`` (one value, one per channel:
  the last axis, or one per element of the tensor, in C order), Gaussian or Laplace;
* ``op = "dropout"``: zero each element with probability ``rate`` and scale the rest by
  ``1 / (1 - rate)`` (inverted dropout, kept on at inference);
* ``op = "none"``: the defence lives in the head's weights (NoPeek, adversarial training);
  nothing is applied.

With an op, the head's own output quantization (``head_scale``, ``head_zero_point``) is
recorded here: the device dequantizes the head's output with it, applies the op, and
quantizes the result with the manifest's ``feature`` parameters (calibrated on defended
features).  No TensorFlow: devices use this module as is.
"""
from __future__ import annotations

import math
from typing import Annotated, Literal, Optional

import msgspec
import numpy as np

from protocol import tensors

METHODS = ("noise", "dropout", "nopeek", "vib", "adversarial")
OPS = ("none", "noise", "dropout")
DISTRIBUTIONS = ("gaussian", "laplace")
#: How many noise scales a manifest may carry (one per element of a 7x7x64 tensor is 3,136).
MAX_SCALES = 1 << 16


class DefenceSpec(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """What the device does to the head's output before sending it (see the module docstring)."""

    method: Literal["noise", "dropout", "nopeek", "vib", "adversarial"]
    strength: float
    op: Literal["none", "noise", "dropout"]
    distribution: Optional[Literal["gaussian", "laplace"]] = None
    scale: Optional[list[float]] = None
    rate: Optional[Annotated[float, msgspec.Meta(ge=0.0, lt=1.0)]] = None
    learned: bool = False
    head_scale: Optional[float] = None
    head_zero_point: Optional[int] = None

    def __post_init__(self):
        if not math.isfinite(self.strength) or self.strength < 0:
            raise ValueError(f"strength must be a finite number >= 0, got {self.strength!r}")
        if self.op == "noise":
            if self.distribution is None or not self.scale:
                raise ValueError("a noise defence needs `distribution` and `scale`")
            if len(self.scale) > MAX_SCALES:
                raise ValueError(f"`scale` has {len(self.scale)} values, more than {MAX_SCALES}")
            if any(not (math.isfinite(s) and s >= 0) for s in self.scale):
                raise ValueError("every `scale` must be a finite number >= 0")
        elif self.distribution is not None or self.scale is not None:
            raise ValueError(f"`distribution` and `scale` belong to op noise, not {self.op!r}")
        if self.op == "dropout":
            if self.rate is None:
                raise ValueError("a dropout defence needs `rate`")
        elif self.rate is not None:
            raise ValueError(f"`rate` belongs to op dropout, not {self.op!r}")
        if (self.head_scale is None) != (self.head_zero_point is None):
            raise ValueError("give both head_scale and head_zero_point, or neither")
        if self.head_scale is not None and not (math.isfinite(self.head_scale) and self.head_scale > 0):
            raise ValueError(f"head_scale must be a finite number > 0, got {self.head_scale!r}")

    @property
    def on_device(self) -> bool:
        """Whether the device applies something to every input (noise or a mask)."""
        return self.op != "none"

    def describe(self) -> str:
        """One line for people, e.g. ``vib 0.01: Gaussian noise (learned), mean std 0.83``."""
        if self.op == "none":
            what = "nothing on the device (the head's weights are the defence)"
        elif self.op == "dropout":
            what = f"dropout rate {self.rate:g} on the device"
        else:
            what = (f"{self.distribution} noise{' (learned)' if self.learned else ''} on the device, "
                    f"mean std {float(np.mean(self.scale)):.4g}")
        return f"{self.method} {self.strength:g}: {what}"

    def to_dict(self) -> dict:
        return msgspec.to_builtins(self)

    def harden_command(self, model: str, cut: str, out=None) -> str:
        """The command that makes a bundle with this defence (for messages that say how to rebuild it)."""
        cmd = f"edgesplit harden {model} --cut {cut} --method {self.method} --strength {self.strength:g}"
        if self.method == "noise" and (self.distribution != "gaussian" or self.learned):
            cmd += f" --noise {self.distribution}" + (" --learned" if self.learned else "")
        return cmd + (f" --out {out}" if out is not None else "")

    def apply(self, values: np.ndarray, rng: np.random.Generator | None = None) -> np.ndarray:
        """Float features (N, ..., C) -> the defended features, fresh randomness per element.

        ``rng`` defaults to a new generator seeded from the operating system's entropy; pass a
        seeded one only to reproduce a run (parity compares two models under the same draws).
        """
        x = np.asarray(values, np.float32)
        if self.op == "none":
            return x
        rng = rng if rng is not None else np.random.default_rng()
        if self.op == "dropout":
            keep = rng.random(x.shape, dtype=np.float32) >= np.float32(self.rate)
            return np.where(keep, x / np.float32(1.0 - self.rate), np.float32(0.0)).astype(np.float32)
        scale = np.asarray(self.scale, np.float32)
        if scale.size == int(np.prod(x.shape[1:])) and scale.size != x.shape[-1]:
            scale = scale.reshape(x.shape[1:])          # one per element
        elif scale.size not in (1, x.shape[-1]):
            raise ValueError(f"the defence has {scale.size} noise scales for features of shape {list(x.shape[1:])} "
                             f"(give 1, one per channel or one per element)")
        if self.distribution == "gaussian":
            noise = rng.standard_normal(x.shape, dtype=np.float32)
        else:  # Laplace of unit standard deviation: b = 1 / sqrt(2)
            noise = rng.laplace(0.0, 1.0 / math.sqrt(2.0), x.shape).astype(np.float32)
        return (x + noise * scale).astype(np.float32)

    def send(self, head_output: np.ndarray, feature, rng: np.random.Generator | None = None) -> np.ndarray:
        """The head's raw output -> the tensor to send, as ``feature`` (a manifest FeatureSpec) says.

        Without an op the head's output is sent as it is.  With one it is dequantized with the
        head's own parameters, defended, and quantized with the feature's.
        """
        if not self.on_device:
            return head_output
        out = np.asarray(head_output)
        if self.head_scale is not None and out.dtype.kind in "iu":
            out = tensors.dequantize(out, self.head_scale, self.head_zero_point)
        defended = self.apply(out, rng)
        return feature.quantize(defended)


def parse_defence(raw: dict) -> DefenceSpec:
    """A DefenceSpec from plain JSON types (ValueError saying what is wrong)."""
    try:
        return msgspec.convert(raw, DefenceSpec)
    except msgspec.ValidationError as exc:
        raise ValueError(str(exc)) from None
