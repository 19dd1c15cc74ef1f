"""A defended cut in a Keras model: the one layer that holds a defence, and how to find it.

``edgesplit harden`` puts a :class:`CutDefence` layer right after the cut layer.  Its config
*is* the declaration that ends up in the bundle's manifest (``protocol.defence.DefenceSpec``):
the op the device applies (noise, dropout or nothing), its distribution, noise scales
or rate, and which method and strength trained it.  The layer is active whatever
``training`` says, so the hardened ``.keras`` behaves as the deployed split does: fresh
noise or a fresh mask for every input, on every call.

:func:`find_defence` says whether a model is hardened and where; :func:`insert_defence`
rebuilds a model with a defence layer after a cut; :func:`defended_split` cuts a hardened
model into the clean head (what ``head.tflite`` computes), the defence, and the tail.
"""
from __future__ import annotations

import logging
import math
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402

from protocol.defence import DISTRIBUTIONS, METHODS, OPS, DefenceSpec  # noqa: E402
from protocol.errors import UsageError  # noqa: E402

log = logging.getLogger(__name__)


def layer_name(cut: str) -> str:
    """The name the defence layer after ``cut`` gets."""
    return f"{cut}_defence"


@keras.saving.register_keras_serializable(package="edgesplit")
class CutDefence(keras.layers.Layer):
    """The defence at a cut, active at inference: noise, dropout, or the identity.

    ``scale`` is the noise's standard deviation: one value, one per channel (last axis) or one
    per element; with ``learned`` it is a trainable weight, one per element (kept positive
    through its logarithm).
    """

    def __init__(self, method: str, strength: float, op: str = "none", distribution: str | None = None,
                 scale=None, rate: float | None = None, learned: bool = False, cut: str | None = None, **kwargs):
        super().__init__(**kwargs)
        if method not in METHODS or op not in OPS:
            raise ValueError(f"CutDefence: unknown method {method!r} or op {op!r}")
        if op == "noise" and (distribution not in DISTRIBUTIONS or scale is None):
            raise ValueError("CutDefence: op noise needs a distribution and a scale")
        if op == "dropout" and not (rate is not None and 0.0 <= rate < 1.0):
            raise ValueError(f"CutDefence: op dropout needs a rate in [0, 1), got {rate!r}")
        self.method, self.strength, self.op = method, float(strength), op
        self.distribution = distribution if op == "noise" else None
        self.initial_scale = [float(s) for s in np.atleast_1d(scale)] if op == "noise" else None
        self.rate = float(rate) if op == "dropout" else None
        self.learned = bool(learned) and op == "noise"
        self.cut = cut
        self.seed_generator = keras.random.SeedGenerator()  # unseeded: every process draws its own noise
        self.log_scale = None

    def build(self, input_shape):
        if self.op == "noise":
            shape = tuple(int(d) for d in input_shape[1:])
            init = np.asarray(self.initial_scale, np.float32)
            if init.size == int(np.prod(shape)):
                init = init.reshape(shape)
            elif init.size not in (1, shape[-1]):
                raise ValueError(f"CutDefence: {init.size} scales for features of shape {list(shape)}")
            init = np.broadcast_to(init, shape) if self.learned else init
            self.log_scale = self.add_weight(name="log_scale", shape=init.shape, trainable=self.learned,
                                             initializer=keras.initializers.Constant(np.log(np.maximum(init, 1e-12))))
        super().build(input_shape)

    def noise_scale(self):
        """The noise's standard deviation (a tensor: one value, per channel or per element), or None."""
        return None if self.log_scale is None else keras.ops.exp(self.log_scale)

    def call(self, x, training=None):
        if self.op == "noise":
            shape = keras.ops.shape(x)
            if self.distribution == "gaussian":
                eps = keras.random.normal(shape, seed=self.seed_generator, dtype=x.dtype)
            else:  # unit-variance Laplace from a uniform draw (b = 1/sqrt 2)
                u = keras.random.uniform(shape, minval=-0.5 + 1e-7, maxval=0.5, seed=self.seed_generator,
                                         dtype=x.dtype)
                eps = -keras.ops.sign(u) * keras.ops.log1p(-2.0 * keras.ops.abs(u)) / math.sqrt(2.0)
            return x + eps * self.noise_scale()
        if self.op == "dropout":
            keep = keras.random.uniform(keras.ops.shape(x), seed=self.seed_generator, dtype=x.dtype) >= self.rate
            return keras.ops.where(keep, x / (1.0 - self.rate), keras.ops.zeros_like(x))
        return x

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        config = super().get_config()
        config.update(method=self.method, strength=self.strength, op=self.op, distribution=self.distribution,
                      scale=self.current_scale() if self.op == "noise" else None, rate=self.rate,
                      learned=self.learned, cut=self.cut)
        return config

    def current_scale(self) -> list[float] | None:
        if self.op != "noise":
            return None
        if self.log_scale is None:
            return list(self.initial_scale)
        return [float(v) for v in np.exp(np.asarray(self.log_scale.numpy(), np.float64)).ravel()]

    def spec(self, head_scale: float | None = None, head_zero_point: int | None = None) -> DefenceSpec:
        """The manifest's declaration of this layer (with the head's output quantization when given)."""
        on = self.op != "none"
        return DefenceSpec(method=self.method, strength=self.strength, op=self.op, distribution=self.distribution,
                           scale=self.current_scale(), rate=self.rate, learned=self.learned,
                           head_scale=head_scale if on else None, head_zero_point=head_zero_point if on else None)


# ------------------------------------------------------------------ graph surgery

def defence_layers(model) -> list:
    """Every CutDefence layer of ``model`` (a hardened model has exactly one)."""
    return [layer for layer in model.layers if isinstance(layer, CutDefence)]


def find_defence(model, cut: str | None = None):
    """The CutDefence layer of ``model`` and the cut it defends, or (None, None) for a plain model.

    With ``cut``, UsageError when the model is hardened at another cut: converting it there
    would send clean features and apply the defence in the cloud.
    """
    from converter.split import _producer

    layers = defence_layers(model)
    if not layers:
        return None, None
    if len(layers) > 1:
        raise UsageError(f"model {model.name!r} holds {len(layers)} defence layers "
                         f"({', '.join(lay.name for lay in layers)}); edgesplit supports one per model",
                         fix="harden the plain model at one cut")
    layer = layers[0]
    node = layer._inbound_nodes[0]
    producer = _producer(node.input_tensors[0])
    defended = producer.operation.name if producer is not None else None
    if cut is not None and cut not in (defended, layer.name):
        raise UsageError(f"model {model.name!r} was hardened at {defended!r}; cut at {cut!r} the device would "
                         f"send {'clean' if _before(model, cut, layer) else 'undefended'} features and the "
                         f"defence would run in the cloud, after the tensor left the device",
                         fix=f"convert it with --cut {defended}, or harden the plain model at {cut}")
    return layer, defended


def _before(model, cut: str, layer) -> bool:
    names = [lay.name for lay in model.layers]
    return cut in names and names.index(cut) < names.index(layer.name)


def insert_defence(model, cut: str, defence: CutDefence, name: str | None = None):
    """A new model computing ``model`` with ``defence`` applied to the output of layer ``cut``.

    The new model shares its layers with ``model`` (clone it first to keep the original).
    The cut must be a valid split point (one tensor crosses).
    """
    from converter.split import _nodes_in_order, cut_tensor

    feature = cut_tensor(model, cut)
    if model.outputs[0] is feature:
        raise UsageError(f"{cut!r} is the model's output: a defence there has no tail to adapt to it",
                         fix="harden an earlier cut (see `edgesplit cuts MODEL`)")

    def bypass(tensor):
        raise UsageError(f"layer {cut!r} is not a valid cut (a skip or residual connection crosses it)",
                         fix="pick a layer where exactly one tensor crosses (see `edgesplit cuts MODEL`)")

    tail_nodes = _nodes_in_order(model.outputs, {id(feature)}, on_input=bypass)
    defended = defence(feature)
    computed = {id(feature): defended}
    for node in tail_nodes:
        args, kwargs = node.arguments.fill_in(computed)
        out = node.operation(*args, **kwargs)
        for ref, new in zip(node.outputs, keras.tree.flatten(out)):
            computed[id(ref)] = new
    return keras.Model(model.inputs[0], computed[id(model.outputs[0])], name=name or model.name)


def defended_split(model, cut: str | None = None):
    """(clean head, defence layer, defended head, tail) of a hardened model.

    The clean head ends at the cut layer (what ``head.tflite`` computes), the defended head
    includes the defence (what is sent, as a Keras model), the tail starts after it.
    """
    from converter.split import split_model

    layer, defended = find_defence(model, cut)
    if layer is None:
        raise UsageError(f"model {model.name!r} has no defence layer", fix="make one with `edgesplit harden`")
    clean_head = keras.Model(model.inputs[0], model.get_layer(defended).output, name=f"{model.name}_head")
    split = split_model(model, layer.name)
    return clean_head, layer, split.head, split.tail


# ------------------------------------------------------------------ conversion

#: parity draws the defence's randomness from this seed, the same for the Keras model and the bundle
PARITY_SEED = 0


def split_for_bundle(model, cut: str, x_check):
    """(split, defence layer or None): what ``converter.bundle.convert`` turns into a bundle.

    For a plain model, ``split_model`` checked numerically.  For a hardened one the split's
    head is the clean head (``head.tflite``), its tail starts after the defence layer, and the
    layer comes back for the manifest; a split through an identity defence is checked as usual,
    a stochastic one through :func:`keras_predict` at parity.
    """
    from converter.split import Split, check_split, split_model

    layer, defended = find_defence(model, cut)
    if layer is None:
        split = split_model(model, cut)
        check_split(split, x_check)
        return split, None
    clean_head, layer, _, tail = defended_split(model, cut)
    split = Split(model=model, cut=defended, head=clean_head, tail=tail,
                  feature_shape=tuple(int(d) for d in clean_head.output_shape[1:]))
    if layer.op == "none":
        check_split(split, x_check)
    return split, layer


def tail_calibration(split, layer, calibration, seed: int = PARITY_SEED):
    """The tensors the tail receives for the calibration images: defended on the device (None: the head's)."""
    if layer is None or layer.op == "none" or calibration is None:
        return None
    x = np.asarray(calibration, np.float32)
    f = np.concatenate([np.asarray(split.head(x[i:i + 250], training=False)) for i in range(0, len(x), 250)])
    return layer.spec().apply(f, np.random.default_rng(seed))


def keras_predict(split, layer, x, *, seed: int = PARITY_SEED, batch: int = 250) -> np.ndarray:
    """Top-1 of the Keras model on ``x`` with the defence's draws taken from ``seed`` batch by batch,
    in the same order as ``runtime.split.Head.features(x, rng)`` takes them at parity."""
    rng = np.random.default_rng(seed)
    spec = layer.spec()
    out = []
    for i in range(0, len(x), batch):
        f = np.asarray(split.head(np.asarray(x[i:i + batch], np.float32), training=False))
        out.append(np.argmax(np.asarray(split.tail(spec.apply(f, rng), training=False)), axis=-1))
    return np.concatenate(out) if out else np.zeros((0,), np.int64)


def check_matches(manifest, model) -> None:
    """BundleError unless ``model``'s defence layer and the bundle's ``manifest`` declare the same defence.

    The two must agree, or an audit attacks one head while the device runs another: a defence
    applied at audit time but not on the device (the audit flatters the bundle), or applied on
    the device but not in the audited model (the audit is about a head that is never deployed).
    """
    from protocol.errors import BundleError

    spec = manifest.defence
    layers = defence_layers(model)
    if len(layers) > 1:
        find_defence(model)  # raises its message
    layer = layers[0] if layers else None
    if layer is None and spec is None:
        return
    if layer is None:
        raise BundleError(f"the bundle declares a defence at {manifest.cut} ({spec.describe()}) but the Keras model "
                          f"{model.name!r} has none: an audit with it would attack a head the device does not run",
                          fix="give the hardened .keras that `edgesplit harden` wrote beside the bundle "
                              "(OUT/model.keras)")
    ours = layer.spec()
    if spec is None:
        raise BundleError(f"the Keras model {model.name!r} applies {ours.describe()} at {layer.cut}, but the bundle's "
                          f"manifest declares no defence: the device sends clean features, so an audit with this "
                          f"model would credit the bundle with a defence it does not have",
                          fix=f"convert the hardened model (edgesplit convert MODEL.keras --cut {layer.cut} ...) "
                              f"or audit the bundle with the model it was made from")
    same = (ours.method, ours.op, ours.distribution, ours.rate) == (spec.method, spec.op, spec.distribution, spec.rate)
    if same and ours.op == "noise":
        same = len(ours.scale) == len(spec.scale) and bool(np.allclose(ours.scale, spec.scale, rtol=1e-5, atol=0))
    if not same or layer.cut not in (None, manifest.cut):
        raise BundleError(f"the Keras model applies {ours.describe()} at {layer.cut}, the bundle's manifest declares "
                          f"{spec.describe()} at {manifest.cut}: they were not made together",
                          fix="give the .keras the bundle was converted from (edgesplit harden writes both)")
