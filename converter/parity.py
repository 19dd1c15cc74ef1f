"""Parity: does the bundle's real TFLite head + tail agree with the Keras model?

The head and tail are run with ``runtime.split`` exactly as a device and a
cloud worker run them: preprocessed float32 images in, the head's tensor as
sent (int8 for ``int8`` bundles), dequantized with the manifest's
parameters through ``protocol``, into the tail.  Top-1 labels are compared
with the Keras model's on held-out test images.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import numpy as np

from protocol.manifest import Bundle, Parity
from runtime.split import Head, Tail

log = logging.getLogger(__name__)


class SplitRunner:
    """Run a bundle's head and tail as a device and a cloud would (``runtime.split``, batched for speed)."""

    def __init__(self, bundle: Bundle, num_threads: int | None = None):
        from converter.quantize import quiet_native_output

        self.bundle = bundle
        with quiet_native_output():  # LiteRT announces its XNNPACK delegate on stderr
            self._head = Head(bundle, num_threads=num_threads)
            self._tail = Tail(bundle, num_threads=num_threads)

    @property
    def interpreter(self) -> str:
        """The interpreter parity ran on, e.g. ``ai-edge-litert 1.2.0``."""
        return self._head.backend.describe()

    def head(self, x: np.ndarray, rng: np.random.Generator | None = None) -> np.ndarray:
        """Float32 images (N, H, W, C) -> features as sent (a declared defence drawn from ``rng``)."""
        return self._head.features(x, rng=rng)

    def tail(self, features: np.ndarray) -> np.ndarray:
        """Features as sent -> outputs (dequantized with the manifest's scale/zero point when the tail wants it)."""
        return self._tail.run(features)

    def predict(self, x: np.ndarray, batch: int = 250, progress=None, rng=None) -> np.ndarray:
        outs = []
        for start in range(0, len(x), batch):
            outs.append(self.tail(self.head(x[start:start + batch], rng)))
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
               num_threads: int | None = None, rng_seed: int | None = None) -> ParityResult:
    """Compare top-1 of the bundle's LiteRT head+tail with ``model`` on ``x`` (labels ``y`` optional).

    ``rng_seed``: a bundle whose device applies a defence draws it from this seed, batch by batch,
    so that ``keras_pred`` made under the same draws (``converter.defended.keras_predict``) compares
    the conversion and not two samples of the noise.
    """
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

        rng = np.random.default_rng(rng_seed) if rng_seed is not None else None
        split_pred = np.argmax(runner.predict(x, batch=batch, progress=tick, rng=rng), axis=-1)
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
                          min_agreement=min_agreement, source=source, interpreter=runner.interpreter,
                          seconds=time.perf_counter() - t0)
    log.debug("parity: %s in %.2f s", result.summary(), result.seconds)
    return result
