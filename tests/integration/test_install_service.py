"""The device service (`edgesplit device serve`, what the systemd unit runs) against a real Mosquitto,
a real cloud worker and a real bundle: sd_notify, watched folder, status, exit codes, recovery."""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from protocol import topics

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.timeout(600)
FLEET = "lab"


@pytest.fixture
def cloud(tiny_bundle, start_worker):
    """``cloud(url)``: a real cloud worker in this process (started by the test when it wants one)."""
    return lambda url: start_worker(url, tiny_bundle, fleet=FLEET)


def write_images(folder: Path, n: int, start: int = 0) -> list[Path]:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(start)
    paths = []
    for i in range(start, start + n):
        p = folder / f"img{i:03d}.png"
        tmp = folder / f".{p.name}.tmp"
        Image.fromarray(rng.integers(0, 256, (28, 28), dtype=np.uint8), "L").save(tmp, format="PNG")
        os.replace(tmp, p)           # the writer's side of the contract: rename into place
        paths.append(p)
    return paths


class Service:
    """`edgesplit device serve --config FILE` under a fake systemd: a notify socket and a watchdog."""

    def __init__(self, tmp: Path, config: dict, *, python: str = sys.executable, env: dict | None = None):
        from device.config import dump_config

        self.dir = tmp
        self.conf = tmp / "device.toml"
        self.conf.write_text(dump_config(config))
        self.state = Path(config.get("state_dir", tmp / "state"))
        self.sock_path = str(tmp / f"notify-{time.monotonic_ns()}")
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.sock_path)
        self.sock.settimeout(0.2)
        self.messages: list[str] = []
        self._stop = threading.Event()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        self.log = open(tmp / f"service-{time.monotonic_ns()}.log", "w+")
        e = dict(os.environ, NOTIFY_SOCKET=self.sock_path, WATCHDOG_USEC="2000000", **(env or {}))
        self.proc = subprocess.Popen([python, "-m", "edgesplit", "device", "serve", "--config", str(self.conf)], cwd=tmp,
                                     env=e, stdout=self.log, stderr=subprocess.STDOUT)

    def _read(self):
        while not self._stop.is_set():
            try:
                self.messages.append(self.sock.recv(65536).decode())
            except socket.timeout:
                continue
            except OSError:
                return

    def output(self) -> str:
        self.log.flush()
        self.log.seek(0)
        return self.log.read()

    def saw(self, text: str) -> bool:
        return any(text in m for m in self.messages)

    def wait_for(self, cond, timeout: float, what: str):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if cond():
                return
            if self.proc.poll() is not None and not cond():
                raise AssertionError(f"service exited {self.proc.returncode} while waiting for {what}:\n"
                                     + self.output())
            time.sleep(0.05)
        raise AssertionError(f"timed out waiting for {what}; notify: {self.messages[-5:]}\n{self.output()}")

    def results(self) -> list[dict]:
        p = self.state / "results.jsonl"
        return [json.loads(x) for x in p.read_text().splitlines()] if p.exists() else []

    def terminate(self, timeout: float = 60) -> int:
        self.proc.send_signal(signal.SIGTERM)
        rc = self.proc.wait(timeout)
        time.sleep(0.3)          # the last datagrams
        return rc

    def close(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self._stop.set()
        self.sock.close()
        self.log.close()


@pytest.fixture
def services():
    made = []
    yield made
    for s in made:
        s.close()


def status_watcher(url: str, device: str):
    """Collects what is published on the device's retained status topic."""
    from protocol.mqtt import MqttClient

    seen: list[str] = []
    c = MqttClient(url, client_id=f"watch-{device}-{time.monotonic_ns()}")
    c.subscribe(topics.status(FLEET, device), lambda t, p: seen.append(p.decode()))
    assert c.start(wait_connected=10)
    return c, seen


def base_config(tmp: Path, bundle: Path, url: str, device: str = "pi-001", **sections) -> dict:
    cfg = {"device_id": device, "fleet": FLEET, "bundle": str(bundle), "state_dir": str(tmp / "state"),
           "broker": {"url": url}, "inputs": {"settle": 0.2, "poll_interval": 0.2}}
    for k, v in sections.items():
        cfg.setdefault(k, {}).update(v)
    return cfg


def test_watched_folder_images_are_answered_moved_and_logged(mosquitto_broker, cloud, tiny_bundle_dir, tmp_path,
                                                             services):
    cloud(mosquitto_broker.url)
    watcher, status = status_watcher(mosquitto_broker.url, "pi-001")
    try:
        svc = Service(tmp_path, base_config(tmp_path, tiny_bundle_dir, mosquitto_broker.url))
        services.append(svc)
        svc.wait_for(lambda: svc.saw("READY=1"), 90, "READY=1")
        inbox = svc.state / "inbox"
        assert inbox.is_dir(), "the service makes its inbox"
        images = write_images(inbox, 12)
        (inbox / "broken.png").write_bytes(b"not an image")
        (inbox / "notes.txt").write_text("not an input")
        svc.wait_for(lambda: len(svc.results()) >= 13, 90, "13 results")
        res = svc.results()
        good = [r for r in res if "error" not in r]
        assert sorted(Path(r["input"]).name for r in good) == [p.name for p in images]
        assert all(r["device_id"] == "pi-001" and r["label"] is not None and 0 <= r["probability"] <= 1
                   for r in good)
        bad = [r for r in res if "error" in r]
        assert len(bad) == 1 and Path(bad[0]["input"]).name == "broken.png" and "input" in bad[0]["error"]
        svc.wait_for(lambda: not any(inbox.glob("*.png")), 10, "the inbox to empty")
        assert sorted(p.name for p in (svc.state / "done").iterdir()) == [p.name for p in images]
        assert [p.name for p in (svc.state / "failed").iterdir()] == ["broken.png"]
        assert (inbox / "notes.txt").exists(), "what is not an image is left alone"

        # a second batch while running: the folder is watched, not read once
        more = write_images(inbox, 3, start=100)
        svc.wait_for(lambda: len(svc.results()) >= 16, 60, "3 more results")
        assert {Path(r["input"]).name for r in svc.results()[-3:]} == {p.name for p in more}
        svc.wait_for(lambda: svc.saw("WATCHDOG=1"), 10, "a watchdog ping")
        assert svc.saw("STATUS=connected; answered")
        assert "online" in status

        assert svc.terminate() == 0
        assert svc.saw("STOPPING=1")
        deadline = time.monotonic() + 5
        while status[-1:] != ["stopped"] and time.monotonic() < deadline:
            time.sleep(0.05)
        assert status[-1] == "stopped", status
    finally:
        watcher.stop()


def test_refused_credentials_exit_78_and_never_report_ready(make_mosquitto, tiny_bundle_dir, tmp_path, services):
    broker = make_mosquitto(users={"pi-001": "right"})
    creds = tmp_path / "creds"
    creds.mkdir()
    (creds / "password").write_text("wrong")
    svc = Service(tmp_path, base_config(tmp_path, tiny_bundle_dir, broker.url, broker={"credentials": str(creds)}))
    services.append(svc)
    assert svc.proc.wait(90) == 78, svc.output()
    assert not svc.saw("READY=1")
    out = svc.output()
    assert "refused" in out and "fix:" in out
    assert svc.saw("EXIT_STATUS=78")

    # the right password, handed over the way systemd's LoadCredential= does
    sd = tmp_path / "sd-creds"
    sd.mkdir()
    (sd / "broker-password").write_text("right")
    ok = Service(tmp_path, base_config(tmp_path, tiny_bundle_dir, broker.url, broker={"credentials": str(creds)}),
                 env={"CREDENTIALS_DIRECTORY": str(sd)})
    services.append(ok)
    ok.wait_for(lambda: ok.saw("READY=1"), 90, "READY=1")
    assert "credentials from systemd credentials" in ok.output()
    assert ok.terminate() == 0


@pytest.mark.parametrize("problem", ["config", "bundle"])
def test_a_bad_config_or_bundle_exits_78(mosquitto_broker, tiny_bundle_dir, tmp_path, services, problem):
    cfg = base_config(tmp_path, tiny_bundle_dir, mosquitto_broker.url)
    if problem == "config":
        svc_dir = tmp_path
        conf = svc_dir / "device.toml"
        from device.config import dump_config

        conf.write_text(dump_config(cfg).replace("poll_interval", "pol_interval"))
        # `python -m device.service`, what units installed before `edgesplit device serve` run
        proc = subprocess.run([sys.executable, "-m", "device.service", "--config", str(conf)], cwd=ROOT,
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode == 78
        assert "inputs.pol_interval" in proc.stderr and "did you mean `inputs.poll_interval`" in proc.stderr
        return
    bad = tmp_path / "bundle"
    shutil.copytree(tiny_bundle_dir, bad)
    with open(bad / "head.tflite", "r+b") as f:
        f.seek(100)
        f.write(b"\0\0\0\0")
    cfg["bundle"] = str(bad)
    svc = Service(tmp_path, cfg)
    services.append(svc)
    assert svc.proc.wait(90) == 78
    assert "head.tflite" in svc.output() and not svc.saw("READY=1")


def test_a_broker_that_is_down_is_waited_for(make_mosquitto, cloud, tiny_bundle_dir, tmp_path, services):
    broker = make_mosquitto()
    url = broker.url
    broker.stop()
    svc = Service(tmp_path, base_config(tmp_path, tiny_bundle_dir, url))
    services.append(svc)
    # READY once the head is loaded and the broker was asked: systemd must not kill a device whose broker is away
    svc.wait_for(lambda: svc.saw("READY=1"), 90, "READY=1")
    assert svc.saw("waiting for the broker")
    images = write_images(svc.state / "inbox", 4)
    time.sleep(1.0)
    assert svc.proc.poll() is None and not svc.results()
    broker.start()
    cloud(url)
    svc.wait_for(lambda: len(svc.results()) >= 4, 120, "4 results after the broker came up")
    assert sorted(Path(r["input"]).name for r in svc.results()) == [p.name for p in images]
    assert svc.terminate() == 0


def _outbox_count(path: Path) -> int:
    try:
        with sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=1) as db:
            return db.execute("SELECT COUNT(*) FROM outbox").fetchone()[0]
    except sqlite3.Error:
        return 0


def test_killed_service_resends_from_its_outbox_and_answers_each_image_once(mosquitto_broker, cloud, tiny_bundle_dir,
                                                                            tmp_path, services):
    cfg = base_config(tmp_path, tiny_bundle_dir, mosquitto_broker.url)
    svc = Service(tmp_path, cfg)
    services.append(svc)
    svc.wait_for(lambda: svc.saw("READY=1"), 90, "READY=1")
    images = write_images(svc.state / "inbox", 6)
    # no cloud yet: the inputs are accepted into the outbox and wait
    svc.wait_for(lambda: _outbox_count(svc.state / "outbox.sqlite") == 6, 60, "6 inputs in the outbox")
    svc.proc.kill()
    svc.proc.wait()

    cloud(mosquitto_broker.url)
    again = Service(tmp_path, cfg)
    services.append(again)
    again.wait_for(lambda: len(again.results()) >= 6, 120, "6 results after the restart")
    time.sleep(2.0)                           # anything answered twice would show up now
    res = again.results()
    assert sorted(Path(r["input"]).name for r in res) == [p.name for p in images], res
    assert all(r.get("recovered") for r in res)
    assert sorted(p.name for p in (again.state / "done").iterdir()) == [p.name for p in images]
    assert _outbox_count(again.state / "outbox.sqlite") == 0
    assert again.terminate() == 0
