"""The one MQTT adapter: device and cloud talk to the broker only through this.

Three modules: ``url`` (broker addresses and password files; no paho, so a URL is checked
where paho is not installed), ``client`` (``MqttClient``, ``Will``, ``Backoff``, ``Delivery``)
and ``paho_client`` (the paho subclass that does less per message, used only when a run-time
check finds the paho internals it overrides; plain paho otherwise, said once in the log).

Business logic never imports paho; it uses this small surface::

    from protocol.mqtt import MqttClient, Will

    client = MqttClient(
        "mqtt://user:pass@127.0.0.1:1883",      # or mqtts://host:8883?ca=/path/ca.pem
        client_id="pi-01",                     # stable id: needed for persistent sessions
        clean_session=True,                    # False = persistent session (issue 6)
        protocol="3.1.1",                      # or "5" (also ?protocol=5 in the URL)
        will=Will(topic, b"offline", qos=1, retain=True),
        on_online=lambda: client.publish(status, b"online", retain=True),
        on_fatal=lambda err: ...,              # called once with a ConfigError
    )
    client.subscribe("edgesplit/v1/f/pi-01/results", handler, qos=1)   # handler(topic: str, payload: bytes)
    if not client.start(wait_connected=10):    # raises ConfigError if the broker refuses us
        ...                                    # not up yet: paho keeps retrying in the background
    delivery = client.publish(topic, payload, qos=1, retain=False)
    delivery.wait(5.0)                         # True once the broker acknowledged it (PUBACK)
    client.publish(status, b"stopped", retain=True).wait(2)
    client.stop()                              # clean DISCONNECT: the broker drops the will

Also: ``client.connected``, ``client.wait_connected(timeout)``, ``client.error``,
``client.raise_if_failed()``, ``client.unsubscribe(filter, timeout)`` (returns once the
broker's UNSUBACK is in; the handler still sees what arrived before it),
``client.in_flight()`` (publishes not yet acknowledged), ``client.connects``,
``client.session_present``, ``on_offline=`` (called when an established connection is
lost), ``backoff=Backoff(initial, maximum)``, ``max_inflight=``.  ``parse_url(url)`` gives
a :class:`BrokerUrl` whose ``str()`` hides the password; ``read_password_file(path)``;
``filter_matches(filter, topic)``.

Behaviour:

* ``subscribe`` remembers the filter and (re)subscribes in every ``on_connect``, so
  subscriptions survive reconnects.  Handlers are picked with MQTT topic matching;
  a ``$share/<group>/`` prefix is stripped for matching.  A handler that raises is
  logged and the loop carries on.  Handlers run on the network thread: hand heavy
  work to a queue.
* ``on_online()`` runs after every successful CONNACK, after the re-subscribe.
* A broker that is down or drops us is retried forever, with exponential backoff
  and full jitter (``Backoff``).  A CONNACK refusing our credentials, our
  authorisation, our client id or protocol, or a TLS certificate that fails
  verification, is final: the client is never marked connected, stops retrying,
  and the :class:`ConfigError` (exit code 78) is delivered once — raised by
  ``start``/``wait_connected``/``raise_if_failed`` and passed to ``on_fatal``.
  The adapter does not print it: whoever receives it reports it.
* ``publish`` never retains unless asked, returns a :class:`Delivery`; QoS>0
  messages published while offline are queued in memory and sent on reconnect
  (the device's durable outbox is what survives a restart).
* ``stop()`` waits (bounded) for in-flight publishes, then disconnects cleanly.
  It publishes nothing itself.
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from protocol.mqtt.url import BrokerUrl, parse_url, read_password_file

if TYPE_CHECKING:  # for type checkers; at run time __getattr__ imports the client (and paho) on first use
    from protocol.mqtt.client import Backoff, Delivery, Handler, MqttClient, Will, filter_matches

__all__ = ["MqttClient", "Will", "Backoff", "Delivery", "Handler", "filter_matches",
           "BrokerUrl", "parse_url", "read_password_file"]

_CLIENT = {"MqttClient", "Will", "Backoff", "Delivery", "Handler", "filter_matches"}


def __getattr__(name: str) -> object:
    # The client needs paho; a URL check does not.  So the client loads on first use (PEP 562).
    if name not in _CLIENT:
        raise AttributeError(f"module 'protocol.mqtt' has no attribute {name!r}")
    value = getattr(importlib.import_module("protocol.mqtt.client"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
