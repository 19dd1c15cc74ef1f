"""A worker that follows the fleet's announcements (cloud.updates) on a real Mosquitto: it loads an announced
bundle's tail without a restart and answers frames of both bundles; a frame for a bundle still loading
waits and is answered; a tail that fails its self-test is never served; an idle tail is dropped and comes
back when a frame names it."""
from __future__ import annotations

import time

import numpy as np
import pytest

from fixtures_core import require

require("cryptography")
pytestmark = pytest.mark.timeout(300)

from fleet_bundles import fleet_bundles  # noqa: E402
from fleet_site import wait_for  # noqa: E402

FLEET = "lab"


def _frame(bundle, rid: int, device="pi-001"):
    from protocol.frame import Frame, encode_frame
    from runtime.split import Head

    x = np.random.default_rng(rid).random((1, *bundle.manifest.input.shape), dtype=np.float32)
    f = bundle.manifest.feature
    t = Head(bundle).features(x)[0]
    return encode_frame(Frame.features(t, request_id=rid, device_id=device, bundle_id=bundle.bundle_id, seq=rid,
                                       scale=f.scale, zero_point=f.zero_point))


def _announce(client, signer, bundles, name, *, chunks=True, previous=None):
    from protocol import announce, topics, transfer
    from protocol.manifest import load_bundle

    b = load_bundle(bundles / name)
    ref = announce.bundle_ref(b, bundles / f"{name}.tar.gz")
    if chunks:
        transfer.publish_chunks(client, FLEET, ref, bundles / f"{name}.tar.gz")
    ann = announce.Announcement(fleet=FLEET, seq=time.time_ns() // 1000, issued_us=0, action="install",
                                bundle_id=b.bundle_id, bundle=ref, previous_id=previous or "")
    client.publish(topics.fleet_announce(FLEET), announce.encode(ann, signer), qos=1, retain=True).wait(10)
    return b


def test_a_following_worker_loads_announced_tails_holds_early_frames_refuses_bad_tails_and_drops_idle_ones(
        mosquitto_broker, start_worker, collect, tmp_path):
    require("litert")
    from protocol import announce, topics
    from protocol.manifest import load_bundle
    from protocol.mqtt import MqttClient

    bundles = fleet_bundles()
    a = load_bundle(bundles / "a")
    priv, pub, _ = announce.generate_keys(tmp_path / "keys")
    signer = announce.load_signing_key(priv)
    url = mosquitto_broker.url
    w = start_worker(url, a, fleet=FLEET, follow=dict(keys=str(pub), cache_dir=tmp_path / "cache", idle_s=3.0))
    results = topics.results(FLEET, "pi-001")
    dead = topics.dead_letter(FLEET, "pi-001")
    got = collect(url, results, dead)
    op = MqttClient(url)
    assert op.start(wait_connected=10)
    try:
        # 1. b announced: its tail comes without a restart; a frame naming it right away waits for it
        b = load_bundle(bundles / "b")
        _announce(op, signer, bundles, "b", previous=a.bundle_id)
        op.publish(topics.features(FLEET, "pi-001"), _frame(b, 1), qos=1).wait(5)
        op.publish(topics.features(FLEET, "pi-001"), _frame(a, 2), qos=1).wait(5)
        assert got.wait(2, 0, timeout=60), (w.stats.line(), got.got)
        assert b.bundle_id in w.registry and a.bundle_id in w.registry
        from protocol.frame import decode_frame

        answered = {decode_frame(p).request_id: decode_frame(p) for _, p in got.got[results]}
        assert answered[1].bundle_id == b.bundle_id and answered[1].ok and answered[2].bundle_id == a.bundle_id
        assert w.stats.dead_lettered == 0

        # 2. a bundle whose tail does not give its probe's outputs is never served
        bad = load_bundle(bundles / "bad")
        _announce(op, signer, bundles, "bad", previous=b.bundle_id)
        wait_for(lambda: w.follower.why_not(bad.bundle_id), 60, "the worker to refuse the bad bundle")
        assert "does not match its probe" in w.follower.why_not(bad.bundle_id)
        op.publish(topics.features(FLEET, "pi-001"), _frame(bad, 3), qos=1).wait(5)
        assert got.wait(2, 1, timeout=30)
        letter = topics.decode_dead_letter(got.got[dead][0][1])
        assert letter.reason == "unknown-bundle" and "not served here" in letter.detail
        assert bad.bundle_id not in w.registry

        # 3. b is the fleet's current bundle again; a, unused, is dropped, and loaded again when named
        _announce(op, signer, bundles, "b", chunks=False, previous=a.bundle_id)
        wait_for(lambda: a.bundle_id not in w.registry and b.bundle_id in w.registry, 30,
                 "the idle tail of bundle a to be dropped, the fleet's current one kept")
        op.publish(topics.features(FLEET, "pi-001"), _frame(a, 4), qos=1).wait(5)
        assert got.wait(3, 1, timeout=60), w.stats.line()
        assert a.bundle_id in w.registry and w.follower.dropped >= 1
    finally:
        op.stop()
    assert w.stats.answered == 3 and w.stats.dead_lettered == 1, w.stats.line()
