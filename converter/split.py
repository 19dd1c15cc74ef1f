"""Cut a Keras model in two: the head (input -> cut tensor) and the tail (cut tensor -> output).

The head is the original graph up to the cut layer's output.  The tail is
rebuilt from a fresh ``keras.Input`` of the cut tensor's shape by replaying,
in order, every layer call between the cut and the output, with cloned layers
carrying the original weights (so the original model's graph is not touched).
Replaying works for any functional graph, residual blocks included, as long
as the cut is an articulation point: if a tensor from before the cut is
needed after it, the cut is refused.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from protocol.errors import CheckFailed, UsageError

log = logging.getLogger(__name__)


@dataclass
class Split:
    """A model cut at ``cut``: ``tail(head(x)) == model(x)``."""

    model: object
    cut: str
    head: object
    tail: object
    feature_shape: tuple  # without the batch axis
    max_abs_diff: float | None = None


def _producer(tensor):
    """The graph node that computed ``tensor`` (a Keras 3 functional graph walk)."""
    history = getattr(tensor, "_keras_history", None)
    if history is None or history.operation is None:
        return None
    return history.operation._inbound_nodes[history.node_index]


def _is_input_node(node) -> bool:
    return node is None or node.is_input or type(node.operation).__name__ == "InputLayer"


def _nodes_in_order(outputs, stop_ids: set, on_input=None) -> list:
    """Nodes needed to compute ``outputs`` from the tensors in ``stop_ids``, inputs first.

    ``on_input(tensor)`` is called when the walk reaches a model input instead of a stop tensor.
    """
    order, done, visiting = [], set(), set()
    stack = [(t, False) for t in reversed(list(outputs))]
    while stack:
        tensor, expanded = stack.pop()
        if id(tensor) in stop_ids:
            continue
        node = _producer(tensor)
        if _is_input_node(node):
            if on_input is not None:
                on_input(tensor)
            continue
        if id(node) in done:
            continue
        if expanded:
            visiting.discard(id(node))
            done.add(id(node))
            order.append(node)
            continue
        if id(node) in visiting:
            continue
        visiting.add(id(node))
        stack.append((tensor, True))
        for t in reversed(node.input_tensors):
            stack.append((t, False))
    return order


def cut_tensor(model, layer_name: str):
    """The output tensor of ``layer_name`` in ``model``'s graph (UsageError if it has none or several)."""
    try:
        outputs = list(model.outputs)
    except (AttributeError, ValueError):
        raise UsageError(f"model {model.name!r} has no defined inputs (it was never built on an Input)",
                         fix="build it with keras.Input(shape=...) as its first layer and save it again") from None
    nodes = [n for n in _nodes_in_order(outputs, set()) if n.operation.name == layer_name]
    if not nodes:
        names = [n.operation.name for n in _nodes_in_order(outputs, set())]
        raise UsageError(f"model {model.name!r} has no layer {layer_name!r}",
                         fix=f"pick one of: {', '.join(names)} (see `edgesplit cuts MODEL`)")
    if len(nodes) > 1 or len(nodes[0].outputs) != 1:
        raise UsageError(f"layer {layer_name!r} is called several times or has several outputs: "
                         f"it cannot be a cut", fix="pick another layer (see `edgesplit cuts MODEL`)")
    return nodes[0].outputs[0]


def _clone_layer(layer):
    """A fresh copy of ``layer`` (weights set after it is built); the layer itself if it cannot be copied."""
    try:
        return layer.__class__.from_config(layer.get_config()), True
    except Exception as exc:  # custom layers without a working get_config: share the layer instead
        log.debug("cannot clone layer %s (%s); the tail shares it", layer.name, exc)
        return layer, False


def split_model(model, cut: str) -> Split:
    """Split ``model`` at the output of layer ``cut``; UsageError if the cut is not an articulation point."""
    import keras

    if hasattr(cut, "name"):  # a converter.cuts.Cut
        cut = cut.name
    if len(model.inputs) != 1 or len(model.outputs) != 1:
        raise UsageError(f"model {model.name!r} has {len(model.inputs)} inputs and {len(model.outputs)} outputs; "
                         f"edgesplit splits models with one image input and one output",
                         fix="wrap the model so it takes one image and returns one tensor")
    feature = cut_tensor(model, cut)
    if model.outputs[0] is feature:
        # A cut at the output is allowed: the device sends the model's answer and the tail is the identity.
        log.info("cut %s is the model's output: the tail only passes the features through", cut)

    def bypass(tensor):
        raise UsageError(f"layer {cut!r} is not a valid cut: the tail also needs a tensor from before it "
                         f"(a skip or residual connection crosses the cut)",
                         fix="pick a layer where exactly one tensor crosses, e.g. after the residual add "
                             "(see `edgesplit cuts MODEL`)")

    tail_nodes = _nodes_in_order(model.outputs, {id(feature)}, on_input=bypass)
    head = keras.Model(model.inputs[0], feature, name=f"{model.name}_head")

    shape = tuple(int(d) for d in feature.shape[1:])
    new_input = keras.Input(shape=shape, dtype=feature.dtype, name=f"{cut}_features")
    computed = {id(feature): new_input}
    for node in tail_nodes:
        layer, cloned = _clone_layer(node.operation)
        args, kwargs = node.arguments.fill_in(computed)
        out = layer(*args, **kwargs)
        if cloned and node.operation.weights:
            layer.set_weights(node.operation.get_weights())
        for ref, new in zip(node.outputs, keras.tree.flatten(out)):
            computed[id(ref)] = new
    tail = keras.Model(new_input, computed[id(model.outputs[0])], name=f"{model.name}_tail")
    log.debug("split %s at %s: head %d layers, tail %d layer calls", model.name, cut,
              len(head.layers), len(tail_nodes))
    return Split(model=model, cut=cut, head=head, tail=tail, feature_shape=shape)


def check_split(split: Split, x: np.ndarray, atol: float = 1e-4, rtol: float = 1e-4) -> float:
    """Check numerically that ``tail(head(x)) == model(x)``; CheckFailed if not.  Returns the max |diff|."""
    x = np.asarray(x, dtype=np.float32)
    want = np.asarray(split.model(x, training=False))
    got = np.asarray(split.tail(split.head(x, training=False), training=False))
    diff = float(np.max(np.abs(want - got))) if want.size else 0.0
    if want.shape != got.shape or not np.allclose(got, want, atol=atol, rtol=rtol):
        raise CheckFailed(f"the split at {split.cut!r} does not reproduce the model: tail(head(x)) differs from "
                          f"model(x) by up to {diff:.3g}",
                          fix="the model may hold layers that behave differently when rebuilt (custom or "
                              "stateful layers); report this model, or pick another cut")
    split.max_abs_diff = diff
    return diff
