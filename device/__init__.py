"""The device role (a Raspberry Pi): read inputs, run the head, publish features, receive results.

Never imports TensorFlow.  The head itself runs in :mod:`runtime` (shared with the
cloud, the converter and the auditor).  Public names, imported lazily:

* :class:`DeviceConfig`, :func:`load_config` (``device.config``) — every setting, defined once
* :class:`DeviceAgent` (``device.agent``), given its config and a client from :func:`open_agent` /
  :func:`mqtt_client` (``device.transport``)
* :class:`DeviceResult`, :class:`AgentStats` (``device.results``)
* :func:`open_inputs`, :class:`Sample` (``device.sources``)
* :class:`SqliteOutbox` (``device.outbox``)
"""
from __future__ import annotations

import importlib

_PUBLIC = {
    "DeviceConfig": "device.config",
    "load_config": "device.config",
    "DeviceAgent": "device.agent",
    "open_agent": "device.transport",
    "mqtt_client": "device.transport",
    "DeviceResult": "device.results",
    "AgentStats": "device.results",
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
