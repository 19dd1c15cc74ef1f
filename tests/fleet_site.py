"""A fleet on this machine for the fleet tests: the generated broker configuration (TLS, passwords,
ACL) run by a real Mosquitto, device services as real processes, the operator's access.

``DeviceProc`` is ``edgesplit device serve --config device.toml`` as installed on a Pi (a watched
inbox, an outbox, the result log, updates into ``state/bundles``), fed PNG images by the test.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def write_site(root: Path, devices: list[str], fleet: str):
    """``edgesplit broker config`` for ``devices`` on a free loopback port (a BrokerConfig)."""
    from deploy.broker import free_port
    from deploy.broker_config import write_broker_config

    return write_broker_config(root, devices, fleet=fleet, cloud_users=("cloud",), port=free_port(),
                               bind="127.0.0.1")


def cloud_args(site, cache: Path, *extra) -> list[str]:
    """``edgesplit cloud`` options for the site's cloud user, following the fleet's announcements."""
    c = site.out_dir / "cloud" / "cloud"
    url = f"mqtts://cloud@localhost:{site.port}?ca={c / 'ca.crt'}"
    return ["--broker", url, "--password-file", str(c / "password"), "--fleet", site.fleet,
            "--fleet-key", str(c / "fleet.pub"), "--bundle-cache", str(cache), "--tail-idle", "600", *extra]


def png(path: Path, seed: int) -> None:
    from PIL import Image

    rng = np.random.default_rng(seed)
    img = np.zeros((28, 28), np.uint8)
    r0, c0 = rng.integers(2, 14, size=2)
    img[r0:r0 + rng.integers(6, 12), c0:c0 + rng.integers(6, 12)] = rng.integers(120, 255)
    tmp = path.with_name("." + path.name)
    Image.fromarray(img, "L").save(tmp)
    os.replace(tmp, path)            # the watcher never sees half a file


class DeviceProc:
    """One device service process (see the module docstring)."""

    def __init__(self, site, device_id: str, bundle: Path, root: Path, *, env: dict | None = None, **settings):
        self.site, self.id, self.root = site, device_id, root
        self.state = root / "state"
        self.inbox = self.state / "inbox"
        self.inbox.mkdir(parents=True, exist_ok=True)
        agent = {"report_interval": 0.5, "resend_after": 3.0, "batch": 8, "outbox": "outbox.sqlite",
                 "results": "results.jsonl", **settings.pop("agent", {})}
        update = {"probation": 5, "max_errors": 3, "probation_seconds": 60.0, **settings.pop("update", {})}
        cfg = {"device_id": device_id, "fleet": site.fleet, "bundle": str(bundle), "state_dir": str(self.state),
               "broker": {"url": f"mqtts://localhost:{site.port}",
                          "credentials": str(site.out_dir / "devices" / device_id)},
               "inputs": {"sources": [str(self.inbox)], "poll_interval": 0.1, "settle": 0.1},
               "agent": agent, "update": update}
        from device.config import dump_config

        self.config = root / "device.toml"
        self.config.write_text(dump_config(cfg))
        self.env = dict(os.environ, PYTHONPATH=str(ROOT), **(env or {}))
        self.proc: subprocess.Popen | None = None
        self.log = root / "device.log"
        self.fed: list[str] = []

    def start(self, **env) -> "DeviceProc":
        self.proc = subprocess.Popen([sys.executable, "-m", "edgesplit", "-v", "device", "serve", "--config",
                                      str(self.config)], cwd=ROOT, env=dict(self.env, **env),
                                     stdout=subprocess.DEVNULL, stderr=open(self.log, "ab"))
        return self

    def kill(self) -> int:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        return self.proc.wait(30) if self.proc is not None else 0

    def stop(self) -> int:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                return self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        return self.proc.wait(30) if self.proc is not None else 0

    def feed(self, n: int = 1) -> None:
        for _ in range(n):
            name = f"{self.id}-{len(self.fed):05d}-{uuid.uuid4().hex[:6]}.png"
            png(self.inbox / name, len(self.fed) + 1000 * hash(self.id) % 997)
            self.fed.append(name)

    def results(self) -> list[dict]:
        p = self.state / "results.jsonl"
        if not p.is_file():
            return []
        return [json.loads(line) for line in p.read_text().splitlines() if line.strip()]

    def answered(self) -> dict[str, dict]:
        """input file name -> its result (the last, if several)."""
        return {Path(r["input"]).name: r for r in self.results()}

    def current(self) -> str | None:
        try:
            return Path(os.readlink(self.state / "bundles" / "current")).name
        except OSError:
            return None

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.is_file() else ""


class Feeder:
    """A thread dropping an image into each device's inbox every ``period`` seconds (requests flow all the time)."""

    def __init__(self, devices: list[DeviceProc], period: float = 0.25):
        self.devices, self.period = devices, period
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.wait(self.period):
            for d in self.devices:
                if d.proc is not None and d.proc.poll() is None:
                    d.feed()

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join(5)


def wait_for(predicate, timeout: float, what: str, every: float = 0.2):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = predicate()
        if got:
            return got
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
