"""What every attack shares: the head as deployed, the attacker's own data, and the attack's shape.

An attack is a small class with a ``name``, a ``threat_model`` (what the attacker has) and one
method, :meth:`Attack.reconstruct`, which takes

* a :class:`DeployedHead` — the head exactly as the device runs it: ``send(x)`` maps images in
  the model's input space to the tensors really sent (int8 through the wire, dequantized; for a
  hardened head with its noise or dropout drawn afresh on every call), and, for the attackers
  who know it, the differentiable Keras head with the defence ops active, the Keras tail the
  cloud runs, and the head's architecture;
* the tensors the attacker observed on the wire (``sent``, one row per victim image);
* :class:`AuxData` — the attacker's own images and labels, disjoint from the victims;

and returns a :class:`Reconstruction`: images in the model's input space, one per row of ``sent``.

Every attack is adaptive by construction: it sees the head only through this object, so a
defence that is part of the deployed head is part of what the attack queries, differentiates
and trains on.  Scoring (PSNR, SSIM in pixel space, beside a label-only baseline) is the
registry's job (:func:`auditor.attacks.run_attacks`), the same for every attack.
"""
from __future__ import annotations

import abc
import dataclasses
import logging
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar

import numpy as np

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ThreatModel:
    """What an attacker has, in flags and in words (the report prints ``knows``)."""

    name: str                  # "white-box", "query access", "architecture only", "query-free", "label only"
    knows: str                 # one sentence: what the attacker has and what it does with it
    weights: bool = False      # the head's trained weights
    architecture: bool = False  # the head's layers (not their weights)
    queries: bool = False      # may send its own images through the deployed head
    tail: bool = False         # runs the tail (the cloud's side of the model)
    aux_data: bool = False     # has its own images (and labels) from the same distribution
    label: bool = True         # sees the predicted class (the cloud learns it legitimately)
    reference: str = ""        # where the attack comes from

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass
class DeployedHead:
    """The head as deployed at one cut, as far as any attacker could know it.

    ``send`` is the ground truth every attack is judged on: images (N, *input_shape) in the
    model's input space -> float32 (N, *feature_shape), the tensor the cloud receives (for an
    int8 bundle the LiteRT head's output through a real wire frame, dequantized).  A defence
    that runs on the device (noise, dropout mask) is inside ``send`` and fresh for every call.

    ``keras_head`` (white-box only) is the float Keras head with the same defence ops active
    when called with ``training=False`` — attacks never pass ``training=True``; ``clean_head``
    is the same head without them (an attacker who knows the defence's form may model it
    itself, e.g. match only the entries a dropout mask kept).
    ``keras_tail`` is the cloud's part, features -> the model's output (for the query-free
    attacker, who runs it).  ``architecture`` builds an untrained copy of the head's layers
    (with the defence ops), fresh weights on every call (for the architecture-only and
    query-free attackers); None when unknown.  ``tail`` is the tail as the cloud runs it
    (numpy in, class probabilities or logits out), used for the predicted label.
    """

    cut: str
    input_shape: tuple
    feature_shape: tuple
    send: Callable[[np.ndarray], np.ndarray]
    keras_head: Any = None
    clean_head: Any = None               # the Keras head without the defence ops (None when unhardened)
    keras_tail: Any = None
    architecture: Callable[[], Any] | None = None
    tail: Callable[[np.ndarray], np.ndarray] | None = None
    defence: dict | None = None          # the manifest's declaration (method, strength, ...); None = unhardened
    pixel_mean: Any = 0.0                 # input = (pixels - mean) / std, pixels 0..255 (manifest preprocess)
    pixel_std: Any = 255.0
    name: str = "unhardened"              # how the report names this head ("unhardened", "noise 0.5", ...)
    depth: float = 0.0                    # relative depth of the cut: 0 = first layer, 1 = last

    @property
    def input_range(self) -> tuple[np.ndarray, np.ndarray]:
        """(low, high) per channel of the model's input: pixels 0 and 255 after preprocessing."""
        mean, std = np.asarray(self.pixel_mean, np.float32), np.asarray(self.pixel_std, np.float32)
        a, b = (0.0 - mean) / std, (255.0 - mean) / std
        return np.minimum(a, b), np.maximum(a, b)

    def to_pixels(self, x) -> np.ndarray:
        """Model-input images -> pixels in [0, 1] (how reconstructions are scored and shown)."""
        x = np.asarray(x, np.float32)
        if np.all(np.asarray(self.pixel_mean) == 0.0) and np.all(np.asarray(self.pixel_std) == 255.0):
            return np.clip(x, 0.0, 1.0)  # already pixel / 255 (MNIST): exactly as it is
        mean, std = np.asarray(self.pixel_mean, np.float32), np.asarray(self.pixel_std, np.float32)
        return np.clip((x * std + mean) / 255.0, 0.0, 1.0).astype(np.float32)

    def predicted_labels(self, sent) -> np.ndarray:
        """The class the cloud reads from ``sent`` (what it legitimately learns)."""
        if self.tail is None:
            raise ValueError(f"the head at {self.cut} has no tail to read the label with")
        return np.asarray(self.tail(np.asarray(sent, np.float32))).argmax(axis=-1)

    def describe(self) -> dict:
        return {"cut": self.cut, "name": self.name, "defence": self.defence,
                "input_shape": list(self.input_shape), "feature_shape": list(self.feature_shape),
                "white_box": self.keras_head is not None, "architecture_known": self.architecture is not None,
                "tail_known": self.keras_tail is not None}


@dataclass
class AuxData:
    """The attacker's own images (model input space) and labels: never the victims."""

    x: np.ndarray
    y: np.ndarray

    def __post_init__(self):
        self.x = np.asarray(self.x, np.float32)
        self.y = np.asarray(self.y).reshape(-1).astype(np.int64)
        if len(self.x) != len(self.y):
            raise ValueError(f"{len(self.x)} auxiliary images but {len(self.y)} labels")

    def __len__(self) -> int:
        return len(self.x)

    def take(self, n: int) -> "AuxData":
        return AuxData(self.x[:n], self.y[:n])


@dataclass
class Reconstruction:
    """An attack's answer: one image per attacked row, in the model's input space.

    ``sweep`` holds further answers of the same attack under other settings (e.g. the decoder
    at 100, 1,000, 10,000 auxiliary images), keyed by a short label; ``images`` is the main one.
    """

    images: np.ndarray
    settings: dict = field(default_factory=dict)
    sweep: dict = field(default_factory=dict)
    notes: str = ""


class Attack(abc.ABC):
    """One attacker.  Subclasses set ``name``, ``title``, ``threat_model``, ``Settings``."""

    name: ClassVar[str]
    title: ClassVar[str]
    threat_model: ClassVar[ThreatModel]
    #: a baseline is scored like an attack but is not counted as one (the label-only baselines)
    baseline: ClassVar[bool] = False

    @dataclass(frozen=True)
    class Settings:
        max_n: int = 1000      # at most this many victim rows are attacked

    def __init__(self, **settings):
        try:
            self.settings = self.Settings(**settings)
        except TypeError as exc:
            names = ", ".join(f.name for f in dataclasses.fields(self.Settings))
            raise ValueError(f"attack {self.name!r}: {exc}; its settings are {names}") from None

    @abc.abstractmethod
    def reconstruct(self, head: DeployedHead, sent: np.ndarray, aux: AuxData, *, seed: int = 0,
                    progress: bool = False) -> Reconstruction:
        """Reconstruct the victims' inputs from ``sent`` (N rows); must not look at the victims."""

    def missing(self, head: DeployedHead, aux: AuxData) -> str | None:
        """Why this attack cannot run on ``head`` with ``aux`` (None when it can); the report prints it."""
        return None

    def settings_dict(self) -> dict:
        return dataclasses.asdict(self.settings)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.settings})"
