"""A staged rollout as a user runs it: three device services, two cloud workers, the generated TLS/ACL
Mosquitto, and ``edgesplit fleet publish B --canary 1`` then ``edgesplit fleet rollback`` from the command line.

Checked from outside: the order in which the devices switch (their retained reports, watched by
the test), that inputs flow the whole time and every one is answered, each by the tail of the
bundle it was sent with, and what ``edgesplit fleet status`` prints.
"""
from __future__ import annotations

import subprocess
import sys
import threading
import time

import pytest

from fixtures_core import require

require("cryptography")
pytestmark = pytest.mark.timeout(600)

from fleet_bundles import fleet_bundles  # noqa: E402
from fleet_site import ROOT, DeviceProc, Feeder, cloud_args, wait_for, write_site  # noqa: E402
from test_fleet_update import _ids, check_answers  # noqa: E402

FLEET = "lab"
DEVICES = ["pi-001", "pi-002", "pi-003"]


def edgesplit(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "edgesplit", *map(str, args)], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout)


class Watcher:
    """Records (time, device, bundle, healthy) whenever a device's report changes."""

    def __init__(self, access):
        from deploy.fleet_view import FleetView

        self.client = access.client()
        self.view = FleetView(self.client, FLEET)
        self.seen: list[tuple[float, str, str, bool]] = []
        self._stop = threading.Event()
        self.client.start(wait_connected=10)
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self):
        last = {}
        while not self._stop.wait(0.05):
            for d in self.view.reported():
                if d.report is None:
                    continue
                key = (d.report.bundle, d.report.healthy)
                if last.get(d.device) != key:
                    last[d.device] = key
                    self.seen.append((time.monotonic(), d.device, *key))

    def first(self, device, bundle, healthy=None):
        return next((t for t, d, b, h in self.seen if d == device and b == bundle and (healthy is None or h == healthy)),
                    None)

    def stop(self):
        self._stop.set()
        self._thread.join(5)
        self.client.stop()


def test_a_canary_goes_first_the_fleet_follows_once_it_is_healthy_and_a_rollback_returns_everyone(
        open_dir, make_mosquitto, cloud_command, tmp_path):
    require("litert")
    bundles = fleet_bundles()
    ids = _ids(bundles)
    a = next(k for k, v in ids.items() if v == "a")
    b = next(k for k, v in ids.items() if v == "b")
    site = write_site(open_dir / "site", DEVICES, FLEET)
    make_mosquitto(config_path=site.out_dir)
    from deploy.fleet import FleetAccess

    access = FleetAccess.find(config=str(site.out_dir))
    cloud = cloud_command(f"mqtts://localhost:{site.port}", bundles / "a",
                          *cloud_args(site, tmp_path / "cache", "--workers", "2"))
    cloud.wait_ready(n_workers=2)
    devs = [DeviceProc(site, d, bundles / "a", tmp_path / d).start() for d in DEVICES]
    watcher = Watcher(access)
    try:
        with Feeder(devs, period=0.25):
            wait_for(lambda: all(len(d.answered()) >= 3 for d in devs), 90, "every device answering")
            done = edgesplit("fleet", "publish", bundles / "b", "--fleet", FLEET, "--config", site.out_dir,
                             "--canary", "1", "--soak", "4", "--timeout", "180")
            assert done.returncode == 0, done.stderr + done.stdout
            assert "canary pi-001" in done.stderr and "announced" in done.stderr
            assert all(d.current() == b for d in devs)
            status = edgesplit("fleet", "status", "--fleet", FLEET, "--config", site.out_dir)
            assert status.returncode == 0, status.stderr
            print(status.stdout)
            for d in DEVICES:
                line = next(ln for ln in status.stdout.splitlines() if ln.startswith(d))
                assert "online" in line and "active" in line and b in line, line
            back = edgesplit("fleet", "rollback", "--fleet", FLEET, "--config", site.out_dir, "--timeout", "120")
            assert back.returncode == 0, back.stderr + back.stdout
            assert all(d.current() == a for d in devs)
            n = {d.id: len(d.fed) for d in devs}
            wait_for(lambda: all(len(d.answered()) >= n[d.id] for d in devs), 60, "answers after the rollback")
    finally:
        watcher.stop()
    # the canary switched first; the others only after it was healthy on b
    canary_healthy = watcher.first("pi-001", b, healthy=True)
    assert canary_healthy is not None, watcher.seen
    for d in ("pi-002", "pi-003"):
        t = watcher.first(d, b)
        assert t is not None and t > canary_healthy, watcher.seen
    for d in devs:
        wait_for(lambda: len(d.answered()) >= len(d.fed), 60, f"the last answers of {d.id}")
        by = check_answers(d, bundles, ids)            # none lost, each answered by its own bundle's tail
        assert by.get(a, 0) >= 3 and by.get(b, 0) >= 1, (d.id, by)
        assert d.stop() == 0
    out = cloud.stop()
    assert out["total"]["dead_lettered"] == 0 and out["total"]["errors"] == 0, out
    assert all(w["answered"] > 0 for w in out["per_worker"]), out       # both workers served
