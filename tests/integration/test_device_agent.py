"""The device agent against real brokers, a real cloud worker and a real converted bundle.

Device and cloud run as separate processes (``python -m edgesplit ...``), the
device in an interpreter where TensorFlow cannot be imported, as on a Pi.
"""
from __future__ import annotations

import json
import queue
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from device.agent import DeviceAgent
from device.config import DeviceConfig
from device.credentials import Credentials
from device.transport import mqtt_client, open_agent
from protocol import topics
from protocol.errors import ConfigError
from protocol.manifest import load_bundle
from protocol.mqtt import MqttClient
from runtime.interpreter import Model
from runtime.preprocess import Preprocessor

from fixtures_models import BLOCKED_CLI, blocked_env

pytestmark = pytest.mark.timeout(300)



# --------------------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def images(tiny_bundle_dir, tmp_path_factory):
    """120 MNIST-like PNGs and the label the split model gives each (computed here, locally)."""
    from converter import datasets

    folder = tmp_path_factory.mktemp("images")
    x, _ = datasets.synthetic_images(120, seed=7)
    k = np.round(x[..., 0] * 255).astype(np.uint8)
    for i, img in enumerate(k):
        Image.fromarray(img, "L").save(folder / f"{i:04d}.png")
    return folder, expected_labels(tiny_bundle_dir, sorted(folder.glob("*.png")))


def expected_labels(bundle_dir: Path, paths) -> dict[str, int]:
    b = load_bundle(bundle_dir)
    x = Preprocessor(b.manifest.input).batch(paths)
    probs = Model(b.tail_path).run_float(b.feature.dequantize(Model(b.head_path).run(x)))
    return {str(p): int(i) for p, i in zip(paths, probs.argmax(axis=1))}


class StatusWatcher:
    """Records every payload on a device's status topic (retained ones included)."""

    def __init__(self, url: str, fleet: str, device: str):
        self.topic = topics.status(fleet, device)
        self.seen: list[str] = []
        self._q: queue.Queue = queue.Queue()
        self.client = MqttClient(url)
        self.client.subscribe(self.topic, self._on, qos=1)
        assert self.client.start(wait_connected=10)

    def _on(self, topic, payload):
        self.seen.append(payload.decode())
        self._q.put(payload.decode())

    def wait_for(self, value: str, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if self._q.get(timeout=0.2) == value:
                    return
            except queue.Empty:
                pass
        raise AssertionError(f"status {value!r} not seen within {timeout} s; seen {self.seen}")

    def stop(self):
        self.client.stop()


def retained_status(url: str, fleet: str, device: str) -> str | None:
    w = StatusWatcher(url, fleet, device)
    try:
        deadline = time.monotonic() + 5
        while not w.seen and time.monotonic() < deadline:
            time.sleep(0.05)
        return w.seen[-1] if w.seen else None
    finally:
        w.stop()


def start_device(tmp_path, *args, **popen):
    """``edgesplit device run ...`` where TensorFlow cannot be imported; what it tried is in block-report.json."""
    return subprocess.Popen([sys.executable, "-c", BLOCKED_CLI, "device", "run", *map(str, args)],
                            env=blocked_env(tmp_path, BLOCK_REPORT=str(tmp_path / "block-report.json")),
                            cwd=tmp_path, text=True, **popen)


# --------------------------------------------------------------------------- tests

def test_device_and_cloud_processes_answer_every_image_once(broker, tiny_bundle_dir, images, cloud_command, tmp_path):
    folder, expected = images
    fleet, device = "lab", "pi-01"
    cloud_command(broker.url, tiny_bundle_dir).wait_ready()
    watcher = StatusWatcher(broker.url, fleet, device)
    try:
        dev = start_device(tmp_path, "--bundle", tiny_bundle_dir, "--broker", broker.url, "--device-id", device,
                           "--fleet", fleet, "--timeout", 60, folder, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        out, err = dev.communicate(timeout=240)
        assert dev.returncode == 0, err
        rows = [json.loads(line) for line in out.splitlines() if line.strip()]
        # every image answered exactly once, with its own answer
        assert sorted(r["input"] for r in rows) == sorted(expected)
        assert len({r["request_id"] for r in rows}) == len(rows)
        assert all("error" not in r for r in rows)
        wrong = [r["input"] for r in rows if int(r["label"]) != expected[r["input"]]]
        assert wrong == []
        assert all(r["latency_ms"] > 0 and 0 <= r["probability"] <= 1 for r in rows)
        assert f"{len(expected)}/{len(expected)} answered" in err
        # availability: online while running, stopped after a clean exit (and that is what stays retained)
        watcher.wait_for("stopped")
        assert "online" in watcher.seen and watcher.seen.index("online") < watcher.seen.index("stopped")
        assert retained_status(broker.url, fleet, device) == "stopped"
        # the device process never touched TensorFlow and ran on LiteRT
        report = json.loads((tmp_path / "block-report.json").read_text())
        assert report == {"attempts": [], "interpreter": ["ai_edge_litert"]}
    finally:
        watcher.stop()


def test_last_will_says_offline_after_kill_9(mosquitto_broker, tiny_bundle_dir, images, tmp_path):
    folder, _ = images
    url = mosquitto_broker.url
    watcher = StatusWatcher(url, "lab", "pi-kill")
    try:
        # no cloud: the device waits for answers with a full window, online
        dev = start_device(tmp_path, "--bundle", tiny_bundle_dir, "--broker", url, "--device-id", "pi-kill",
                           "--fleet", "lab", "--timeout", 120, folder, stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL)
        watcher.wait_for("online", timeout=60)
        dev.send_signal(signal.SIGKILL)
        dev.wait(10)
        watcher.wait_for("offline", timeout=30)
        assert retained_status(url, "lab", "pi-kill") == "offline"
    finally:
        watcher.stop()


def test_sigterm_is_a_clean_stop(mosquitto_broker, tiny_bundle_dir, images, tmp_path):
    folder, _ = images
    url = mosquitto_broker.url
    watcher = StatusWatcher(url, "lab", "pi-term")
    frames = []
    watcher.client.subscribe(topics.features("lab", "pi-term"), lambda t, p: frames.append(p))
    try:
        dev = start_device(tmp_path, "--bundle", tiny_bundle_dir, "--broker", url, "--device-id", "pi-term",
                           "--fleet", "lab", "--timeout", 120, folder, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        watcher.wait_for("online", timeout=60)
        deadline = time.monotonic() + 60
        while len(frames) < 64 and time.monotonic() < deadline:   # a full window, unanswered (no cloud)
            time.sleep(0.05)
        assert len(frames) >= 64
        dev.send_signal(signal.SIGTERM)     # what systemd does
        out, err = dev.communicate(timeout=60)
        watcher.wait_for("stopped", timeout=30)
        assert "offline" not in watcher.seen
        assert dev.returncode == 0, err     # a requested stop is a clean exit...
        rows = [json.loads(line) for line in out.splitlines() if line.strip()]
        assert rows and all(r["error"].startswith("stopped") for r in rows)   # ...that says what was left
        assert f"abandoned {len(rows)}" in err
    finally:
        watcher.stop()


@pytest.fixture
def password_broker(make_mosquitto):
    return make_mosquitto(users={"pi-01": "s3cret"})


def test_refused_credentials_exit_78_once(password_broker, tiny_bundle_dir, images, tmp_path):
    folder, _ = images
    url = password_broker.url.replace("mqtt://", "mqtt://pi-01:wrong-pass@")
    dev = start_device(tmp_path, "--bundle", tiny_bundle_dir, "--broker", url, "--device-id", "pi-01", folder,
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out, err = dev.communicate(timeout=120)
    assert dev.returncode == 78, err
    assert err.count("refused the connection") == 1
    assert "wrong-pass" not in err
    assert out == ""


def test_python_api_runs_arrays_and_matches_each_answer(broker, tiny_bundle, start_worker):
    """What the demo drives: 300 in-memory images, no files, every answer for its own request."""
    from converter import datasets

    x, _ = datasets.synthetic_images(300, seed=11)
    b = tiny_bundle
    want = Model(b.tail_path).run_float(b.feature.dequantize(Model(b.head_path).run(x))).argmax(axis=1)

    start_worker(broker.url, b)
    cfg = DeviceConfig(device_id="pi-api", fleet="lab", bundle=b.root, broker_url=broker.url, max_in_flight=16)
    with open_agent(cfg) as agent:
        got = {}
        for r in agent.run_arrays(x, ids=[f"img{i}" for i in range(len(x))]):
            assert r.ok, r.error
            assert r.input not in got
            got[r.input] = r.index
            assert agent.in_flight <= 16
        single = agent.infer(x[5], name="again")
    assert got == {f"img{i}": int(want[i]) for i in range(len(x))}
    assert single.index == int(want[5]) and single.input == "again"
    s = agent.stats
    assert (s.requests, s.answered, s.timeouts, s.duplicates, s.bad_frames) == (301, 301, 0, 0, 0)
    assert s.ok and "301/301 answered" in s.summary()


def test_no_answer_is_reported_as_a_timeout(mosquitto_broker, tiny_bundle_dir):
    cfg = DeviceConfig(device_id="pi-lonely", bundle=tiny_bundle_dir, broker_url=mosquitto_broker.url, timeout=1.0,
                       resend_after=0.3)
    with open_agent(cfg) as agent:
        results = list(agent.run_arrays(np.zeros((3, 28, 28, 1), np.float32)))
    assert [r.error.split(":")[0] for r in results] == ["timeout"] * 3
    assert all(r.attempts >= 2 for r in results)      # re-sent while waiting
    assert agent.stats.timeouts == 3 and not agent.stats.ok


def test_refused_credentials_raise_config_error_in_python(password_broker, tiny_bundle_dir):
    cfg = DeviceConfig(device_id="pi-01", bundle=tiny_bundle_dir, broker_url=password_broker.url)
    # the client is made outside the agent, as any transport would be
    agent = DeviceAgent(cfg, mqtt_client(cfg, Credentials(username="pi-01", password="nope")))
    with pytest.raises(ConfigError) as e:
        agent.start()
    assert e.value.exit_code == 78
    agent.stop()


def test_signed_frames_are_answered_and_a_wrong_key_is_not(mosquitto_broker, tiny_bundle, start_worker, tmp_path):
    from protocol import signing

    keys = tmp_path / "keys"
    good = signing.write_key(keys / "pi-signed.key")
    signing.write_key(keys / "pi-forged.key")
    start_worker(mosquitto_broker.url, tiny_bundle, keys=signing.load_keys(keys))
    x = np.zeros((4, 28, 28, 1), np.float32)
    signed = DeviceConfig(device_id="pi-signed", bundle=tiny_bundle.root, broker_url=mosquitto_broker.url,
                          key_file=str(keys / "pi-signed.key"))
    with open_agent(signed) as agent:
        assert agent.key == good
        assert all(r.ok for r in agent.run_arrays(x))
    assert agent.stats.answered == 4 and agent.stats.bad_frames == 0
    # a device signing with a key the cloud does not hold for it gets no answers (dead-lettered)
    forged = DeviceConfig(device_id="pi-forged", bundle=tiny_bundle.root, broker_url=mosquitto_broker.url,
                          timeout=2.0, resend_after=0)
    with DeviceAgent(forged, mqtt_client(forged), key=signing.generate_key()) as agent:
        results = list(agent.run_arrays(x))
    assert [r.error.split(":")[0] for r in results] == ["timeout"] * 4


def test_a_keyed_device_drops_unsigned_and_forged_results_and_counts_them(mosquitto_broker, tiny_bundle, tmp_path):
    """A device holding a key uses a result only with a valid MAC: on its own results topic, an unsigned
    answer and one signed with another key are counted and dropped; the correctly signed one is used."""
    from protocol import signing
    from protocol.frame import Frame, decode_frame, encode_frame, now_us

    key = signing.write_key(tmp_path / "pi-keyed.key")
    cfg = DeviceConfig(device_id="pi-keyed", fleet="lab", bundle=tiny_bundle.root, broker_url=mosquitto_broker.url,
                       key_file=str(tmp_path / "pi-keyed.key"), timeout=60, resend_after=0)
    # a cloud of the test's own: it answers every request three times, in this order, on one topic
    requests: queue.Queue = queue.Queue()
    cloud = MqttClient(mosquitto_broker.url)
    cloud.subscribe(topics.features("lab", "pi-keyed"), lambda t, p: requests.put(p), qos=1)
    assert cloud.start(wait_connected=10)
    answers = {"unsigned": None, "forged": signing.generate_key(), "signed": key}
    label = 3

    def answer_all(n):
        for _ in range(n):
            request = decode_frame(requests.get(timeout=30), key=key)      # the device signs what it sends
            result = Frame.result(request, np.eye(10, dtype=np.float32)[label], t_recv_us=now_us())
            for k in answers.values():
                cloud.publish(topics.results("lab", "pi-keyed"), encode_frame(result, key=k), qos=1)

    import threading

    x = np.zeros((4, 28, 28, 1), np.float32)
    answering = threading.Thread(target=answer_all, args=(len(x),), daemon=True)
    answering.start()
    try:
        with open_agent(cfg) as agent:
            got = list(agent.run_arrays(x))
        answering.join(10)
    finally:
        cloud.stop()
    assert [r.index for r in got] == [label] * 4 and all(r.ok for r in got)
    s = agent.stats
    assert s.unauthenticated == 8, s.summary()          # one unsigned and one forged answer per request
    assert (s.answered, s.bad_frames, s.duplicates) == (4, 0, 0)
    assert "unauthenticated 8" in s.summary()


def test_device_with_generated_credentials_over_tls(tiny_bundle, images, open_dir, make_mosquitto, start_worker,
                                                    tmp_path):
    """The production path: `edgesplit broker config` output, TLS, passwords, ACL; the device reads its
    credential directory, the cloud logs in as the cloud user."""
    import urllib.parse

    from deploy.broker import free_port
    from deploy.broker_config import write_broker_config

    folder, expected = images
    port = free_port()
    cfg = write_broker_config(open_dir / "cfg", ["pi-001"], fleet="f1", port=port, bind="127.0.0.1")
    make_mosquitto(config_path=cfg.out_dir)
    cloud_dir = cfg.credentials_dir("cloud")
    start_worker(f"mqtts://cloud:{urllib.parse.quote(cfg.password('cloud'), safe='')}@localhost:{port}"
                 f"?ca={cloud_dir / 'ca.crt'}", tiny_bundle)
    dev = start_device(tmp_path, "--bundle", tiny_bundle.root, "--credentials", cfg.credentials_dir("pi-001"),
                       "--timeout", 60, folder, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out, err = dev.communicate(timeout=240)
    assert dev.returncode == 0, err
    rows = [json.loads(line) for line in out.splitlines() if line.strip()]
    assert {r["input"]: int(r["label"]) for r in rows} == expected
    assert cfg.password("pi-001") not in out + err
