"""``edgesplit convert``: model -> cut -> split -> TFLite -> bundle -> parity.

:func:`convert` loads a model (zoo name, ``.keras`` path or a ``keras.Model``),
splits it at a cut, converts head and tail with the chosen quantization,
writes the bundle directory (``manifest.json``, ``head.tflite``,
``tail.tflite``), checks parity with a real LiteRT interpreter on held-out
test images, records the result in the manifest, and packs ``DIR.tar.gz``
beside the directory.  The format is in ``docs/bundle.md``.
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

log = logging.getLogger(__name__)

#: parity threshold applied when the user sets none, by model name
DEFAULT_MIN_AGREEMENT = {"paper-cnn": 0.99}
CALIBRATION_SEED = 0

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
            f"input    {list(m.input.shape)} {m.input.dtype}  ({m.input.preprocess.color_mode}, "
            f"(pixel - {m.input.preprocess.mean}) / {m.input.preprocess.std})",
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
    """A resolved model with the data and labels that go with it."""

    model: object
    name: str
    data: object          # x_train, y_train, x_test, y_test
    data_name: str
    labels: list[str]
    value_range: tuple[float, float]


def _resolve(model, data, labels, name=None) -> _Source:
    """Model argument -> keras model, name, datasets and labels (zoo entries bring their own)."""
    import keras

    from converter import zoo

    entry = None
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
            name = name or (entry.name if entry is not None else stem)
    value_range = (0.0, 1.0)
    data_name = "given"
    if entry is not None:
        value_range = tuple(float(v) for v in entry.input_spec.get("range", value_range))
        labels = list(labels) if labels is not None else list(entry.labels)
        if data is None:
            data, data_name = zoo.load_dataset(entry), entry.dataset
    _check_image_input(keras_model)
    n_out = int(np.prod(keras_model.outputs[0].shape[1:]))
    if data is None:
        if tuple(keras_model.inputs[0].shape[1:]) == (28, 28, 1) and n_out == 10:
            from converter import datasets

            data, data_name = datasets.load_mnist(), "mnist"
            labels = list(labels) if labels is not None else list(datasets.LABELS)
        else:
            raise UsageError(f"no calibration and test images are known for model {name!r} (input "
                             f"{tuple(keras_model.inputs[0].shape[1:])}, {n_out} outputs)",
                             fix="use a zoo model, an MNIST-shaped model (28x28x1 -> 10), or call "
                                 "converter.bundle.convert(..., data=Mnist-like(x_train, y_train, x_test, y_test))")
    if labels is None:
        labels = [str(i) for i in range(n_out)]
    return _Source(keras_model, name, data, data_name, [str(v) for v in labels], value_range)


def _check_image_input(model) -> None:
    if len(model.inputs) != 1:
        raise UsageError(f"model {model.name!r} has {len(model.inputs)} inputs; a bundle's head takes one image",
                         fix="convert a model with a single image input (height, width, 1 or 3 channels)")
    shape = tuple(model.inputs[0].shape[1:])
    dtype = str(getattr(model.inputs[0], "dtype", "float32"))
    if len(shape) != 3 or shape[-1] not in (1, 3) or None in shape or "float" not in dtype:
        raise UsageError(f"model {model.name!r} takes input of shape {shape} ({dtype}), which is not an image: "
                         f"edgesplit needs (height, width, 1 or 3 channels) float input",
                         fix="convert an image model (e.g. `edgesplit convert paper-cnn ...`)")


def _preprocess(shape, value_range) -> mf.Preprocess:
    """Pixels 0..255 -> value_range, as (pixel - mean) / std."""
    lo, hi = value_range
    std = 255.0 / (hi - lo)
    mean = 0.0 - lo * std + 0.0  # + 0.0: no -0.0 in the manifest
    h, w, c = shape
    return mf.Preprocess(color_mode="L" if c == 1 else "RGB", resize=(w, h), resample="bilinear",
                         mean=float(mean), std=float(std), value_range=(float(lo), float(hi)))


def _output_kind(model) -> str:
    last = model.layers[-1]
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
    if isinstance(calibration, np.ndarray):
        if len(calibration) < 1:
            raise UsageError("no calibration images given", fix="pass at least one training image")
        return np.asarray(calibration, np.float32), len(calibration)
    n = int(calibration)
    if n < 1:
        raise UsageError(f"--calibration must be at least 1, got {n}", fix="use e.g. --calibration 500")
    if n > len(x_train):
        log.warning("only %d training images: calibrating on all of them", len(x_train))
        n = len(x_train)
    idx = np.sort(np.random.default_rng(CALIBRATION_SEED).choice(len(x_train), size=n, replace=False))
    return np.asarray(x_train[idx], np.float32), n


def convert(model, cut: str, quant: str = "int8", calibration=500, out=None, min_agreement: float | None = None,
            parity_n: int = 2000, *, data=None, labels=None, name: str | None = None, keras_tail: bool = False,
            progress: bool = True) -> ConvertResult:
    """Split ``model`` at ``cut``, quantize, write the bundle at ``out`` (+ ``out.tar.gz``), check parity.

    ``model``: zoo name, ``.keras`` path or ``keras.Model``.  ``calibration``: number of
    training images (or an array of them) for int8.  ``data``: an object with
    ``x_train, y_train, x_test, y_test`` for models outside the zoo; ``name``: the model name written
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
    src = _resolve(model, data, labels, name)
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
        input=mf.InputSpec(shape=tuple(int(d) for d in keras_model.inputs[0].shape[1:]),
                           dtype=converted.input_dtype,
                           preprocess=_preprocess(keras_model.inputs[0].shape[1:], src.value_range)),
        feature=mf.FeatureSpec(shape=split.feature_shape, dtype=converted.feature_dtype,
                               scale=converted.feature_scale, zero_point=converted.feature_zero_point),
        output=mf.OutputSpec(shape=tuple(int(d) for d in keras_model.outputs[0].shape[1:]),
                             dtype=converted.output_dtype, kind=_output_kind(keras_model)),
        labels=src.labels, files={}, tools=_tools(),
        calibration=(mf.Calibration(n=calib_n, seed=CALIBRATION_SEED,
                                    source="images given by the caller" if isinstance(calibration, np.ndarray)
                                    else f"{src.data_name} training images")
                     if quant == "int8" else None),
        parity=None,
        defence=defence.spec(converted.head_scale, converted.head_zero_point) if defence is not None else None)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    staging.chmod(0o755)  # mkdtemp makes it private; a bundle is meant to be copied and served
    try:
        (staging / mf.HEAD_FILE).write_bytes(converted.head)
        (staging / mf.TAIL_FILE).write_bytes(converted.tail)
        if keras_tail:
            split.tail.save(staging / mf.TAIL_KERAS_FILE)
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
                        requant_exact=converted.requant_exact, seconds=times)
    log.info("convert: %s", result.summary())
    if not result.passed:
        raise CheckFailed(
            f"head+tail agree with the Keras model on only {100 * result.agreement:.2f} % of {result.n} test images "
            f"(required {100 * min_agreement:.2f} %); the bundle in {out} is marked failed and was not packed",
            fix="try --quant float16 or dynamic, more --calibration images, or another --cut; "
                "or lower --min-agreement if this is acceptable")
    return res

