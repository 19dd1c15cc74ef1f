"""``edgesplit broker config --bridge``: an edge Mosquitto bridged to the cloud broker, and a WAN cut of 60 s
under it (a TCP relay the test stops and starts again) with every request answered once the link returns."""
from __future__ import annotations

import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from deploy.broker import free_port, start_mosquitto
from device.config import DeviceConfig
from device.transport import open_agent

ROOT = Path(__file__).resolve().parents[2]
CUT_S = 60.0
pytestmark = pytest.mark.timeout(400)


def _config(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "edgesplit", "broker", "config", *map(str, args)], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)


def test_bridge_config_and_the_cloud_side_gateway_user(tmp_path):
    done = _config("--bridge", "mqtts://gw-01@broker.example:8883", "--out", tmp_path / "edge", "--fleet", "lab")
    assert done.returncode == 2 and "has no password" in done.stderr          # a login without a password
    (tmp_path / "pw").write_text("s3cret\n")
    (tmp_path / "ca.crt").write_text("-----BEGIN CERTIFICATE-----\n")
    done = _config("--bridge", "mqtts://gw-01@broker.example:8883", "--password-file", tmp_path / "pw",
                   "--ca", tmp_path / "ca.crt", "--out", tmp_path / "edge", "--fleet", "lab")
    assert done.returncode == 0, done.stderr
    conf = tmp_path / "edge" / "edge" / "mosquitto.conf"
    text = conf.read_text()
    assert conf.stat().st_mode & 0o777 == 0o600                  # it holds the bridge's password
    for line in ("listener 1883 127.0.0.1", "persistence true", "cleansession false", "address broker.example:8883",
                 "topic edgesplit/v1/lab/+/features out 1", "topic edgesplit/v1/lab/+/status out 1",
                 "topic edgesplit/v1/lab/+/results in 1", "topic edgesplit/v1/lab/announce in 1",
                 "topic edgesplit/v1/lab/bundle/# in 1", "topic edgesplit/v1/lab/+/report out 1",
                 "remote_username gw-01", "remote_password s3cret",
                 f"bridge_cafile {tmp_path / 'edge' / 'edge' / 'cloud-ca.crt'}", "bridge_insecure false"):
        assert line in text.splitlines(), line
    assert "edge broker configuration for fleet 'lab'" in done.stdout
    # the cloud side: a gateway user that may speak for the fleet's devices, and no more
    done = _config("--out", tmp_path / "cloud", "--devices", 2, "--fleet", "lab", "--gateway", "gw-01")
    assert done.returncode == 0, done.stderr
    acl = (tmp_path / "cloud" / "broker" / "acl").read_text().split("user gw-01\n", 1)[1].split("\n\n")[0]
    assert acl.splitlines() == ["topic write edgesplit/v1/lab/+/features", "topic write edgesplit/v1/lab/+/status",
                                "topic read edgesplit/v1/lab/+/results",
                                # bundle updates: what the devices behind it read and write (docs/fleet.md)
                                "topic read edgesplit/v1/lab/announce", "topic read edgesplit/v1/lab/+/announce",
                                "topic read edgesplit/v1/lab/bundle/#", "topic read edgesplit/v1/lab/+/dead-letter",
                                "topic write edgesplit/v1/lab/+/report"]
    assert (tmp_path / "cloud" / "gateways" / "gw-01" / "password").is_file()
    done = _config("--bridge", "mqtt://127.0.0.1:1", "--out", tmp_path / "x", "--devices", 2)
    assert done.returncode == 2 and "bridges the whole fleet" in done.stderr


def test_wan_cut_of_60_s_under_the_bridge_every_request_answered_after(mosquitto_broker, tiny_bundle, start_worker,
                                                                     open_dir):
    from bench.netlink import Relay
    from converter import datasets

    cloud = mosquitto_broker
    start_worker(cloud.url, tiny_bundle)
    wan_port = free_port()
    relay = Relay(("127.0.0.1", wan_port), ("127.0.0.1", cloud.port)).start()
    edge_port = free_port()
    done = _config("--bridge", f"mqtt://127.0.0.1:{wan_port}", "--out", open_dir / "site", "--fleet", "lab",
                   "--port", edge_port, "--gateway", "gw-test")
    assert done.returncode == 0, done.stderr
    edge = start_mosquitto(config_path=open_dir / "site", workdir=open_dir / "edge-run")
    links = [relay]
    try:
        x, _ = datasets.synthetic_images(300, seed=9)
        times: dict[str, float] = {}
        cut = {}

        def restore():
            cut["restored"] = time.monotonic()
            links.append(Relay(("127.0.0.1", wan_port), ("127.0.0.1", cloud.port)).start())

        cfg = DeviceConfig(device_id="pi-edge", fleet="lab", bundle=tiny_bundle.root, broker_url=edge.url,
                           timeout=CUT_S + 120, resend_after=0.0)            # never re-sent: the bridge keeps them
        with open_agent(cfg) as agent:
            for r in agent.run_arrays(x, ids=[f"img{i}" for i in range(len(x))]):
                assert r.ok, r.error
                assert r.input not in times, "a request answered twice at the device"
                times[r.input] = time.monotonic()
                if not cut and len(times) == 100:
                    relay.stop()                    # the WAN goes: connections reset, nothing listens
                    cut["at"] = time.monotonic()
                    threading.Timer(CUT_S, restore).start()
        s = agent.stats
        assert len(times) == s.answered == 300 and s.timeouts == 0 and s.resends == 0
        assert cut["restored"] - cut["at"] >= CUT_S
        after = sum(t >= cut["restored"] for t in times.values())
        assert after >= 150, f"only {after} answers came after the link returned"
        print(f"\nWAN cut for {cut['restored'] - cut['at']:.0f} s after 100 answers: the other {after} answered "
              f"{max(times.values()) - cut['restored']:.1f} s after the link returned; none re-sent by the device")
    finally:
        for link in links:
            link.stop()
        edge.cleanup()
