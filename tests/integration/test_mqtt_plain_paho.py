"""When paho's internals are not the ones the tuned client overrides, the adapter falls back to
plain paho, says so once, and still delivers every message on a real Mosquitto.

Each case runs in a fresh interpreter whose paho is changed before protocol.mqtt is imported:
a newer version number, or a private method with another signature (as a paho release that
reworked its internals would have).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

pytestmark = pytest.mark.timeout(120)

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

CHILD = textwrap.dedent("""
    import json, logging, sys, threading, time
    sys.path.insert(0, {root!r})
    logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s")
    import paho.mqtt as paho_package, paho.mqtt.client as paho
    if {change!r} == "version":
        paho_package.__version__ = "2.3.0"
    else:                              # a paho whose PUBACK handler grew a parameter
        own = paho.Client._handle_pubackcomp
        def _handle_pubackcomp(self, cmd, properties_cache=None):
            return own(self, cmd)
        paho.Client._handle_pubackcomp = _handle_pubackcomp

    from protocol.mqtt import Backoff, MqttClient
    got, lock = [], threading.Lock()
    def keep(topic, payload):
        with lock:
            got.append(payload)
    url = {url!r} + "?protocol=" + {protocol!r}
    sub = MqttClient(url, backoff=Backoff(0.1, 0.5), max_inflight=1000)
    sub.subscribe({topic!r}, keep, qos=1)
    pub = MqttClient(url, backoff=Backoff(0.1, 0.5), max_inflight=3)   # most messages wait behind the window
    assert sub.start(wait_connected=10) and pub.start(wait_connected=10)
    want = [str(i).encode() * (1 + i % 7) for i in range(300)]
    deliveries = [pub.publish({topic!r}, p, qos=0 if i % 10 == 9 else 1) for i, p in enumerate(want)]
    acked = all(d.wait(20) for d in deliveries)
    deadline = time.monotonic() + 20
    while len(got) < len(want) and time.monotonic() < deadline:
        time.sleep(0.02)
    pub.stop(); sub.stop()
    print(json.dumps({{"classes": [type(c._client).__name__ for c in (sub, pub)], "acked": acked,
                      "got": sorted(p.decode() for p in got), "want": sorted(p.decode() for p in want)}}))
""")


@pytest.mark.parametrize("change, protocol", [("version", "3.1.1"), ("signature", "3.1.1"), ("signature", "5")])
def test_plain_paho_fallback_is_said_once_and_delivers_every_message(mosquitto_broker, topic_root, change,
                                                                     protocol):
    code = CHILD.format(root=ROOT, change=change, url=mosquitto_broker.url, protocol=protocol,
                        topic=f"{topic_root}/plain")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=90,
                          env={**os.environ, "PYTHONPATH": ROOT})
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["classes"] == ["PlainClient", "PlainClient"], "the tuned client ran on a paho it was not read against"
    warnings = [ln for ln in proc.stderr.splitlines() if "using paho's own client" in ln]
    assert len(warnings) == 1, proc.stderr                   # two clients, one line
    assert ("version 2.3.0" if change == "version" else "_handle_pubackcomp(cmd, properties_cache)") in warnings[0]
    assert out["acked"], "a Delivery never completed on plain paho"
    assert out["got"] == out["want"], "a message was lost, altered or doubled on plain paho"
