"""Cloud workers on a 3-node NATS cluster (JetStream work queue as the source, answers over MQTT),
with faults on the real engines: a node killed with SIGKILL mid-stream, a worker killed holding frames.

Every test starts its own cluster on free loopback ports (``nats_cluster``) and the real device agent
publishes MQTT 3.1.1 QoS 1 to one node, as a device in the field would."""
from __future__ import annotations

import asyncio
import os
import signal
import time
from pathlib import Path

import pytest

from device.config import DeviceConfig
from device.transport import open_agent

pytestmark = pytest.mark.timeout(300)
STREAM = "EDGESPLIT_FEATURES"


def _agent(url, bundle, device_id, **settings):
    settings.setdefault("timeout", 120.0)
    cfg = DeviceConfig(device_id=device_id, fleet="lab", bundle=bundle.root, broker_url=url, **settings)
    return open_agent(cfg)


def _stream_leader(nats_url: str, avoid: str | None = None) -> str:
    """The node leading the features stream; with ``avoid``, first moved off that node (leader step-down)."""
    import nats

    async def go():
        nc = await nats.connect([f"nats://{h}" for h in nats_url[len("nats://"):].split(",")])
        js = nc.jetstream()
        try:
            for _ in range(50):
                info = await js.stream_info(STREAM)
                leader = info.cluster.leader if info.cluster else None
                if leader and leader != avoid:
                    return leader
                if leader == avoid:
                    try:
                        await nc.request(f"$JS.API.STREAM.LEADER.STEPDOWN.{STREAM}", b"", timeout=5)
                    except Exception:
                        pass
                await asyncio.sleep(0.2)
            raise AssertionError(f"no leader of {STREAM} other than {avoid}")
        finally:
            await nc.close()

    return asyncio.run(go())


def test_device_on_mqtt5_falls_back_to_311_and_is_answered(nats_cluster, tiny_bundle, start_worker, caplog):
    """NATS's MQTT gateway refuses MQTT 5: a device configured for 5 says so and speaks 3.1.1."""
    import numpy as np

    w = start_worker(nats_cluster.mqtt_url(0), tiny_bundle, source=nats_cluster.nats_url, group="v5")
    x = np.random.default_rng(0).random((20, 28, 28, 1), dtype=np.float32)
    with caplog.at_level("WARNING", logger="protocol.mqtt"):
        with _agent(nats_cluster.mqtt_url(1), tiny_bundle, "pi-v5", protocol="5") as agent:
            got = [r for r in agent.run_arrays(x) if r.ok]
    assert len(got) == 20
    assert any("refused MQTT 5; speaking MQTT 3.1.1" in r.getMessage() for r in caplog.records)
    assert w.stats.answered == 20


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="finds worker processes through /proc")
def test_kill_one_nats_node_mid_stream_all_2000_answered_exactly_once(nats_cluster, tiny_bundle, cloud_command):
    from converter import datasets

    c = nats_cluster
    cloud = cloud_command(c.mqtt_url(0), tiny_bundle.root, "--workers", 2, "--group", "nodekill",
                          "--source", c.nats_url + "?ack_wait=5s")
    cloud.wait_ready(2)
    # kill the node that leads the stream (JetStream must elect another), never the devices' MQTT node
    victim = _stream_leader(c.nats_url, avoid=c.nodes[0].name)
    index = [n.name for n in c.nodes].index(victim)
    x, _ = datasets.synthetic_images(2000, seed=5)
    seen: dict[str, int] = {}
    killed_at = None
    t0 = time.monotonic()
    with _agent(c.mqtt_url(0), tiny_bundle, "pi-node", resend_after=10.0) as agent:
        for r in agent.run_arrays(x, ids=[f"img{i}" for i in range(len(x))]):
            assert r.ok, r.error
            seen[r.input] = seen.get(r.input, 0) + 1
            if killed_at is None and len(seen) == 700:
                c.kill(index)
                killed_at = len(seen)
    seconds = time.monotonic() - t0
    assert killed_at is not None and not c.nodes[index].running
    assert sorted(seen) == sorted(f"img{i}" for i in range(len(x)))
    assert set(seen.values()) == {1}, "a request answered twice at the device"
    s = agent.stats
    assert s.answered == s.requests == 2000 and s.timeouts == 0 and s.worker_errors == 0
    run = cloud.stop()
    total = run["total"]
    assert total["answered"] + total["duplicates"] >= 2000 and total["dead_lettered"] == 0, run
    print(f"\nkilled {victim} (the stream leader) after {killed_at} answers: 2,000 answered in {seconds:.1f} s; "
          f"device re-sent {s.resends}, ignored {s.duplicates} duplicate answer(s); queue redelivered "
          f"{total['redelivered']}, workers answered {[w['answered'] for w in run['per_worker']]}")


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="finds worker processes through /proc")
def test_kill_one_worker_its_frames_are_redelivered_to_the_other(nats_cluster, tiny_bundle, cloud_command):
    """The device never re-sends here (resend_after 0): only JetStream's redelivery can save the frames
    the killed worker held."""
    from converter import datasets

    c = nats_cluster
    cloud = cloud_command(c.mqtt_url(0), tiny_bundle.root, "--workers", 2, "--group", "workerkill",
                          "--source", c.nats_url + "?ack_wait=2s")
    cloud.wait_ready(2)
    pids = cloud.worker_pids()
    assert len(pids) == 2, pids
    x, _ = datasets.synthetic_images(1000, seed=6)
    seen: dict[str, int] = {}
    stopped_at = killed_at = None
    t0 = time.monotonic()
    with _agent(c.mqtt_url(0), tiny_bundle, "pi-worker", resend_after=0.0) as agent:
        for r in agent.run_arrays(x, ids=[f"img{i}" for i in range(len(x))]):
            assert r.ok, r.error
            seen[r.input] = seen.get(r.input, 0) + 1
            if stopped_at is None and len(seen) == 300:
                os.kill(pids[0], signal.SIGSTOP)      # hangs holding the frames it pulled, then dies
                stopped_at = time.monotonic()
            elif killed_at is None and stopped_at is not None and time.monotonic() - stopped_at > 0.5:
                os.kill(pids[0], signal.SIGKILL)
                killed_at = len(seen)
    seconds = time.monotonic() - t0
    assert sorted(seen) == sorted(f"img{i}" for i in range(len(x)))
    assert set(seen.values()) == {1}, "a request answered twice at the device"
    s = agent.stats
    assert s.answered == s.requests == 1000 and s.timeouts == 0 and s.resends == 0
    cloud.wait_ready(3)                               # `edgesplit cloud` started a replacement
    run = cloud.stop()
    total = run["total"]
    assert total["redelivered"] > 0, run              # the dead worker's frames went to the others
    assert run["restarted"] == 1
    print(f"\nkilled a worker after {killed_at} answers: 1,000 answered in {seconds:.1f} s, the queue redelivered "
          f"{total['redelivered']} frame(s), the device re-sent none and ignored {s.duplicates} duplicate "
          f"answer(s); survivors answered {[w['answered'] for w in run['per_worker']]}")


def test_at_the_stream_bound_the_oldest_frames_go_and_are_counted(nats_cluster, tiny_bundle, cloud_command, collect):
    """No worker runs while 120 frames arrive on a stream bounded to ~30 of them: the worker that starts
    then answers the newest ones, and `edgesplit cloud` counts the others as dropped at the bound."""
    import numpy as np

    from protocol import topics
    from protocol.frame import Frame, encode_frame
    from protocol.mqtt import MqttClient
    from runtime.split import Head

    c = nats_cluster
    source = c.nats_url + "?stream=BOUNDED&max_bytes=30000&replicas=3"
    first = cloud_command(c.mqtt_url(0), tiny_bundle.root, "--group", "bound", "--source", source)
    first.wait_ready(1)                                   # makes the stream and the durable consumer
    assert first.stop()["total"]["received"] == 0
    head = Head(tiny_bundle, num_threads=1)
    x = np.random.default_rng(1).random((120, 28, 28, 1), dtype=np.float32)
    spec = tiny_bundle.feature
    frames = [encode_frame(Frame.features(f, request_id=i + 1, device_id="pi-bound", bundle_id=tiny_bundle.bundle_id,
                                          seq=i + 1, scale=spec.scale, zero_point=spec.zero_point), compress="raw")
              for i, f in enumerate(head.features(x))]
    got = collect(c.mqtt_url(0), topics.results("lab", "pi-bound"))
    pub = MqttClient(c.mqtt_url(1), client_id="bench-bound-pub")
    assert pub.start(wait_connected=10)
    for d in [pub.publish(topics.features("lab", "pi-bound"), p, qos=1) for p in frames]:
        assert d.wait(10)
    pub.stop()
    second = cloud_command(c.mqtt_url(0), tiny_bundle.root, "--group", "bound", "--source", source)
    second.wait_ready(1)
    kept = 30000 // len(frames[0])
    assert got.wait(kept // 2, timeout=60)
    time.sleep(2)                                          # whatever else the stream kept
    total = second.stop()["total"]
    answered = got.count(topics.results("lab", "pi-bound"))
    assert total["answered"] == answered and 0 < answered < 120
    assert total["queue_dropped"] == 120 - answered, total  # every frame answered or counted as dropped
    from protocol.frame import decode_frame

    ids = sorted(decode_frame(p).request_id for _, p in got.got[topics.results("lab", "pi-bound")])
    assert ids == list(range(121 - answered, 121))         # the newest were kept, the oldest dropped
    print(f"\nstream bounded to 30,000 bytes: {answered} newest of 120 frames answered, "
          f"{total['queue_dropped']} counted as dropped at the bound")


def test_a_worker_whose_cluster_is_gone_still_drains_and_exits_0(nats_cluster, tiny_bundle, cloud_command):
    """SIGTERM during an outage is a drain, not a failure: nothing it held is lost (unacked frames are
    delivered again when the cluster is back), so `edgesplit cloud` exits 0 with its counters."""
    c = nats_cluster
    cloud = cloud_command(c.mqtt_url(0), tiny_bundle.root, "--group", "outage", "--source", c.nats_url)
    cloud.wait_ready(1)
    for i in range(len(c.nodes)):
        c.kill(i)
    time.sleep(2)
    run = cloud.stop()                                     # asserts exit code 0
    assert run["total"]["received"] == 0
    assert not any("Traceback" in line for line in cloud.err), "".join(cloud.err)
