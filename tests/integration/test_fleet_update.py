"""Bundle updates over the air on a real Mosquitto running the generated TLS/ACL configuration.

Devices are ``edgesplit device serve`` processes fed PNG files through their watched inbox; the
cloud is ``edgesplit cloud --fleet-key``; the operator is ``deploy.fleet`` with the site's operator
user and signing key.  What is checked is what a user sees: the device's report and result log,
which bundle answered each input, and that no input went unanswered.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest

from fixtures_core import require

pytest.importorskip("cryptography")
pytestmark = pytest.mark.timeout(600)

from fleet_bundles import fleet_bundles  # noqa: E402
from fleet_site import DeviceProc, Feeder, cloud_args, wait_for, write_site  # noqa: E402

FLEET = "lab"


@pytest.fixture(scope="module")
def bundles():
    require("litert")
    return fleet_bundles()


@pytest.fixture
def site(open_dir, make_mosquitto):
    s = write_site(open_dir / "site", ["pi-001", "pi-002", "pi-003"], FLEET)
    make_mosquitto(config_path=s.out_dir)
    return s


@pytest.fixture
def fleet_access(site):
    from deploy.fleet import FleetAccess

    return FleetAccess.find(config=str(site.out_dir))


@pytest.fixture
def devices(site, bundles, tmp_path):
    made = []

    def make(device_id="pi-001", **kw):
        d = DeviceProc(site, device_id, bundles / "a", tmp_path / device_id, **kw)
        made.append(d)
        return d

    yield make
    for d in made:
        d.kill()


def report(access, device_id, timeout=5.0):
    from deploy.fleet_view import FleetView

    client = access.client()
    view = FleetView(client, FLEET)
    client.start(wait_connected=10)
    try:
        view.settle(timeout=timeout)
        d = view.devices.get(device_id)
        return None if d is None else d.report
    finally:
        client.stop()


def expected(bundle_dir: Path, image: Path):
    """(label index, probability) of ``image`` through ``bundle_dir``'s own head and tail, here."""
    from protocol.manifest import load_bundle
    from runtime.preprocess import Preprocessor
    from runtime.split import Head, Tail

    b = load_bundle(bundle_dir)
    x = Preprocessor(b.manifest.input)(image)[None]
    probs = np.asarray(Tail(b).run(Head(b).features(x)), np.float32).reshape(-1)
    return int(probs.argmax()), float(probs.max())


def check_answers(dev: DeviceProc, bundles: Path, ids: dict[str, str]):
    """Every image fed has one answer, from a bundle it may have been sent with, as that bundle computes it."""
    got = dev.answered()
    missing = [n for n in dev.fed if n not in got]
    assert not missing, f"{len(missing)} input(s) of {dev.id} never answered: {missing[:5]}\n{dev.log_text()[-3000:]}"
    by = {}
    for name in dev.fed:
        r = got[name]
        assert "error" not in r, r
        bid = r["bundle_id"]
        assert bid in ids, f"{name} answered by unknown bundle {bid}"
        by[bid] = by.get(bid, 0) + 1
        done = dev.state / "done" / name
        label, prob = expected(bundles / ids[bid], done)
        assert r["index"] == label and abs(r["probability"] - prob) < 2e-3, (name, r, label, prob)
    return by


def _ids(bundles):
    from protocol.manifest import read_manifest

    return {read_manifest(bundles / n / "manifest.json").bundle_id: n for n in ("a", "b", "bad", "wide")}


def test_a_published_bundle_is_fetched_checked_switched_to_and_every_input_answered_by_its_own_bundle(
        site, bundles, devices, fleet_access, cloud_command, tmp_path):
    from deploy import fleet

    ids = _ids(bundles)
    a = next(k for k, v in ids.items() if v == "a")
    b = next(k for k, v in ids.items() if v == "b")
    cloud = cloud_command(f"mqtts://localhost:{site.port}", bundles / "a", *cloud_args(site, tmp_path / "cache"))
    cloud.wait_ready()
    dev = devices().start()
    with Feeder([dev], period=0.2):
        wait_for(lambda: len(dev.answered()) >= 5, 60, "answers with bundle a")
        result = fleet.publish(bundles / "b", FLEET, fleet_access, timeout_s=120, say=print)
        assert result.ok, result.summary()
        wait_for(lambda: sum(r.get("bundle_id") == b for r in dev.results()) >= 5, 60, "answers with bundle b")
    wait_for(lambda: len(dev.answered()) >= len(dev.fed), 60, "the last answers")
    rep = report(fleet_access, "pi-001")
    assert rep.state == "active" and rep.bundle == b and rep.previous == a, rep
    assert dev.current() == b
    by = check_answers(dev, bundles, ids)
    assert by.get(a, 0) >= 5 and by.get(b, 0) >= 5, by
    assert dev.stop() == 0
    out = cloud.stop()
    assert out["total"]["dead_lettered"] == 0, out
