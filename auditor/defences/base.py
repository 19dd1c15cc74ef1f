"""What every defence shares: its strength, the layer it puts at the cut, its training loss.

A defence is a small class registered by name (``auditor.defences.METHODS``).  It says

* what its strength means and which values are allowed (:class:`Strength`), and which four
  strengths a sweep tries;
* which layer goes right after the cut (:meth:`Defence.layer`, a ``converter.defended.CutDefence``:
  the op the device applies, or the identity);
* which weights fine-tuning may change (``trains``: head, tail, the defence layer's own);
* the extra training loss (:meth:`Defence.penalty`) and, for adversarial training, an extra
  step per batch (:meth:`Defence.before_step`).

The fine-tuning loop that drives them is ``auditor.defences.finetune``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

from protocol.errors import UsageError


@dataclass(frozen=True)
class Strength:
    """The allowed values of one method's strength, and what it means."""

    low: float
    high: float
    meaning: str                 # "the noise's standard deviation in units of the features' RMS"
    low_open: bool = True        # low itself is not allowed
    high_open: bool = False
    example: float = 1.0

    def check(self, method: str, value) -> float:
        try:
            v = float(value)
        except (TypeError, ValueError):
            v = math.nan
        ok = math.isfinite(v) and (v > self.low if self.low_open else v >= self.low) and \
            (v < self.high if self.high_open else v <= self.high)
        if not ok:
            lo, hi = "(" if self.low_open else "[", ")" if self.high_open else "]"
            raise UsageError(f"--strength {value} is out of range for {method}: its strength is {self.meaning}, "
                             f"in {lo}{self.low:g}, {self.high:g}{hi}",
                             fix=f"give e.g. --strength {self.example:g}, or --sweep to try "
                                 f"{', '.join(f'{s:g}' for s in _SWEEPS.get(method, ()))}")
        return v


_SWEEPS: dict[str, tuple] = {}


@dataclass
class Reference:
    """What a defence may calibrate itself on: the clean features of the unhardened head."""

    rms: float                   # root mean square of the clean features (training images)
    channels: int
    feature_shape: tuple
    input_shape: tuple
    label_mse: float             # squared error of the label-only guess (each image's class mean image)


@dataclass
class Batch:
    """One fine-tuning step's tensors (TensorFlow tensors inside the step)."""

    x: object          # images
    y: object          # labels
    clean: object      # the cut layer's output
    sent: object       # after the defence layer (what the device sends)
    output: object     # the model's output
    layer: object      # the CutDefence layer
    progress: object = 1.0   # share of the fine-tuning steps done (a scalar tensor in the step)


class Defence:
    """One method.  Subclasses set the class attributes and override what they need."""

    name: ClassVar[str]
    title: ClassVar[str]
    reference: ClassVar[str]
    strength: ClassVar[Strength]
    sweep: ClassVar[tuple]            # four strengths, weakest first
    default: ClassVar[float]
    #: which weights fine-tuning trains: any of "head", "tail", "defence"
    trains: ClassVar[tuple] = ("head", "tail")
    #: the defence layer's own weights (a learned noise scale) learn this many times faster than the model's
    defence_lr_factor: ClassVar[float] = 10.0

    def __init__(self, value: float, *, reference: Reference, **options):
        self.value = self.strength.check(self.name, value)
        self.ref = reference
        self.options = options

    def __init_subclass__(cls, **kw):
        super().__init_subclass__(**kw)
        if getattr(cls, "sweep", None):
            _SWEEPS[cls.name] = tuple(cls.sweep)

    def layer(self, cut: str):
        """The CutDefence layer placed after ``cut`` (identity unless overridden)."""
        from converter.defended import CutDefence, layer_name

        return CutDefence(self.name, self.value, op="none", cut=cut, name=layer_name(cut))

    def prepare(self, clean_features) -> None:
        """Called once before fine-tuning with clean features of training images (adapt normalisers)."""

    def penalty(self, batch: Batch):
        """Extra loss added to the cross-entropy (a scalar tensor), or None."""
        return None

    def extra_variables(self) -> list:
        """Trainable variables the method owns besides the model's (e.g. an adversary's, trained apart)."""
        return []

    def before_step(self, batch_x, sent) -> None:
        """Called with each batch before the model's step (adversarial training trains its decoder here)."""

    def describe(self) -> str:
        return f"{self.name} {self.value:g} ({self.strength.meaning})"
