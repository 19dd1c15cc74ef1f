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

require("cryptography")
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


def _operator(access):
    client = access.client()
    assert client.start(wait_connected=10)
    return client


def _ref(bundles, name, **kw):
    from protocol.announce import bundle_ref
    from protocol.manifest import load_bundle

    return bundle_ref(load_bundle(bundles / name), bundles / f"{name}.tar.gz", **kw)


def _announcement(ref, **kw):
    from protocol.announce import Announcement

    return Announcement(fleet=FLEET, seq=time.time_ns() // 1000, issued_us=time.time_ns() // 1000, action="install",
                        bundle_id=ref.bundle_id, bundle=ref, **kw)


def _refused(access, reason, target=None, timeout=60):
    def got():
        r = report(access, "pi-001", timeout=1.0)
        return r if r is not None and r.state == "refused" and r.reason == reason and \
            (target is None or r.target == target) else None
    return wait_for(got, timeout, f"pi-001 to report refused {reason}")


def test_a_bad_signature_a_wrong_sha256_a_failing_self_test_another_input_and_a_cut_stream_are_refused(
        site, bundles, devices, fleet_access, cloud_command, tmp_path):
    """Each is refused with its reason on the report; bundle a serves all along; no input is lost."""
    from deploy import fleet
    from protocol import announce, topics, transfer

    ids = _ids(bundles)
    a = next(k for k, v in ids.items() if v == "a")
    cloud = cloud_command(f"mqtts://localhost:{site.port}", bundles / "a", *cloud_args(site, tmp_path / "cache"))
    cloud.wait_ready()
    dev = devices(update={"download_stall": 3.0}).start()
    signer = fleet_access.signer()
    op = _operator(fleet_access)
    d = topics.delivery(topics.ANNOUNCE)
    try:
        with Feeder([dev], period=0.3):
            wait_for(lambda: len(dev.answered()) >= 3, 60, "first answers")
            ref = _ref(bundles, "b")
            transfer.publish_chunks(op, FLEET, ref, bundles / "b.tar.gz")

            # 1. a signed announcement altered on the way: its body no longer matches the signature
            env = json.loads(announce.encode(_announcement(ref), signer))
            env["body"] = env["body"].replace('"action":"install"', '"action":"rollback"')
            op.publish(topics.fleet_announce(FLEET), json.dumps(env).encode(), qos=1, retain=True).wait(10)
            rep = _refused(fleet_access, "bad-signature")
            assert "does not verify" in rep.detail

            # 2. a properly signed announcement whose archive sha256 is not the archive's
            wrong = announce.BundleRef(**{**{f: getattr(ref, f) for f in ref.__struct_fields__}, "sha256": "0" * 64})
            op.publish(topics.fleet_announce(FLEET), announce.encode(_announcement(wrong), signer), qos=d.qos,
                       retain=True).wait(10)
            rep = _refused(fleet_access, "bad-sha256", ref.bundle_id)
            assert "does not match the sha256" in rep.detail

            # 3. a head that does not give its probe's features
            result = fleet.publish(bundles / "bad", FLEET, fleet_access, timeout_s=60, say=print)
            assert not result.ok and "self-test" in result.halted, result.summary()
            rep = _refused(fleet_access, "self-test")
            assert "does not match its probe" in rep.detail

            # 4. a bundle made for another model input (16x16)
            result = fleet.publish(bundles / "wide", FLEET, fleet_access, timeout_s=60, say=print)
            assert not result.ok and "input-mismatch" in result.halted, result.summary()

            # 5. a chunk stream cut short: 10 of its 33 chunks were ever published
            transfer.clear_chunks(op, FLEET, ref)
            small = _ref(bundles, "b", chunk_size=1024)
            data = (bundles / "b.tar.gz").read_bytes()
            for i in range(10):
                op.publish(topics.chunk(FLEET, small.bundle_id, i), data[i * 1024:(i + 1) * 1024], qos=1,
                           retain=True)
            op.publish(topics.fleet_announce(FLEET), announce.encode(_announcement(small), signer), qos=1,
                       retain=True).wait(10)
            rep = _refused(fleet_access, "truncated", small.bundle_id)
            assert "10 of 33 chunks" in rep.detail
            n = len(dev.fed)
            wait_for(lambda: len(dev.answered()) >= n, 30, "answers after the refusals")
    finally:
        op.stop()
    wait_for(lambda: len(dev.answered()) >= len(dev.fed), 60, "the last answers")
    assert dev.current() == a and report(fleet_access, "pi-001").bundle == a
    by = check_answers(dev, bundles, ids)
    assert set(by) == {a}, by
    assert dev.stop() == 0
    cloud.stop()


def test_a_bundle_whose_answers_fail_is_rolled_back_and_its_inputs_answered_by_the_old_one(
        site, bundles, devices, fleet_access, cloud_command, tmp_path):
    """The cloud does not serve the new bundle (a worker that follows no announcements): its frames are
    dead-lettered, the device rolls back by itself and runs those inputs again with bundle a."""
    from deploy import fleet

    ids = _ids(bundles)
    a = next(k for k, v in ids.items() if v == "a")
    b = next(k for k, v in ids.items() if v == "b")
    c = site.out_dir / "cloud" / "cloud"
    cloud = cloud_command(f"mqtts://cloud@localhost:{site.port}?ca={c / 'ca.crt'}", bundles / "a",
                          "--password-file", str(c / "password"))
    cloud.wait_ready()
    dev = devices().start()
    with Feeder([dev], period=0.2):
        wait_for(lambda: len(dev.answered()) >= 3, 60, "first answers")
        result = fleet.publish(bundles / "b", FLEET, fleet_access, timeout_s=90, say=print)
        assert not result.ok and "rolled-back answers-failed" in result.halted, result.summary()
        rep = report(fleet_access, "pi-001")
        assert rep.state == "rolled-back" and rep.target == b and rep.bundle == a, rep
        assert "dead letter unknown-bundle" in rep.detail
        n = len(dev.fed)
        wait_for(lambda: len(dev.answered()) >= n, 60, "answers after the rollback")
    wait_for(lambda: len(dev.answered()) >= len(dev.fed), 60, "the last answers")
    by = check_answers(dev, bundles, ids)
    assert set(by) == {a}, by                       # the inputs first sent with b were run again with a
    assert dev.current() == a
    assert "re-running" in dev.log_text()
    dev.stop()
    out = cloud.stop()
    assert out["total"]["reasons"].get("unknown-bundle", 0) >= 3, out


@pytest.mark.parametrize("step", ["download", "verified", "switch"])
def test_a_device_killed_during_an_update_restarts_on_one_complete_bundle_and_finishes_it(
        step, site, bundles, devices, fleet_access, cloud_command, tmp_path):
    """kill -9 (the device kills itself at the step: EDGESPLIT_FAILPOINTS) while fetching, after the
    archive is verified and unpacked, and between the two renames of the switch."""
    from deploy import fleet
    from protocol.manifest import load_bundle

    ids = _ids(bundles)
    a = next(k for k, v in ids.items() if v == "a")
    b = next(k for k, v in ids.items() if v == "b")
    cloud = cloud_command(f"mqtts://localhost:{site.port}", bundles / "a", *cloud_args(site, tmp_path / "cache"))
    cloud.wait_ready()
    dev = devices().start(EDGESPLIT_FAILPOINTS=f"update:{step}")
    with Feeder([dev], period=0.2):
        wait_for(lambda: len(dev.answered()) >= 3, 60, "first answers")
        # small chunks, so that the download has a middle to be killed in
        fleet.publish(bundles / "b", FLEET, fleet_access, chunk_size=4096, wait=False, say=print)
        assert dev.proc.wait(60) == -9, dev.log_text()[-2000:]
        assert f"failpoint update:{step}" in dev.log_text()
        incoming = list((dev.state / "bundles" / "incoming").iterdir())
        assert dev.current() == a                     # the kill left the old bundle active
        load_bundle(dev.state / "bundles" / "current")     # and complete: every sha256 checks
        if step == "download":
            assert any(p.name.endswith(".part") for p in incoming), incoming
        if step in ("verified", "switch"):
            assert (dev.state / "bundles" / "store" / b / "manifest.json").is_file()
        dev.start()                                   # as systemd would, without the failpoint
        wait_for(lambda: (r := report(fleet_access, "pi-001", 1.0)) and r.bundle == b and r.healthy, 90,
                 "the restarted device to finish the update")
    wait_for(lambda: len(dev.answered()) >= len(dev.fed), 60, "the last answers")
    assert dev.current() == b and load_bundle(dev.state / "bundles" / "current").bundle_id == b
    assert not list((dev.state / "bundles" / "staging").iterdir())
    by = check_answers(dev, bundles, ids)            # inputs of the killed run were answered after the restart
    assert by.get(a, 0) >= 3 and by.get(b, 0) >= 1, by
    dev.stop()
    cloud.stop()
