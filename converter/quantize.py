"""Convert a split's head and tail to TFLite in one of four quantization modes.

* ``int8``: full-integer.  The head takes float32 images (its first op
  quantizes them) and outputs **int8**: that is the tensor sent, and its
  scale/zero point go into the manifest.  The tail takes a **float32** input:
  the receiver dequantizes the int8 features with the head's scale/zero point
  (``protocol.manifest.FeatureSpec.dequantize``) and the tail's first op
  quantizes them again; both are calibrated on the same tensor, so in practice
  the tail's input parameters equal the head's and the round trip is exact
  (``Converted.requant_exact`` says whether it is).  Calibration uses
  training images only.
* ``float16``: weights stored as float16; float32 in and out.
* ``dynamic``: dynamic-range quantization (int8 weights, float activations).
* ``none``: plain float32.
"""
from __future__ import annotations

import contextlib
import logging
import os
import re
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass

import numpy as np

from protocol.errors import CheckFailed, UsageError
from protocol.manifest import QUANT_MODES

log = logging.getLogger(__name__)


@dataclass
class Converted:
    """TFLite flatbuffers of a head and tail, and what the head sends."""

    quant: str
    head: bytes
    tail: bytes
    feature_dtype: str
    feature_scale: float | None
    feature_zero_point: int | None
    input_dtype: str
    output_dtype: str
    requant_exact: bool | None
    seconds: float
    head_scale: float | None = None        # the head's own output quantization (differs from the
    head_zero_point: int | None = None     # feature's when a defence runs between head and wire)


@contextlib.contextmanager
def quiet_native_output():
    """Route what TensorFlow's converter prints (C++ and Python) to the debug log instead of the terminal."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    with tempfile.TemporaryFile(mode="w+b") as sink:
        os.dup2(sink.fileno(), 1)
        os.dup2(sink.fileno(), 2)
        try:
            with contextlib.redirect_stdout(sys.__stdout__), contextlib.redirect_stderr(sys.__stderr__):
                yield
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            os.close(saved[0])
            os.close(saved[1])
            sink.seek(0)
            text = sink.read().decode("utf-8", "replace").strip()
            if text:
                log.debug("converter output:\n%s", text[-4000:])


def to_tflite(model, quant: str, representative: np.ndarray | None = None, int8_output: bool = False) -> bytes:
    """One Keras model -> TFLite flatbuffer.  ``representative`` is needed for ``int8``."""
    import tensorflow as tf

    if quant not in QUANT_MODES:
        raise UsageError(f"unknown quantization {quant!r}", fix=f"use one of: {', '.join(QUANT_MODES)}")
    converter = tf.lite.TFLiteConverter.from_keras_model(model)
    if quant == "int8":
        if representative is None or len(representative) == 0:
            raise UsageError("int8 quantization needs calibration images", fix="pass --calibration N with N >= 1")
        data = np.asarray(representative, dtype=np.float32)

        def samples():
            for i in range(len(data)):
                yield [data[i:i + 1]]

        converter.optimizations = [tf.lite.Optimize.DEFAULT]
        converter.representative_dataset = samples
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
        converter.inference_input_type = tf.float32
        converter.inference_output_type = tf.int8 if int8_output else tf.float32
    elif quant == "float16":
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
        converter.target_spec.supported_types = [tf.float16]
    elif quant == "dynamic":
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
    try:
        with quiet_native_output(), warnings.catch_warnings():
            # "Statistics for quantized inputs were expected": our float input is quantized inside the model
            warnings.filterwarnings("ignore", message="Statistics for quantized inputs")
            return converter.convert()
    except Exception as exc:  # the converter raises many types; say which model and mode failed
        unsupported = unsupported_layers(model, str(exc))
        if unsupported:
            raise UsageError(
                f"{model.name!r} cannot be converted to TFLite ({quant}): "
                + "; ".join(f"layer {layer!r} ({kind}) uses {', '.join(ops)}" for layer, kind, ops in unsupported)
                + ", which TFLite's built-in ops do not have. edgesplit converts models made of built-in ops: "
                  + SUPPORTED_LAYERS,
                fix="replace those layers with built-in ones (e.g. an approximate GELU instead of erf) and "
                    "retrain the model") from None
        first = str(exc).strip().splitlines()[0][:400] if str(exc).strip() else type(exc).__name__
        raise CheckFailed(f"TFLite conversion of {model.name!r} ({quant}) failed: {first}",
                          fix="try another --quant mode or another --cut; run with -v for the converter's log") \
            from exc


SUPPORTED_LAYERS = ("Conv2D, DepthwiseConv2D, SeparableConv2D, Dense, the pooling layers, BatchNormalization, "
                    "ReLU/ReLU6/sigmoid/tanh/softmax/hard-swish activations, Add, Multiply, Concatenate, Reshape, "
                    "Flatten, Dropout, ZeroPadding2D, Rescaling and Normalization")
_OP_RE = re.compile(r"'tf\.(\w+)' op is neither a custom op nor a flex op")
_LOC_RE = re.compile(r'fused\["(\w+):", "([^"@]+)@')


def unsupported_layers(model, text: str) -> list[tuple[str, str, list[str]]]:
    """(layer name, layer class, [TF ops]) for each layer the converter's error blames, from its message.

    TFLite names an op it has no kernel for ("'tf.Erf' op is neither a custom op nor a flex op") and
    where it was made ("model/lambda_1/Erf"); the layer is the path part that names a layer of the model.
    """
    ops = _OP_RE.findall(text)
    if not ops:
        return []
    names = {layer.name: type(layer).__name__ for layer in _all_layers(model)}
    found: dict[str, tuple[str, list[str]]] = {}
    for op, path in _LOC_RE.findall(text):
        if op not in ops:
            continue
        layer = next((part for part in reversed(path.split("/")[:-1]) if part in names), None)
        if layer is None:
            layer = next((n for n in names if any(part.startswith(n) for part in path.split("/"))), "?")
        kind = names.get(layer, "?")
        entry = found.setdefault(layer, (kind, []))
        if op not in entry[1]:
            entry[1].append(op)
    if not found:
        return [("?", "?", sorted(set(ops)))]
    return [(layer, kind, ops_) for layer, (kind, ops_) in found.items()]


def _all_layers(model):
    for layer in getattr(model, "layers", []):
        yield layer
        if hasattr(layer, "layers"):
            yield from _all_layers(layer)


def _io(flatbuffer: bytes):
    from ai_edge_litert.interpreter import Interpreter

    with quiet_native_output():
        it = Interpreter(model_content=flatbuffer)
    return it, it.get_input_details()[0], it.get_output_details()[0]


def _first_quantize_params(it, input_index: int):
    """Scale/zero point the tail's first QUANTIZE op maps its float input to (None if there is none)."""
    try:
        for op in it._get_ops_details():  # no public API lists ops; tolerate its absence
            if op["op_name"] == "QUANTIZE" and input_index in list(op["inputs"]):
                q = it._get_tensor_details(op["outputs"][0], 0)["quantization"]
                return float(q[0]), int(q[1])
    except Exception as exc:
        log.debug("cannot inspect the tail's ops: %s", exc)
    return None


def convert_split(split, quant: str, calibration: np.ndarray | None = None,
                  tail_calibration: np.ndarray | None = None) -> Converted:
    """Head and tail of ``split`` -> TFLite; ``calibration`` (training images) is required for int8.

    ``tail_calibration``: the tensors the tail will receive for those images when they are not
    the head's output (a defended cut: the device adds noise or a mask after the head).  The
    wire's quantization is then the tail's input quantization, not the head's output's.
    """
    t0 = time.perf_counter()
    rep_tail = None
    if quant == "int8" and tail_calibration is not None:
        rep_tail = np.asarray(tail_calibration, np.float32)
    elif quant == "int8":
        if calibration is None or len(calibration) == 0:
            raise UsageError("int8 quantization needs calibration images", fix="pass --calibration N with N >= 1")
        # The tail is calibrated on the float tensor the head computes for the same images,
        # so its input quantization comes out equal to the head's output quantization.
        # Eager calls, not predict(): predict traces a new tf.function for every head and TF warns about it.
        calib = np.asarray(calibration, np.float32)
        rep_tail = np.concatenate([np.asarray(split.head(calib[i:i + 250], training=False))
                                   for i in range(0, len(calib), 250)])
    head = to_tflite(split.head, quant, calibration, int8_output=True)
    tail = to_tflite(split.tail, quant, rep_tail)

    _, hin, hout = _io(head)
    tail_it, tin, tout = _io(tail)
    scale = zero_point = None
    requant_exact = None
    head_q = (None, None)
    if quant == "int8":
        if hout["dtype"] != np.int8:
            raise CheckFailed(f"the int8 head outputs {np.dtype(hout['dtype']).name}, not int8",
                              fix="report this model; try --quant dynamic meanwhile")
        scale, zero_point = float(hout["quantization"][0]), int(hout["quantization"][1])
        head_q = (scale, zero_point)
        tail_q = _first_quantize_params(tail_it, tin["index"])
        if tail_calibration is not None:
            if tail_q is None:
                raise CheckFailed("the int8 tail of a defended cut has no input QUANTIZE op to read the wire's "
                                  "quantization from", fix="report this model; try --quant dynamic meanwhile")
            (scale, zero_point), tail_q = tail_q, None   # the wire is what the tail was calibrated on
            requant_exact = True
        if tail_q is not None:
            requant_exact = bool(np.isclose(tail_q[0], scale, rtol=1e-6, atol=0) and tail_q[1] == zero_point)
            if not requant_exact:
                log.info("the tail requantizes the features (head scale %.6g zp %d, tail scale %.6g zp %d)",
                         scale, zero_point, tail_q[0], tail_q[1])
    if np.dtype(tin["dtype"]) != np.float32:
        raise CheckFailed(f"the tail takes {np.dtype(tin['dtype']).name}, expected float32",
                          fix="report this model")
    return Converted(quant=quant, head=head, tail=tail, feature_dtype=np.dtype(hout["dtype"]).name,
                     feature_scale=scale, feature_zero_point=zero_point,
                     input_dtype=np.dtype(hin["dtype"]).name, output_dtype=np.dtype(tout["dtype"]).name,
                     requant_exact=requant_exact, seconds=time.perf_counter() - t0,
                     head_scale=head_q[0], head_zero_point=head_q[1])
