"""The split model at run time, wherever it runs: the one place every role runs a bundle.

Never imports TensorFlow (a Raspberry Pi has none); imports ``protocol``, numpy and a
LiteRT interpreter.  Public names, imported lazily so that the cloud can run a tail
without Pillow:

* :class:`Model`, :func:`pick_backend` (``runtime.interpreter``) — the LiteRT interpreter shim
* :class:`Preprocessor` (``runtime.preprocess``) — images to the head's input, as the manifest says
* :class:`Head`, :class:`Tail` (``runtime.split``) — input -> the tensors exactly as sent; wire tensors -> answer
"""
from __future__ import annotations

import importlib

_PUBLIC = {
    "Model": "runtime.interpreter",
    "pick_backend": "runtime.interpreter",
    "Preprocessor": "runtime.preprocess",
    "Head": "runtime.split",
    "Tail": "runtime.split",
}

__all__ = sorted(_PUBLIC)


def __getattr__(name: str):
    module = _PUBLIC.get(name)
    if module is None:
        raise AttributeError(f"module 'runtime' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_PUBLIC))
