"""Cut analysis: where a Keras model can be split into a head and a tail, and what each cut costs.

A cut after layer ``L`` is valid when ``L``'s output is the *only* tensor that
crosses from the head (everything ``L`` depends on) to the tail (everything
else): every input of every tail layer is either that tensor or computed in the
tail, the model inputs feed only the head, and the model outputs come from the
tail (or are ``L``'s output itself, for the last layer).  In graph words these
are the articulation points of the layer graph between input and output, so a
layer inside a residual block or on one branch of a fork is never a cut: the
skip connection or the other branch would cross as well.

Not listed, on purpose:

* the input layer: cutting there sends the raw input, i.e. no split at all;
* pure reshape layers (``Flatten``, ``Reshape``) whose input is already a cut:
  they send the same numbers in the same order as the cut before them, so they
  would be a duplicate row with identical bytes and identical leakage (for
  ``paper-cnn`` the cut is ``pool2``; its tail starts with the flatten);
* layers called more than once in the model (shared layers) and layers with
  several outputs: "the output of L" is not one tensor.

Costs: elements of the feature tensor, bytes sent as int8 (one per element) and
float32 (four), multiply-accumulates and parameters on each side.  MACs count
the weight layers (convolutions incl. depthwise/separable/transposed, dense,
nested models); pooling, activations, normalisation and element-wise ops are
counted as 0 because they are small next to those and TFLite fuses most of them.
"""
from __future__ import annotations

import dataclasses
import difflib
import logging
import math
import os
from dataclasses import dataclass

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402

from protocol.errors import UsageError  # noqa: E402

log = logging.getLogger(__name__)

RESHAPE_LAYERS = (keras.layers.Flatten, keras.layers.Reshape)


@dataclass(frozen=True)
class Cut:
    """One valid cut: the head ends with layer ``name`` and sends its output."""

    name: str
    index: int                        # position of the layer in model.layers
    kind: str                         # layer class, e.g. "Conv2D"
    shape: tuple                      # feature tensor shape without the batch axis
    elements: int | None              # None when the shape has unknown dimensions
    bytes_int8: int | None
    bytes_float32: int | None
    head_macs: int
    tail_macs: int
    head_params: int
    tail_params: int

    def to_dict(self) -> dict:
        out = dataclasses.asdict(self)
        out["shape"] = list(self.shape)
        return out


# --------------------------------------------------------------------- graph

@dataclass
class _Op:
    """One call of a layer in the model graph (a Keras node)."""

    layer: object
    inputs: list[int]                 # ids of the input KerasTensors
    outputs: list[int]
    in_shapes: list[tuple]
    out_shapes: list[tuple]


def _model_io(model) -> tuple[list, list]:
    try:
        inputs, outputs = list(model.inputs), list(model.outputs)
    except (AttributeError, ValueError) as exc:
        raise UsageError(f"model {model.name!r} is not built: its inputs are unknown",
                         fix="build it with keras.Input(shape=...) as the first layer, or call it once "
                             "on data before saving") from exc
    return inputs, outputs


def _graph(model) -> tuple[list[_Op], set[int], list[int]]:
    """The model's layer calls in topological order, its input ids and its output ids.

    Walks back from the outputs through each tensor's Keras history, so layers
    that also appear in other models contribute only the calls made in this one.
    """
    inputs, outputs = _model_io(model)
    input_ids = {id(t) for t in inputs}
    ops: list[_Op] = []
    seen: set[int] = set()
    # Iterative post-order DFS (deep models would overflow recursion).
    stack: list[tuple[object, bool]] = [(t, False) for t in reversed(outputs)]
    while stack:
        tensor, expanded = stack.pop()
        if id(tensor) in input_ids:
            continue
        layer, node_index, _ = tensor._keras_history
        node = layer._inbound_nodes[node_index]
        if id(node) in seen:
            continue
        if expanded:
            seen.add(id(node))
            ops.append(_Op(layer, [id(t) for t in node.input_tensors], [id(t) for t in node.output_tensors],
                           [tuple(t.shape) for t in node.input_tensors],
                           [tuple(t.shape) for t in node.output_tensors]))
            continue
        stack.append((tensor, True))
        stack.extend((t, False) for t in node.input_tensors if id(t) not in input_ids)
    return ops, input_ids, [id(t) for t in outputs]


# ---------------------------------------------------------------------- cost

def _prod(values) -> int:
    return int(math.prod(int(v) for v in values))


def _channels_last(layer) -> bool:
    return getattr(layer, "data_format", "channels_last") != "channels_first"


def _spatial_and_channels(shape: tuple, layer) -> tuple[int, int]:
    dims = shape[1:]
    if _channels_last(layer):
        return _prod(dims[:-1]), int(dims[-1])
    return _prod(dims[1:]), int(dims[0])


def layer_macs(layer, in_shapes: list[tuple], out_shapes: list[tuple]) -> int:
    """Multiply-accumulates of one call of ``layer`` for one example (0 for layers without weights)."""
    try:
        if isinstance(layer, keras.Model):
            return model_macs(layer)
        if not in_shapes or not out_shapes or any(d is None for d in in_shapes[0][1:] + out_shapes[0][1:]):
            return 0
        kernel = _prod(getattr(layer, "kernel_size", ()) or ())
        if isinstance(layer, (keras.layers.SeparableConv1D, keras.layers.SeparableConv2D)):
            out_spatial, c_out = _spatial_and_channels(out_shapes[0], layer)
            _, c_in = _spatial_and_channels(in_shapes[0], layer)
            mid = c_in * layer.depth_multiplier
            return out_spatial * (kernel * mid + mid * c_out)
        if isinstance(layer, (keras.layers.DepthwiseConv1D, keras.layers.DepthwiseConv2D)):
            out_spatial, _ = _spatial_and_channels(out_shapes[0], layer)
            _, c_in = _spatial_and_channels(in_shapes[0], layer)
            return out_spatial * kernel * c_in * layer.depth_multiplier
        if isinstance(layer, (keras.layers.Conv1DTranspose, keras.layers.Conv2DTranspose,
                              keras.layers.Conv3DTranspose)):
            in_spatial, c_in = _spatial_and_channels(in_shapes[0], layer)
            return in_spatial * kernel * c_in * layer.filters
        if isinstance(layer, (keras.layers.Conv1D, keras.layers.Conv2D, keras.layers.Conv3D)):
            out_spatial, c_out = _spatial_and_channels(out_shapes[0], layer)
            _, c_in = _spatial_and_channels(in_shapes[0], layer)
            return out_spatial * kernel * (c_in // max(1, getattr(layer, "groups", 1))) * c_out
        if isinstance(layer, keras.layers.Dense):
            shape = in_shapes[0]
            return _prod(shape[1:-1]) * int(shape[-1]) * int(layer.units)
    except (TypeError, ValueError, AttributeError, IndexError) as exc:
        log.debug("MACs of %s not counted: %s", layer.name, exc)
    return 0


def model_macs(model) -> int:
    """Multiply-accumulates of a whole model for one example."""
    ops, _, _ = _graph(model)
    return sum(layer_macs(op.layer, op.in_shapes, op.out_shapes) for op in ops)


def _params(layers) -> int:
    # A layer object counted once even if called several times on one side.
    return sum(int(layer.count_params()) for layer in {id(lay): lay for lay in layers}.values())


# ---------------------------------------------------------------------- cuts

def list_cuts(model) -> list[Cut]:
    """Every valid cut of ``model``, in graph order (see the module docstring).

    Raises :class:`UsageError` if the model has none.
    """
    ops, input_ids, output_ids = _graph(model)
    producer = {tid: i for i, op in enumerate(ops) for tid in op.outputs}
    calls: dict[int, int] = {}
    for op in ops:
        calls[id(op.layer)] = calls.get(id(op.layer), 0) + 1
    index_of = {id(layer): i for i, layer in enumerate(model.layers)}
    macs = [layer_macs(op.layer, op.in_shapes, op.out_shapes) for op in ops]

    valid: dict[int, tuple[int, set[int]]] = {}       # op position -> (tensor id, head op positions)
    for pos, op in enumerate(ops):
        if isinstance(op.layer, keras.layers.InputLayer) or len(op.outputs) != 1 or calls[id(op.layer)] != 1:
            continue
        head = _ancestors(pos, ops, producer)
        if _only_crossing(op.outputs[0], head, ops, producer, output_ids):
            valid[pos] = (op.outputs[0], head)

    cuts = []
    for pos, (tid, head) in valid.items():
        op = ops[pos]
        if isinstance(op.layer, RESHAPE_LAYERS) and len(op.inputs) == 1 and producer.get(op.inputs[0]) in valid:
            continue  # same numbers as the cut before it
        tail = [i for i in range(len(ops)) if i not in head]
        shape = tuple(None if d is None else int(d) for d in op.out_shapes[0][1:])
        elements = None if any(d is None for d in shape) else _prod(shape)
        cuts.append(Cut(
            name=op.layer.name, index=index_of.get(id(op.layer), pos), kind=type(op.layer).__name__,
            shape=shape, elements=elements,
            bytes_int8=elements, bytes_float32=None if elements is None else 4 * elements,
            head_macs=sum(macs[i] for i in head), tail_macs=sum(macs[i] for i in tail),
            head_params=_params(ops[i].layer for i in head), tail_params=_params(ops[i].layer for i in tail)))
    if not cuts:
        raise UsageError(
            f"model {model.name!r} has no valid cut: no single layer output carries everything the rest "
            "of the model needs (e.g. several outputs computed from a shared trunk, or branches up to the end)",
            fix="split a model whose graph has a point where exactly one tensor flows on, or add one "
                "(e.g. a Concatenate that merges the branches)")
    return cuts


def _ancestors(pos: int, ops: list[_Op], producer: dict[int, int]) -> set[int]:
    """Positions of the ops that ``ops[pos]`` depends on, itself included."""
    found, todo = {pos}, [pos]
    while todo:
        for tid in ops[todo.pop()].inputs:
            src = producer.get(tid)
            if src is not None and src not in found:
                found.add(src)
                todo.append(src)
    return found


def _only_crossing(tid: int, head: set[int], ops: list[_Op], producer: dict[int, int],
                   output_ids: list[int]) -> bool:
    """True if ``tid`` is the one tensor the tail needs from the head (or from the model inputs)."""
    for i, op in enumerate(ops):
        if i in head:
            continue
        for src in op.inputs:
            # Fine: the cut tensor, or a tensor a tail op computed.  A model input
            # (no producer) or another head tensor reaching the tail is a second crossing.
            origin = producer.get(src)
            if src != tid and (origin is None or origin in head):
                return False
    if len(head) == len(ops):  # cut at the very end: the tail is empty
        return output_ids == [tid]
    return all(out != tid and producer.get(out) not in head for out in output_ids)


def find_cut(model, layer_name: str) -> Cut:
    """The cut after ``layer_name``; UsageError listing the valid cuts otherwise."""
    cuts = list_cuts(model)
    for cut in cuts:
        if cut.name == layer_name:
            return cut
    names = [c.name for c in cuts]
    layers = [layer.name for layer in model.layers]
    if layer_name in layers:
        layer = model.get_layer(layer_name)
        if isinstance(layer, keras.layers.InputLayer):
            why = "it is the input layer (nothing would be computed on the device)"
        elif isinstance(layer, RESHAPE_LAYERS):
            why = "it only reshapes the previous cut's output (use that cut: it sends the same numbers)"
        else:
            why = "its output is not the only tensor that crosses to the rest of the model " \
                  "(a skip connection or a parallel branch crosses too)"
        message = f"layer {layer_name!r} of {model.name!r} is not a valid cut: {why}"
    else:
        close = difflib.get_close_matches(layer_name, names, n=1) or difflib.get_close_matches(layer_name, layers, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        message = f"model {model.name!r} has no layer {layer_name!r}{hint}"
    raise UsageError(f"{message}; valid cuts: {', '.join(names)}",
                     fix="pick one of the valid cuts (see `edgesplit cuts MODEL`)")


def format_table(cuts: list[Cut]) -> str:
    """The cuts as an aligned text table."""
    header = ("cut", "layer", "shape", "elements", "int8 B", "float32 B", "head MACs", "tail MACs",
              "head params", "tail params")

    def num(value):
        return "?" if value is None else f"{value:,}"

    rows = [(c.name, c.kind, "x".join("?" if d is None else str(d) for d in c.shape), num(c.elements),
             num(c.bytes_int8), num(c.bytes_float32), num(c.head_macs), num(c.tail_macs),
             num(c.head_params), num(c.tail_params)) for c in cuts]
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]

    def line(row):
        return "  ".join(cell.ljust(w) if i < 3 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths)))

    return "\n".join([line(header), line(tuple("-" * w for w in widths)), *map(line, rows)])
