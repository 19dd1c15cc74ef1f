"""The device role (a Raspberry Pi): read inputs, run the head, publish features, receive results.

Never imports TensorFlow.  The head itself runs in :mod:`runtime` (shared with the
cloud, the converter and the auditor).  Public names (each imported on first use):

* :class:`DeviceConfig`, :func:`load_config` (``device.config``) — every setting, defined once
* :class:`DeviceAgent` (``device.agent``), given its config and a client from :func:`open_agent` /
  :func:`mqtt_client` (``device.transport``)
* :class:`DeviceResult`, :class:`AgentStats` (``device.results``)
* :func:`open_inputs`, :class:`Sample` (``device.sources``)
* :class:`SqliteOutbox` (``device.outbox``)
"""
from __future__ import annotations

from protocol.public import public_names

__all__, __getattr__, __dir__ = public_names(__name__, {
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
})
