"""The split model at run time, wherever it runs: the one place every role runs a bundle.

Never imports TensorFlow (a Raspberry Pi has none); imports ``protocol``, numpy and a
LiteRT interpreter.  Public names (each imported on first use, so that the cloud can run a
tail without Pillow):

* :class:`Model`, :func:`pick_backend` (``runtime.interpreter``) — the LiteRT interpreter shim
* :class:`Preprocessor` (``runtime.preprocess``) — images to the head's input, as the manifest says
* :class:`Head`, :class:`Tail` (``runtime.split``) — input -> the tensors exactly as sent; wire tensors -> answer
"""
from __future__ import annotations

from protocol.public import public_names

__all__, __getattr__, __dir__ = public_names(__name__, {
    "Model": "runtime.interpreter",
    "pick_backend": "runtime.interpreter",
    "Preprocessor": "runtime.preprocess",
    "Head": "runtime.split",
    "Tail": "runtime.split",
})
