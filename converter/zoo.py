"""The model zoo: reference models, trained once and cached.

``paper-cnn`` is the MNIST CNN of Tuor et al. (SPIE 2018).  ``tiny-cnn`` and
``residual-cnn`` are small models trained on :func:`converter.datasets.synthetic_images`
in seconds, for tests and quick demos (``residual-cnn`` has a residual block
and a two-branch block, so its cuts are not simply "every layer").

Trained models live in the cache (``$EDGESPLIT_CACHE`` or ``~/.cache/edgesplit``)
as ``models/<name>.keras`` plus ``models/<name>.json`` (test accuracy, training
time, recipe, tool versions).  A second ``train``/``load_model`` loads from there.
Training holds an ``fcntl`` lock so two processes never train the same model at
once; the second one waits and then loads what the first one wrote.
"""
from __future__ import annotations

import dataclasses
import difflib
import json
import logging
import math
import os
import platform
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402  (after the TF log level is set)
import numpy as np  # noqa: E402

from converter import datasets  # noqa: E402
from protocol.errors import UsageError  # noqa: E402

log = logging.getLogger(__name__)

L = keras.layers


# ------------------------------------------------------------------ builders

def build_paper_cnn() -> keras.Model:
    """Tuor et al.'s MNIST CNN (TensorFlow's layers tutorial without dropout)."""
    inp = keras.Input(shape=datasets.IMAGE_SHAPE, name="image")
    x = L.Conv2D(32, 5, padding="same", activation="relu", name="conv1")(inp)
    x = L.MaxPooling2D(2, strides=2, name="pool1")(x)
    x = L.Conv2D(64, 5, padding="same", activation="relu", name="conv2")(x)
    x = L.MaxPooling2D(2, strides=2, name="pool2")(x)
    x = L.Flatten(name="flatten")(x)
    x = L.Dense(1024, activation="relu", name="dense1")(x)
    out = L.Dense(10, activation="softmax", name="dense2")(x)
    return keras.Model(inp, out, name="paper_cnn")


def build_tiny_cnn() -> keras.Model:
    """A few thousand parameters; learns the synthetic shapes in seconds."""
    inp = keras.Input(shape=datasets.IMAGE_SHAPE, name="image")
    x = L.Conv2D(8, 3, padding="same", activation="relu", name="conv1")(inp)
    x = L.MaxPooling2D(2, name="pool1")(x)
    x = L.Conv2D(16, 3, padding="same", activation="relu", name="conv2")(x)
    x = L.MaxPooling2D(2, name="pool2")(x)
    x = L.Flatten(name="flatten")(x)
    x = L.Dense(32, activation="relu", name="dense1")(x)
    out = L.Dense(10, activation="softmax", name="dense2")(x)
    return keras.Model(inp, out, name="tiny_cnn")


def build_residual_cnn() -> keras.Model:
    """A small functional model with a residual block and a two-branch block.

    Valid cuts: stem, res_add, res_relu, pool1, merge, pool2, dense1, dense2.
    Not cuts: res_a/res_b (the skip connection also crosses) and
    branch_a/branch_b (the other branch also crosses).
    """
    inp = keras.Input(shape=datasets.IMAGE_SHAPE, name="image")
    x = L.Conv2D(8, 3, padding="same", activation="relu", name="stem")(inp)
    y = L.Conv2D(8, 3, padding="same", activation="relu", name="res_a")(x)
    y = L.Conv2D(8, 3, padding="same", name="res_b")(y)
    x = L.Add(name="res_add")([x, y])
    x = L.Activation("relu", name="res_relu")(x)
    x = L.MaxPooling2D(2, name="pool1")(x)
    a = L.Conv2D(8, 1, activation="relu", name="branch_a")(x)
    b = L.Conv2D(8, 3, padding="same", activation="relu", name="branch_b")(x)
    x = L.Concatenate(name="merge")([a, b])
    x = L.MaxPooling2D(2, name="pool2")(x)
    x = L.Flatten(name="flatten")(x)
    x = L.Dense(32, activation="relu", name="dense1")(x)
    out = L.Dense(10, activation="softmax", name="dense2")(x)
    return keras.Model(inp, out, name="residual_cnn")


def build_branching_cnn() -> keras.Model:
    """Branches straight from the input (inception-like) and a depthwise conv.

    Valid cuts: merge, dw, pool, dense; the three branch layers are not cuts.
    """
    inp = keras.Input(shape=datasets.IMAGE_SHAPE, name="image")
    a = L.Conv2D(4, 1, activation="relu", name="branch_1x1")(inp)
    b = L.Conv2D(4, 3, padding="same", activation="relu", name="branch_3x3")(inp)
    c = L.MaxPooling2D(3, strides=1, padding="same", name="branch_pool")(inp)
    x = L.Concatenate(name="merge")([a, b, c])
    x = L.DepthwiseConv2D(3, padding="same", activation="relu", name="dw")(x)
    x = L.GlobalAveragePooling2D(name="pool")(x)
    out = L.Dense(10, activation="softmax", name="dense")(x)
    return keras.Model(inp, out, name="branching_cnn")


# ---------------------------------------------------------------------- zoo

MNIST_INPUT = {
    "shape": list(datasets.IMAGE_SHAPE),
    "dtype": "float32",
    "range": [0.0, 1.0],
    "color": "grayscale",
    "preprocessing": "uint8 pixel k -> k / 255, shape (28, 28, 1), white digit on black",
}
SYNTHETIC_INPUT = dict(MNIST_INPUT, preprocessing="synthetic shapes, float32 in [0, 1], shape (28, 28, 1)")


@dataclass(frozen=True)
class ZooEntry:
    """A reference model: how to build it, what it is trained on, and the training recipe."""

    name: str
    build: Callable[[], keras.Model]
    dataset: str                      # "mnist" or "synthetic"
    labels: tuple[str, ...]
    input_spec: dict
    description: str
    epochs: int
    batch_size: int
    learning_rate: float              # peak of the cosine-decayed Adam learning rate
    min_accuracy: float               # test accuracy the recipe is expected to reach
    seed: int = 1234
    synthetic_n: tuple[int, int] = (3000, 1000)   # train/test sizes for the synthetic set

    def recipe(self, epochs: int | None = None) -> dict:
        recipe = {"epochs": epochs or self.epochs, "batch_size": self.batch_size,
                  "learning_rate": self.learning_rate, "optimizer": "adam+cosine-decay", "seed": self.seed,
                  "dataset": self.dataset, "recipe_version": 1}
        if self.dataset == "synthetic":
            recipe["synthetic_n"] = list(self.synthetic_n)
        return recipe


ZOO: dict[str, ZooEntry] = {e.name: e for e in [
    ZooEntry("paper-cnn", build_paper_cnn, "mnist", tuple(datasets.LABELS), MNIST_INPUT,
             "MNIST CNN of Tuor et al. (SPIE 2018): conv32-pool-conv64-pool-dense1024-dense10",
             epochs=3, batch_size=128, learning_rate=1e-3, min_accuracy=0.99),
    ZooEntry("tiny-cnn", build_tiny_cnn, "synthetic", tuple(datasets.SYNTHETIC_LABELS), SYNTHETIC_INPUT,
             "tiny CNN on synthetic shapes, for tests",
             epochs=2, batch_size=32, learning_rate=3e-3, min_accuracy=0.9, synthetic_n=(2000, 500)),
    ZooEntry("residual-cnn", build_residual_cnn, "synthetic", tuple(datasets.SYNTHETIC_LABELS), SYNTHETIC_INPUT,
             "small CNN with a residual and a two-branch block on synthetic shapes, for tests",
             epochs=2, batch_size=32, learning_rate=3e-3, min_accuracy=0.9, synthetic_n=(2000, 500)),
]}


def get_entry(name: str) -> ZooEntry:
    """The zoo entry called ``name``; UsageError with the known names otherwise."""
    if name in ZOO:
        return ZOO[name]
    close = difflib.get_close_matches(name, list(ZOO), n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    raise UsageError(f"unknown model {name!r}{hint}; the zoo has: {', '.join(ZOO)}",
                     fix="use one of those names, or the path of a .keras file")


def load_dataset(entry: ZooEntry) -> datasets.Mnist:
    """The (train, test) data an entry is trained and evaluated on, MNIST-shaped."""
    if entry.dataset == "mnist":
        return datasets.load_mnist()
    n_train, n_test = entry.synthetic_n
    x_train, y_train = datasets.synthetic_images(n_train, seed=entry.seed)
    x_test, y_test = datasets.synthetic_images(n_test, seed=entry.seed + 1)
    return datasets.Mnist(x_train, y_train, x_test, y_test)


# ------------------------------------------------------------------- training

@dataclass
class TrainResult:
    """A trained zoo model and how it was obtained."""

    name: str
    model: keras.Model
    test_accuracy: float
    seconds: float                     # training time (from the cache record when cached)
    path: Path
    epochs: int
    from_cache: bool
    info: dict = field(default_factory=dict)

    def summary(self) -> str:
        how = "loaded from cache" if self.from_cache else "trained"
        lines = [f"{self.name}: test accuracy {self.test_accuracy:.4f} ({self.test_accuracy * 100:.2f} %)",
                 f"  {how}: {self.path}",
                 f"  training: {self.epochs} epochs, {self.seconds:.0f} s"
                 + (f" on {self.info.get('trained_at', '?')}" if self.from_cache else "")]
        return "\n".join(lines)


def models_dir() -> Path:
    path = datasets.cache_dir() / "models"
    path.mkdir(parents=True, exist_ok=True)
    return path


def cached_paths(name: str, epochs: int | None = None) -> tuple[Path, Path]:
    """(model .keras, record .json) paths; a non-default epoch count gets its own files."""
    entry = get_entry(name)
    stem = name if epochs in (None, entry.epochs) else f"{name}.e{epochs}"
    return models_dir() / f"{stem}.keras", models_dir() / f"{stem}.json"


def train(name: str, epochs: int | None = None, force: bool = False) -> TrainResult:
    """Return the trained zoo model ``name``, training it unless it is cached.

    ``epochs`` other than the recipe's trains a separate variant (cached under
    ``<name>.e<epochs>``) so the reference model is never replaced by a weaker
    one.  ``force`` retrains even when cached.
    """
    entry = get_entry(name)
    if epochs is not None and epochs < 1:
        raise UsageError(f"--epochs must be at least 1, got {epochs}", fix="omit --epochs to use the recipe")
    epochs = epochs or entry.epochs
    model_path, record_path = cached_paths(name, epochs)
    if not force:
        cached = _load_cached(entry, epochs, model_path, record_path)
        if cached is not None:
            return cached
    with datasets.file_lock(model_path.with_suffix(".lock"), "training"):
        # Another process may have trained it while we waited for the lock.
        if not force:
            cached = _load_cached(entry, epochs, model_path, record_path)
            if cached is not None:
                return cached
        return _train_and_save(entry, epochs, model_path, record_path)


def _load_cached(entry: ZooEntry, epochs: int, model_path: Path, record_path: Path) -> TrainResult | None:
    if not (model_path.is_file() and record_path.is_file()):
        return None
    try:
        info = json.loads(record_path.read_text())
    except (OSError, ValueError):
        log.warning("unreadable record %s; retraining %s", record_path, entry.name)
        return None
    if info.get("recipe") != entry.recipe(epochs):
        log.warning("cached %s was trained with another recipe; retraining", entry.name)
        return None
    model = _load_keras_file(model_path)
    _compile_for_evaluation(model)
    return TrainResult(entry.name, model, float(info["test_accuracy"]), float(info["seconds"]), model_path,
                       epochs, True, info)


def _train_and_save(entry: ZooEntry, epochs: int, model_path: Path, record_path: Path) -> TrainResult:
    data = load_dataset(entry)
    keras.utils.set_random_seed(entry.seed)
    model = entry.build()
    steps = math.ceil(len(data.x_train) / entry.batch_size) * epochs
    schedule = keras.optimizers.schedules.CosineDecay(entry.learning_rate, decay_steps=steps)
    model.compile(optimizer=keras.optimizers.Adam(schedule), loss="sparse_categorical_crossentropy",
                  metrics=["accuracy"])
    log.info("training %s: %d epochs of %d images, batch %d", entry.name, epochs, len(data.x_train),
             entry.batch_size)
    start = time.perf_counter()
    model.fit(data.x_train, data.y_train, batch_size=entry.batch_size, epochs=epochs, shuffle=True,
              verbose=0, callbacks=[_Progress(entry.name, epochs)])
    seconds = time.perf_counter() - start
    loss, accuracy = model.evaluate(data.x_test, data.y_test, batch_size=500, verbose=0)
    log.info("%s: test accuracy %.4f after %.0f s", entry.name, accuracy, seconds)
    if accuracy < entry.min_accuracy:
        log.warning("%s reached only %.4f test accuracy (expected >= %.2f)", entry.name, accuracy,
                    entry.min_accuracy)

    # Drop the optimizer: the saved file then holds no optimizer state (3x
    # smaller for paper-cnn); a loaded zoo model is compiled for evaluate() only.
    _compile_for_evaluation(model)
    info = {
        "name": entry.name, "test_accuracy": float(accuracy), "test_loss": float(loss), "seconds": seconds,
        "epochs": epochs, "recipe": entry.recipe(epochs), "train_images": int(len(data.x_train)),
        "test_images": int(len(data.x_test)), "labels": list(entry.labels), "input": entry.input_spec,
        "trained_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "versions": _versions(), "cpus": os.cpu_count(),
    }
    _atomic_write(model_path, lambda tmp: model.save(tmp))
    _atomic_write(record_path, lambda tmp: Path(tmp).write_text(json.dumps(info, indent=2) + "\n"))
    return TrainResult(entry.name, model, float(accuracy), seconds, model_path, epochs, False, info)


class _Progress(keras.callbacks.Callback):
    """A tqdm bar per epoch on stderr (hidden when stderr is not a terminal) and one log line per epoch."""

    def __init__(self, name: str, epochs: int):
        super().__init__()
        self.name, self.epochs = name, epochs
        self.bar = None
        self.t0 = 0.0

    def on_epoch_begin(self, epoch, logs=None):
        from tqdm.auto import tqdm

        self.t0 = time.perf_counter()
        self.bar = tqdm(total=self.params.get("steps"), desc=f"{self.name} epoch {epoch + 1}/{self.epochs}",
                        unit="batch", file=sys.stderr, disable=None, leave=False)

    def on_train_batch_end(self, batch, logs=None):
        if self.bar is not None:
            self.bar.update(1)
            if logs and batch % 20 == 0:
                self.bar.set_postfix(loss=f"{logs.get('loss', 0):.4f}", acc=f"{logs.get('accuracy', 0):.4f}")

    def on_epoch_end(self, epoch, logs=None):
        if self.bar is not None:
            self.bar.close()
        logs = logs or {}
        log.info("%s epoch %d/%d: loss %.4f, train accuracy %.4f (%.0f s)", self.name, epoch + 1, self.epochs,
                 logs.get("loss", float("nan")), logs.get("accuracy", float("nan")), time.perf_counter() - self.t0)


# -------------------------------------------------------------------- loading

def load_model(name_or_path: str | os.PathLike) -> keras.Model:
    """A zoo model by name (trained if not cached) or a Keras 3 ``.keras`` file."""
    text = os.fspath(name_or_path)
    if text in ZOO:
        return train(text).model
    path = Path(text).expanduser()
    looks_like_path = path.suffix != "" or os.sep in text or path.exists()
    if not looks_like_path:
        get_entry(text)  # raises the unknown-name error with suggestions
    if not path.exists():
        raise UsageError(f"model file not found: {path}",
                         fix=f"check the path, or use a zoo model: {', '.join(ZOO)}")
    if path.is_dir() or path.suffix != ".keras":
        raise UsageError(f"{path} is not a .keras file (Keras 3 format)",
                         fix="save the model with model.save('model.keras') and pass that file")
    return _load_keras_file(path)


def _compile_for_evaluation(model: keras.Model) -> None:
    model.compile(loss="sparse_categorical_crossentropy", metrics=["accuracy"])


def _load_keras_file(path: Path) -> keras.Model:
    # compile=False: edgesplit only runs inference, and it avoids Keras' warnings
    # about optimizer state that was (deliberately) not saved.
    from converter import defended  # noqa: F401  (registers CutDefence: hardened models load too)

    try:
        return keras.saving.load_model(path, compile=False)
    except Exception as exc:  # Keras raises many types for a damaged zip / unknown layers
        raise UsageError(f"cannot load {path}: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}",
                         fix="re-save the model with model.save('model.keras'); custom layers must be "
                             "registered with keras.saving.register_keras_serializable") from exc


def describe(name: str) -> dict:
    """What the zoo knows about a model: entry fields plus the cached record, if any."""
    entry = get_entry(name)
    out = {k: v for k, v in dataclasses.asdict(entry).items() if k != "build"}
    out["labels"] = list(entry.labels)
    record = cached_paths(name)[1]
    if record.is_file():
        out["cached"] = json.loads(record.read_text())
    return out


# ---------------------------------------------------------------------- utils

def _atomic_write(path: Path, write: Callable[[str], object]) -> None:
    # The temp name keeps the suffix: Keras refuses to save a .keras model under another one.
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp{path.suffix}")
    try:
        write(str(tmp))
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def _versions() -> dict:
    import tensorflow as tf

    return {"python": platform.python_version(), "tensorflow": tf.__version__, "keras": keras.__version__,
            "numpy": np.__version__}
