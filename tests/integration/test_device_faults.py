"""Faults the device must ride out: a broker killed mid-stream, a device killed mid-stream (outbox)."""
from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from device.config import DeviceConfig
from device.transport import open_agent
from protocol import topics
from protocol.frame import decode_frame
from protocol.mqtt import MqttClient

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.timeout(400)


def test_broker_killed_mid_stream_every_request_answered_once(mosquitto_broker, tiny_bundle, start_worker):
    from converter import datasets

    x, _ = datasets.synthetic_images(2000, seed=5)      # issue 6: a 2,000-frame stream, broker killed mid-way
    start_worker(mosquitto_broker.url, tiny_bundle)
    seen: dict[str, int] = {}
    killed = False
    with open_agent(DeviceConfig(device_id="pi-fault", fleet="lab", bundle=tiny_bundle.root,
                                 broker_url=mosquitto_broker.url, timeout=120, resend_after=5.0)) as agent:
        for r in agent.run_arrays(x, ids=[f"img{i}" for i in range(len(x))]):
            assert r.ok, r.error
            seen[r.input] = seen.get(r.input, 0) + 1
            # mid-stream means with requests in flight (on a busy machine the agent can have
            # drained every answer at the 1,000th; then the kill would test nothing)
            if len(seen) >= 1000 and not killed and agent.in_flight > 0:
                killed = True
                mosquitto_broker.kill()          # SIGKILL: whatever it held in memory is gone
                time.sleep(1.0)
                mosquitto_broker.restart()
    assert sorted(seen) == sorted(f"img{i}" for i in range(len(x)))
    assert set(seen.values()) == {1}
    assert killed, "the broker was never killed with requests in flight"
    s = agent.stats
    assert s.answered == s.requests == len(x) and s.timeouts == 0
    assert s.connects >= 2 and s.resends > 0


def _device(tmp_path, *args):
    return subprocess.Popen([sys.executable, "-m", "edgesplit", "device", "run", *map(str, args)], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _image_folder(tmp_path, n, seed):
    """A folder of ``n`` synthetic 28x28 PNG images, as a user's camera roll would be."""
    from converter import datasets
    from PIL import Image

    folder = tmp_path / "imgs"
    folder.mkdir()
    x, _ = datasets.synthetic_images(n, seed=seed)
    for i, img in enumerate(np.round(x[..., 0] * 255).astype(np.uint8)):
        Image.fromarray(img, "L").save(folder / f"{i:04d}.png")
    return folder


def test_device_killed_mid_stream_resends_its_outbox(mosquitto_broker, tiny_bundle, start_worker, tmp_path):
    folder = _image_folder(tmp_path, 200, seed=9)
    url = mosquitto_broker.url
    outbox = tmp_path / "outbox.sqlite"

    # every request id the device ever published, from the broker's side
    published: set[int] = set()
    spy = MqttClient(url)
    spy.subscribe(topics.features("lab", "pi-box"), lambda t, p: published.add(decode_frame(p).request_id))
    assert spy.start(wait_connected=10)

    # run 1: no cloud yet, so requests pile up in the outbox; kill -9 once the window is full
    common = ("--broker", url, "--device-id", "pi-box", "--fleet", "lab", "--bundle", tiny_bundle.root,
              "--outbox", outbox, "--timeout", 120)
    dev = _device(tmp_path, *common, folder)
    deadline = time.monotonic() + 90
    while len(published) < 64 and time.monotonic() < deadline:
        time.sleep(0.05)
    dev.kill()
    dev.communicate(timeout=30)
    assert len(published) >= 64
    accepted = set(published)

    # run 2: the cloud is up; the device is restarted with no new input: the outbox is re-sent and answered
    start_worker(url, tiny_bundle)
    dev = _device(tmp_path, *common)
    out, err = dev.communicate(timeout=180)
    assert dev.returncode == 0, err
    rows = [json.loads(line) for line in out.splitlines() if line.strip()]
    assert all(r.get("recovered") and "error" not in r for r in rows)
    assert {r["request_id"] for r in rows} == accepted          # nothing lost
    assert len(rows) == len(accepted)                            # nothing answered twice
    assert {Path(r["input"]).parent for r in rows} == {folder}   # results name the original files

    # run 3: nothing is left
    dev = _device(tmp_path, *common)
    out, err = dev.communicate(timeout=120)
    assert dev.returncode == 0 and out.strip() == "", err
    spy.stop()


@pytest.mark.parametrize("resend_after, answered", [("1", 20), ("0", 0)])
def test_resend_after_recovers_requests_no_worker_received(mosquitto_broker, tiny_bundle, start_worker, tmp_path,
                                                           resend_after, answered):
    """Frames published while no worker listens are gone (no one holds a session for them): only the
    device's resend brings them to the worker that starts later; --resend-after 0 never resends."""
    folder = _image_folder(tmp_path, 20, seed=3)
    url = mosquitto_broker.url
    published: list[int] = []
    spy = MqttClient(url)
    spy.subscribe(topics.features("lab", "pi-resend"), lambda t, p: published.append(decode_frame(p).request_id))
    assert spy.start(wait_connected=10)
    dev = _device(tmp_path, "--broker", url, "--device-id", "pi-resend", "--fleet", "lab", "--bundle",
                  tiny_bundle.root, "--timeout", 8, "--resend-after", resend_after, folder)
    deadline = time.monotonic() + 60
    while len(published) < 20 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert len(published) >= 20, "the device did not publish its inputs"
    start_worker(url, tiny_bundle)                    # too late for the first publication of each
    out, err = dev.communicate(timeout=120)
    results = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    assert len(results) == 20, err
    ok = [r for r in results if not r.get("error")]
    assert len(ok) == answered, err
    if answered == 0:
        assert all("timeout" in r["error"] for r in results)
    spy.stop()
