"""The TFLite/LiteRT interpreter shim every role runs models with.

Role-neutral on purpose: the device, the cloud, the converter and the auditor
run their models with it.  It never imports TensorFlow unless neither LiteRT
interpreter is installed (a Raspberry Pi has no TensorFlow; a workstation might
have nothing else).  Order of preference:

1. ``ai_edge_litert.interpreter`` — the maintained LiteRT wheel (pip ``ai-edge-litert``);
2. ``tflite_runtime.interpreter`` — the older standalone wheel, still the only
   one on some 32-bit Raspberry Pi OS images;
3. ``tensorflow.lite`` — last resort, never on a Pi.

``EDGESPLIT_INTERPRETER=ai_edge_litert|tflite_runtime|tensorflow`` forces one.

:func:`pick_backend` says which one was picked (logged once, and
``Backend.name``); :class:`Model` wraps one ``.tflite`` file: tensor details,
quantization, and ``run(x)`` on a batch of any size.  Float input to an integer
model is quantized with ``protocol.tensors``, the project's one quantizer.
:mod:`runtime.split` builds a bundle's head and tail on it.
"""
from __future__ import annotations

import dataclasses
import importlib
import logging
import os
import threading
from pathlib import Path
from typing import Any

import numpy as np

from protocol import tensors
from protocol.errors import ConfigError, UsageError
from runtime.quiet import quiet_native_stderr

log = logging.getLogger(__name__)

#: Interpreter modules in order of preference: (short name, module, pip package).
BACKENDS: tuple[tuple[str, str, str], ...] = (
    ("ai_edge_litert", "ai_edge_litert.interpreter", "ai-edge-litert"),
    ("tflite_runtime", "tflite_runtime.interpreter", "tflite-runtime"),
    ("tensorflow", "tensorflow.lite", "tensorflow"),
)

_INSTALL_FIX = ("pip install ai-edge-litert (64-bit OS: x86_64, aarch64); on 32-bit Raspberry Pi OS "
                "pip install tflite-runtime; then run `edgesplit doctor`")


@dataclasses.dataclass(frozen=True)
class Backend:
    """The interpreter implementation in use."""

    name: str            # "ai_edge_litert" | "tflite_runtime" | "tensorflow"
    module: str          # the module the Interpreter class came from
    version: str         # the distribution's version, "unknown" when it does not say
    interpreter_class: Any = dataclasses.field(repr=False, compare=False)
    package: str = ""    # the pip distribution, e.g. "ai-edge-litert"

    def to_dict(self) -> dict:
        return {"name": self.name, "module": self.module, "version": self.version}

    def describe(self) -> str:
        """``"ai-edge-litert 1.2.0"``: the distribution and its version."""
        return f"{self.package or self.name} {self.version}"


_picked: dict[str | None, Backend] = {}
_pick_lock = threading.Lock()


def _dist_version(package: str) -> str:
    from importlib import metadata

    for name in (package, package.replace("-", "_"), "tensorflow-cpu" if package == "tensorflow" else ""):
        if not name:
            continue
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return "unknown"


def _load(name: str, module: str, package: str) -> Backend:
    if name == "tensorflow":
        # Only reached when no LiteRT wheel exists; keep TF's start-up noise down.
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
        tf = importlib.import_module("tensorflow")
        cls = tf.lite.Interpreter
    else:
        cls = importlib.import_module(module).Interpreter
    return Backend(name=name, module=module, version=_dist_version(package), interpreter_class=cls,
                   package=package)


def pick_backend(prefer: str | None = None) -> Backend:
    """Return the first interpreter that imports (cached; logged once).

    ``prefer`` (or ``$EDGESPLIT_INTERPRETER``) names one backend to use and no
    other.  Raises :class:`ConfigError` when none is installed.
    """
    prefer = prefer or os.environ.get("EDGESPLIT_INTERPRETER") or None
    with _pick_lock:
        if prefer in _picked:
            return _picked[prefer]
        if prefer is not None:
            known = {b[0]: b for b in BACKENDS}
            if prefer not in known:
                raise UsageError(f"unknown interpreter {prefer!r}",
                                 fix=f"use one of {', '.join(known)} (or unset EDGESPLIT_INTERPRETER)")
            candidates = [known[prefer]]
        else:
            candidates = list(BACKENDS)
        errors = []
        for name, module, package in candidates:
            try:
                backend = _load(name, module, package)
            except ImportError as exc:  # the package is missing or broken: try the next one
                errors.append(f"{module}: {exc}")
                continue
            log.info("interpreter: %s %s (%s)", backend.name, backend.version, backend.module)
            _picked[prefer] = backend
            return backend
        raise ConfigError("no TFLite interpreter could be imported (" + "; ".join(errors) + ")", fix=_INSTALL_FIX)


@dataclasses.dataclass(frozen=True)
class TensorInfo:
    """One input or output tensor of a model (batch dimension included)."""

    name: str
    index: int
    shape: tuple[int, ...]
    dtype: np.dtype
    scale: float          # 0.0 when not quantized
    zero_point: int

    @property
    def quantized(self) -> bool:
        return self.scale != 0.0 and np.issubdtype(self.dtype, np.integer)

    @classmethod
    def from_details(cls, d: dict) -> "TensorInfo":
        scale, zero_point = d.get("quantization", (0.0, 0))
        return cls(name=d["name"], index=int(d["index"]), shape=tuple(int(s) for s in d["shape"]),
                   dtype=np.dtype(d["dtype"]), scale=float(scale), zero_point=int(zero_point))

    def to_dict(self) -> dict:
        return {"name": self.name, "shape": list(self.shape), "dtype": self.dtype.name,
                "scale": self.scale, "zero_point": self.zero_point}


class Model:
    """One ``.tflite`` model with a single input and a single output.

    ``run(x)`` takes a batch (leading batch dimension) of any size: the input
    tensor is resized and re-allocated when the batch size changes; models whose
    graph pins the batch to 1 are run one sample at a time instead.  Float input
    to an integer-quantized model is quantized with the model's own parameters.
    Thread-safe (one lock; a TFLite interpreter is not).
    """

    def __init__(self, path: str | os.PathLike | None = None, *, content: bytes | None = None,
                 num_threads: int | None = None, backend: str | Backend | None = None):
        if (path is None) == (content is None):
            raise UsageError("Model needs exactly one of a path or the model bytes")
        self.backend = backend if isinstance(backend, Backend) else pick_backend(backend)
        self.path = Path(path) if path is not None else None
        if self.path is not None and not self.path.is_file():
            raise UsageError(f"model file {self.path} does not exist", fix="check the bundle path")
        kwargs: dict[str, Any] = {"num_threads": num_threads} if num_threads else {}
        try:
            with quiet_native_stderr():  # LiteRT announces its XNNPACK delegate on the first allocation
                if self.path is not None:
                    self.interpreter = self.backend.interpreter_class(model_path=str(self.path), **kwargs)
                else:
                    self.interpreter = self.backend.interpreter_class(model_content=content, **kwargs)
                self.interpreter.allocate_tensors()
        except (ValueError, RuntimeError) as exc:
            raise UsageError(f"cannot load TFLite model {self.path or '<bytes>'}: {exc}",
                             fix="re-create the bundle with `edgesplit convert`") from exc
        self.num_threads = num_threads
        self._lock = threading.Lock()
        ins, outs = self.interpreter.get_input_details(), self.interpreter.get_output_details()
        if len(ins) != 1 or len(outs) != 1:
            raise UsageError(f"model {self.path} has {len(ins)} inputs and {len(outs)} outputs; "
                             "edgesplit heads and tails have one of each")
        self.input = TensorInfo.from_details(ins[0])
        self.output = TensorInfo.from_details(outs[0])
        self._batch = self.input.shape[0] if self.input.shape else 1
        self._resizable = True
        log.debug("loaded %s with %s: in %s out %s", self.path, self.backend.name, self.input, self.output)

    # ------------------------------------------------------------- details
    @property
    def input_details(self) -> dict:
        return self.interpreter.get_input_details()[0]

    @property
    def output_details(self) -> dict:
        return self.interpreter.get_output_details()[0]

    @property
    def sample_shape(self) -> tuple[int, ...]:
        """The input shape without the batch dimension."""
        return self.input.shape[1:]

    def __repr__(self) -> str:
        return (f"Model({self.path or '<bytes>'}, backend={self.backend.name}, "
                f"in={self.input.shape}/{self.input.dtype}, out={self.output.shape}/{self.output.dtype})")

    # ------------------------------------------------------------- running
    def _prepare(self, x: np.ndarray) -> np.ndarray:
        x = np.asarray(x)
        want = self.input
        if x.shape[1:] != want.shape[1:]:
            if x.shape == want.shape[1:]:
                raise UsageError(f"input has shape {x.shape}; run() wants a batch {('N',) + want.shape[1:]}",
                                 fix="add a batch axis, e.g. x[None]")
            raise UsageError(f"input shape {x.shape} does not fit the model input {('N',) + want.shape[1:]}")
        if x.dtype == want.dtype:
            return np.ascontiguousarray(x)
        if np.issubdtype(x.dtype, np.floating):
            if want.quantized:
                return tensors.quantize(x, want.scale, want.zero_point, want.dtype.name)
            return np.ascontiguousarray(x, dtype=want.dtype)
        raise UsageError(f"input dtype {x.dtype} does not match the model input dtype {want.dtype}",
                         fix="pass float32 values (quantized automatically) or the model's own dtype")

    def _set_batch(self, n: int) -> bool:
        if n == self._batch:
            return True
        if not self._resizable:
            return False
        try:
            self.interpreter.resize_tensor_input(self.input.index, [n, *self.input.shape[1:]], strict=False)
            self.interpreter.allocate_tensors()
        except (ValueError, RuntimeError) as exc:
            log.info("model %s cannot be resized to batch %d (%s); running one sample at a time", self.path, n, exc)
            self._resizable = False
            self._reset_batch()
            return False
        self._batch = n
        return True

    def _reset_batch(self) -> None:
        self.interpreter.resize_tensor_input(self.input.index, [1, *self.input.shape[1:]], strict=False)
        self.interpreter.allocate_tensors()
        self._batch = 1

    def _invoke(self, x: np.ndarray) -> np.ndarray:
        self.interpreter.set_tensor(self.input.index, x)
        self.interpreter.invoke()
        return self.interpreter.get_tensor(self.output.index).copy()

    def run(self, x: np.ndarray) -> np.ndarray:
        """Run a batch ``x`` (N, *sample_shape); return the output (N, ...) in the model's output dtype."""
        x = self._prepare(x)
        n = x.shape[0]
        if n == 0:
            return np.zeros((0, *self.output.shape[1:]), dtype=self.output.dtype)
        with self._lock:
            if self._set_batch(n):
                y = self._invoke(x)
                if y.shape[0] == n:
                    return y
                # A graph with a hard-coded batch of 1 (e.g. a Reshape to [1, k]) resizes
                # without error but answers with the wrong batch: never batch it again.
                log.info("model %s ignores the batch size; running one sample at a time", self.path)
                self._resizable = False
                self._reset_batch()
            elif self._batch != 1:
                self._reset_batch()
            return np.concatenate([self._invoke(x[i:i + 1]) for i in range(n)], axis=0)

    def run_float(self, x: np.ndarray) -> np.ndarray:
        """Like :meth:`run`, but the output is dequantized to float32 when the model's output is quantized."""
        y = self.run(x)
        if self.output.quantized:
            return tensors.dequantize(y, self.output.scale, self.output.zero_point)
        return y.astype(np.float32, copy=False)
