"""The broker round trip, measured by the doctor (and at start-up by the worker and the agent), and the
warning with its fix when it looks like Nagle's algorithm: a stock Mosquitto (no ``set_tcp_nodelay``)
against the configuration edgesplit writes, both real, on loopback."""
from __future__ import annotations

import pytest

from deploy.broker import free_port
from device.doctor import OK, WARN, run_doctor
from protocol.mqtt.probe import nagle_advice, round_trip_ms

pytestmark = pytest.mark.timeout(120)


def test_advice_only_for_slow_round_trips_on_near_addresses():
    assert nagle_advice([44.0, 43.0, 45.0], "127.0.0.1").count("set_tcp_nodelay true") == 1
    assert nagle_advice([44.0, 43.0, 45.0], "192.168.1.10") is not None
    assert nagle_advice([0.3, 0.4, 0.2], "127.0.0.1") is None
    assert nagle_advice([44.0, 43.0, 45.0], "8.8.8.8") is None        # far away: 44 ms may be the distance
    assert nagle_advice(None, "127.0.0.1") is None


def test_doctor_finds_nagle_on_a_stock_mosquitto_and_not_on_ours(make_mosquitto, mosquitto_broker, open_dir):
    port = free_port()
    conf = open_dir / "stock.conf"           # what a stock mosquitto.conf says: no set_tcp_nodelay
    conf.write_text(f"listener {port} 127.0.0.1\nallow_anonymous true\nuser root\n")
    stock = make_mosquitto(config_path=conf)
    checks = {c.name: c for c in run_doctor(broker=stock.url, skip=("bundle", "camera")).checks}
    rt = checks["round trip"]
    assert rt.status == WARN and "Nagle" in rt.detail and "set_tcp_nodelay true" in rt.fix, rt
    checks = {c.name: c for c in run_doctor(broker=mosquitto_broker.url, skip=("bundle", "camera")).checks}
    assert checks["round trip"].status == OK, checks["round trip"]
    assert round_trip_ms(mosquitto_broker.url, rounds=3)                 # three round trips, all back


def test_worker_warns_at_start_up_on_a_stock_mosquitto(make_mosquitto, open_dir, tiny_bundle, start_worker, caplog):
    import time

    port = free_port()
    conf = open_dir / "stock.conf"
    conf.write_text(f"listener {port} 127.0.0.1\nallow_anonymous true\nuser root\n")
    stock = make_mosquitto(config_path=conf)
    with caplog.at_level("WARNING", logger="protocol.mqtt"):
        start_worker(stock.url, tiny_bundle)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and not any("Nagle" in r.getMessage() for r in caplog.records):
            time.sleep(0.1)
    assert any("Nagle" in r.getMessage() and "set_tcp_nodelay true" in r.getMessage() for r in caplog.records)
