"""The bundle contract: ``manifest.json``, its validation, reading and writing.

A bundle is a directory (and its ``.tar.gz``) holding ``manifest.json``,
``head.tflite``, ``tail.tflite`` and optionally ``tail.keras``.  The manifest
says what the head expects (image preprocessing a device can follow with
Pillow), what crosses the network (the feature tensor and its quantization),
what the tail answers, and the sha256 of every file.  Its ``bundle_id`` is
a hash of its own content, so it changes whenever any file or field does.

This module is the one place the format is defined (docs/bundle.md describes
it for humans); ``protocol.archive`` reads and writes the ``.tar.gz`` for it.  It
imports no TensorFlow: devices and clouds use it as is.
"""
from __future__ import annotations

import atexit
import hashlib
import json
import logging
import math
import os
import re
import shlex
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Iterable, Literal, Optional

import msgspec
import numpy as np

from protocol import archive, tensors
from protocol.defence import DefenceSpec
from protocol.errors import BundleError
from protocol.image import InputSpec, Preprocess  # noqa: F401  (part of the manifest: mf.InputSpec, mf.Preprocess)
from protocol.probe import Probe

log = logging.getLogger(__name__)

#: written by this edgesplit; 2 added input.preprocess.fit/crop, dataset and source_model
SCHEMA_VERSION = 2
#: read by this edgesplit (a version 1 manifest is a version 2 one without the new keys)
READ_VERSIONS = (1, 2)
MANIFEST_NAME = "manifest.json"
HEAD_FILE = "head.tflite"
TAIL_FILE = "tail.tflite"
TAIL_KERAS_FILE = "tail.keras"
QUANT_MODES = ("int8", "float16", "dynamic", "none")

# Bounds for reading untrusted bundles (a .tar.gz may come from anywhere).
MAX_MANIFEST_BYTES = 1 << 20
MAX_FILE_BYTES = 1 << 30
MAX_TOTAL_BYTES = 2 << 30
MAX_MEMBERS = 64

_Hex16 = Annotated[str, msgspec.Meta(pattern=r"^[0-9a-f]{16}$")]
_Sha256 = Annotated[str, msgspec.Meta(pattern=r"^[0-9a-f]{64}$")]
_FileName = Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9_][A-Za-z0-9._-]{0,127}$")]
_Dim = Annotated[int, msgspec.Meta(ge=1, le=1 << 24)]
_Fraction = Annotated[float, msgspec.Meta(ge=0.0, le=1.0)]
_FILE_NAME_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._-]{0,127}$")

_REBUILD = "re-run `edgesplit convert` to rebuild the bundle"


# ------------------------------------------------------------------ schema

_FLOAT_DTYPES = ("float16", "float32")


class FeatureSpec(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """The tensor the head outputs and the device sends (without the batch axis)."""

    shape: tuple[_Dim, ...]
    dtype: Literal["int8", "uint8", "float16", "float32"]
    scale: Optional[float] = None
    zero_point: Optional[int] = None

    def __post_init__(self):
        if not self.shape:
            raise ValueError("shape must have at least one dimension")
        if self.dtype in _FLOAT_DTYPES:
            if self.scale is not None or self.zero_point is not None:
                raise ValueError(f"a {self.dtype} feature has no scale/zero_point (set both to null)")
        else:
            if self.scale is None or self.zero_point is None:
                raise ValueError(f"a {self.dtype} feature needs scale and zero_point")
            if not (math.isfinite(self.scale) and self.scale > 0):
                raise ValueError(f"scale must be a finite number > 0, got {self.scale!r}")
            lo, hi = tensors.INT_RANGES[self.dtype]
            if not lo <= self.zero_point <= hi:
                raise ValueError(f"zero_point {self.zero_point} is outside the {self.dtype} range {lo}..{hi}")

    @property
    def quantized(self) -> bool:
        return self.dtype not in _FLOAT_DTYPES

    @property
    def elements(self) -> int:
        return int(np.prod(self.shape))

    @property
    def nbytes(self) -> int:
        """Bytes of one feature tensor (batch of one) on the wire, before compression."""
        return self.elements * np.dtype(self.dtype).itemsize

    def check(self, tensor: np.ndarray) -> np.ndarray:
        """Return ``tensor`` if its dtype and shape (with or without a batch axis) match, else ValueError."""
        t = np.asarray(tensor)
        if t.dtype != np.dtype(self.dtype):
            raise ValueError(f"feature dtype is {t.dtype}, the bundle expects {self.dtype}")
        if tuple(t.shape) != tuple(self.shape) and tuple(t.shape[1:]) != tuple(self.shape):
            raise ValueError(f"feature shape is {list(t.shape)}, the bundle expects {list(self.shape)} "
                             f"(optionally with a batch axis first)")
        return t

    def dequantize(self, tensor: np.ndarray) -> np.ndarray:
        """Feature as sent -> float32 tail input (the identity cast for float features)."""
        t = np.asarray(tensor)
        if not self.quantized:
            return t.astype(np.float32, copy=False)
        return tensors.dequantize(t, self.scale, self.zero_point)

    def quantize(self, x: np.ndarray) -> np.ndarray:
        """Float feature -> the dtype sent (what the head's last op does)."""
        if not self.quantized:
            return np.asarray(x, dtype=self.dtype)
        return tensors.quantize(x, self.scale, self.zero_point, self.dtype)


class OutputSpec(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """What the tail answers for one input (without the batch axis)."""

    shape: tuple[_Dim, ...]
    dtype: Literal["float32"]
    kind: Literal["probabilities", "logits", "values"]


class Calibration(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Images used to calibrate int8 quantization: always training images."""

    n: Annotated[int, msgspec.Meta(ge=1)]
    source: str
    seed: int


class Dataset(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """The labelled images calibration and parity used, and how they were split (schema 2).

    ``test_split`` is the fraction held out by a seeded, per-class split when the source
    had one set of images; ``None`` when it brought its own train and test sets.
    Calibration (and an auditor's attacker) only ever see the train side; parity (and the
    attacked images) only the test side.
    """

    source: str
    kind: Literal["folders", "labels.csv", "npz", "arrays", "zoo"]
    n_train: Annotated[int, msgspec.Meta(ge=0)]
    n_test: Annotated[int, msgspec.Meta(ge=0)]
    test_split: Optional[Annotated[float, msgspec.Meta(gt=0.0, lt=1.0)]] = None
    seed: int = 0


class SourceModel(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """The Keras file the bundle was made from, so the auditor can find it again (schema 2)."""

    file: str
    sha256: _Sha256


class Parity(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Top-1 comparison of the real TFLite head+tail with the Keras model on held-out images."""

    n: Annotated[int, msgspec.Meta(ge=1)]
    source: str
    agreement: _Fraction
    accuracy: Optional[_Fraction]
    keras_accuracy: Optional[_Fraction]
    min_agreement: Optional[_Fraction]
    passed: bool
    interpreter: str


class Manifest(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Everything a device, a cloud worker or an auditor needs to know about a bundle."""

    schema_version: int
    bundle_id: _Hex16
    model: str
    cut: str
    quant: Literal["int8", "float16", "dynamic", "none"]
    input: InputSpec
    feature: FeatureSpec
    output: OutputSpec
    labels: list[str]
    files: dict[_FileName, _Sha256]
    tools: dict[str, str]
    calibration: Optional[Calibration] = None
    parity: Optional[Parity] = None
    defence: Optional[DefenceSpec] = None   # schema 2: applied on the device before sending (protocol.defence)
    dataset: Optional[Dataset] = None              # schema 2
    source_model: Optional[SourceModel] = None     # schema 2
    probe: Optional[Probe] = None                  # schema 2: the self-test of a device and a worker (protocol.probe)

    def __post_init__(self):
        if self.quant == "int8" and not self.feature.quantized:
            raise ValueError(f"quant is int8 but the feature dtype is {self.feature.dtype}")
        if self.quant != "int8" and self.feature.quantized:
            raise ValueError(f"quant is {self.quant} but the feature dtype is {self.feature.dtype}")
        if self.labels and len(self.output.shape) == 1 and len(self.labels) != self.output.shape[0]:
            raise ValueError(f"{len(self.labels)} labels for an output of shape {list(self.output.shape)}")
        if self.defence and self.defence.on_device and self.feature.quantized and self.defence.head_scale is None:
            raise ValueError("a defence applied on the device needs the head's head_scale and head_zero_point")

    def to_dict(self) -> dict:
        """The manifest as plain JSON types, in field order."""
        return msgspec.to_builtins(self)

    def convert_command(self, out: str | os.PathLike | None = None) -> str:
        """The command that makes this bundle (for error messages that say how to rebuild it)."""
        if self.defence is not None:
            return self.defence.harden_command(self.model, self.cut, out)
        model = self.source_model.file if self.source_model is not None else self.model
        cmd = f"edgesplit convert {shlex.quote(model)} --cut {self.cut} --quant {self.quant}"
        if self.dataset is not None and self.dataset.kind in ("folders", "labels.csv", "npz"):
            cmd += f" --data {shlex.quote(self.dataset.source)}"
            if self.dataset.test_split is not None:
                cmd += f" --test-split {self.dataset.test_split:g}"
            if self.dataset.seed:
                cmd += f" --data-seed {self.dataset.seed}"
            cmd += f" --preprocess {self.input.preprocess.to_option()}"
        if self.calibration is not None and self.quant == "int8":
            cmd += f" --calibration {self.calibration.n}"
        return cmd + (f" --out {out}" if out is not None else "")


# ------------------------------------------------------------- validation

def _canonical(obj: dict) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False,
                      allow_nan=False).encode("utf-8")


def compute_bundle_id(manifest: dict | Manifest) -> str:
    """First 16 hex chars of sha256 over the canonical JSON of the manifest without ``bundle_id``.

    Canonical JSON: keys sorted, no whitespace, UTF-8, numbers as Python's ``json`` writes them.
    """
    d = manifest.to_dict() if isinstance(manifest, Manifest) else dict(manifest)
    d.pop("bundle_id", None)
    return hashlib.sha256(_canonical(d)).hexdigest()[:16]


def parse_manifest(raw: dict | bytes | str, where: str = MANIFEST_NAME) -> Manifest:
    """Validate a manifest (a dict, or JSON text) and return it; BundleError saying what is wrong."""
    if isinstance(raw, (bytes, str)):
        try:
            raw = json.loads(raw)
        except (ValueError, UnicodeDecodeError) as exc:
            raise BundleError(f"{where} is not valid JSON ({exc})", fix=_REBUILD) from None
    if not isinstance(raw, dict):
        raise BundleError(f"{where} must hold a JSON object, found {type(raw).__name__}", fix=_REBUILD)
    if "schema_version" not in raw:
        raise BundleError(f"{where} is missing the key `schema_version`", fix=_REBUILD)
    version = raw["schema_version"]
    if not isinstance(version, int) or isinstance(version, bool):
        raise BundleError(f"{where}: `schema_version` must be an integer, found {version!r}", fix=_REBUILD)
    if version not in READ_VERSIONS:
        newer = version > SCHEMA_VERSION
        raise BundleError(
            f"{where} has schema_version {version}; this edgesplit reads schema_version "
            f"{' and '.join(str(v) for v in READ_VERSIONS)}",
            fix="upgrade edgesplit on this machine" if newer else
            "re-run `edgesplit convert` with this edgesplit to rebuild the bundle")
    try:
        return msgspec.convert(raw, Manifest)
    except msgspec.ValidationError as exc:
        raise BundleError(f"{where} is not a valid manifest: {_explain(exc)}", fix=_REBUILD) from None


def _explain(exc: msgspec.ValidationError) -> str:
    # msgspec says "Object missing required field `cut` - at `$`"; say "missing key" like a person would.
    text = str(exc)
    m = re.match(r"Object missing required field `(.+?)`(?: - at `\$(.*)`)?$", text)
    if m:
        where = m.group(2) or ""
        return f"missing key `{where.lstrip('.') + '.' if where else ''}{m.group(1)}`"
    return text.replace("`$.", "`").replace("`$`", "the top level")


def read_manifest(path: str | os.PathLike) -> Manifest:
    """Read and validate one ``manifest.json`` (no file hashes checked; see :func:`load_bundle`)."""
    path = Path(path)
    try:
        size = path.stat().st_size
        if size > MAX_MANIFEST_BYTES:
            raise BundleError(f"{path} is {size} bytes, more than a manifest can be ({MAX_MANIFEST_BYTES})",
                              fix=_REBUILD)
        data = path.read_bytes()
    except FileNotFoundError:
        raise BundleError(f"{path} does not exist", fix=_REBUILD) from None
    return parse_manifest(data, where=str(path))


# ------------------------------------------------------------------ bundles

@dataclass(frozen=True)
class Bundle:
    """A verified bundle on disk: every file present and matching its sha256."""

    root: Path
    manifest: Manifest
    source: Path

    @property
    def bundle_id(self) -> str:
        return self.manifest.bundle_id

    @property
    def head_path(self) -> Path:
        return self.root / HEAD_FILE

    @property
    def tail_path(self) -> Path:
        return self.root / TAIL_FILE

    @property
    def tail_keras_path(self) -> Path | None:
        return self.root / TAIL_KERAS_FILE if TAIL_KERAS_FILE in self.manifest.files else None

    @property
    def input(self) -> InputSpec:
        return self.manifest.input

    @property
    def feature(self) -> FeatureSpec:
        return self.manifest.feature

    @property
    def output(self) -> OutputSpec:
        return self.manifest.output

    @property
    def labels(self) -> list[str]:
        return self.manifest.labels


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _archive_limits() -> archive.Limits:
    # read at each call: the bounds above are this module's to set
    return archive.Limits(_FILE_NAME_RE, MANIFEST_NAME, MAX_MANIFEST_BYTES, MAX_FILE_BYTES, MAX_TOTAL_BYTES,
                          MAX_MEMBERS)


def load_bundle(path: str | os.PathLike, *, extract_to: str | os.PathLike | None = None) -> Bundle:
    """Open a bundle directory or its ``.tar.gz`` and verify every file's sha256.

    A tarball is extracted (safely: regular files only, no paths outside the
    bundle, bounded sizes) into ``extract_to`` or a temporary directory removed
    at exit.  Raises :class:`BundleError` naming the file that is wrong.
    """
    source = Path(path)
    if not source.exists():
        raise BundleError(f"no bundle at {source}",
                          fix="check the path, or make one with `edgesplit convert MODEL --cut LAYER --out DIR`")
    if source.is_dir():
        root = source
    elif source.name.endswith((".tar.gz", ".tgz")):
        if extract_to is None:
            root = Path(tempfile.mkdtemp(prefix="edgesplit-bundle-"))
            atexit.register(shutil.rmtree, root, True)
        else:
            root = Path(extract_to)
            root.mkdir(parents=True, exist_ok=True)
        archive.extract(source, root, _archive_limits())
    elif source.name == MANIFEST_NAME:
        root = source.parent
    else:
        raise BundleError(f"{source} is neither a bundle directory nor a .tar.gz bundle",
                          fix="pass the directory `edgesplit convert` wrote, or the .tar.gz beside it")

    manifest_path = root / MANIFEST_NAME
    if not manifest_path.is_file():
        raise BundleError(f"{source} has no {MANIFEST_NAME}: it is not a bundle (or it is incomplete)",
                          fix="pass the directory `edgesplit convert` wrote, or the .tar.gz beside it")
    manifest = read_manifest(manifest_path)
    rebuild = f"re-run `{manifest.convert_command(source if source.is_dir() else None)}` to rebuild the bundle"

    try:
        expected = compute_bundle_id(json.loads(manifest_path.read_bytes()))
    except ValueError as exc:  # e.g. NaN, which canonical JSON cannot hold
        raise BundleError(f"{MANIFEST_NAME} in {source} cannot be hashed: {exc}", fix=rebuild) from None
    if expected != manifest.bundle_id:
        raise BundleError(f"{MANIFEST_NAME} in {source} was modified after the bundle was made: its bundle_id "
                          f"is {manifest.bundle_id} but its content hashes to {expected}", fix=rebuild)
    for required in (HEAD_FILE, TAIL_FILE):
        if required not in manifest.files:
            raise BundleError(f"{MANIFEST_NAME} in {source} lists no {required}", fix=rebuild)
    for name, digest in manifest.files.items():
        fp = root / name
        if not fp.is_file():
            raise BundleError(f"{name} is missing from the bundle {source}", fix=rebuild)
        if sha256_file(fp) != digest:
            raise BundleError(f"{name} in {source} does not match its sha256 in {MANIFEST_NAME} "
                              f"(the file was changed or truncated)", fix=rebuild)
    if manifest.parity is not None and not manifest.parity.passed:
        log.warning("bundle %s failed its parity check (agreement %.4f < %s)", manifest.bundle_id,
                    manifest.parity.agreement, manifest.parity.min_agreement)
    log.debug("loaded bundle %s from %s", manifest.bundle_id, source)
    return Bundle(root=root, manifest=manifest, source=source)


# ------------------------------------------------------------------ writing

def write_bundle(root: str | os.PathLike, manifest: Manifest, files: Iterable[str] | None = None) -> Manifest:
    """Hash ``files`` of ``root`` (default: every file but the manifest), set ``files`` and ``bundle_id``,
    validate, and write ``root/manifest.json`` atomically.  Returns the final manifest.

    ``manifest`` is a draft: its ``files`` and ``bundle_id`` are replaced.
    """
    root = Path(root)
    names = sorted(files) if files is not None else sorted(
        p.name for p in root.iterdir() if p.is_file() and p.name != MANIFEST_NAME and not p.name.startswith("."))
    hashes = {}
    for name in names:
        if not _FILE_NAME_RE.match(name) or name == MANIFEST_NAME:
            raise ValueError(f"write_bundle: {name!r} cannot be a bundle file name")
        hashes[name] = sha256_file(root / name)
    draft = msgspec.structs.replace(manifest, files=hashes, bundle_id="0" * 16, schema_version=SCHEMA_VERSION)
    # Normalise through JSON so the hash is over exactly what lands on disk.
    d = json.loads(json.dumps(draft.to_dict(), allow_nan=False))
    d["bundle_id"] = compute_bundle_id(d)
    final = parse_manifest(d, where=str(root / MANIFEST_NAME))
    text = _pretty_json(final.to_dict()) + "\n"
    tmp = root / f".{MANIFEST_NAME}.tmp"
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, root / MANIFEST_NAME)
    return final


def _pretty_json(obj, indent: str = "") -> str:
    """Indented JSON for people, with lists of numbers and strings kept on one line."""
    inner = indent + "  "
    if isinstance(obj, dict) and obj:
        items = [f"{inner}{json.dumps(k, ensure_ascii=False)}: {_pretty_json(v, inner)}" for k, v in obj.items()]
        return "{\n" + ",\n".join(items) + "\n" + indent + "}"
    if isinstance(obj, list) and any(isinstance(v, (dict, list)) for v in obj):
        return "[\n" + ",\n".join(inner + _pretty_json(v, inner) for v in obj) + "\n" + indent + "]"
    return json.dumps(obj, ensure_ascii=False, allow_nan=False)


def write_tarball(root: str | os.PathLike, dest: str | os.PathLike | None = None) -> Path:
    """Pack a written bundle into ``dest`` (default: ``<root>.tar.gz`` beside it), byte-reproducibly.

    Entries are ``<root name>/<file>``: the manifest and the files it lists, sorted,
    with zeroed times and owners, so the same bundle always gives the same tarball.
    """
    root = Path(root)
    manifest = read_manifest(root / MANIFEST_NAME)
    dest = Path(dest) if dest is not None else root.parent / (root.name + ".tar.gz")
    return archive.pack(root, [MANIFEST_NAME, *manifest.files], dest)
