"""The user's labelled images, from the command line's ``--data SPEC``.

SPEC is one of

* a folder of class-named subfolders, ``D/<class>/...`` (the convention of Keras'
  ``image_dataset_from_directory``: class ``i`` is the ``i``-th folder name in sorted order,
  images are found in nested folders too);
* a folder of images with a ``labels.csv`` (``file,label`` rows; ``file`` relative to the
  folder).  Labels that are all whole numbers are output indices; otherwise class ``i`` is
  the ``i``-th label in sorted order;
* an ``.npz`` with ``x_train, y_train, x_test, y_test`` (or only ``x, y``) and optionally
  ``labels`` (the class names).  uint8 images are pixels and go through the bundle's
  preprocessing; float images are taken as the model's input already.

A folder holding ``train/`` and ``test/`` (or ``val/``, ``validation/``) folders of either
kind brings its own split.  Otherwise a seeded, per-class split holds out ``test_split`` of
the images: calibration and the auditor's attacker only ever see the train side, parity and
the attacked images only the test side.

:func:`load_data` only lists files and labels.  :meth:`ImageData.for_input` binds them to a
bundle's input spec and returns views that decode on demand with the device's own
:class:`runtime.preprocess.Preprocessor` (so a file gives the model exactly what a device
computes from it), with a progress bar while decoding.  Only the images used are decoded,
each once; undecoded bytes are never held.

Every problem with the data raises :class:`DataError` (exit code 2) naming the file and
what to do.  No TensorFlow here: the device's ``edgesplit profile --data`` uses it too.
"""
from __future__ import annotations

import csv
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from protocol.errors import UsageError

log = logging.getLogger(__name__)

#: file name endings read as images (what Keras reads, and what Pillow reads besides)
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")
LABELS_CSV = "labels.csv"
TRAIN_DIRS = ("train", "training")
TEST_DIRS = ("test", "val", "validation")
DEFAULT_TEST_SPLIT = 0.2
NPZ_KEYS = ("x_train", "y_train", "x_test", "y_test")
#: decoded pixels kept per set of images (a few thousand camera-sized images)
CACHE_BYTES = 512 << 20

_FORMS = ("a folder of class folders (D/<class>/*.jpg), a folder of images with a labels.csv "
          "(file,label), or an .npz with x_train, y_train, x_test, y_test")


class DataError(UsageError):
    """The ``--data`` images cannot be used as they are (exit code 2)."""


@dataclass(frozen=True)
class Split:
    """Where the images came from and how they were split (goes into the manifest and the report)."""

    source: str
    kind: str                        # "folders", "labels.csv" or "npz"
    n_train: int
    n_test: int
    test_split: float | None         # None: the source brought its own test set
    seed: int

    def describe(self) -> str:
        how = (f"seeded per-class split (seed {self.seed}, {100 * self.test_split:g} % held out)"
               if self.test_split is not None else "the source's own train and test sets")
        return f"{self.source} ({self.kind}): {self.n_train} train / {self.n_test} test images, {how}"

    def to_manifest(self):
        from protocol import manifest as mf

        return mf.Dataset(source=self.source, kind=self.kind, n_train=self.n_train, n_test=self.n_test,
                          test_split=self.test_split, seed=self.seed)


@dataclass
class _Side:
    """One side of the data: files (or arrays) and their class indices."""

    items: list | np.ndarray          # list of Paths, or an array of images
    y: np.ndarray                     # int64 class indices

    def take(self, idx: np.ndarray) -> "_Side":
        items = [self.items[i] for i in idx] if isinstance(self.items, list) else self.items[idx]
        return _Side(items, self.y[idx])


@dataclass
class ImageData:
    """The user's labelled images before decoding: file lists (or arrays), labels and the split."""

    train: _Side
    test: _Side
    classes: list[str]
    split: Split
    named: bool = True                # class names came with the data (folders, labels, npz labels)

    @property
    def files(self) -> bool:
        return isinstance(self.train.items, list)

    def check_outputs(self, n_outputs: int, model_name: str = "the model") -> list[str]:
        """The class names for a model with ``n_outputs`` classes; DataError when a label cannot be output."""
        biggest = int(max(self.train.y.max(initial=-1), self.test.y.max(initial=-1)))
        if biggest >= n_outputs:
            side = self.train if self.train.y.max(initial=-1) == biggest else self.test
            where = ""
            if isinstance(side.items, list):
                where = f" (e.g. {side.items[int(np.argmax(side.y == biggest))]})"
            name = self.classes[biggest] if biggest < len(self.classes) else str(biggest)
            raise DataError(f"{self.split.source}: label {name!r} is class {biggest}{where}, but {model_name} has "
                            f"{n_outputs} outputs (classes 0..{n_outputs - 1}); the data has "
                            f"{len(self.classes)} classes",
                            fix="give the images of the classes the model was trained on, or the model trained "
                                "on these classes")
        names = list(self.classes[:n_outputs])
        if len(names) < n_outputs:
            log.info("the data names %d classes, %s has %d outputs: outputs %d..%d are named by number",
                     len(names), model_name, n_outputs, len(names), n_outputs - 1)
            names += [str(i) for i in range(len(names), n_outputs)]
        return names

    def for_input(self, input_spec, *, progress: bool = True) -> "UserData":
        """Bind to a head's input spec: decoded (on demand) the way a device decodes them."""
        from runtime.preprocess import Preprocessor

        pre = Preprocessor(input_spec)
        return UserData(x_train=Images(self.train.items, pre, progress=progress, what="train"),
                        y_train=self.train.y,
                        x_test=Images(self.test.items, pre, progress=progress, what="test"),
                        y_test=self.test.y, classes=list(self.classes), split=self.split, input_spec=input_spec)

    def sample_pixels(self, n: int, input_spec, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
        """``n`` training images as uint8 pixels (geometry of ``input_spec``), and their labels.

        For choosing a normalisation: the mean/std of ``input_spec`` do not matter here.
        Float arrays are returned as they are (they are the model's input already).
        """
        from runtime.preprocess import Preprocessor

        pre = Preprocessor(input_spec)
        k = min(n, len(self.train.y))
        idx = np.sort(np.random.default_rng(seed).choice(len(self.train.y), size=k, replace=False))
        side = self.train.take(idx)
        if isinstance(side.items, np.ndarray) and side.items.dtype.kind == "f":
            return side.items, side.y
        view = Images(side.items, pre, progress=False, what="sample")
        return view.pixels(np.arange(k)), side.y


@dataclass
class UserData:
    """Labelled images bound to a head's input: ``x_*`` decode to float32 head input on demand.

    Shaped like :class:`converter.datasets.Mnist` (``x_train, y_train, x_test, y_test``), so every
    role that takes a dataset takes this one.
    """

    x_train: "Images"
    y_train: np.ndarray
    x_test: "Images"
    y_test: np.ndarray
    classes: list[str]
    split: Split
    input_spec: object = field(repr=False, default=None)

    def __iter__(self):
        return iter((self.x_train, self.y_train, self.x_test, self.y_test))


class Images(Sequence):
    """N images decoded on demand: ``view[i]``, ``view[a:b]``, ``view[index_array]``, ``np.asarray(view)``.

    Indexing gives float32 head input (N, H, W, C); :meth:`pixels` gives the uint8 pixels
    before normalisation.  Decoded pixels are kept (up to :data:`CACHE_BYTES`; the file bytes
    never are), so calibration and parity decode each file once; past that budget images are
    decoded again when asked for.  A progress bar shows while more than a few are decoded (only
    on a terminal).
    """

    def __init__(self, items, pre, *, progress: bool = True, what: str = "images"):
        self.items = items
        self.pre = pre
        self.progress = progress
        self.what = what
        self._pixels: dict[int, np.ndarray] = {}
        self.shape = (len(items),) + tuple(pre.shape)
        self.dtype = np.dtype(np.float32)

    def __len__(self) -> int:
        return len(self.items)

    def __repr__(self) -> str:
        return f"Images({len(self)} {self.what} images, {len(self._pixels)} decoded)"

    def _index(self, key) -> np.ndarray:
        if isinstance(key, slice):
            return np.arange(len(self))[key]
        idx = np.asarray(key)
        if idx.dtype == bool:
            return np.flatnonzero(idx)
        idx = idx.astype(np.int64).reshape(-1)
        idx = np.where(idx < 0, idx + len(self), idx)
        if idx.size and (idx.min() < 0 or idx.max() >= len(self)):
            raise IndexError(f"index out of range for {len(self)} images")
        return idx

    def __getitem__(self, key):
        if isinstance(key, (int, np.integer)):
            return self[np.asarray([key])][0]
        idx = self._index(key)
        if isinstance(self.items, np.ndarray):
            return self.pre.arrays(self.items[idx]) if len(idx) else np.zeros((0,) + self.shape[1:], np.float32)
        return self.pre.spec.pixels_to_input(self.pixels(idx)) if len(idx) else \
            np.zeros((0,) + self.shape[1:], np.float32)

    def __array__(self, dtype=None, copy=None):
        x = self[:]
        return x if dtype is None else x.astype(dtype, copy=False)

    def __iter__(self):
        for i in range(len(self)):
            yield self[i]

    def pixels(self, idx) -> np.ndarray:
        """uint8 pixels (n, H, W, C) of the images at ``idx`` (the device's decoding, before normalisation)."""
        idx = self._index(idx)
        if isinstance(self.items, np.ndarray):
            return np.stack([self._array_pixels(self.items[i]) for i in idx]) if len(idx) else \
                np.zeros((0,) + self.shape[1:], np.uint8)
        if not len(idx):
            return np.zeros((0,) + self.shape[1:], np.uint8)
        todo = sorted({int(i) for i in idx if int(i) not in self._pixels})
        fresh = self._decode(todo) if todo else {}
        return np.stack([self._pixels[int(i)] if int(i) in self._pixels else fresh[int(i)] for i in idx])

    def _array_pixels(self, a: np.ndarray) -> np.ndarray:
        from PIL import Image

        a = np.asarray(a)
        if a.shape == self.shape[1:]:
            return a
        img = Image.fromarray(a.squeeze(axis=-1) if a.ndim == 3 and a.shape[-1] == 1 else a)
        return self.pre.image_pixels(img)

    def _decode(self, todo: list[int]) -> dict[int, np.ndarray]:
        """Decode the files at ``todo``; keep them while the cache has room; return those it could not keep."""
        from tqdm.auto import tqdm

        per_image = int(np.prod(self.shape[1:]))
        extra: dict[int, np.ndarray] = {}
        bar = tqdm(total=len(todo), desc=f"decoding {self.what} images", unit="img", leave=False,
                   disable=None if (self.progress and len(todo) > 50) else True)
        try:
            for i in todo:
                path = self.items[i]
                try:
                    px = self.pre.image_pixels(self.pre.open_image(path))
                except UsageError as exc:
                    raise DataError(f"{exc.message}", fix=f"replace or delete {path}, then run again") from None
                if (len(self._pixels) + 1) * per_image <= CACHE_BYTES:
                    self._pixels[i] = px
                else:
                    extra[i] = px
                bar.update(1)
        finally:
            bar.close()
        return extra


# ---------------------------------------------------------------------- loading

def load_data(spec, *, test_split: float | None = None, seed: int = 0) -> ImageData:
    """List the images and labels of ``spec`` (see the module docstring) and split them.

    ``test_split`` (default 0.2) is only used when the source has one set of images; giving it
    for a source with its own test set is an error.  Nothing is decoded here.
    """
    if test_split is not None and not (isinstance(test_split, (int, float)) and 0.0 < test_split < 1.0):
        raise DataError(f"--test-split must be a fraction between 0 and 1, got {test_split}",
                        fix="e.g. --test-split 0.2 (a fifth of the images held out)")
    path = Path(os.fspath(spec)).expanduser()
    if not path.exists():
        raise DataError(f"--data {spec}: no such file or folder", fix=f"give {_FORMS}")
    source = str(path.resolve())
    if path.is_file():
        if path.suffix.lower() != ".npz":
            raise DataError(f"--data {spec} is a file but not an .npz",
                            fix=f"give {_FORMS}; for one image file use `edgesplit device run`")
        train, test, classes, named, kind = _load_npz(path)
    else:
        train, test, classes, named, kind = _load_folder(path)
    if test is None:
        frac = DEFAULT_TEST_SPLIT if test_split is None else float(test_split)
        train, test = _split(train, frac, seed, source)
        split = Split(source, kind, len(train.y), len(test.y), frac, int(seed))
    else:
        if test_split is not None:
            raise DataError(f"--data {spec} has its own test set; --test-split {test_split} would split it again",
                            fix="drop --test-split, or give one set of images to split")
        split = Split(source, kind, len(train.y), len(test.y), None, int(seed))
    for side, name in ((train, "train"), (test, "test")):
        if len(side.y) == 0:
            raise DataError(f"--data {spec}: the {name} set is empty", fix="add images to it")
    log.info("data: %s", split.describe())
    return ImageData(train=train, test=test, classes=classes, split=split, named=named)


def _split(side: _Side, frac: float, seed: int, source: str) -> tuple[_Side, _Side]:
    """Seeded per-class split: ``round(frac * N)`` images held out, shared among classes by their size."""
    n = len(side.y)
    if n < 2:
        raise DataError(f"{source} holds {n} image(s); a split into train and test images needs at least 2",
                        fix="add images (a few dozen per class at least)")
    rng = np.random.default_rng(seed)
    k = min(max(1, int(np.floor(frac * n + 0.5))), n - 1)
    classes, counts = np.unique(side.y, return_counts=True)
    # largest remainder: each class gets floor(frac * n_c), the rest go to the largest fractions
    quota = frac * counts * (k / (frac * n))
    take = np.floor(quota).astype(int)
    for i in np.argsort(-(quota - take), kind="stable")[:k - int(take.sum())]:
        take[i] += 1
    test_idx = []
    for c, t in zip(classes, take):
        members = np.flatnonzero(side.y == c)
        rng.shuffle(members)
        test_idx.extend(members[:t].tolist())
    mask = np.zeros(n, bool)
    mask[test_idx] = True
    return side.take(np.flatnonzero(~mask)), side.take(np.flatnonzero(mask))


def _is_image(p: Path) -> bool:
    return p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith(".")


def _visible_dirs(path: Path) -> list[Path]:
    return sorted((d for d in path.iterdir() if d.is_dir() and not d.name.startswith(".")), key=lambda d: d.name)


def _images_under(path: Path) -> list[Path]:
    found = []
    for root, dirs, files in os.walk(path, followlinks=True):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        found.extend(Path(root) / f for f in sorted(files) if _is_image(Path(f)))
    return found


def _load_folder(path: Path):
    dirs = _visible_dirs(path)
    names = {d.name.lower(): d for d in dirs}
    train_dir = next((names[n] for n in TRAIN_DIRS if n in names), None)
    test_dir = next((names[n] for n in TEST_DIRS if n in names), None)
    if train_dir is not None and test_dir is not None and len(dirs) == 2 \
            and all(_visible_dirs(d) or (d / LABELS_CSV).is_file() for d in (train_dir, test_dir)):
        train, classes, named, kind = _one_folder(train_dir)
        test, test_classes, _, test_kind = _one_folder(test_dir, classes if kind == "folders" else None)
        if test_kind != kind:
            raise DataError(f"{train_dir} is a {kind} folder but {test_dir} is a {test_kind} folder",
                            fix="lay both out the same way")
        if kind == "labels.csv":
            classes, train, test = _merge_csv_classes(classes, train, test_classes, test)
        return train, test, classes, named, kind
    train, classes, named, kind = _one_folder(path)
    return train, None, classes, named, kind


def _one_folder(path: Path, classes: list[str] | None = None):
    """(side, class names, named, kind) of one folder: labels.csv, or class folders."""
    if (path / LABELS_CSV).is_file():
        side, classes, named = _read_labels_csv(path)
        return side, classes, named, "labels.csv"
    dirs = _visible_dirs(path)
    loose = [p for p in path.iterdir() if p.is_file() and _is_image(p)]
    if not dirs:
        if loose:
            raise DataError(f"{path} holds {len(loose)} images but no labels",
                            fix=f"put them in one folder per class ({path}/<class>/...), or add {path}/{LABELS_CSV} "
                                "with rows file,label")
        raise DataError(f"{path} is empty: no class folders, no {LABELS_CSV}, no images", fix=f"give {_FORMS}")
    if loose:
        log.warning("%s: %d images beside the class folders are ignored (as Keras does)", path, len(loose))
    own = [d.name for d in dirs]
    if classes is None:
        classes = own
    else:
        extra = sorted(set(own) - set(classes))
        if extra:
            raise DataError(f"{path} has class folders {extra} that the training folder does not have",
                            fix="give both sets the same class folders")
    items, ys = [], []
    for d in dirs:
        found = _images_under(d)
        if not found:
            log.warning("class folder %s holds no images", d)
        items.extend(found)
        ys.extend([classes.index(d.name)] * len(found))
    if not items:
        raise DataError(f"{path} has class folders ({', '.join(own[:5])}{', ...' if len(own) > 5 else ''}) "
                        "but no images in them", fix=f"put images ({', '.join(IMAGE_SUFFIXES)}) in the class folders")
    return _Side(items, np.asarray(ys, np.int64)), list(classes), True, "folders"


_FILE_COLUMNS = ("file", "filename", "path", "image")
_LABEL_COLUMNS = ("label", "class", "category")


def _read_labels_csv(path: Path):
    csv_path = path / LABELS_CSV
    try:
        with open(csv_path, newline="", encoding="utf-8-sig") as fh:
            rows = [r for r in csv.reader(fh) if r and any(c.strip() for c in r)]
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise DataError(f"cannot read {csv_path} ({exc})", fix="write it as UTF-8 text with rows file,label") from None
    if not rows:
        raise DataError(f"{csv_path} is empty", fix="write one row file,label per image")
    head = [c.strip().lower() for c in rows[0]]
    start, fcol, lcol = 0, 0, 1
    if any(h in _FILE_COLUMNS for h in head) or any(h in _LABEL_COLUMNS for h in head):
        fcol = next((i for i, h in enumerate(head) if h in _FILE_COLUMNS), None)
        lcol = next((i for i, h in enumerate(head) if h in _LABEL_COLUMNS), None)
        if fcol is None or lcol is None:
            raise DataError(f"{csv_path}: the header {rows[0]} names no {'file' if fcol is None else 'label'} column",
                            fix="start it with the header file,label")
        start = 1
    items, labels, missing = [], [], []
    for lineno, row in enumerate(rows[start:], start=start + 1):
        if len(row) <= max(fcol, lcol):
            raise DataError(f"{csv_path} line {lineno}: {row} has {len(row)} field(s), expected file,label",
                            fix="write one row file,label per image")
        name, label = row[fcol].strip(), row[lcol].strip()
        if not name or not label:
            raise DataError(f"{csv_path} line {lineno}: empty {'file name' if not name else 'label'}",
                            fix="give every row a file and a label")
        f = Path(name) if os.path.isabs(name) else path / name
        if not f.is_file():
            missing.append((lineno, name))
            continue
        items.append(f)
        labels.append(label)
    if missing:
        lineno, name = missing[0]
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise DataError(f"{csv_path} line {lineno} names {name}, which is not in {path}{more}",
                        fix="correct or delete those rows, or add the files")
    if not items:
        raise DataError(f"{csv_path} lists no images", fix="write one row file,label per image")
    if all(_whole(v) for v in labels):
        y = np.asarray([int(v) for v in labels], np.int64)
        if y.min() < 0:
            raise DataError(f"{csv_path}: label {y.min()} is negative", fix="labels are class indices 0, 1, ... or names")
        return _Side(items, y), [str(i) for i in range(int(y.max()) + 1)], False
    classes = sorted(set(labels))
    index = {c: i for i, c in enumerate(classes)}
    return _Side(items, np.asarray([index[v] for v in labels], np.int64)), classes, True


def _whole(text: str) -> bool:
    return re.fullmatch(r"[+-]?\d+", text) is not None


def _merge_csv_classes(train_classes, train: _Side, test_classes, test: _Side):
    """Two labels.csv folders: one class list for both (by name), indices remapped."""
    if train_classes == test_classes:
        return train_classes, train, test
    if all(_whole(c) for c in train_classes + test_classes):
        n = max(len(train_classes), len(test_classes))
        return [str(i) for i in range(n)], train, test
    classes = sorted(set(train_classes) | set(test_classes))
    remap = lambda names, side: _Side(side.items, np.asarray([classes.index(names[i]) for i in side.y], np.int64))  # noqa: E731
    return classes, remap(train_classes, train), remap(test_classes, test)


# -------------------------------------------------------------------------- npz

def _load_npz(path: Path):
    try:
        npz = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as exc:
        raise DataError(f"cannot read {path} as an .npz ({exc})",
                        fix="write it with np.savez(path, x_train=..., y_train=..., x_test=..., y_test=...)") from None
    with npz:
        keys = set(npz.files)
        if set(NPZ_KEYS) <= keys:
            pairs = [("x_train", "y_train"), ("x_test", "y_test")]
        elif {"x", "y"} <= keys:
            pairs = [("x", "y")]
        else:
            raise DataError(f"{path} holds the arrays {sorted(keys) or 'none'}; edgesplit needs x_train, y_train, "
                            "x_test, y_test (or x, y to be split)",
                            fix="np.savez(path, x_train=..., y_train=..., x_test=..., y_test=..., labels=[names])")
        try:
            sides = [_npz_side(path, xk, npz[xk], yk, npz[yk]) for xk, yk in pairs]
            names = [str(v) for v in npz["labels"].reshape(-1)] if "labels" in keys else None
        except ValueError as exc:  # e.g. an object array, refused without pickle
            raise DataError(f"{path}: {exc}", fix="store plain numeric arrays (and labels as strings)") from None
    if len(sides) == 2 and sides[0].items.shape[1:] != sides[1].items.shape[1:]:
        raise DataError(f"{path}: x_train images are {list(sides[0].items.shape[1:])} but x_test images are "
                        f"{list(sides[1].items.shape[1:])}", fix="store both sets at the same size")
    if len(sides) == 2 and sides[0].items.dtype.kind != sides[1].items.dtype.kind:
        raise DataError(f"{path}: x_train is {sides[0].items.dtype} but x_test is {sides[1].items.dtype}",
                        fix="store both as uint8 pixels, or both as the model's float input")
    n_classes = int(max(s.y.max() for s in sides)) + 1
    if names is not None and len(names) < n_classes:
        raise DataError(f"{path}: labels names {len(names)} classes but the labels go up to {n_classes - 1}",
                        fix="give one name per class in `labels`")
    classes = names if names is not None else [str(i) for i in range(n_classes)]
    return sides[0], (sides[1] if len(sides) == 2 else None), classes, names is not None, "npz"


def _npz_side(path: Path, xk: str, x: np.ndarray, yk: str, y: np.ndarray) -> _Side:
    if x.ndim == 3:
        x = x[..., None]
    if x.ndim != 4:
        raise DataError(f"{path}: {xk} has shape {list(x.shape)}; images are (N, height, width) or "
                        "(N, height, width, channels)", fix=f"reshape {xk} to (N, H, W, C)")
    if x.shape[-1] not in (1, 2, 3, 4):
        raise DataError(f"{path}: {xk} images have {x.shape[-1]} channels, which cannot be converted to grey or RGB "
                        f"(shape {list(x.shape)})", fix=f"store {xk} as (N, H, W, 1) grey or (N, H, W, 3) RGB images")
    if x.dtype.kind in "iu" and x.dtype != np.uint8:
        if x.size and (x.min() < 0 or x.max() > 255):
            raise DataError(f"{path}: {xk} is {x.dtype} with values {x.min()}..{x.max()}, not 0..255 pixels",
                            fix=f"store {xk} as uint8 pixels, or as the model's float input")
        x = x.astype(np.uint8)
    elif x.dtype.kind == "f":
        if x.shape[-1] not in (1, 3):
            raise DataError(f"{path}: {xk} is float with {x.shape[-1]} channels; float images are taken as the "
                            "model's input and cannot be converted", fix=f"store {xk} as uint8 pixels")
        if not np.isfinite(x).all():
            raise DataError(f"{path}: {xk} holds NaN or infinity", fix="store finite values")
        x = x.astype(np.float32, copy=False)
    elif x.dtype != np.uint8:
        raise DataError(f"{path}: {xk} has dtype {x.dtype}", fix=f"store {xk} as uint8 pixels or float32 input")
    y = np.asarray(y)
    if y.ndim == 2 and y.shape[1] == 1:
        y = y[:, 0]
    if y.ndim != 1:
        raise DataError(f"{path}: {yk} has shape {list(y.shape)}; labels are one class index per image (N,)",
                        fix=f"store {yk} = np.argmax(one_hot, axis=1)" if y.ndim == 2 else f"store {yk} as (N,)")
    if len(y) != len(x):
        raise DataError(f"{path}: {xk} holds {len(x)} images but {yk} holds {len(y)} labels",
                        fix="store one label per image")
    if y.dtype.kind == "f" and np.all(y == np.round(y)):
        y = y.astype(np.int64)
    if y.dtype.kind not in "iu":
        raise DataError(f"{path}: {yk} has dtype {y.dtype}; labels are whole class indices 0, 1, ...",
                        fix=f"store {yk} as integers (names go in `labels`)")
    if len(y) and y.min() < 0:
        raise DataError(f"{path}: {yk} holds the negative label {y.min()}", fix="labels are class indices 0, 1, ...")
    return _Side(x, y.astype(np.int64))
