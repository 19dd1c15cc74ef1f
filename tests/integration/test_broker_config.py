"""The generated Mosquitto configuration, run by a real Mosquitto started here.

Checked by what arrives: a device never receives another device's results and
cannot inject frames as another device; anonymous clients and wrong passwords
are refused; TLS with the generated CA works; the broker has no plain-TCP port.
"""
from __future__ import annotations

import os
import ssl
import stat
import subprocess
import threading
import time
import uuid
from pathlib import Path

import pytest

paho = pytest.importorskip("paho.mqtt.client")
from paho.mqtt.enums import CallbackAPIVersion  # noqa: E402

from deploy.broker import free_port  # noqa: E402
from deploy.broker_config import device_ids, hash_password, verify_password, write_broker_config  # noqa: E402
from fixtures_core import require  # noqa: E402
from protocol import topics  # noqa: E402
from protocol.errors import TopicError, UsageError  # noqa: E402

needs_mosquitto = pytest.mark.usefixtures("mosquitto_path")
pytestmark = pytest.mark.timeout(120)

FLEET = "f1"


@pytest.fixture
def broker(open_dir, make_mosquitto):
    """A real Mosquitto running the generated configuration (``.cfg``: what write_broker_config wrote)."""
    cfg = write_broker_config(open_dir / "cfg", ["pi-001", "pi-002"], fleet=FLEET,
                              cloud_users=("cloud", "cloud-b"), port=free_port(), bind="127.0.0.1")
    b = make_mosquitto(config_path=cfg.out_dir)
    b.cfg = cfg
    return b


class Client:
    """A paho client that records the CONNACK, SUBACKs, PUBACK reason codes and messages."""

    def __init__(self, port, user=None, password=None, *, ca=None, tls=True, protocol=paho.MQTTv311,
                 client_id=None):
        self.messages: list[tuple[str, bytes]] = []
        self.connack = None
        self.pubacks: dict[int, int] = {}
        self.suback = threading.Event()
        self._connected = threading.Event()
        self._lock = threading.Lock()
        self.c = paho.Client(CallbackAPIVersion.VERSION2, client_id=client_id or f"t-{uuid.uuid4().hex[:8]}",
                             protocol=protocol)
        if user is not None:
            self.c.username_pw_set(user, password)
        if tls:
            self.c.tls_set(ca_certs=str(ca))
        self.c.on_connect = self._on_connect
        self.c.on_message = self._on_message
        self.c.on_subscribe = lambda *a: self.suback.set()
        self.c.on_publish = self._on_publish
        self.port = port

    def _on_connect(self, c, userdata, flags, rc, props):
        self.connack = rc
        self._connected.set()

    def _on_message(self, c, userdata, msg):
        with self._lock:
            self.messages.append((msg.topic, msg.payload))

    def _on_publish(self, c, userdata, mid, rc, props):
        self.pubacks[mid] = rc.value

    def connect(self, host="localhost", wait=10.0):
        self.c.connect(host, self.port, keepalive=30)
        self.c.loop_start()
        self._connected.wait(wait)
        return self.connack

    def subscribe(self, topic_filter):
        self.suback.clear()
        self.c.subscribe(topic_filter, qos=1)
        assert self.suback.wait(5), f"no SUBACK for {topic_filter}"

    def publish(self, topic, payload):
        info = self.c.publish(topic, payload, qos=1)
        info.wait_for_publish(5)
        return info.mid

    def received(self):
        with self._lock:
            return list(self.messages)

    def close(self):
        self.c.disconnect()
        self.c.loop_stop()


def _login(broker, user, **kw):
    cfg = broker.cfg
    c = Client(broker.port, user, cfg.password(user), ca=cfg.ca_path, **kw)
    rc = c.connect()
    assert rc is not None and not rc.is_failure, f"{user} was refused: {rc}"
    return c


def _settle(clients, expected: int, timeout=5.0):
    """Wait until the clients together hold ``expected`` messages (then a little longer for strays)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and sum(len(c.received()) for c in clients) < expected:
        time.sleep(0.05)
    time.sleep(0.3)


# ----------------------------------------------------------------- passwords

def test_password_file_format_matches_mosquitto_passwd(tmp_path):
    mosquitto_passwd = require("mosquitto_passwd")
    pw_file = tmp_path / "pw"
    subprocess.run([mosquitto_passwd, "-c", "-b", str(pw_file), "alice", "s3cret-pass"], check=True)
    stored = pw_file.read_text().strip().split(":", 1)[1]
    assert verify_password("s3cret-pass", stored)
    assert not verify_password("s3cret-Pass", stored)
    # same salt -> byte-identical line: our format is the tool's format
    _, _, rounds, salt_b64, _ = stored.split("$")
    import base64
    assert hash_password("s3cret-pass", salt=base64.b64decode(salt_b64), iterations=int(rounds)) == stored


# ----------------------------------------------------------------- the ACL, by what arrives

@needs_mosquitto
def test_device_receives_only_its_own_results(broker):
    cloud = _login(broker, "cloud")
    pi1, pi2 = _login(broker, "pi-001"), _login(broker, "pi-002")
    try:
        for f in (topics.results(FLEET, "pi-001"), topics.results(FLEET, "pi-002"),
                  f"edgesplit/v1/{FLEET}/+/results", "#"):
            pi1.subscribe(f)
        pi2.subscribe(topics.results(FLEET, "pi-002"))
        cloud.publish(topics.results(FLEET, "pi-002"), b"answer for pi-002")
        cloud.publish(topics.results(FLEET, "pi-001"), b"answer for pi-001")
        _settle([pi1, pi2], 2 + 4)
        got1 = {p for _, p in pi1.received()}
        assert got1 == {b"answer for pi-001"}, "pi-001 read something not addressed to it"
        assert pi2.received() == [(topics.results(FLEET, "pi-002"), b"answer for pi-002")]
    finally:
        for c in (cloud, pi1, pi2):
            c.close()


@needs_mosquitto
def test_device_cannot_publish_as_another_device(broker):
    workers = [_login(broker, "cloud"), _login(broker, "cloud-b")]
    pi1, pi2 = _login(broker, "pi-001"), _login(broker, "pi-002")
    v5 = _login(broker, "pi-001", protocol=paho.MQTTv5, client_id="pi-001-v5")
    try:
        for w in workers:   # the workers' shared subscription, as the cloud makes it
            w.subscribe(topics.shared_features("workers", FLEET))
        pi2.subscribe(topics.features(FLEET, "pi-001"))     # a device reading another's features
        pi2.subscribe(topics.results(FLEET, "pi-002"))
        for i in range(10):
            pi1.publish(topics.features(FLEET, "pi-001"), b"pi-001 frame %d" % i)
            pi2.publish(topics.features(FLEET, "pi-002"), b"pi-002 frame %d" % i)
        pi1.publish(topics.features(FLEET, "pi-002"), b"forged by pi-001")
        pi1.publish(topics.results(FLEET, "pi-002"), b"forged result by pi-001")
        pi1.publish(topics.status(FLEET, "pi-002"), b"offline")
        denied_mid = v5.publish(topics.features(FLEET, "pi-002"), b"forged over MQTT 5")
        _settle(workers + [pi2], 20)
        got = [p for w in workers for _, p in w.received()]
        assert sorted(got) == sorted([b"pi-001 frame %d" % i for i in range(10)]
                                     + [b"pi-002 frame %d" % i for i in range(10)])
        assert all(w.received() for w in workers), "the shared subscription did not spread frames over both workers"
        assert pi2.received() == [], "pi-002 saw another device's features or a forged result"
        # MQTT 5 tells the device why: PUBACK 135 "not authorised"
        assert v5.pubacks.get(denied_mid) == 135
    finally:
        for c in workers + [pi1, pi2, v5]:
            c.close()


@needs_mosquitto
def test_cloud_cannot_publish_features_nor_read_results(broker):
    cloud, pi1 = _login(broker, "cloud"), _login(broker, "pi-001")
    watcher = _login(broker, "cloud-b")
    try:
        cloud.subscribe(topics.results(FLEET, "pi-001"))
        watcher.subscribe(topics.all_features(FLEET))
        cloud.publish(topics.features(FLEET, "pi-001"), b"forged by the cloud")
        pi1.publish(topics.features(FLEET, "pi-001"), b"real frame")
        watcher.publish(topics.results(FLEET, "pi-001"), b"the answer")
        _settle([watcher, cloud], 1)
        assert [p for _, p in watcher.received()] == [b"real frame"]
        assert cloud.received() == [], "a cloud user read a device's results"
    finally:
        for c in (cloud, pi1, watcher):
            c.close()


# ----------------------------------------------------------------- who gets in

@needs_mosquitto
def test_anonymous_and_wrong_password_are_refused(broker):
    ca = broker.cfg.ca_path
    cases = {"anonymous": Client(broker.port, ca=ca),
             "wrong password": Client(broker.port, "pi-001", "not-the-password", ca=ca),
             "unknown user": Client(broker.port, "pi-999", broker.cfg.password("pi-001"), ca=ca),
             "another device's password": Client(broker.port, "pi-002", broker.cfg.password("pi-001"), ca=ca)}
    try:
        for what, c in cases.items():
            rc = c.connect()
            assert rc is not None and rc.is_failure, f"{what} was let in ({rc})"
            assert rc.value in (134, 135), f"{what}: unexpected CONNACK {rc}"
    finally:
        for c in cases.values():
            c.c.loop_stop()


@needs_mosquitto
def test_tls_with_generated_ca_and_no_plain_tcp(broker, tmp_path):
    cfg = broker.cfg
    # TLS with the CA written for the device connects (also by the loopback address: it is in the SAN)
    for host in ("localhost", "127.0.0.1"):
        c = Client(broker.port, "pi-001", cfg.password("pi-001"), ca=cfg.out_dir / "devices" / "pi-001" / "ca.crt")
        assert not c.connect(host).is_failure
        c.close()
    # a client that does not trust this CA is stopped by certificate verification
    other = write_broker_config(tmp_path / "other", ["pi-001"], fleet=FLEET, port=free_port())
    c = Client(broker.port, "pi-001", cfg.password("pi-001"), ca=other.ca_path)
    with pytest.raises(ssl.SSLCertVerificationError):
        c.c.connect("localhost", broker.port)
    # plain MQTT on the TLS port gets no CONNACK
    plain = Client(broker.port, "pi-001", cfg.password("pi-001"), tls=False)
    assert plain.connect(wait=3) is None
    plain.c.loop_stop()
    # and the broker listens on no other port: exactly one listening socket, the TLS one
    assert _listening_ports(broker.pid) == {broker.port}
    conf = cfg.conf_path.read_text()
    assert conf.count("\nlistener ") == 1 and "allow_anonymous false" in conf


def _listening_ports(pid: int) -> set[int]:
    """TCP ports the process listens on, from its socket inodes and /proc/net/tcp{,6}."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    ports = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        if not os.path.exists(table):
            continue
        for line in Path(table).read_text().splitlines()[1:]:
            f = line.split()
            if f[3] == "0A" and f[9] in inodes:   # 0A = LISTEN
                ports.add(int(f[1].rsplit(":", 1)[1], 16))
    return ports


@needs_mosquitto
def test_own_certificate_is_used(open_dir, make_mosquitto):
    """A user's own CA and server certificate instead of the generated ones."""
    from deploy import broker_config as bc
    ca_key, ca_cert = bc._make_ca("mine")
    key, cert = bc._make_server_cert(ca_key, ca_cert, ["localhost"])
    from cryptography.hazmat.primitives import serialization
    pem = serialization.Encoding.PEM
    mine = open_dir / "mine"
    mine.mkdir()
    (mine / "ca.pem").write_bytes(ca_cert.public_bytes(pem))
    (mine / "server.pem").write_bytes(cert.public_bytes(pem))
    (mine / "server.key").write_bytes(bc._key_pem(key))
    cfg = write_broker_config(open_dir / "cfg", ["pi-001"], fleet=FLEET, port=free_port(), bind="127.0.0.1",
                              tls_cert=mine / "server.pem", tls_key=mine / "server.key", ca=mine / "ca.pem")
    assert cfg.own_certificate and not (cfg.out_dir / "ca" / "ca.key").exists()
    assert (cfg.out_dir / "devices" / "pi-001" / "ca.crt").read_bytes() == (mine / "ca.pem").read_bytes()
    b = make_mosquitto(config_path=cfg.out_dir)
    c = Client(b.port, "pi-001", cfg.password("pi-001"), ca=mine / "ca.pem")
    assert not c.connect().is_failure
    c.close()
    # a key that is not the certificate's is refused before anything is written
    other_key, _ = bc._make_server_cert(ca_key, ca_cert, ["localhost"])
    (mine / "wrong.key").write_bytes(bc._key_pem(other_key))
    with pytest.raises(UsageError, match="does not belong"):
        write_broker_config(open_dir / "cfg2", ["pi-001"], tls_cert=mine / "server.pem", tls_key=mine / "wrong.key")


# ----------------------------------------------------------------- files, re-runs, ids

def test_rerun_keeps_secrets_and_rotate_replaces_them(tmp_path):
    out = tmp_path / "cfg"
    first = write_broker_config(out, device_ids(2), broker_user=None)
    assert first.devices == ("pi-001", "pi-002")
    assert set(first.created) >= {"CA", "server certificate"}
    for secret in ("ca/ca.key", "broker/server.key", "broker/passwd", "devices/pi-001/password",
                   "cloud/cloud/password"):
        assert stat.S_IMODE((out / secret).stat().st_mode) == 0o600, secret
    ca, pw, passwd = ((out / "broker/ca.crt").read_bytes(), first.password("pi-001"),
                      (out / "broker/passwd").read_text())

    again = write_broker_config(out, device_ids(3), broker_user=None)
    assert (out / "broker/ca.crt").read_bytes() == ca and again.password("pi-001") == pw
    assert (out / "broker/passwd").read_text().startswith(passwd.splitlines()[0])
    assert again.created == ("passwords for pi-003",)
    assert "user pi-003" in (out / "broker/acl").read_text()

    fewer = write_broker_config(out, ["pi-001"], broker_user=None)
    assert fewer.stale == ("pi-002", "pi-003")
    assert "pi-002" not in (out / "broker/passwd").read_text()
    assert "pi-002" not in (out / "broker/acl").read_text()

    rotated = write_broker_config(out, ["pi-001"], broker_user=None, rotate=True)
    assert (out / "broker/ca.crt").read_bytes() != ca and rotated.password("pi-001") != pw
    assert verify_password(rotated.password("pi-001"),
                           (out / "broker/passwd").read_text().split("\n")[0].split(":", 1)[1])


def test_device_credentials_for_flashing(tmp_path):
    import json
    cfg = write_broker_config(tmp_path / "cfg", ["cam-7"], fleet="lab", hostnames=("broker.lan", "10.0.0.5"),
                              port=8884, broker_user=None)
    d = tmp_path / "cfg" / "devices" / "cam-7"
    info = json.loads((d / "broker.json").read_text())
    assert info["broker_url"] == "mqtts://broker.lan:8884"
    assert info["username"] == info["device_id"] == "cam-7"
    assert info["topics"]["features"] == topics.features("lab", "cam-7")
    assert (d / info["ca_file"]).read_bytes() == cfg.ca_path.read_bytes()
    assert len((d / info["password_file"]).read_text()) >= 32


@pytest.mark.parametrize("devices, error", [
    (["pi/1"], TopicError), (["pi-1", "pi-1"], UsageError), (["cloud"], UsageError), ([], UsageError),
    (["a b"], TopicError)])
def test_bad_device_lists_are_refused(tmp_path, devices, error):
    with pytest.raises(error):
        write_broker_config(tmp_path / "cfg", devices, broker_user=None)
    assert not (tmp_path / "cfg").exists()


def test_device_ids():
    assert device_ids(3) == ["pi-001", "pi-002", "pi-003"]
    assert device_ids(1000)[-1] == "pi-1000"
    with pytest.raises(UsageError):
        device_ids(0)
