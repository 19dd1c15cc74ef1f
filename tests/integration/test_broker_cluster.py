"""``edgesplit broker --cluster 3``: three NATS nodes with JetStream and MQTT on loopback, as a user runs it."""
from __future__ import annotations

import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fixtures_core import require

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.timeout(120)


def test_cluster_verb_prints_urls_that_work_and_stops_on_sigterm(tmp_path):
    require("nats-server")
    from protocol.mqtt import MqttClient

    p = subprocess.Popen([sys.executable, "-m", "edgesplit", "broker", "--cluster", "3", "--workdir",
                          str(tmp_path / "c")], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines = []
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not any("devices (MQTT 3.1.1" in x for x in lines):
            line = p.stderr.readline()
            assert line or p.poll() is None, "".join(lines)
            lines.append(line)
        text = "".join(lines)
        mqtt = re.findall(r"MQTT (mqtt://127\.0\.0\.1:\d+)", text)
        assert len(mqtt) == 3 and "--source nats://" in text, text
        assert sorted(f.name for f in (tmp_path / "c").glob("n*.conf")) == ["n1.conf", "n2.conf", "n3.conf"]
        for url in mqtt:                         # every node's MQTT gateway takes a device
            c = MqttClient(url)
            assert c.start(wait_connected=10), url
            c.stop()
    finally:
        p.send_signal(signal.SIGTERM)
        out, _ = p.communicate(timeout=60)
    assert p.returncode == 0 and "NATS cluster of 3 node(s)" in out


def test_cluster_refuses_mosquitto_options():
    done = subprocess.run([sys.executable, "-m", "edgesplit", "broker", "--cluster", "3", "--mosquitto"], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "cannot go with --cluster" in done.stderr
