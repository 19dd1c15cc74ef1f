"""Broker fixtures: a real Mosquitto and the embedded rumqttd, each on a free port of 127.0.0.1.

* ``mosquitto_broker`` — ``mosquitto -c <generated conf>``, anonymous, no persistence.
* ``make_mosquitto(*extra_lines, persistence=False, anonymous=True, config_path=None, port=None)`` —
  a factory for brokers with extra config lines (password files, ACLs, TLS listeners).
* ``embedded_broker`` — the embedded broker the ``edgesplit broker`` verb runs.
* ``broker`` — parametrized over both.
* ``nats_cluster`` — a 3-node NATS cluster (JetStream and MQTT on each node, ``deploy.cluster``):
  ``.nats_url``, ``.mqtt_url(i)``, ``.kill(i)``, ``.start(i)``, ``.nodes``.
* ``open_dir`` — a 0755 temp directory for files a root-started Mosquitto must read after dropping root.
* ``start_worker`` (an in-process ``cloud.Worker``), ``cloud_command`` (``edgesplit cloud`` in its own process) and
  ``collect`` (a client keeping what arrives on some topic filters) for the cloud tests (their bundle:
  ``tiny_bundle`` in fixtures_models.py).

The broker fixtures yield a ``deploy.broker.RunningBroker``: ``.url``, ``.host``, ``.port``, ``.log_path``,
``.stop()``, ``.kill()`` (SIGKILL), ``.restart()`` (same port and config).  The system broker
on 1883 is never touched.
"""
from __future__ import annotations

import uuid

import pytest

from deploy.broker import start_embedded, start_mosquitto
from fixtures_core import require


def _need_mosquitto():
    require("mosquitto")


@pytest.fixture
def mosquitto_path() -> str:
    """The mosquitto binary (a test using it skips without one, or fails under CI)."""
    return require("mosquitto")


@pytest.fixture
def make_mosquitto(tmp_path):
    """Factory: ``make_mosquitto("acl_file /x", users={"pi-01": "s3cret"})`` -> a started RunningBroker.

    ``users`` writes a password file (hashed as ``mosquitto_passwd`` does) and refuses anonymous clients.
    """
    _need_mosquitto()
    started = []

    def make(*extra_lines, users=None, persistence=False, anonymous=True, config_path=None, port=None):
        wd = tmp_path / f"mosquitto-{len(started)}"
        if users:
            from deploy.broker_config import hash_password

            passwd = tmp_path / f"passwd-{len(started)}"
            passwd.write_text("".join(f"{u}:{hash_password(pw)}\n" for u, pw in users.items()))
            passwd.chmod(0o600)
            extra_lines, anonymous = (f"password_file {passwd}", *extra_lines), False
        b = start_mosquitto("127.0.0.1", port, extra_lines=extra_lines, persistence=persistence,
                            anonymous=anonymous, config_path=config_path, workdir=wd)
        started.append(b)
        return b

    yield make
    for b in started:
        b.cleanup()


@pytest.fixture
def mosquitto_broker(make_mosquitto):
    return make_mosquitto()


@pytest.fixture
def embedded_broker(tmp_path):
    b = start_embedded("127.0.0.1", None, workdir=tmp_path / "rumqttd")
    yield b
    b.cleanup()


@pytest.fixture(params=["mosquitto", "embedded"])
def broker(request):
    """Each test using it runs once against Mosquitto and once against the embedded broker."""
    return request.getfixturevalue(f"{request.param}_broker")


@pytest.fixture
def nats_cluster(tmp_path):
    """Three nats-server processes on free loopback ports, one cluster; stopped at teardown."""
    require("nats-server")
    require("nats-py")
    from deploy.cluster import start_cluster

    c = start_cluster(3, workdir=tmp_path / "nats")
    yield c
    c.cleanup()


@pytest.fixture
def open_dir():
    """A directory Mosquitto can still read after it drops root to its own user (tmp_path is 0700)."""
    import shutil
    import tempfile
    from pathlib import Path

    d = Path(tempfile.mkdtemp(prefix="edgesplit-test-"))
    d.chmod(0o755)
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def topic_root():
    """A topic prefix unique to the test, so tests never see each other's messages."""
    return f"test/{uuid.uuid4().hex[:10]}"


# ---------------------------------------------------------------- cloud test helpers

@pytest.fixture
def start_worker():
    """Factory: ``start_worker(url, bundle, **Worker_options)`` -> a connected ``cloud.Worker``
    in this process; stopped (drained) at teardown."""
    from cloud import Registry, Worker
    from protocol.mqtt import Backoff

    started = []

    def start(url, bundle, **options):
        options.setdefault("backoff", Backoff(0.1, 0.5))
        w = Worker(Registry.load([bundle.root]), url, **options)
        started.append(w)
        assert w.start(wait_connected=10), f"worker could not connect to {url}"
        return w

    yield start
    for w in started:
        w.stop(drain_timeout=10)


class Collector:
    """One MQTT client keeping every payload that arrives on its filters: ``.got[filter]``."""

    def __init__(self, url, *filters, max_inflight=1000):
        import threading

        from protocol.mqtt import Backoff, MqttClient

        self.got = {f: [] for f in filters}
        self.lock = threading.Lock()
        self.client = MqttClient(url, backoff=Backoff(0.1, 0.5), max_inflight=max_inflight)
        for f in filters:
            self.client.subscribe(f, lambda t, p, f=f: self._add(f, t, p))
        assert self.client.start(wait_connected=10)

    def _add(self, f, topic, payload):
        with self.lock:
            self.got[f].append((topic, payload))

    def count(self, f) -> int:
        with self.lock:
            return len(self.got[f])

    def wait(self, *at_least: int, timeout: float = 60.0) -> bool:
        """Wait until each filter (in the order given) holds at least that many payloads."""
        import time

        names = list(self.got)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if all(self.count(f) >= n for f, n in zip(names, at_least)):
                return True
            time.sleep(0.02)
        return False

    def stop(self):
        self.client.stop()


@pytest.fixture
def collect():
    """Factory: ``collect(url, filter, ...)`` -> a started :class:`Collector`, stopped at teardown."""
    made = []

    def make(url, *filters, **kw):
        c = Collector(url, *filters, **kw)
        made.append(c)
        return c

    yield make
    for c in made:
        c.stop()


class CloudCommand:
    """``edgesplit cloud ... --json`` as a user runs it; stderr is read as it comes (to know when the
    workers are ready); ``stop()`` sends SIGTERM and returns the counters it printed (with
    ``json=False``: the text summary a user reads)."""

    def __init__(self, url, bundle_root, *extra, json=True):
        import subprocess
        import sys
        import threading
        from pathlib import Path

        root = Path(__file__).resolve().parents[1]
        self.json = json
        self.proc = subprocess.Popen([sys.executable, "-m", "edgesplit", "cloud", "--bundle", str(bundle_root),
                                      "--broker", url, "--stats-every", "0", *(["--json"] if json else []),
                                      *map(str, extra)],
                                     cwd=root, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.err: list[str] = []
        self._reader = threading.Thread(target=lambda: self.err.extend(self.proc.stderr), daemon=True)
        self._reader.start()

    def wait_ready(self, n_workers=1, timeout=120):
        import time

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if sum("ready on" in line for line in self.err) >= n_workers:
                return
            assert self.proc.poll() is None, "".join(self.err)
            time.sleep(0.05)
        raise AssertionError("workers not ready:\n" + "".join(self.err))

    def worker_pids(self) -> list[int]:
        """Worker processes of ``--workers N`` (Linux: read from /proc; not multiprocessing's helpers)."""
        from pathlib import Path

        out = []
        for task in Path(f"/proc/{self.proc.pid}/task").iterdir():
            for pid in (task / "children").read_text().split():
                try:
                    if b"spawn_main" in Path(f"/proc/{pid}/cmdline").read_bytes():
                        out.append(int(pid))
                except OSError:
                    pass
        return sorted(out)

    def stop(self, timeout=120):
        """SIGTERM (the workers drain), exit code 0, and the JSON it printed (``["total"]`` …) as a dict."""
        import json
        import signal

        self.proc.send_signal(signal.SIGTERM)
        out = self.proc.stdout.read()
        self.proc.wait(timeout)
        self._reader.join(10)
        assert self.proc.returncode == 0, "".join(self.err)
        return json.loads(out) if self.json else out

    def kill(self):
        """SIGKILL it and its workers (they would outlive a killed parent)."""
        import os
        import signal

        if self.proc.poll() is None:
            try:
                orphans = self.worker_pids()
            except OSError:
                orphans = []
            self.proc.kill()
            self.proc.wait()
            for pid in orphans:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass


@pytest.fixture
def cloud_command():
    """Factory: ``cloud_command(url, bundle_root, *extra_args, json=True)`` -> a running :class:`CloudCommand`,
    killed at teardown if the test did not stop it."""
    made = []

    def make(url, bundle_root, *extra, **kw):
        c = CloudCommand(url, bundle_root, *extra, **kw)
        made.append(c)
        return c

    yield make
    for c in made:
        c.kill()
