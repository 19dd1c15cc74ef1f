"""`edgesplit broker`: the zero-setup broker a new user starts, as a user starts it."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from deploy.broker import free_port, port_accepts
from fixtures_core import require
from protocol.mqtt import Backoff, MqttClient

pytestmark = pytest.mark.timeout(90)
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _non_loopback_ip() -> str | None:
    """An address of this machine other than loopback, if it has one."""
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect(("192.0.2.1", 9))           # no packet is sent for UDP connect
            ip = s.getsockname()[0]
    except OSError:
        return None
    return None if ip.startswith("127.") else ip


def _run_verb(*args, tmp_path):
    proc = subprocess.Popen([sys.executable, "-m", "edgesplit", "broker", *args, "--workdir", str(tmp_path / "b")],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return proc


def _wait_port(port, proc, timeout=20):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if port_accepts("127.0.0.1", port):
            return
        if proc.poll() is not None:
            raise AssertionError(f"broker verb exited early: {proc.communicate()}")
        time.sleep(0.05)
    raise AssertionError("broker verb never accepted connections")


@pytest.mark.parametrize("kind", ["embedded", "mosquitto"])
def test_broker_verb_loopback_shared_subscriptions_and_clean_exit(kind, tmp_path):
    if kind == "mosquitto":
        require("mosquitto")
    port = free_port()
    proc = _run_verb("--port", str(port), *(["--mosquitto"] if kind == "mosquitto" else []), tmp_path=tmp_path)
    try:
        _wait_port(port, proc)
        ip = _non_loopback_ip()
        if ip is not None:
            assert not port_accepts(ip, port), f"the default broker must not be reachable on {ip}"

        got = {0: [], 1: []}
        url = f"mqtt://127.0.0.1:{port}"
        workers = []
        for i in range(2):
            w = MqttClient(url, backoff=Backoff(0.1, 0.5))
            w.subscribe("$share/g/edgesplit/v1/+/+/features", lambda t, p, i=i: got[i].append(p))
            assert w.start(wait_connected=10)
            workers.append(w)
        pub = MqttClient(url)
        assert pub.start(wait_connected=10)
        ds = [pub.publish(f"edgesplit/v1/f/d{k % 3}/features", str(k).encode()) for k in range(60)]
        assert all(d.wait(10) for d in ds)
        deadline = time.monotonic() + 10
        while len(got[0]) + len(got[1]) < 60 and time.monotonic() < deadline:
            time.sleep(0.02)
        time.sleep(0.3)
        assert sorted(got[0] + got[1], key=int) == [str(k).encode() for k in range(60)]
        assert got[0] and got[1]
        pub.stop()
        for w in workers:
            w.stop()

        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=20)
        assert proc.returncode == 0, err
        assert "stopped" in out
        assert not port_accepts("127.0.0.1", port), "the broker still holds the port after the verb exited"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_open_host_warns(tmp_path):
    port = free_port()
    proc = _run_verb("--host", "0.0.0.0", "--port", str(port), tmp_path=tmp_path)
    try:
        _wait_port(port, proc)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=20)
        assert proc.returncode == 0
        assert "anonymous" in err and "WARNING" in err
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_busy_port_is_a_clear_usage_error(embedded_broker, tmp_path):
    proc = _run_verb("--port", str(embedded_broker.port), tmp_path=tmp_path)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 2
    assert f"{embedded_broker.port}" in err and "fix:" in err


def test_mosquitto_with_a_given_config(tmp_path):
    require("mosquitto")
    port = free_port()
    conf = tmp_path / "conf" / "mosquitto.conf"
    conf.parent.mkdir()
    extra = "user root\n" if os.geteuid() == 0 else ""
    conf.write_text(f"listener {port} 127.0.0.1\nallow_anonymous true\n{extra}")
    proc = _run_verb("--mosquitto", "--config", str(conf.parent), tmp_path=tmp_path)
    try:
        _wait_port(port, proc)
        c = MqttClient(f"mqtt://127.0.0.1:{port}")
        assert c.start(wait_connected=10)
        c.stop()
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=20)
        assert proc.returncode == 0, err
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


# ---------------------------------------------------------------- `broker config` and running it

def _cli(*args, timeout=60):
    return subprocess.run([sys.executable, "-m", "edgesplit", *map(str, args)], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout)


def test_broker_config_then_run_it_with_tls(open_dir, tmp_path):
    require("mosquitto")
    import json
    import re

    port = free_port()
    out = open_dir / "cfg"
    done = _cli("broker", "config", "--out", out, "--devices", 2, "--fleet", "lab", "--port", port,
                "--bind", "127.0.0.1", "--hostname", "localhost")
    assert done.returncode == 0, done.stderr
    assert "TLS only" in done.stdout and f"--config {out}" in done.stdout
    info = json.loads((out / "devices" / "pi-002" / "broker.json").read_text())
    assert info["broker_url"] == f"mqtts://localhost:{port}" and info["fleet"] == "lab"
    assert "max_queued_messages" in (out / "broker" / "mosquitto.conf").read_text()

    proc = subprocess.Popen([sys.executable, "-m", "edgesplit", "broker", "--mosquitto", "--config", str(out),
                             "--workdir", str(tmp_path / "b")],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _wait_port(port, proc)
        creds = out / "devices" / "pi-002"
        pw = (creds / "password").read_text()
        good = MqttClient(f"mqtts://pi-002:{pw}@localhost:{port}?ca={creds / 'ca.crt'}")
        assert good.start(wait_connected=10), "a device with its generated credentials could not connect"
        good.stop()
        plain = MqttClient(f"mqtt://pi-002:{pw}@127.0.0.1:{port}", backoff=Backoff(0.1, 0.2))
        assert not plain.start(wait_connected=2), "plain TCP must be off"
        plain.stop()
        proc.send_signal(signal.SIGTERM)
        stdout, stderr = proc.communicate(timeout=20)
        assert proc.returncode == 0, stderr
        # the URL printed is the TLS one the config asks for, on its port
        assert re.search(rf"mqtts://127\.0\.0\.1:{port}", stderr + stdout), stderr
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.parametrize("args, message", [
    (("--mosquitto", "config", "--out", "X", "--devices", "2"), "--mosquitto is for running a broker"),
    (("--port", "1884", "config", "--out", "X", "--devices", "2"), "--port is for running a broker"),
    (("config", "--out", "X"), "say which devices the broker serves"),   # (or --bridge URL)
    (("config", "--out", "X", "--devices", "2", "--device", "a"), "not allowed with"),
    (("config", "--out", "X", "--devices", "2", "--tls-key", "k.pem"), "needs both --tls-cert and --tls-key"),
    (("--config", "X"), "add --mosquitto"),
    (("frob",), "invalid choice: 'frob'"),
])
def test_bad_broker_combinations_are_usage_errors(args, message, tmp_path):
    done = _cli("broker", *[str(tmp_path / a) if a == "X" else a for a in args])
    assert done.returncode == 2 and message in done.stderr, done.stderr
    assert not (tmp_path / "X").exists()


def test_config_port_must_match_the_configuration(tmp_path):
    require("mosquitto")
    conf = tmp_path / "mosquitto.conf"
    conf.write_text("listener 18999 127.0.0.1\nallow_anonymous true\n")
    done = _cli("broker", "--mosquitto", "--config", conf, "--port", 1884)
    assert done.returncode == 2 and "listens on port 18999" in done.stderr, done.stderr
