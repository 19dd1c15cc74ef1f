"""The HIL scenario: a device on a target, a broker and a cloud worker here, a shaped link between.

:func:`build_package` makes the device package for a target (broker URL = the relay,
wheels for the target's platform, Raspberry Pi OS's dependency set);
:func:`run_scenario` drives the installed device from outside, only through files
dropped into its inbox and the broker:

A. a burst of images with the cloud up (the device's first connection is cut
   mid-stream by the relay, so it must reconnect);
B. the cloud stopped, more images: the device fills its window of unanswered
   requests (kept in its outbox), then is killed with SIGKILL;
C. the cloud and the device restarted: the outbox is re-sent, the rest answered;
D. images one at a time (the unloaded round trip over the link), then SIGTERM.

A status subscriber on this machine records ``online``/``offline``/``stopped``; a
spy records every request id the device published.  Timing figures are collected,
never asserted (they go to the report).
"""
from __future__ import annotations

import dataclasses
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Sequence

import numpy as np

from protocol import stats, topics

log = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parents[2]
FLEET = "hil"
MAX_IN_FLIGHT = 64

DEVICE_CONFIG = """\
# the HIL device: snappy folder polling, the default window and resend time
device_id = "{device_id}"
fleet = "{fleet}"
bundle = "/opt/edgesplit/bundle"

[broker]
url = "{broker}"

[inputs]
poll_interval = 0.1
settle = 0.2

[agent]
max_in_flight = {max_in_flight}
batch = 32
resend_after = 10.0
"""


# --------------------------------------------------------------------------- the package

def interpreter_choice() -> tuple[str, list[str]]:
    """(interpreter package, pip constraints) for the target: Raspberry Pi OS Bookworm's set by default."""
    interp = os.environ.get("EDGESPLIT_HIL_INTERPRETER", "tflite-runtime")
    cons = ["numpy<2"]
    if interp == "tflite-runtime":
        cons.append("tflite-runtime==2.14.*")
    return interp, cons


def build_package(bundle: Path, target, broker_url: str, device_id: str, out_dir: Path):
    """The device package for ``target`` (offline wheels for its machine and Python)."""
    import platform

    from deploy.device_package import build_device_package

    arch, pyver = target.platform()
    here = f"{sys.version_info[0]}.{sys.version_info[1]}"
    wheel_platform = "native" if (arch == platform.machine() and pyver == here) else arch
    interp, cons = interpreter_choice()
    out_dir.mkdir(parents=True, exist_ok=True)
    cfg = out_dir / "device.toml"
    cfg.write_text(DEVICE_CONFIG.format(device_id=device_id, fleet=FLEET, broker=broker_url,
                                        max_in_flight=MAX_IN_FLIGHT))
    return build_device_package(bundle, out_dir / f"{device_id}.tar.gz", config=cfg, broker=broker_url,
                                device_id=device_id, fleet=FLEET, offline_wheels=True, wheel_platform=wheel_platform,
                                python_version=pyver, interpreter=interp, constraints=cons)


# --------------------------------------------------------------------------- helpers on this machine

class StatusLog:
    """Every payload on the device's (retained) status topic, with the time it arrived here."""

    def __init__(self, url: str, topic: str):
        from protocol.mqtt import MqttClient

        self.topic = topic
        self.events: list[tuple[float, str]] = []
        self._cond = threading.Condition()
        # forget a retained status left by an earlier run on this broker
        c = MqttClient(url, client_id=f"hil-clear-{time.monotonic_ns()}")
        c.start(wait_connected=10)
        c.publish(topic, b"", qos=1, retain=True).wait(5)
        c.stop()
        self.client = MqttClient(url, client_id=f"hil-status-{time.monotonic_ns()}")
        self.client.subscribe(topic, self._on_message, qos=1)
        if not self.client.start(wait_connected=10):
            raise RuntimeError(f"status subscriber: broker {url} not reachable")

    def _on_message(self, topic: str, payload: bytes) -> None:
        if not payload:
            return
        with self._cond:
            self.events.append((time.monotonic(), payload.decode(errors="replace")))
            self._cond.notify_all()

    def wait_for(self, status: str, after: float, timeout: float) -> float:
        """Time of the first ``status`` that arrived at or after ``after``; AssertionError after ``timeout``."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for t, s in self.events:
                    if s == status and t >= after:
                        return t
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"no {status!r} on {self.topic} within {timeout:.0f} s; "
                                         f"seen: {self.sequence()}")
                self._cond.wait(min(left, 0.5))

    def sequence(self) -> list[str]:
        with self._cond:
            return [s for _, s in self.events]

    def close(self) -> None:
        self.client.stop()


class FeatureSpy:
    """Every request id the device published on its features topic (decoded with protocol.frame)."""

    def __init__(self, url: str, topic: str):
        from protocol.mqtt import MqttClient

        self.ids: list[int] = []
        self._lock = threading.Lock()
        self.client = MqttClient(url, client_id=f"hil-spy-{time.monotonic_ns()}")
        self.client.subscribe(topic, self._on_message, qos=1)
        if not self.client.start(wait_connected=10):
            raise RuntimeError(f"feature spy: broker {url} not reachable")

    def _on_message(self, topic: str, payload: bytes) -> None:
        from protocol.frame import decode_frame

        rid = decode_frame(payload).request_id
        with self._lock:
            self.ids.append(rid)

    def distinct(self) -> set[int]:
        with self._lock:
            return set(self.ids)

    def close(self) -> None:
        self.client.stop()


class Cloud:
    """``edgesplit cloud`` on this machine, straight to the broker (not through the link)."""

    def __init__(self, bundle: Path, url: str, workdir: Path):
        self.bundle, self.url, self.workdir = bundle, url, workdir
        self.proc: subprocess.Popen | None = None
        self.n = 0

    def start(self) -> "Cloud":
        log_path = self.workdir / f"cloud-{self.n}.log"
        self.n += 1
        fh = open(log_path, "w")
        self.proc = subprocess.Popen([sys.executable, "-m", "edgesplit", "cloud", "--bundle", str(self.bundle),
                                      "--broker", self.url, "--stats-every", "0"], cwd=ROOT, stdout=fh,
                                     stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        fh.close()
        deadline = time.monotonic() + 120
        while "ready" not in log_path.read_text():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"the cloud worker did not start: {log_path.read_text()[-2000:]}")
            time.sleep(0.1)
        return self

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.proc = None


# --------------------------------------------------------------------------- the scenario

@dataclasses.dataclass
class ScenarioResult:
    rows: list[dict]                       # the device's result log
    statuses: list[str]
    spy_ids: set[int]                      # every request id published
    parked_ids: set[int]                   # published while the cloud was down, before the kill
    phase_names: dict[str, list[str]]      # phase -> image file names
    rss_kb: list[int]                      # peak RSS of each device process
    killed_exit: int | None
    stop_exit: int | None
    doctor: tuple[int, str]
    relay: dict
    seconds: float

    def answers(self) -> dict[str, list[dict]]:
        out: dict[str, list[dict]] = {}
        for r in self.rows:
            out.setdefault(Path(r["input"]).name, []).append(r)
        return out

    def latencies(self, phase: str) -> list[float]:
        names = set(self.phase_names[phase])
        return [r["latency_ms"] for r in self.rows if Path(r["input"]).name in names
                and "error" not in r and not r.get("recovered") and r.get("latency_ms") is not None]


def _wait_answered(target, names: Sequence[str], timeout: float, dev=None, poll: float = 0.3) -> list[dict]:
    want = set(names)
    deadline = time.monotonic() + timeout
    while True:
        rows = target.results()
        got = {Path(r["input"]).name for r in rows if "error" not in r}
        if want <= got:
            return rows
        if dev is not None:
            dev.peak_rss_kb()
            if not dev.alive():
                raise AssertionError(f"the device exited while {len(want - got)} answers were due:\n"
                                     f"{dev.log_tail()}")
        if time.monotonic() > deadline:
            tail = dev.log_tail() if dev is not None else ""
            raise AssertionError(f"{len(want - got)} of {len(want)} images unanswered after {timeout:.0f} s "
                                 f"(e.g. {sorted(want - got)[:5]}):\n{tail}")
        time.sleep(poll)


def run_scenario(target, relay, broker_url: str, bundle: Path, device_id: str, images: Sequence[Path],
                 workdir: Path, *, n_burst: int, n_kill: int, n_paced: int, timeout: float = 180.0
                 ) -> ScenarioResult:
    """Phases A–D of the module docstring over ``images`` (n_burst + n_kill + n_paced of them)."""
    assert n_burst + n_kill + n_paced <= len(images)
    t_start = time.monotonic()
    burst = list(images[:n_burst])
    parked = list(images[n_burst:n_burst + n_kill])
    paced = list(images[n_burst + n_kill:n_burst + n_kill + n_paced])
    names = {"burst": [p.name for p in burst], "kill": [p.name for p in parked], "paced": [p.name for p in paced]}
    poll = 0.1 if target.kind == "local" else 0.5
    status = StatusLog(broker_url, topics.status(FLEET, device_id))
    spy = FeatureSpy(broker_url, topics.features(FLEET, device_id))
    cloud = Cloud(bundle, broker_url, workdir)
    rss: list[int] = []
    devs = []
    try:
        # the installed device, checked by its own doctor, broker included (through the relay)
        doctor = target.doctor()
        cloud.start()
        relay.cut_next(1)                  # the device's first connection is cut mid-stream
        t = time.monotonic()
        dev = target.start_device()
        devs.append(dev)
        status.wait_for("online", t, 60)

        # A: a burst, answered
        target.drop_images(burst)
        _wait_answered(target, names["burst"], timeout, dev, poll)
        dev.peak_rss_kb()

        # B: no cloud: the window fills with unanswered requests, held in the outbox; then SIGKILL
        cloud.stop()
        before = spy.distinct()
        target.drop_images(parked)
        expect = min(n_kill, MAX_IN_FLIGHT)
        deadline = time.monotonic() + 60
        while len(spy.distinct() - before) < expect:
            dev.peak_rss_kb()
            if time.monotonic() > deadline:
                raise AssertionError(f"the device published {len(spy.distinct() - before)} of {expect} requests "
                                     f"with the cloud down:\n{dev.log_tail()}")
            time.sleep(0.05)
        parked_ids = spy.distinct() - before
        rss.append(dev.peak_rss_kb())
        t_kill = time.monotonic()
        dev.kill(signal.SIGKILL)
        killed_exit = dev.wait(30)
        status.wait_for("offline", t_kill, 60)        # the broker's last will for the vanished device

        # C: cloud and device back: the outbox is re-sent, the rest of the folder answered
        cloud.start()
        t = time.monotonic()
        dev = target.start_device()
        devs.append(dev)
        status.wait_for("online", t, 60)
        _wait_answered(target, names["burst"] + names["kill"], timeout, dev, poll)

        # D: one image at a time: the round trip of a lone request over the link
        for p in paced:
            target.drop_images([p])
            _wait_answered(target, [p.name], 60, dev, poll=0.05 if target.kind == "local" else 0.3)
        rss.append(dev.peak_rss_kb())
        t_stop = time.monotonic()
        dev.kill(signal.SIGTERM)
        stop_exit = dev.wait(60)
        status.wait_for("stopped", t_stop, 30)
        rows = target.results()
    finally:
        for d in devs:
            if d.alive():
                d.kill(signal.SIGKILL)
        cloud.stop()
        status.close()
        spy.close()
    return ScenarioResult(rows=rows, statuses=status.sequence(), spy_ids=spy.distinct(), parked_ids=parked_ids,
                          phase_names=names, rss_kb=rss, killed_exit=killed_exit, stop_exit=stop_exit, doctor=doctor,
                          relay=relay.stats.to_dict(), seconds=time.monotonic() - t_start)


def percentiles(values: Sequence[float]) -> dict:
    """n, p50, p95 and max (to 0.1 ms) for the report."""
    p = stats.percentiles(values, (50, 95))
    return {k: p[k] if k == "n" else round(p[k], 1) for k in ("n", "p50", "p95", "max")} if p else {}


def check(res: ScenarioResult, y_local: np.ndarray, y_true: np.ndarray, paths: Sequence[Path]) -> dict:
    """Assert what a user would notice; return the figures (accuracy, latency, RSS, relay)."""
    answers = res.answers()
    all_names = res.phase_names["burst"] + res.phase_names["kill"] + res.phase_names["paced"]
    errors = [r for r in res.rows if "error" in r]
    assert not errors, f"{len(errors)} image(s) failed on the device, e.g. {errors[:3]}"
    missing = [n for n in all_names if n not in answers]
    assert not missing, f"{len(missing)} image(s) never answered, e.g. {missing[:5]}"
    # an image may be answered twice (killed between its answer and moving the file): the answers agree
    for name, rows in answers.items():
        assert len({r["index"] for r in rows}) == 1, f"{name} got different answers: {rows}"
    index_of = {p.name: i for i, p in enumerate(paths)}
    got = np.array([answers[n][0]["index"] for n in all_names])
    idx = np.array([index_of[n] for n in all_names])
    differ = [all_names[i] for i in np.flatnonzero(got != y_local[idx])]
    assert not differ, f"the device's answers differ from the split model run here for {differ[:10]}"
    # what the outbox held at the kill was re-sent (same request ids) and answered, once
    recovered = {r["request_id"] for r in res.rows if r.get("recovered")}
    assert res.parked_ids and recovered == res.parked_ids
    # availability as a user's dashboard sees it
    seq = res.statuses
    want = ["online", "offline", "online", "stopped"]
    pos = 0
    for s in seq:
        if pos < len(want) and s == want[pos]:
            pos += 1
    assert pos == len(want), f"status transitions {seq} do not contain {want} in order"
    assert seq[-1] == "stopped"
    assert res.killed_exit not in (None, 0), "SIGKILL did not end the device"
    assert res.stop_exit == 0, "SIGTERM should end the device cleanly (exit 0)"
    assert res.doctor[0] == 0, f"the doctor on the target failed:\n{res.doctor[1]}"
    assert res.relay["cut"] >= 1 and res.relay["connections"] >= 3
    assert all(kb > 0 for kb in res.rss_kb)
    accuracy_device = float(np.mean(got == y_true[idx]))
    accuracy_local = float(np.mean(y_local[idx] == y_true[idx]))
    assert accuracy_device == accuracy_local
    duplicates = sum(len(v) - 1 for v in answers.values())
    return {
        "images": len(all_names),
        "accuracy": {"device": round(accuracy_device, 4), "local head+tail": round(accuracy_local, 4)},
        "latency_ms burst (64 in flight)": percentiles(res.latencies("burst")),
        "latency_ms one at a time": percentiles(res.latencies("paced")),
        "peak_rss_mib": round(max(res.rss_kb) / 1024, 1),
        "peak_rss_kib per process": res.rss_kb,
        "recovered from the outbox": len(recovered),
        "answered twice": duplicates,
        "status sequence": " ".join(seq),
        "relay": {k: res.relay[k] for k in ("connections", "cut", "bytes_up", "bytes_down")}
        | {"held_ms": {k: round(v, 1) for k, v in res.relay["held_ms"].items()}},
        "scenario_seconds": round(res.seconds, 1),
        "machine load (1-min average, 2 cores shared)": round(os.getloadavg()[0], 1),
    }
