"""The device role (a Raspberry Pi): read inputs, run the head, publish features, receive results.

Never imports TensorFlow.  Public names, imported lazily so that ``cloud`` can
use :mod:`device.runtime` without pulling in Pillow or paho:

* :class:`DeviceAgent`, :class:`DeviceResult`, :class:`AgentStats` (``device.agent``)
* :class:`Model`, :func:`pick_backend` (``device.runtime``) — the LiteRT interpreter shim
* :class:`Preprocessor` (``device.preprocess``)
* :func:`open_inputs`, :class:`Sample` (``device.sources``)
* :class:`SqliteOutbox` (``device.outbox``)
"""
from __future__ import annotations

import importlib

_PUBLIC = {
    "DeviceAgent": "device.agent",
    "DeviceResult": "device.agent",
    "AgentStats": "device.agent",
    "Model": "device.runtime",
    "pick_backend": "device.runtime",
    "Preprocessor": "device.preprocess",
    "open_inputs": "device.sources",
    "Sample": "device.sources",
    "SqliteOutbox": "device.outbox",
}

__all__ = sorted(_PUBLIC)


def __getattr__(name: str):
    module = _PUBLIC.get(name)
    if module is None:
        raise AttributeError(f"module 'device' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_PUBLIC))
