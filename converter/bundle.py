"""``edgesplit convert``: model -> cut -> split -> TFLite -> bundle -> parity.

:func:`convert` loads a model (zoo name, ``.keras`` path or a ``keras.Model``),
splits it at a cut, converts head and tail with the chosen quantization,
writes the bundle directory (``manifest.json``, ``head.tflite``,
``tail.tflite``, and ``probe.npz``, the self-test of ``runtime.probe``), checks
parity with a real LiteRT interpreter on held-out test images, records the
result in the manifest, and packs ``DIR.tar.gz`` beside the directory.  The format is in ``docs/bundle.md``.
"""
from __future__ import annotations

import hashlib
import importlib.metadata
import logging
import os
import platform
import shutil
import tempfile
import time
import weakref
from dataclasses import dataclass, field
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import msgspec  # noqa: E402
import numpy as np  # noqa: E402

from converter import defended  # noqa: E402
from converter import parity as parity_mod  # noqa: E402
from converter.quantize import convert_split  # noqa: E402
from protocol import manifest as mf  # noqa: E402
from protocol.errors import CheckFailed, UsageError  # noqa: E402
from runtime.probe import make_probe  # noqa: E402

log = logging.getLogger(__name__)

#: parity threshold applied when the user sets none, by model name
DEFAULT_MIN_AGREEMENT = {"paper-cnn": 0.99}
CALIBRATION_SEED = 0
DEFAULT_CALIBRATION = 500

# Keras top-1 on the parity images is the same for every cut of a model: compute it once.
_KERAS_PRED: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


@dataclass
class ConvertResult:
    """What ``convert`` made, and how well the split agrees with the model."""

    bundle_dir: Path
    tarball: Path | None
    manifest: mf.Manifest
    parity: parity_mod.ParityResult
    head_bytes: int
    tail_bytes: int
    tarball_bytes: int | None
    requant_exact: bool | None
    seconds: dict = field(default_factory=dict)
    input_origin: str = ""
    split: object = None          # converter.userdata.Split for --data images

    @property
    def agreement(self) -> float:
        return self.parity.agreement

    @property
    def accuracy(self) -> float | None:
        return self.parity.accuracy

    @property
    def keras_accuracy(self) -> float | None:
        return self.parity.keras_accuracy

    @property
    def bundle_id(self) -> str:
        return self.manifest.bundle_id

    def summary(self) -> str:
        m = self.manifest
        f = m.feature
        quant = f"  scale {f.scale:.6g}  zero point {f.zero_point}" if f.quantized else ""
        lines = [
            f"bundle   {self.bundle_dir}  (id {m.bundle_id})",
            f"tarball  {self.tarball}  {_kb(self.tarball_bytes)}" if self.tarball else "tarball  not written",
            f"model    {m.model}  cut {m.cut}  quant {m.quant}",
            f"input    {list(m.input.shape)} {m.input.dtype}  {m.input.preprocess.describe()}"
            + (f"\n         scaling from {self.input_origin}" if self.input_origin else ""),
            *([f"data     {self.split.describe()}"] if self.split is not None else []),
            f"output   {list(m.output.shape)} {m.output.kind}, {len(m.labels)} classes: "
            + ", ".join(m.labels[:6]) + (", ..." if len(m.labels) > 6 else ""),
            f"feature  {list(f.shape)} {f.dtype}  {f.nbytes} bytes per image{quant}",
            f"files    head.tflite {_kb(self.head_bytes)}  tail.tflite {_kb(self.tail_bytes)}",
            f"parity   {self.parity.summary()}  {'PASSED' if self.parity.passed else 'FAILED'}",
            "time     " + "  ".join(f"{k} {v:.1f} s" for k, v in self.seconds.items()),
        ]
        return "\n".join(lines)


def _kb(n: int | None) -> str:
    if n is None:
        return "?"
    return f"{n / 1024:.1f} KiB" if n < 1 << 20 else f"{n / (1 << 20):.2f} MiB"


@dataclass
class _Source:
    """A resolved model with the data, labels and input spec that go with it."""

    model: object
    name: str
    data: object          # x_train, y_train, x_test, y_test (model input)
    data_name: str
    labels: list[str]
    input: object         # converter.inputspec.Resolved
    dataset: mf.Dataset | None = None
    source_model: mf.SourceModel | None = None
    split: object = None  # converter.userdata.Split for --data images


def _resolve(model, data, labels, name=None, *, preprocess=None, test_split=None, seed=0,
             progress=True) -> _Source:
    """Model argument -> keras model, name, datasets, labels and input spec (zoo entries bring their own).

    ``data``: None (the zoo's, or MNIST for an MNIST-shaped model), an object with
    ``x_train, y_train, x_test, y_test`` already scaled as the model's input, a ``--data`` SPEC
    (folder or .npz: :func:`converter.userdata.load_data`) or a loaded ``ImageData``.
    """
    import keras

    from converter import inputspec, userdata, zoo

    entry = None
    source_model = None
    if isinstance(model, keras.Model):
        keras_model = model
        # a loaded zoo model passed with its zoo name is that zoo entry (data, labels, thresholds)
        entry = zoo.ZOO.get(name) if name else None
        name = name or model.name
    else:
        text = os.fspath(model)
        keras_model = zoo.load_model(text)
        if text in zoo.ZOO:
            entry, name = zoo.ZOO[text], name or text
        else:
            # the cached file of a zoo model (e.g. ~/.cache/edgesplit/models/paper-cnn.keras) is that model
            stem = Path(text).stem
            if stem in zoo.ZOO and Path(text).resolve() == zoo.cached_paths(stem)[0].resolve():
                entry = zoo.ZOO[stem]
            else:
                path = Path(text).expanduser().resolve()
                source_model = mf.SourceModel(file=str(path), sha256=mf.sha256_file(path))
            name = name or (entry.name if entry is not None else stem)
    check_model(keras_model, name)
    n_out = int(np.prod(keras_model.outputs[0].shape[1:]))
    if isinstance(data, (str, os.PathLike)):
        data = userdata.load_data(data, test_split=test_split, seed=seed)
    elif test_split is not None:
        raise UsageError("--test-split only applies to --data images", fix="give --data, or drop --test-split")
    if isinstance(data, userdata.ImageData):
        names = data.check_outputs(n_out, repr(name))
        labels = list(labels) if labels is not None else names
        zoo_range = tuple(float(v) for v in entry.input_spec.get("range", (0.0, 1.0))) if entry is not None else None
        resolved = inputspec.resolve(keras_model, preprocess=preprocess, value_range=zoo_range, data=data,
                                     n_outputs=n_out, name=repr(name))
        split = data.split
        bound = data.for_input(resolved.spec, progress=progress)
        return _Source(keras_model, name, bound, f"{Path(split.source).name} ({split.kind})", [str(v) for v in labels],
                       resolved, split.to_manifest(), source_model, split)

    data_name = "given"
    value_range = None
    dataset = None
    if entry is not None:
        value_range = tuple(float(v) for v in entry.input_spec.get("range", (0.0, 1.0)))
        labels = list(labels) if labels is not None else list(entry.labels)
        if data is None:
            data, data_name = zoo.load_dataset(entry), entry.dataset
            dataset = mf.Dataset(source=entry.dataset, kind="zoo", n_train=len(data.x_train), n_test=len(data.x_test))
    if data is None:
        if tuple(keras_model.inputs[0].shape[1:]) == (28, 28, 1) and n_out == 10:
            from converter import datasets

            data, data_name = datasets.load_mnist(), "mnist"
            labels = list(labels) if labels is not None else list(datasets.LABELS)
            value_range = value_range or (0.0, 1.0)
            dataset = mf.Dataset(source="mnist", kind="zoo", n_train=len(data.x_train), n_test=len(data.x_test))
        else:
            raise UsageError(f"no calibration and test images are known for model {name!r} (input "
                             f"{list(keras_model.inputs[0].shape[1:])}, {n_out} outputs)",
                             fix="give your labelled images with --data: a folder of class folders, a folder with "
                                 "labels.csv (file,label), or an .npz with x_train, y_train, x_test, y_test")
    elif dataset is None:
        dataset = mf.Dataset(source="arrays given to convert()", kind="arrays", n_train=len(data.x_train),
                             n_test=len(data.x_test))
        if value_range is None:
            value_range = _array_range(data)
    if labels is None:
        labels = [str(i) for i in range(n_out)]
    resolved = inputspec.resolve(keras_model, preprocess=preprocess, value_range=value_range, name=repr(name))
    return _Source(keras_model, name, data, data_name, [str(v) for v in labels], resolved, dataset, source_model)


def _array_range(data) -> tuple[float, float]:
    """The range float arrays given to the API are scaled to: [0, 1] unless they say otherwise."""
    x = np.asarray(data.x_test[:256], np.float32)
    lo, hi = (float(x.min()), float(x.max())) if x.size else (0.0, 1.0)
    if lo < -1e-4:
        return (-1.0, 1.0)
    if hi > 1.0 + 1e-4:
        return (0.0, 255.0)
    return (0.0, 1.0)


def check_model(model, name=None) -> None:
    """One image input, one classifier output: else one UsageError saying what is supported."""
    name = name or model.name
    supported = ("edgesplit splits image classifiers: one input of shape (height, width, 1 or 3) float, one "
                 "output of class scores (softmax or logits)")
    if len(model.inputs) != 1:
        raise UsageError(f"model {name!r} has {len(model.inputs)} inputs; a bundle's head takes one image. {supported}",
                         fix="convert a model with a single image input (e.g. wrap the image branch in its own "
                             "keras.Model)")
    shape = tuple(model.inputs[0].shape[1:])
    dtype = str(getattr(model.inputs[0], "dtype", "float32"))
    if len(shape) != 3 or shape[-1] not in (1, 3) or None in shape or "float" not in dtype:
        hint = (" (its height and width are not fixed: build it with input_shape=(H, W, C))"
                if len(shape) == 3 and None in shape[:2] else "")
        raise UsageError(f"model {name!r} takes input of shape {shape} ({dtype}), which is not an image{hint}: "
                         f"{supported}", fix="convert an image model (e.g. `edgesplit convert paper-cnn ...`)")
    if len(model.outputs) != 1:
        raise UsageError(f"model {name!r} has {len(model.outputs)} outputs; the tail answers one. {supported}",
                         fix="convert a model with one classification output (keras.Model(inputs, outputs[0]))")
    out = tuple(model.outputs[0].shape[1:])
    if len(out) != 1 or out[0] is None or out[0] < 2:
        raise UsageError(f"model {name!r} outputs shape {out}; {supported}, at least 2 classes"
                         + (" (a single sigmoid output: give it 2 softmax outputs instead)" if out == (1,) else ""),
                         fix="convert a classifier whose last layer gives one score per class")


def _output_kind(model) -> str:
    """``probabilities`` when the output comes from a softmax, else ``logits``."""
    try:
        last = model.outputs[0]._keras_history.operation
    except AttributeError:
        last = model.layers[-1]
    while hasattr(last, "layers") and last.layers:   # a nested model as the last layer: its own last layer
        last = last.layers[-1]
    act = getattr(last, "activation", None)
    if type(last).__name__ == "Softmax" or getattr(act, "__name__", "") == "softmax":
        return "probabilities"
    return "logits"


def _tools() -> dict:
    import keras
    import tensorflow as tf

    versions = {"python": platform.python_version(), "tensorflow": tf.__version__, "keras": keras.__version__,
                "numpy": np.__version__}
    for dist in ("edgesplit", "ai-edge-litert", "msgspec"):
        try:
            versions[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            pass
    return versions


def _prepare_out(out) -> Path:
    out = Path(out).expanduser()
    if out.name.endswith((".tar.gz", ".tgz")):
        raise UsageError(f"--out {out} names a tarball; give the bundle directory",
                         fix=f"use --out {str(out).removesuffix('.tar.gz').removesuffix('.tgz')} "
                             f"(the .tar.gz is written beside it)")
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} is a file, not a directory", fix="give a new directory name for the bundle")
    if out.is_dir() and any(out.iterdir()) and not (out / mf.MANIFEST_NAME).is_file():
        raise UsageError(f"--out {out} is a directory that holds other files, not a bundle; refusing to overwrite it",
                         fix="give a new or empty directory for the bundle")
    for parent in out.absolute().parents:
        if parent.exists():
            if not parent.is_dir():
                raise UsageError(f"cannot create {out}: {parent} is a file", fix="give another --out")
            break
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UsageError(f"cannot create {out.parent}: {exc.strerror}", fix="give another --out") from None
    if not os.access(out.parent, os.W_OK):
        raise UsageError(f"cannot write into {out.parent}", fix="give a directory you can write to")
    return out


def _fingerprint(arrays) -> str:
    """A digest of arrays' contents (cache key that cannot confuse two datasets or two sets of weights)."""
    h = hashlib.blake2b(digest_size=16)
    for a in arrays:
        a = np.ascontiguousarray(a)
        h.update(str((a.dtype, a.shape)).encode())
        h.update(a.data)
    return h.hexdigest()


def _calibration_images(calibration, x_train) -> tuple[np.ndarray, int]:
    """``calibration`` training images: an array as given, a count (seeded choice), or None (500, or all)."""
    if isinstance(calibration, np.ndarray):
        if len(calibration) < 1:
            raise UsageError("no calibration images given", fix="pass at least one training image")
        return np.asarray(calibration, np.float32), len(calibration)
    if calibration is None:
        n = min(DEFAULT_CALIBRATION, len(x_train))
        if n < DEFAULT_CALIBRATION:
            log.info("calibrating on all %d training images", n)
    else:
        n = int(calibration)
        if n < 1:
            raise UsageError(f"--calibration must be at least 1, got {n}", fix="use e.g. --calibration 500")
        if n > len(x_train):
            from converter.userdata import DataError

            raise DataError(f"--calibration {n} asks for more images than the {len(x_train)} training images there "
                            "are", fix=f"use --calibration {len(x_train)} or fewer (or omit it: up to "
                                       f"{DEFAULT_CALIBRATION}), or give more images")
    idx = np.sort(np.random.default_rng(CALIBRATION_SEED).choice(len(x_train), size=n, replace=False))
    return np.asarray(x_train[idx], np.float32), n


def convert(model, cut: str, quant: str = "int8", calibration=None, out=None, min_agreement: float | None = None,
            parity_n: int = 2000, *, data=None, labels=None, name: str | None = None, keras_tail: bool = False,
            preprocess=None, test_split: float | None = None, seed: int = 0,
            progress: bool = True) -> ConvertResult:
    """Split ``model`` at ``cut``, quantize, write the bundle at ``out`` (+ ``out.tar.gz``), check parity.

    ``model``: zoo name, ``.keras`` path or ``keras.Model``.  ``calibration``: number of
    training images (default 500, or all when there are fewer; or an array of them) for int8.
    ``data``: the ``--data`` SPEC (a folder or .npz, see :mod:`converter.userdata`, split with
    ``test_split`` and ``seed``), or an object with ``x_train, y_train, x_test, y_test`` already
    scaled as the model's input; ``preprocess``: the ``--preprocess`` text (see
    :mod:`converter.inputspec`); ``name``: the model name written
    in the manifest (a zoo name given with a ``keras.Model`` brings that entry's data and labels).  Raises
    UsageError for user mistakes and CheckFailed when parity is under ``min_agreement``
    (default 0.99 for paper-cnn); a failed bundle stays in ``out`` for inspection, without tarball.
    """
    t_start = time.perf_counter()
    times = {}
    if quant not in mf.QUANT_MODES:
        raise UsageError(f"unknown quantization {quant!r}", fix=f"use one of: {', '.join(mf.QUANT_MODES)}")
    if out is None:
        raise UsageError("no output directory given", fix="pass --out DIR")
    if min_agreement is not None and not 0.0 <= min_agreement <= 1.0:
        raise UsageError(f"--min-agreement must be a fraction between 0 and 1, got {min_agreement}",
                         fix="e.g. --min-agreement 0.99")
    if int(parity_n) < 1:
        raise UsageError(f"--parity-n must be at least 1, got {parity_n}", fix="use e.g. --parity-n 2000")
    out = _prepare_out(out)

    log.info("convert: loading %s", model if isinstance(model, (str, os.PathLike)) else getattr(model, "name", model))
    src = _resolve(model, data, labels, name, preprocess=preprocess, test_split=test_split, seed=seed,
                   progress=progress)
    keras_model = src.model
    if min_agreement is None:
        min_agreement = DEFAULT_MIN_AGREEMENT.get(src.name)
    times["load"] = time.perf_counter() - t_start

    t = time.perf_counter()
    try:
        from converter import cuts as cuts_mod
    except ImportError:  # cut analysis not installed: split_model checks the cut itself
        cuts_mod = None
    if cuts_mod is not None and hasattr(cuts_mod, "find_cut"):
        cut = cuts_mod.find_cut(keras_model, cut).name
    log.info("convert: splitting %s at %s", src.name, cut)
    # a hardened model (converter.defended): the clean head, the defence the device applies, the tail
    split, defence = defended.split_for_bundle(keras_model, cut, np.asarray(src.data.x_test[:16], np.float32))
    calib_x, calib_n = _calibration_images(calibration, src.data.x_train) if quant == "int8" else (None, 0)
    times["split"] = time.perf_counter() - t

    t = time.perf_counter()
    log.info("convert: converting head and tail to TFLite (%s%s)", quant,
             f", calibrating on {calib_n} training images" if quant == "int8" else "")
    converted = convert_split(split, quant, calib_x if quant == "int8" else None,
                              tail_calibration=defended.tail_calibration(split, defence, calib_x))
    times["quantize"] = time.perf_counter() - t

    t = time.perf_counter()
    n_test = len(src.data.x_test)
    if parity_n > n_test:
        log.warning("only %d test images: parity runs on all of them", n_test)
    n = min(int(parity_n), n_test)
    draft = mf.Manifest(
        schema_version=mf.SCHEMA_VERSION, bundle_id="0" * 16, model=src.name, cut=split.cut, quant=quant,
        input=msgspec.structs.replace(src.input.spec, dtype=converted.input_dtype),
        feature=mf.FeatureSpec(shape=split.feature_shape, dtype=converted.feature_dtype,
                               scale=converted.feature_scale, zero_point=converted.feature_zero_point),
        output=mf.OutputSpec(shape=tuple(int(d) for d in keras_model.outputs[0].shape[1:]),
                             dtype=converted.output_dtype, kind=_output_kind(keras_model)),
        labels=src.labels, files={}, tools=_tools(),
        calibration=(mf.Calibration(n=calib_n, seed=CALIBRATION_SEED,
                                    source="images given by the caller" if isinstance(calibration, np.ndarray)
                                    else f"{src.data_name} training images")
                     if quant == "int8" else None),
        parity=None, dataset=src.dataset, source_model=src.source_model,
        defence=defence.spec(converted.head_scale, converted.head_zero_point) if defence is not None else None)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    staging.chmod(0o755)  # mkdtemp makes it private; a bundle is meant to be copied and served
    try:
        (staging / mf.HEAD_FILE).write_bytes(converted.head)
        (staging / mf.TAIL_FILE).write_bytes(converted.tail)
        if keras_tail:
            split.tail.save(staging / mf.TAIL_KERAS_FILE)
        mf.write_bundle(staging, draft)
        # the self-test a device (and a worker) runs before switching to this bundle: the real LiteRT
        # head and tail on seeded inputs, stored in probe.npz (runtime.probe)
        draft = msgspec.structs.replace(draft, probe=make_probe(mf.load_bundle(staging)))
        mf.write_bundle(staging, draft)
        times["write"] = time.perf_counter() - t

        t = time.perf_counter()
        log.info("convert: parity of the LiteRT head+tail against Keras on %d %s test images", n, src.data_name)
        x_test = np.asarray(src.data.x_test[:n], np.float32)
        y_test = np.asarray(src.data.y_test[:n])
        key = (_fingerprint([x_test]), _fingerprint(keras_model.get_weights()))
        cache = _KERAS_PRED.setdefault(keras_model, {})
        stochastic = draft.defence is not None and draft.defence.on_device
        if stochastic:  # the Keras model and the bundle under the same draws of the defence
            cache[key] = defended.keras_predict(split, defence, x_test)
        elif key not in cache:
            cache[key] = np.argmax(keras_model.predict(x_test, batch_size=256, verbose=0), axis=-1)
        result = parity_mod.run_parity(mf.load_bundle(staging), keras_model, x_test, y_test,
                                       min_agreement=min_agreement, keras_pred=cache[key],
                                       rng_seed=defended.PARITY_SEED if stochastic else None,
                                       source=f"{src.data_name} test images [0:{n}]", progress=progress)
        final = mf.write_bundle(staging, msgspec.structs.replace(draft, parity=result.to_manifest()))
        times["parity"] = time.perf_counter() - t

        t = time.perf_counter()
        tarball = out.parent / (out.name + ".tar.gz")
        if out.exists():
            shutil.rmtree(out)
        os.replace(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if tarball.exists():
        tarball.unlink()  # never leave a tarball that does not match the directory
    if result.passed:
        mf.write_tarball(out, tarball)
        with tempfile.TemporaryDirectory(prefix="edgesplit-verify-") as tmp:
            mf.load_bundle(tarball, extract_to=tmp)  # the tarball opens and verifies like a user's copy
    times["pack"] = time.perf_counter() - t
    times["total"] = time.perf_counter() - t_start

    res = ConvertResult(bundle_dir=out, tarball=tarball if result.passed else None, manifest=final, parity=result,
                        head_bytes=len(converted.head), tail_bytes=len(converted.tail),
                        tarball_bytes=tarball.stat().st_size if result.passed else None,
                        requant_exact=converted.requant_exact, seconds=times, input_origin=src.input.origin,
                        split=src.split)
    log.info("convert: %s", result.summary())
    if not result.passed:
        raise CheckFailed(
            f"head+tail agree with the Keras model on only {100 * result.agreement:.2f} % of {result.n} test images "
            f"(required {100 * min_agreement:.2f} %); the bundle in {out} is marked failed and was not packed",
            fix="try --quant float16 or dynamic, more --calibration images, or another --cut; "
                "or lower --min-agreement if this is acceptable")
    return res

