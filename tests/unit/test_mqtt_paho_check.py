"""The run-time check that decides whether the adapter may tune paho (protocol/mqtt/paho_client.py).

The installed paho is one the tuned client was read against; paho classes whose internals
moved (a private method with another signature, another queued-packet record, a newer
version) must each be caught, so the adapter falls back to plain paho instead of driving
internals that are not there.
"""
from __future__ import annotations

import paho.mqtt.client as paho
import pytest

from protocol.mqtt.paho_client import LeanClient, PlainClient, client_class, internals_mismatch


def test_the_installed_paho_is_the_one_the_tuned_client_was_read_against():
    assert internals_mismatch() == []
    assert client_class() is LeanClient


class _NewPuback(paho.Client):
    """A paho whose PUBACK handler takes one more argument."""

    def _handle_pubackcomp(self, cmd, properties_cache=None):
        return super()._handle_pubackcomp(cmd)


class _NewQueue(paho.Client):
    """A paho that queues its outgoing packets as another record."""

    def _packet_queue(self, command, packet, mid, qos, info=None):
        self._out_packet.append({"command": command, "mid": mid, "qos": qos, "data": memoryview(packet),
                                 "info": info})
        return paho.MQTT_ERR_SUCCESS


class _NoMatcherRoot(paho.Client):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._on_message_filtered = paho.MQTTMatcher.__new__(paho.MQTTMatcher)   # no _root


@pytest.mark.parametrize("base, words", [
    (_NewPuback, "_handle_pubackcomp(cmd, properties_cache) instead of _handle_pubackcomp(cmd)"),
    (_NewQueue, "queued packets are"),
    (_NoMatcherRoot, "matcher"),
])
def test_a_paho_whose_internals_moved_is_refused(base, words):
    problems = internals_mismatch(base)
    assert any(words in p for p in problems), problems


@pytest.mark.parametrize("version", ["2.3.0", "3.0.0", "1.6.1", "2.2.0.dev1+local", "unknown"])
def test_only_the_versions_read_against_pass(version):
    problems = internals_mismatch(version=version)
    if version.startswith("2.2"):
        assert problems == []
    else:
        assert problems and f"version {version}" in problems[0]


def test_the_plain_client_is_paho_with_nothing_private_overridden():
    own = {n for n in vars(PlainClient) if n.startswith("_") and not n.startswith("__")}
    assert own == set(), own
    assert issubclass(LeanClient, PlainClient)
