"""Parity: does the bundle's real TFLite head + tail agree with the Keras model?

The head and tail are run through a LiteRT interpreter exactly as a device and
a cloud worker would: preprocessed float32 images in, the head's tensor as
sent (int8 for ``int8`` bundles), dequantized with the manifest's
parameters through ``protocol``, into the tail.  Top-1 labels are compared
with the Keras model's on held-out test images.
"""
from __future__ import annotations

import importlib.metadata
import logging
import time
from dataclasses import dataclass

import numpy as np

from protocol.manifest import Bundle, Parity

log = logging.getLogger(__name__)


def interpreter_name() -> str:
    try:
        return f"ai-edge-litert {importlib.metadata.version('ai-edge-litert')}"
    except importlib.metadata.PackageNotFoundError:
        return "ai-edge-litert (version unknown)"


class _Batched:
    """One LiteRT interpreter whose batch size is resized to the data (batch 1 if the model refuses)."""

    def __init__(self, path, num_threads: int | None = None):
        from ai_edge_litert.interpreter import Interpreter

        from converter.quantize import quiet_native_output

        with quiet_native_output():  # LiteRT announces its XNNPACK delegate on stderr
            self.it = Interpreter(model_path=str(path), num_threads=num_threads)
            self.it.allocate_tensors()
        self.inp = self.it.get_input_details()[0]
        self.out = self.it.get_output_details()[0]
        self.batch = 1
        self.can_batch = True

    def _resize(self, n: int) -> None:
        if n == self.batch:
            return
        shape = [n, *self.inp["shape"][1:]]
        try:
            self.it.resize_tensor_input(self.inp["index"], shape, strict=False)
            self.it.allocate_tensors()
            self.batch = n
        except (RuntimeError, ValueError) as exc:
            log.debug("cannot batch %s (%s); running one image at a time", self.inp["name"], exc)
            self.can_batch = False
            self.it.resize_tensor_input(self.inp["index"], [1, *self.inp["shape"][1:]], strict=False)
            self.it.allocate_tensors()
            self.batch = 1

    def __call__(self, x: np.ndarray) -> np.ndarray:
        x = np.ascontiguousarray(x, dtype=self.inp["dtype"])
        if self.can_batch:
            self._resize(len(x))
        if self.batch != len(x):
            return np.concatenate([self(x[i:i + 1]) for i in range(len(x))])
        self.it.set_tensor(self.inp["index"], x)
        self.it.invoke()
        return self.it.get_tensor(self.out["index"]).copy()


class SplitRunner:
    """Run a bundle's head and tail like a device and a cloud would (batched for speed)."""

    def __init__(self, bundle: Bundle, num_threads: int | None = None):
        self.bundle = bundle
        self._head = _Batched(bundle.head_path, num_threads)
        self._tail = _Batched(bundle.tail_path, num_threads)

    def head(self, x: np.ndarray) -> np.ndarray:
        """Float32 images (N, H, W, C) -> features as sent."""
        return self.bundle.feature.check(self._head(x))

    def tail(self, features: np.ndarray) -> np.ndarray:
        """Features as sent -> outputs; dequantized with the manifest's scale/zero point first."""
        return self._tail(self.bundle.feature.dequantize(features))

    def predict(self, x: np.ndarray, batch: int = 250, progress=None) -> np.ndarray:
        outs = []
        for start in range(0, len(x), batch):
            outs.append(self.tail(self.head(x[start:start + batch])))
            if progress is not None:
                progress(min(start + batch, len(x)))
        return np.concatenate(outs) if outs else np.zeros((0, *self.bundle.output.shape), np.float32)


@dataclass
class ParityResult:
    n: int
    agreement: float
    accuracy: float | None
    keras_accuracy: float | None
    min_agreement: float | None
    source: str
    interpreter: str
    seconds: float

    @property
    def passed(self) -> bool:
        return self.min_agreement is None or self.agreement >= self.min_agreement

    def to_manifest(self) -> Parity:
        return Parity(n=self.n, source=self.source, agreement=self.agreement, accuracy=self.accuracy,
                      keras_accuracy=self.keras_accuracy, min_agreement=self.min_agreement,
                      passed=self.passed, interpreter=self.interpreter)

    def summary(self) -> str:
        s = f"{self.n} images ({self.source}): agreement {100 * self.agreement:.2f} %"
        if self.accuracy is not None:
            s += f", split accuracy {100 * self.accuracy:.2f} % (Keras {100 * self.keras_accuracy:.2f} %)"
        if self.min_agreement is not None:
            s += f", required {100 * self.min_agreement:.2f} %"
        return s


def run_parity(bundle: Bundle, model, x: np.ndarray, y: np.ndarray | None = None, *,
               min_agreement: float | None = None, source: str = "held-out images",
               keras_pred: np.ndarray | None = None, batch: int = 250, progress: bool = True,
               num_threads: int | None = None) -> ParityResult:
    """Compare top-1 of the bundle's LiteRT head+tail with ``model`` on ``x`` (labels ``y`` optional)."""
    t0 = time.perf_counter()
    x = np.asarray(x, dtype=np.float32)
    if keras_pred is None:
        keras_pred = np.argmax(model.predict(x, batch_size=256, verbose=0), axis=-1)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(x), desc="parity", unit="img", leave=False, disable=None)
    try:
        runner = SplitRunner(bundle, num_threads=num_threads)
        done = [0]

        def tick(k):
            if bar is not None:
                bar.update(k - done[0])
            done[0] = k

        split_pred = np.argmax(runner.predict(x, batch=batch, progress=tick), axis=-1)
    finally:
        if bar is not None:
            bar.close()
    agreement = float(np.mean(split_pred == keras_pred)) if len(x) else 0.0
    accuracy = keras_accuracy = None
    if y is not None:
        y = np.asarray(y).reshape(-1)
        accuracy = float(np.mean(split_pred == y))
        keras_accuracy = float(np.mean(keras_pred == y))
    result = ParityResult(n=len(x), agreement=agreement, accuracy=accuracy, keras_accuracy=keras_accuracy,
                          min_agreement=min_agreement, source=source, interpreter=interpreter_name(),
                          seconds=time.perf_counter() - t0)
    log.debug("parity: %s in %.2f s", result.summary(), result.seconds)
    return result
