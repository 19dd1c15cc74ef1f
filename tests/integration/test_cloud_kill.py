"""Kill -9 one of two workers mid-stream: the other carries on, `edgesplit cloud` starts a new one,
and the real device agent gets every one of 1,000 requests answered exactly once (it re-sends what
the dead worker had taken but not answered; the survivors answer each request id once)."""
from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest

from device.config import DeviceConfig
from device.transport import open_agent

pytestmark = pytest.mark.timeout(300)


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="finds worker processes through /proc")
def test_kill_one_of_two_workers_mid_stream_every_request_answered_once(mosquitto_broker, tiny_bundle, cloud_command):
    from converter import datasets

    url = mosquitto_broker.url
    cloud = cloud_command(url, tiny_bundle.root, "--workers", 2, "--group", "kill")
    x, _ = datasets.synthetic_images(1000, seed=3)
    cloud.wait_ready(2)
    pids = cloud.worker_pids()
    assert len(pids) == 2, pids
    seen: dict[str, int] = {}
    stopped_at = killed_at = None
    # resend_after: how long the device waits before it re-sends an unanswered request
    cfg = DeviceConfig(device_id="pi-kill", fleet="lab", bundle=tiny_bundle.root, broker_url=url, timeout=120,
                       resend_after=3.0)
    with open_agent(cfg) as agent:
        for r in agent.run_arrays(x, ids=[f"img{i}" for i in range(len(x))]):
            assert r.ok, r.error
            seen[r.input] = seen.get(r.input, 0) + 1
            if stopped_at is None and len(seen) == 300:
                # a worker that hangs (SIGSTOP) and is then killed: the broker keeps handing it its
                # share of the frames for a second, so it surely dies with frames it never answered
                os.kill(pids[0], signal.SIGSTOP)
                stopped_at = time.monotonic()
            elif killed_at is None and stopped_at is not None and time.monotonic() - stopped_at > 1.0:
                os.kill(pids[0], signal.SIGKILL)
                killed_at = len(seen)
    # every request answered, each exactly once at the device
    assert sorted(seen) == sorted(f"img{i}" for i in range(len(x)))
    assert set(seen.values()) == {1}
    s = agent.stats
    assert s.answered == s.requests == 1000 and s.timeouts == 0 and s.worker_errors == 0
    assert killed_at is not None and s.resends > 0, "the dead worker's frames were re-sent by the device"
    # the survivor kept going, and `edgesplit cloud` replaced the dead worker
    cloud.wait_ready(3)
    run = cloud.stop()
    assert run["restarted"] == 1 and len(run["per_worker"]) == 2, run
    assert any("was killed (SIGKILL)" in line for line in cloud.err)
    per = [w["answered"] for w in run["per_worker"]]
    print(f"\nkilled one of two workers after {killed_at} answers: device re-sent {s.resends} frame(s), "
          f"ignored {s.duplicates} duplicate answer(s); the survivor and the replacement answered {per}")
