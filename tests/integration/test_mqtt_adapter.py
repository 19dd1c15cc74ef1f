"""protocol.mqtt against real brokers: what a device or a worker notices when the broker misbehaves."""
from __future__ import annotations

import os
import queue
import signal
import subprocess
import sys
import textwrap
import threading
import time

import pytest

from deploy.broker import free_port, start_mosquitto
from fixtures_core import require
from protocol.errors import ConfigError
from protocol.mqtt import Backoff, MqttClient, Will

pytestmark = pytest.mark.timeout(90)

FAST = Backoff(initial=0.1, maximum=0.5)


class Inbox:
    """Collects (topic, payload) from a handler; ``get`` waits for the next one."""

    def __init__(self):
        self.q: queue.Queue = queue.Queue()
        self.items: list = []

    def __call__(self, topic: str, payload: bytes) -> None:
        self.items.append((topic, payload))
        self.q.put((topic, payload))

    def get(self, timeout=10.0):
        return self.q.get(timeout=timeout)


def _client(url, **kw):
    kw.setdefault("backoff", FAST)
    return MqttClient(url, **kw)


def _wait_for(pred, timeout=15.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(0.02)
    return pred()


def test_publish_and_subscribe(broker, topic_root):
    inbox = Inbox()
    online = []
    c = _client(broker.url, on_online=lambda: online.append(1))
    c.subscribe(f"{topic_root}/+/data", inbox)
    try:
        assert c.start(wait_connected=10)
        assert online == [1]
        d = c.publish(f"{topic_root}/a/data", b"\x00\x01payload")
        assert d.wait(10)
        assert inbox.get() == (f"{topic_root}/a/data", b"\x00\x01payload")
        c.publish(f"{topic_root}/a/other", b"not for us").wait(10)
        c.publish(f"{topic_root}/b/data", b"second").wait(10)
        assert inbox.get() == (f"{topic_root}/b/data", b"second")   # the non-matching one never arrived
    finally:
        c.stop()


def test_mqtt5_on_mosquitto(mosquitto_broker, topic_root):
    inbox = Inbox()
    c = _client(mosquitto_broker.url + "?protocol=5")
    c.subscribe(f"{topic_root}/#", inbox)
    try:
        assert c.start(wait_connected=10)
        c.publish(f"{topic_root}/x", b"v5").wait(10)
        assert inbox.get() == (f"{topic_root}/x", b"v5")
    finally:
        c.stop()


def test_subscription_survives_broker_restart(mosquitto_broker, topic_root):
    inbox = Inbox()
    online = []
    sub = _client(mosquitto_broker.url, on_online=lambda: online.append(time.monotonic()))
    sub.subscribe(f"{topic_root}/cmd", inbox)
    assert sub.start(wait_connected=10)
    try:
        mosquitto_broker.kill()
        assert _wait_for(lambda: not sub.connected)
        mosquitto_broker.restart()
        assert sub.wait_connected(20), "did not reconnect after the broker came back"
        assert len(online) == 2, "on_online must run after every reconnect"
        pub = _client(mosquitto_broker.url)
        assert pub.start(wait_connected=10)
        pub.publish(f"{topic_root}/cmd", b"after restart").wait(10)
        pub.stop()
        assert inbox.get() == (f"{topic_root}/cmd", b"after restart")
    finally:
        sub.stop()


def test_publish_while_broker_down_is_sent_after_reconnect(mosquitto_broker, topic_root):
    pub = _client(mosquitto_broker.url)
    assert pub.start(wait_connected=10)
    try:
        mosquitto_broker.kill()
        assert _wait_for(lambda: not pub.connected)
        d = pub.publish(f"{topic_root}/queued", b"sent while offline", qos=1)
        assert not d.done
        mosquitto_broker.restart()
        inbox = Inbox()
        sub = _client(mosquitto_broker.url)
        sub.subscribe(f"{topic_root}/queued", inbox)
        assert sub.start(wait_connected=10)
        # the subscriber may come up after the resend; give the publisher a reason to resend to it
        assert pub.wait_connected(20)
        assert d.wait(20), "the queued QoS 1 message was not delivered after reconnect"
        sub.stop()
    finally:
        pub.stop()


WILL_CHILD = textwrap.dedent("""
    import sys, time
    sys.path.insert(0, {root!r})
    from protocol.mqtt import MqttClient, Will
    c = MqttClient({url!r}, client_id="will-child", keepalive=2,
                   will=Will({topic!r}, b"offline", qos=1, retain=True),
                   on_online=lambda: c.publish({topic!r}, b"online", retain=True))
    assert c.start(wait_connected=10)
    print("ready", flush=True)
    time.sleep(600)
""")


def test_last_will_delivered_when_the_client_is_killed(broker, topic_root):
    status = f"{topic_root}/dev1/status"
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    child = subprocess.Popen([sys.executable, "-c", WILL_CHILD.format(root=root, url=broker.url, topic=status)],
                             stdout=subprocess.PIPE, text=True)
    inbox = Inbox()
    watcher = _client(broker.url)
    watcher.subscribe(status, inbox)
    try:
        assert child.stdout.readline().strip() == "ready"
        assert watcher.start(wait_connected=10)
        assert inbox.get() == (status, b"online")          # retained, seen by a late subscriber
        child.send_signal(signal.SIGKILL)
        child.wait(10)
        assert inbox.get(timeout=30) == (status, b"offline")
    finally:
        if child.poll() is None:
            child.kill()
        watcher.stop()


def test_clean_stop_does_not_fire_the_will(mosquitto_broker, topic_root):
    status = f"{topic_root}/dev2/status"
    inbox = Inbox()
    watcher = _client(mosquitto_broker.url)
    watcher.subscribe(status, inbox)
    assert watcher.start(wait_connected=10)
    dev = _client(mosquitto_broker.url, will=Will(status, b"offline"))
    try:
        assert dev.start(wait_connected=10)
        dev.publish(status, b"stopped", retain=True).wait(10)
        dev.stop()
        assert inbox.get() == (status, b"stopped")
        with pytest.raises(queue.Empty):
            inbox.get(timeout=1.5)
    finally:
        watcher.stop()


@pytest.fixture
def password_broker(make_mosquitto):
    return make_mosquitto(users={"dev1": "s3cret"})


@pytest.mark.parametrize("creds", [("dev1", "wrong"), ("nobody", "x"), (None, None)],
                         ids=["wrong-password", "unknown-user", "anonymous"])
def test_refused_credentials_raise_config_error_once(password_broker, creds):
    user, pw = creds
    fatal = []
    online = []
    c = _client(password_broker.url, username=user, password=pw,
                on_fatal=fatal.append, on_online=lambda: online.append(1))
    try:
        with pytest.raises(ConfigError) as err:
            c.start(wait_connected=10)
        assert err.value.exit_code == 78
        assert "refused" in err.value.message and err.value.fix
        assert "wrong" not in str(err.value)                    # the password is never printed
        time.sleep(2.0)                                          # several backoff periods
        assert len(fatal) == 1 and not online and not c.connected
        attempts = password_broker.log_path.read_text().count("not authorised")
        assert attempts == 1, f"the client retried a refused login {attempts} times"
        with pytest.raises(ConfigError):
            c.publish("x/y", b"z")
    finally:
        c.stop()


def test_right_credentials_connect(password_broker):
    c = _client(password_broker.url.replace("mqtt://", "mqtt://dev1:s3cret@"))
    try:
        assert c.start(wait_connected=10)
    finally:
        c.stop()


def test_down_broker_is_retried_until_it_comes_up(tmp_path, topic_root):
    require("mosquitto")
    port = free_port()
    inbox = Inbox()
    c = _client(f"mqtt://127.0.0.1:{port}")
    c.subscribe(f"{topic_root}/x", inbox)
    b = None
    try:
        assert c.start(wait_connected=1.0) is False           # nothing listens yet: no error, keeps trying
        assert c.error is None
        b = start_mosquitto("127.0.0.1", port, workdir=tmp_path / "late")
        assert c.wait_connected(20)
        c.publish(f"{topic_root}/x", b"hi").wait(10)
        assert inbox.get() == (f"{topic_root}/x", b"hi")
    finally:
        c.stop()
        if b is not None:
            b.cleanup()


def test_persistent_session_receives_what_was_sent_while_away(mosquitto_broker, topic_root):
    inbox = Inbox()
    dev = _client(mosquitto_broker.url, client_id=f"pi-{topic_root[-6:]}", clean_session=False)
    dev.subscribe(f"{topic_root}/results", inbox, qos=1)
    assert dev.start(wait_connected=10)
    dev.stop()
    pub = _client(mosquitto_broker.url)
    assert pub.start(wait_connected=10)
    pub.publish(f"{topic_root}/results", b"answer while away", qos=1).wait(10)
    pub.stop()
    again = _client(mosquitto_broker.url, client_id=f"pi-{topic_root[-6:]}", clean_session=False)
    again.subscribe(f"{topic_root}/results", inbox, qos=1)
    try:
        assert again.start(wait_connected=10)
        assert again.session_present
        assert inbox.get() == (f"{topic_root}/results", b"answer while away")
    finally:
        again.stop()


def test_handler_exception_does_not_stop_delivery(broker, topic_root):
    inbox = Inbox()
    seen = []

    def bad(topic, payload):
        seen.append(payload)
        raise RuntimeError("boom")

    c = _client(broker.url)
    c.subscribe(f"{topic_root}/bad", bad)
    c.subscribe(f"{topic_root}/good", inbox)
    try:
        assert c.start(wait_connected=10)
        c.publish(f"{topic_root}/bad", b"1").wait(10)
        c.publish(f"{topic_root}/good", b"2").wait(10)
        assert inbox.get() == (f"{topic_root}/good", b"2")
        assert seen == [b"1"] and c.connected
    finally:
        c.stop()


def test_shared_subscription_splits_messages(broker, topic_root):
    """Two workers on one $share group: each message reaches exactly one of them."""
    n = 200
    lock = threading.Lock()
    got = {0: [], 1: []}

    def handler(i):
        def h(topic, payload):
            with lock:
                got[i].append(payload)
        return h

    workers = []
    for i in range(2):
        w = _client(broker.url, client_id=f"w{i}-{topic_root[-6:]}")
        w.subscribe(f"$share/cloud/{topic_root}/+/features", handler(i))
        assert w.start(wait_connected=10)
        workers.append(w)
    pub = _client(broker.url)
    try:
        assert pub.start(wait_connected=10)
        ds = [pub.publish(f"{topic_root}/dev{k % 4}/features", str(k).encode()) for k in range(n)]
        assert all(d.wait(20) for d in ds)
        assert _wait_for(lambda: len(got[0]) + len(got[1]) >= n, 20)
        time.sleep(0.5)   # would let duplicates arrive
        every = got[0] + got[1]
        assert sorted(every, key=int) == [str(k).encode() for k in range(n)], "lost or duplicated messages"
        assert got[0] and got[1], f"one worker got everything: {len(got[0])}/{len(got[1])}"
    finally:
        pub.stop()
        for w in workers:
            w.stop()


def _make_ca_and_server(d, name="test-ca"):
    """A CA and a server certificate for 127.0.0.1 made with `cryptography` (PEM files in ``d``)."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    d.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
          .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=1))
          .not_valid_after(now + datetime.timedelta(days=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                                       data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                       crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
          .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")]))
            .issuer_name(ca_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=1)).not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                                                        x509.DNSName("localhost")]), critical=False)
            .sign(ca_key, hashes.SHA256()))
    pem = serialization.Encoding.PEM
    (d / "ca.pem").write_bytes(ca.public_bytes(pem))
    (d / "server.pem").write_bytes(cert.public_bytes(pem))
    (d / "server.key").write_bytes(key.private_bytes(pem, serialization.PrivateFormat.PKCS8,
                                                     serialization.NoEncryption()))
    return d / "ca.pem"


@pytest.fixture
def tls_broker(make_mosquitto, tmp_path):
    ca = _make_ca_and_server(tmp_path / "pki")
    port = free_port()
    b = make_mosquitto(f"listener {port} 127.0.0.1", f"cafile {ca}", f"certfile {tmp_path / 'pki' / 'server.pem'}",
                       f"keyfile {tmp_path / 'pki' / 'server.key'}")
    return b, port, ca


def test_tls_with_the_right_ca_connects(tls_broker, topic_root):
    b, port, ca = tls_broker
    inbox = Inbox()
    c = _client(f"mqtts://127.0.0.1:{port}?ca={ca}")
    c.subscribe(f"{topic_root}/t", inbox)
    try:
        assert c.start(wait_connected=10)
        c.publish(f"{topic_root}/t", b"over tls").wait(10)
        assert inbox.get() == (f"{topic_root}/t", b"over tls")
    finally:
        c.stop()


def test_tls_with_another_ca_is_a_config_error_once(tls_broker, tmp_path):
    b, port, _ = tls_broker
    other = _make_ca_and_server(tmp_path / "other", name="someone-else")
    fatal = []
    c = _client(f"mqtts://127.0.0.1:{port}", tls_ca=str(other), on_fatal=fatal.append)
    try:
        with pytest.raises(ConfigError) as err:
            c.start(wait_connected=10)
        assert err.value.exit_code == 78 and "TLS" in err.value.message and "ca=" in err.value.fix
        time.sleep(1.5)
        assert len(fatal) == 1 and not c.connected
    finally:
        c.stop()


def _burst_payloads():
    """Payloads around MQTT's length-byte boundaries and the adapter's 64 KiB read chunk."""
    sizes = [0, 1, 126, 127, 128, 129, 16_382, 16_383, 16_384, 65_535, 65_536, 70_000, 200_000]
    out = [bytes([i % 256]) * n for i, n in enumerate(sizes)]
    out += [f"small-{i}".encode() for i in range(1500)]           # many packets per read
    return out


@pytest.mark.parametrize("qos", [0, 1])
def test_a_burst_read_in_chunks_arrives_whole_and_in_order(broker, topic_root, qos):
    """The adapter reads the socket 64 KiB at a time; every message already read must reach the
    handler at once, not wait for the next bytes (keepalive 60 s: a stall would show)."""
    got, first = [], threading.Event()

    def slow_first(topic, payload):          # holds the network thread while the broker fills the socket
        if not first.is_set():
            first.set()
            time.sleep(0.5)
        got.append(payload)

    want = _burst_payloads()
    sub = _client(broker.url, keepalive=60, max_inflight=1000)
    sub.subscribe(f"{topic_root}/burst", slow_first, qos=qos)
    pub = _client(broker.url, max_inflight=1000)
    try:
        assert sub.start(wait_connected=10) and pub.start(wait_connected=10)
        deliveries = [pub.publish(f"{topic_root}/burst", p, qos=qos) for p in want]
        assert deliveries[-1].wait(20)
        assert _wait_for(lambda: len(got) >= len(want), timeout=10), f"{len(got)} of {len(want)} arrived"
        assert got == want
    finally:
        pub.stop()
        sub.stop()


def test_tls_burst_arrives_whole(tls_broker, topic_root):
    b, port, ca = tls_broker
    got = []
    want = _burst_payloads()[:200]
    sub = _client(f"mqtts://127.0.0.1:{port}?ca={ca}", keepalive=60, max_inflight=1000)
    sub.subscribe(f"{topic_root}/tb", lambda t, p: got.append(p))
    pub = _client(f"mqtts://127.0.0.1:{port}?ca={ca}", max_inflight=1000)
    try:
        assert sub.start(wait_connected=10) and pub.start(wait_connected=10)
        for p in want:
            pub.publish(f"{topic_root}/tb", p, qos=1)
        assert _wait_for(lambda: len(got) >= len(want), timeout=10), f"{len(got)} of {len(want)} arrived"
        assert got == want
    finally:
        pub.stop()
        sub.stop()


@pytest.mark.parametrize("qos", [0, 1])
def test_publishes_from_several_threads_all_arrive_each_in_its_order(broker, topic_root, qos):
    """paho's network thread is woken once per burst, not per packet (protocol/mqtt/paho_client.py): bursts
    queued from several threads at once must all leave, none waiting behind a wake-up skipped."""
    got, n_threads, n_each = [], 4, 300
    sub = _client(broker.url, keepalive=60, max_inflight=1000)
    sub.subscribe(f"{topic_root}/mt", lambda t, p: got.append(p), qos=qos)
    pub = _client(broker.url, max_inflight=1000)
    try:
        assert sub.start(wait_connected=10) and pub.start(wait_connected=10)
        go = threading.Barrier(n_threads)

        def burst(k):
            go.wait()
            for i in range(n_each):
                pub.publish(f"{topic_root}/mt", f"{k}:{i}".encode(), qos=qos)
                if i % 50 == 49:
                    time.sleep(0.01)          # let the network thread drain and fall asleep again

        threads = [threading.Thread(target=burst, args=(k,)) for k in range(n_threads)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        want = n_threads * n_each
        assert _wait_for(lambda: len(got) >= want, timeout=20), f"{len(got)} of {want} arrived"
        for k in range(n_threads):
            mine = [int(p.split(b":")[1]) for p in got if p.startswith(f"{k}:".encode())]
            assert mine == list(range(n_each)), f"thread {k}'s messages arrived out of order or twice"
    finally:
        pub.stop()
        sub.stop()


def test_a_publish_to_an_idle_client_leaves_at_once(broker, topic_root):
    """An idle network thread sleeps in select() for up to a second; a publish from another thread
    must wake it, not wait for the timeout."""
    pub = _client(broker.url, keepalive=60)
    try:
        assert pub.start(wait_connected=10)
        late = []
        for i in range(10):
            time.sleep(0.3)                   # the network thread is asleep again
            if not pub.publish(f"{topic_root}/idle", b"x", qos=1).wait(0.5):
                late.append(i)
        assert not late, f"publishes {late} waited for the network thread's select() timeout"
    finally:
        pub.stop()


@pytest.mark.parametrize("protocol", ["3.1.1", "5"])
def test_more_messages_than_the_inflight_window_all_leave_in_order(mosquitto_broker, topic_root, protocol):
    """The adapter reads plain PUBACKs itself and skips paho's scan for queued messages when none
    is queued (protocol/mqtt/paho_client.py); with a window of 3, most messages wait behind it and must each
    leave, in order, as PUBACKs free the window, and every Delivery must complete."""
    got = []
    url = f"{mosquitto_broker.url}?protocol={protocol}"
    sub = _client(url, keepalive=60, max_inflight=1000)
    sub.subscribe(f"{topic_root}/win", lambda t, p: got.append(p), qos=1)
    pub = _client(url, max_inflight=3)
    try:
        assert sub.start(wait_connected=10) and pub.start(wait_connected=10)
        want = [str(i).encode() for i in range(500)]
        deliveries = [pub.publish(f"{topic_root}/win", p, qos=1) for p in want]
        assert all(d.wait(20) for d in deliveries), "a Delivery never completed"
        assert _wait_for(lambda: len(got) >= len(want), timeout=10), f"{len(got)} of {len(want)} arrived"
        assert got == want
    finally:
        pub.stop()
        sub.stop()


def test_mqtt5_puback_with_a_reason_code_completes_the_delivery(mosquitto_broker, topic_root):
    """Mosquitto answers an MQTT 5 publish nobody subscribes to with PUBACK reason 0x10 ("no
    matching subscribers"): three bytes, which the adapter leaves to paho; the Delivery completes."""
    pub = _client(f"{mosquitto_broker.url}?protocol=5")
    try:
        assert pub.start(wait_connected=10)
        assert all(pub.publish(f"{topic_root}/nobody/{i}", b"x", qos=1).wait(10) for i in range(20))
    finally:
        pub.stop()


def test_a_burst_larger_than_the_socket_buffer_arrives_whole_in_order_mixing_qos(mosquitto_broker, topic_root):
    """The adapter joins queued packets into one send().  With the broker paused, 12 MB of messages
    fill the kernel's buffers, so sends are cut short mid-packet and the rest must follow
    byte-exact once it resumes; QoS 0 messages (paho acts on them once written) are not joined."""
    got = []
    sub = _client(mosquitto_broker.url, keepalive=60, max_inflight=1000)
    sub.subscribe(f"{topic_root}/big", lambda t, p: got.append(p), qos=1)
    pub = _client(mosquitto_broker.url, keepalive=60, max_inflight=1000)
    try:
        assert sub.start(wait_connected=10) and pub.start(wait_connected=10)
        want = [bytes([i % 251]) * (60_000 + i) + i.to_bytes(4, "big") for i in range(200)]
        qos = [0 if i % 10 == 9 else 1 for i in range(len(want))]
        os.kill(mosquitto_broker.pid, signal.SIGSTOP)
        try:
            deliveries = [pub.publish(f"{topic_root}/big", p, qos=q) for p, q in zip(want, qos)]
            time.sleep(1.0)                        # the publisher's socket fills up
        finally:
            os.kill(mosquitto_broker.pid, signal.SIGCONT)
        assert all(d.wait(30) for d in deliveries)
        assert _wait_for(lambda: len(got) >= len(want), timeout=30), f"{len(got)} of {len(want)} arrived"
        assert sorted(got) == sorted(want), "a message arrived altered, twice, or not at all"
        # MQTT orders the messages of one QoS; a broker may let QoS 0 overtake QoS 1 held by its window
        for q in (0, 1):
            assert [p for p, pq in zip(got, [qos[int.from_bytes(p[-4:], "big")] for p in got]) if pq == q] == \
                [p for p, pq in zip(want, qos) if pq == q]
    finally:
        pub.stop()
        sub.stop()
