"""The head's input spec for a model: what a device does to an image before the head sees it.

Size and channels come from the model's input (``(H, W, 1)`` is grey, ``(H, W, 3)`` RGB).
How pixels 0..255 are scaled comes from the first of:

1. ``--preprocess`` (:func:`parse_preprocess`): ``scale=1/127.5,offset=-1``, ``mean=...,std=...``
   (per channel: ``mean=0.485,0.456,0.406,std=0.229,0.224,0.225``; values all <= 1 are on the
   0..1 scale, i.e. of ``pixel / 255``, as torchvision writes them), or ``range=-1:1``; also
   ``resize=WxH``, ``crop=WxH``, ``fit=stretch|cover`` and ``resample=bilinear|bicubic|...``;
2. the model itself: a ``Rescaling`` or ``Normalization`` layer at its input belongs to the
   model, so the device sends it plain pixels 0..255 and it is never applied twice;
3. the zoo entry's range, or float ``--data`` arrays (already the model's input: their range);
4. the user's labelled images: the usual conventions ([0, 1], [-1, 1], 0..255, ImageNet
   mean/std) are tried on a few hundred training images and the one the model classifies
   best is kept (the convert summary says which, and how well each did);
5. otherwise ``pixel / 255`` in [0, 1], said so in the log.
"""
from __future__ import annotations

import logging
import re
from dataclasses import dataclass

import numpy as np

from protocol import manifest as mf
from protocol.errors import UsageError

log = logging.getLogger(__name__)

RESAMPLES = ("nearest", "bilinear", "bicubic", "lanczos", "box", "hamming")
#: (name, mean, std) tried on the user's images when nothing else says how pixels are scaled
CANDIDATES = (
    ("[0, 1] (pixel / 255)", 0.0, 255.0),
    ("[-1, 1] (pixel / 127.5 - 1)", 127.5, 127.5),
    ("0..255 (plain pixels)", 0.0, 1.0),
    ("ImageNet mean/std", [123.675, 116.28, 103.53], [58.395, 57.12, 57.375]),
)
SAMPLE_N = 256
#: layers that take plain pixels and scale them inside the model
IN_MODEL_SCALING = ("Rescaling", "Normalization")
_KEYS = {"scale", "offset", "mean", "std", "range", "resize", "crop", "fit", "resample", "interpolation"}
_FIX = ("e.g. --preprocess scale=1/127.5,offset=-1   or   mean=0.485,0.456,0.406,std=0.229,0.224,0.225   "
        "(also resize=WxH, crop=WxH, fit=stretch|cover, resample=bilinear)")


@dataclass(frozen=True)
class Resolved:
    """An input spec and where its scaling came from (for the summary and the report)."""

    spec: mf.InputSpec
    origin: str


def _number(text: str, key: str) -> float:
    text = text.strip()
    try:
        if "/" in text:
            a, b = text.split("/", 1)
            return float(a) / float(b)
        return float(text)
    except (ValueError, ZeroDivisionError):
        raise UsageError(f"--preprocess {key}={text}: not a number", fix=_FIX) from None


def _size(text: str, key: str) -> tuple[int, int]:
    m = re.fullmatch(r"\s*(\d+)\s*[xX*,:]?\s*(\d+)?\s*", text)
    if not m:
        raise UsageError(f"--preprocess {key}={text}: give a size as WIDTHxHEIGHT, e.g. {key}=96x96", fix=_FIX)
    w = int(m.group(1))
    h = int(m.group(2)) if m.group(2) else w
    if w < 1 or h < 1:
        raise UsageError(f"--preprocess {key}={text}: sizes must be at least 1", fix=_FIX)
    return w, h


def parse_preprocess(text: str | None) -> dict:
    """``--preprocess`` text -> {key: value}.  Commas separate keys; a bare value continues a list."""
    if text is None or not str(text).strip():
        return {}
    raw: dict[str, list[str]] = {}
    key = None
    for token in str(text).split(","):
        token = token.strip()
        if not token:
            continue
        if "=" in token:
            key, _, value = token.partition("=")
            key = key.strip().lower()
            if key not in _KEYS:
                raise UsageError(f"--preprocess: unknown key {key!r}; known: {', '.join(sorted(_KEYS))}", fix=_FIX)
            if key in raw:
                raise UsageError(f"--preprocess: {key} is given twice", fix=_FIX)
            raw[key] = [v for v in re.split(r"[:\s]+", value.strip()) if v]
        elif key is not None:
            raw[key].extend(v for v in re.split(r"[:\s]+", token) if v)
        else:
            raise UsageError(f"--preprocess: {token!r} is not key=value", fix=_FIX)
    out: dict = {}
    for key, values in raw.items():
        if not values:
            raise UsageError(f"--preprocess: {key}= has no value", fix=_FIX)
        if key in ("scale", "offset", "mean", "std"):
            nums = [_number(v, key) for v in values]
            out[key] = nums[0] if len(nums) == 1 else nums
        elif key == "range":
            if len(values) != 2:
                raise UsageError(f"--preprocess range={':'.join(values)}: give low:high, e.g. range=-1:1", fix=_FIX)
            lo, hi = (_number(v, key) for v in values)
            if not lo < hi:
                raise UsageError(f"--preprocess range={lo:g}:{hi:g}: low must be below high", fix=_FIX)
            out["range"] = (lo, hi)
        elif key in ("resize", "crop"):
            out[key] = _size("x".join(values), key)
        elif key == "fit":
            if values[0] not in ("stretch", "cover"):
                raise UsageError(f"--preprocess fit={values[0]}: use stretch or cover", fix=_FIX)
            out["fit"] = values[0]
        else:  # resample / interpolation
            name = values[0].lower()
            if name not in RESAMPLES:
                raise UsageError(f"--preprocess {key}={values[0]}: use one of {', '.join(RESAMPLES)}", fix=_FIX)
            out["resample"] = name
    forms = [k for k in (("scale", "offset"), ("mean", "std"), ("range",)) if any(x in out for x in k)]
    if len(forms) > 1:
        raise UsageError("--preprocess: give one of scale/offset, mean/std or range, not several", fix=_FIX)
    if "offset" in out and "scale" not in out:
        out["scale"] = 1.0
    if ("mean" in out) != ("std" in out):
        raise UsageError("--preprocess: mean and std go together", fix=_FIX)
    return out


def _mean_std(opts: dict, channels: int):
    """(mean, std) in pixel units from the parsed option, or None when it sets no scaling."""
    def per_channel(v, key):
        if isinstance(v, list):
            if len(v) not in (1, channels):
                raise UsageError(f"--preprocess {key} has {len(v)} values for a model with {channels} channel(s)",
                                 fix="give one value, or one per channel")
            return v[0] if len(v) == 1 else v
        return v

    if "scale" in opts:
        scale = np.asarray(per_channel(opts["scale"], "scale"), np.float64)
        offset = np.asarray(per_channel(opts.get("offset", 0.0), "offset"), np.float64)
        if np.any(scale == 0):
            raise UsageError("--preprocess scale must not be 0", fix=_FIX)
        # x = p * scale + offset  <=>  x = (p - mean) / std with std = 1/scale, mean = -offset/scale
        std, mean = 1.0 / scale, -offset / scale
    elif "mean" in opts:
        mean = np.asarray(per_channel(opts["mean"], "mean"), np.float64)
        std = np.asarray(per_channel(opts["std"], "std"), np.float64)
        if np.any(std == 0):
            raise UsageError("--preprocess std must not be 0", fix=_FIX)
        if np.all(np.abs(mean) <= 1.0) and np.all(np.abs(std) <= 1.0):
            mean, std = mean * 255.0, std * 255.0   # written on the 0..1 scale, as torchvision does
    elif "range" in opts:
        lo, hi = opts["range"]
        std = np.asarray(255.0 / (hi - lo))
        mean = np.asarray(-lo * std)
    else:
        return None

    def clean(a):
        # 12 significant digits: 1/(1/127.5) is 127.5, not 127.49999999999999
        vals = [float(f"{float(v):.12g}") + 0.0 for v in np.atleast_1d(a)]
        return vals[0] if np.ndim(a) == 0 else vals

    return clean(mean), clean(std)


def make_preprocess(shape, mean=0.0, std=255.0, *, resize=None, crop=None, fit="stretch",
                    resample="bilinear") -> mf.Preprocess:
    """A manifest Preprocess for a model input ``shape`` (H, W, C); value_range follows from mean/std."""
    h, w, c = (int(d) for d in shape)
    if crop is None and resize is not None and tuple(resize) != (w, h):
        crop = (w, h)    # resize=110x110 alone for a 96x96 model: resize, then crop the centre
    if crop is not None and tuple(crop) != (w, h):
        raise UsageError(f"--preprocess crop={crop[0]}x{crop[1]} must be the model's input size {w}x{h}",
                         fix=f"use crop={w}x{h}, or leave it out")
    resize = tuple(resize) if resize is not None else (w, h)
    if crop is not None and (resize[0] < crop[0] or resize[1] < crop[1]):
        raise UsageError(f"--preprocess resize={resize[0]}x{resize[1]} is smaller than the crop {crop[0]}x{crop[1]}",
                         fix=f"resize to at least {w}x{h}")
    lo_c = (0.0 - np.asarray(mean, np.float64)) / np.asarray(std, np.float64)
    hi_c = (255.0 - np.asarray(mean, np.float64)) / np.asarray(std, np.float64)
    lo = float(np.min(np.minimum(lo_c, hi_c))) + 0.0
    hi = float(np.max(np.maximum(lo_c, hi_c))) + 0.0
    try:
        return mf.Preprocess(color_mode="L" if c == 1 else "RGB", resize=resize, resample=resample, mean=mean,
                             std=std, value_range=(lo, hi), fit=fit, crop=tuple(crop) if crop else None)
    except ValueError as exc:
        raise UsageError(f"--preprocess: {exc}", fix=_FIX) from None


def input_layer_scaling(model) -> str | None:
    """The class name of a Rescaling/Normalization layer the model applies to its input first, if any.

    Random* augmentation layers in front of it do nothing at inference and are looked through;
    a nested model (e.g. a Sequential preprocessing block) is looked into.
    """
    def first_consumers(m):
        if not hasattr(m, "layers"):
            return []
        layers = [l for l in m.layers if type(l).__name__ != "InputLayer"]
        if not layers:
            return []
        if type(m).__name__ == "Sequential":
            return layers[:1]
        ins = {id(t) for t in m.inputs}
        out = []
        for layer in layers:
            try:
                inp = layer.input
            except (AttributeError, ValueError):  # called on several inputs/nodes
                continue
            tensors = inp if isinstance(inp, (list, tuple)) else [inp]
            if any(id(t) in ins for t in tensors):
                out.append(layer)
        return out

    def walk(m, depth=0):
        found = first_consumers(m)
        if len(found) != 1 or depth > 4:
            return None
        layer = found[0]
        name = type(layer).__name__
        if name in IN_MODEL_SCALING:
            return name
        if name.startswith("Random"):
            return _after(m, layer, depth)
        if hasattr(layer, "layers"):
            return walk(layer, depth + 1)
        return None

    def _after(m, layer, depth):
        # the layer after an augmentation layer: in a Sequential the next one, else its consumers
        layers = [l for l in m.layers if type(l).__name__ != "InputLayer"]
        i = layers.index(layer)
        if i + 1 < len(layers):
            nxt = layers[i + 1]
            name = type(nxt).__name__
            if name in IN_MODEL_SCALING:
                return name
            if name.startswith("Random"):
                return _after(m, nxt, depth)
            if hasattr(nxt, "layers"):
                return walk(nxt, depth + 1)
        return None

    return walk(model)


def resolve(model, *, preprocess=None, value_range=None, data=None, n_outputs=None, name="the model") -> Resolved:
    """The input spec for ``model`` (see the module docstring for the order of the sources).

    ``preprocess``: ``--preprocess`` text, a parsed dict, or a ready :class:`protocol.manifest.Preprocess`.
    ``data``: a :class:`converter.userdata.ImageData` (to try the conventions on) or None.
    """
    shape = tuple(int(d) for d in model.inputs[0].shape[1:])
    if isinstance(preprocess, mf.Preprocess):
        try:
            return Resolved(mf.InputSpec(shape=shape, dtype="float32", preprocess=preprocess), "given")
        except ValueError as exc:
            raise UsageError(f"the preprocessing given does not fit the model's input {list(shape)}: {exc}",
                             fix=_FIX) from None
    opts = parse_preprocess(preprocess) if isinstance(preprocess, (str, type(None))) else dict(preprocess)
    geometry = {k: opts[k] for k in ("resize", "crop", "fit", "resample") if k in opts}

    def spec(mean, std):
        return mf.InputSpec(shape=shape, dtype="float32", preprocess=make_preprocess(shape, mean, std, **geometry))

    in_model = input_layer_scaling(model)
    given = _mean_std(opts, shape[-1])
    if given is not None:
        if in_model:
            log.warning("%s starts with a %s layer that scales its input, and --preprocess scales the pixels "
                        "before it too: both apply", name, in_model)
        return Resolved(spec(*given), "--preprocess")
    if in_model:
        return Resolved(spec(0.0, 1.0), f"the model's own {in_model} layer (plain pixels 0..255 go in)")
    if value_range is not None:
        lo, hi = value_range
        std = 255.0 / (hi - lo)
        return Resolved(spec(-lo * std + 0.0, std), f"the zoo entry ([{lo:g}, {hi:g}])")
    if data is not None:
        floats = _float_range(data)
        if floats is not None:
            return Resolved(spec(*floats[0]), floats[1])
        return _try_candidates(model, data, spec, shape, n_outputs, name)
    log.info("%s: nothing says how its input is scaled; using pixel / 255 in [0, 1] (--preprocess sets it)", name)
    return Resolved(spec(0.0, 255.0), "the default [0, 1] (nothing else said how pixels are scaled)")


def _float_range(data):
    """Float arrays are the model's input already: their range names the scaling."""
    items = data.train.items
    if not (isinstance(items, np.ndarray) and items.dtype.kind == "f"):
        return None
    both = [a for a in (data.train.items, data.test.items) if len(a)]
    lo = min(float(a.min()) for a in both)
    hi = max(float(a.max()) for a in both)
    slack = 1e-4
    if lo >= -slack and hi <= 1 + slack:
        return (0.0, 255.0), f"the float data's range {lo:.3g}..{hi:.3g}: [0, 1]"
    if lo >= -1 - slack and hi <= 1 + slack:
        return (127.5, 127.5), f"the float data's range {lo:.3g}..{hi:.3g}: [-1, 1]"
    if lo >= -slack and hi <= 255 + slack:
        return (0.0, 1.0), f"the float data's range {lo:.3g}..{hi:.3g}: 0..255"
    raise UsageError(f"the float images of {data.split.source} span {lo:g}..{hi:g}; edgesplit cannot tell which pixel "
                     "scaling a device should apply to give such values",
                     fix="store uint8 pixels in the .npz, or give the scaling: " + _FIX)


def _try_candidates(model, data, spec, shape, n_outputs, name) -> Resolved:
    pixels, y = data.sample_pixels(SAMPLE_N, spec(0.0, 255.0))
    tried = []
    for label, mean, std in CANDIDATES:
        if isinstance(mean, list) and shape[-1] != 3:
            continue
        s = spec(mean, std)
        x = s.pixels_to_input(pixels)
        pred = np.argmax(np.asarray(model.predict(x, batch_size=64, verbose=0)), axis=-1)
        tried.append((float(np.mean(pred == y)), label, s))
    best = max(tried, key=lambda t: t[0])   # max keeps the first of equals: [0, 1] wins ties
    report = ", ".join(f"{lab} {100 * acc:.1f} %" for acc, lab, _ in tried)
    log.info("%s: nothing says how its input is scaled; on %d training images: %s -> %s", name, len(y), report,
             best[1])
    return Resolved(best[2], f"the best of the usual scalings on {len(y)} training images ({report})")
