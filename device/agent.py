"""The device agent: inputs → head → feature frames over MQTT → results, matched by request id.

::

    with DeviceAgent("bundle/", "mqtt://127.0.0.1:1883", "pi-01", fleet="lab") as agent:
        for r in agent.run_arrays(x_test[:1000], ids=range(1000)):
            print(r.to_json())
        print(agent.stats.summary())

Behaviour (see docs and issue 4/6):

* publishes each feature tensor as one frame, QoS 1, never retained, on
  ``edgesplit/v1/<fleet>/<device>/features``; at most ``max_in_flight``
  requests are unanswered at a time, so a slow cloud slows the device down
  instead of flooding the broker;
* results arrive on its own results topic (subscribed on every connect by
  :mod:`protocol.mqtt`), are matched by request id, and a duplicate answer is
  ignored;
* availability like Frigate's: ``online`` (retained) after connect and every
  reconnect, ``stopped`` on a clean exit, ``offline`` as the retained last will;
* after a reconnect, and when a request has waited ``resend_after`` seconds,
  unanswered requests are published again as new frames with the same request
  id (the cloud answers a request id once);
* with an outbox (:class:`device.outbox.SqliteOutbox`) every accepted input is
  stored before it is published and re-sent after a restart;
* a broker that refuses the credentials raises :class:`ConfigError` (exit 78).

Never imports TensorFlow.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import queue
import secrets
import signal
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np

from device.outbox import OutboxEntry, OutboxFull, SqliteOutbox
from device import sources
from protocol import topics
from protocol.errors import ConfigError, FrameError, UsageError
from protocol.frame import RESULT, Frame, decode_frame, encode_frame, now_us
from protocol.manifest import Bundle, load_bundle
from protocol.mqtt import MqttClient, Will, read_password_file
from protocol.stats import percentiles
from runtime.preprocess import Preprocessor
from runtime.split import Head

log = logging.getLogger(__name__)

DEFAULT_MAX_IN_FLIGHT = 64
DEFAULT_BATCH = 32

_RECONNECTED = object()      # queue sentinels from the network thread
_FATAL = object()


# --------------------------------------------------------------------------- results

@dataclasses.dataclass
class DeviceResult:
    """What came back for one input (or why nothing did)."""

    input: str                       # file path, array id, camera frame name
    request_id: int
    label: str | None = None         # the manifest's label name of the top class
    index: int | None = None         # the top class index
    probability: float | None = None
    latency_ms: float | None = None  # head start -> result received, on the device's clock
    head_ms: float | None = None     # this input's share of the head's batch time
    cloud_ms: float | None = None    # the worker's receive -> done time (its clock)
    attempts: int = 1                # frames published for this request
    error: str | None = None         # "timeout", the worker's error, or why the input failed
    recovered: bool = False          # re-sent from the outbox after a restart
    probabilities: np.ndarray | None = dataclasses.field(default=None, repr=False)

    @property
    def ok(self) -> bool:
        return self.error is None

    def to_dict(self) -> dict:
        d = {"input": self.input, "request_id": self.request_id, "label": self.label, "index": self.index,
             "probability": None if self.probability is None else round(self.probability, 6),
             "latency_ms": None if self.latency_ms is None else round(self.latency_ms, 3),
             "head_ms": None if self.head_ms is None else round(self.head_ms, 3),
             "cloud_ms": None if self.cloud_ms is None else round(self.cloud_ms, 3),
             "attempts": self.attempts}
        if self.error is not None:
            d["error"] = self.error
        if self.recovered:
            d["recovered"] = True
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), ensure_ascii=False)


@dataclasses.dataclass
class AgentStats:
    """Counters and latencies of one agent (``summary()`` for people, ``to_dict()`` for tools)."""

    device_id: str = ""
    bundle_id: str = ""
    interpreter: str = ""
    requests: int = 0          # inputs that became a request
    answered: int = 0          # results received and matched (errors from the worker included)
    worker_errors: int = 0     # results that carry an error
    timeouts: int = 0
    failed_inputs: int = 0     # unreadable images, outbox refusals
    frames_sent: int = 0       # frames published, resends included
    resends: int = 0
    duplicates: int = 0        # results for requests already answered (ignored)
    unmatched: int = 0         # results for request ids this agent never sent
    bad_frames: int = 0        # results that failed to decode
    bytes_sent: int = 0        # feature frame payload bytes, resends included
    recovered: int = 0         # requests re-sent from the outbox at start
    abandoned: int = 0         # still unanswered when a stop was requested (kept in the outbox, if any)
    stopped_early: bool = False  # a stop (SIGTERM, request_stop) ended the run before all inputs were sent
    dropped: int = 0           # requests the outbox dropped when full
    connects: int = 0
    seconds: float = 0.0
    latencies_ms: list = dataclasses.field(default_factory=list, repr=False)
    head_ms: list = dataclasses.field(default_factory=list, repr=False)

    @property
    def ok(self) -> bool:
        """True when every request was answered without an error and every input could be read."""
        return (self.timeouts == 0 and self.worker_errors == 0 and self.failed_inputs == 0 and self.dropped == 0
                and self.abandoned == 0)

    def percentiles(self) -> dict:
        return percentiles(self.latencies_ms)

    def to_dict(self) -> dict:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
             if f.name not in ("latencies_ms", "head_ms")}
        d["latency_ms"] = self.percentiles()
        d["head_ms_mean"] = float(np.mean(self.head_ms)) if self.head_ms else None
        d["throughput_per_s"] = self.answered / self.seconds if self.seconds > 0 else None
        d["bytes_per_frame"] = self.bytes_sent / self.frames_sent if self.frames_sent else None
        d["ok"] = self.ok
        return d

    def summary(self) -> str:
        p = self.percentiles()
        lines = [f"device {self.device_id}: {self.answered}/{self.requests} answered in {self.seconds:.2f} s"
                 + (f" ({self.answered / self.seconds:.1f}/s)" if self.seconds > 0 else "")
                 + f", interpreter {self.interpreter}, bundle {self.bundle_id}"]
        if p:
            lines.append(f"  latency ms: p50 {p['p50']:.1f}  p95 {p['p95']:.1f}  p99 {p['p99']:.1f}  "
                         f"max {p['max']:.1f}; head {np.mean(self.head_ms):.2f} ms/input")
        if self.frames_sent:
            lines.append(f"  frames sent {self.frames_sent} ({self.bytes_sent / self.frames_sent:.0f} B each), "
                         f"resends {self.resends}")
        problems = {k: getattr(self, k) for k in ("timeouts", "worker_errors", "failed_inputs", "duplicates",
                                                  "unmatched", "bad_frames", "recovered", "dropped", "abandoned")
                    if getattr(self, k)}
        if problems:
            lines.append("  " + ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in problems.items()))
        return "\n".join(lines)


@dataclasses.dataclass
class _Pending:
    name: str
    feature: np.ndarray
    t_submit: float           # monotonic, when the head started on it
    head_s: float
    t_sent: float = 0.0       # monotonic, last publish
    attempts: int = 0
    recovered: bool = False
    scale: float | None = None
    zero_point: int | None = None
    bundle_id: str = ""


# --------------------------------------------------------------------------- the agent

class DeviceAgent:
    """Runs a bundle's head on a device and talks to the cloud over MQTT (see the module docstring).

    ``timeout``: seconds a request may wait for its answer before it is reported
    as ``"timeout"`` (None: wait for ever).  ``resend_after``: seconds after which an
    unanswered request is published again.  ``key``: the device's MAC key (bytes).
    ``outbox``: a path (SQLite file) or a :class:`SqliteOutbox`, for inputs that must
    survive a restart.  ``client_id`` defaults to ``edgesplit-<fleet>-<device>``
    (stable, as persistent sessions and broker ACLs want).  ``clean_session``
    defaults to False (a persistent session) when there is an outbox, else True.
    """

    def __init__(self, bundle: str | os.PathLike | Bundle, broker_url: str, device_id: str, fleet: str = "default",
                 *, max_in_flight: int = DEFAULT_MAX_IN_FLIGHT, batch_size: int = DEFAULT_BATCH,
                 timeout: float | None = 30.0, resend_after: float | None = 10.0, num_threads: int | None = None,
                 interpreter: str | None = None, key: bytes | None = None,
                 outbox: str | os.PathLike | SqliteOutbox | None = None, client_id: str | None = None,
                 clean_session: bool | None = None, protocol: str | None = None, compress: str = "auto",
                 connect_timeout: float = 10.0, username: str | None = None, password: str | None = None,
                 tls_ca: str | None = None, tls_cert: str | None = None, tls_key: str | None = None):
        if max_in_flight < 1:
            raise UsageError(f"max_in_flight must be at least 1, got {max_in_flight}")
        if batch_size < 1:
            raise UsageError(f"batch size must be at least 1, got {batch_size}")
        if timeout is not None and timeout <= 0:
            raise UsageError(f"timeout must be > 0 seconds, got {timeout}", fix="or leave it unset to wait for ever")
        self.device_id = topics.check_id(device_id, "device id")
        self.fleet = topics.check_id(fleet, "fleet id")
        self.bundle = bundle if isinstance(bundle, Bundle) else load_bundle(bundle)
        self.manifest = self.bundle.manifest
        self.head = Head(self.bundle, num_threads=num_threads, backend=interpreter)  # checked against the manifest
        self.preprocessor = Preprocessor(self.manifest.input)
        self.max_in_flight = int(max_in_flight)
        self.batch_size = min(int(batch_size), self.max_in_flight)
        self.timeout = timeout
        self.resend_after = resend_after
        self.key = key
        self.compress = compress
        self.connect_timeout = connect_timeout

        self.features_topic = topics.features(self.fleet, self.device_id)
        self.results_topic = topics.results(self.fleet, self.device_id)
        self.status_topic = topics.status(self.fleet, self.device_id)

        if outbox is None or isinstance(outbox, SqliteOutbox):
            self.outbox = outbox
        else:
            self.outbox = SqliteOutbox(outbox, device_id=self.device_id)

        self.stats = AgentStats(device_id=self.device_id, bundle_id=self.bundle.bundle_id,
                                interpreter=f"{self.head.backend.name} {self.head.backend.version}")
        self._queue: queue.Queue = queue.Queue()
        self._pending: dict[int, _Pending] = {}
        self._answered_recent: dict[int, None] = {}     # bounded memory of answered ids, for duplicates
        self._id_prefix = secrets.randbits(32) << 32
        self._id_counter = 0
        self._seq = 0
        self._started = self._stopped = False
        self._stop_requested = threading.Event()
        self._t_start = 0.0
        self.client = MqttClient(
            broker_url, client_id=client_id or f"edgesplit-{self.fleet}-{self.device_id}",
            username=username, password=password, tls_ca=tls_ca, tls_cert=tls_cert, tls_key=tls_key,
            # with an outbox, a persistent session also keeps the results that arrive while we are away
            protocol=protocol, clean_session=(self.outbox is None) if clean_session is None else clean_session,
            will=Will(self.status_topic, topics.STATUS_OFFLINE.encode(), qos=1, retain=True),
            on_online=self._on_online, on_fatal=self._on_fatal)
        self.client.subscribe(self.results_topic, self._on_message, qos=topics.delivery(topics.RESULTS).qos)

    # ------------------------------------------------------------- MQTT callbacks (network thread)
    def _on_online(self) -> None:
        self.stats.connects = self.client.connects
        st = topics.delivery(topics.STATUS)
        self.client.publish(self.status_topic, topics.STATUS_ONLINE.encode(), qos=st.qos, retain=st.retain)
        if self.client.connects > 1:
            self._queue.put(_RECONNECTED)

    def _on_fatal(self, error: ConfigError) -> None:
        self._queue.put(_FATAL)

    def _on_message(self, topic: str, payload: bytes) -> None:
        self._queue.put((time.monotonic(), payload))

    # ------------------------------------------------------------- lifecycle
    def start(self) -> "DeviceAgent":
        """Connect (waiting up to ``connect_timeout`` s; a down broker is retried in the background)
        and queue what the outbox still holds.  Raises ConfigError if the broker refuses us."""
        if self._started:
            return self
        self._started = True
        self._t_start = time.monotonic()
        if not self.client.start(wait_connected=self.connect_timeout):
            log.warning("broker %s not reachable yet; inputs are queued and sent once it is", self.client.broker)
        self._recover_outbox()
        return self

    def stop(self) -> None:
        """Publish ``stopped`` (retained) and disconnect cleanly; the broker then drops our will."""
        if self._stopped or not self._started:
            return
        self._stopped = True
        self.stats.seconds = time.monotonic() - self._t_start
        try:
            if self.client.connected and self.client.error is None:
                st = topics.delivery(topics.STATUS)
                self.client.publish(self.status_topic, topics.STATUS_STOPPED.encode(), qos=st.qos,
                                    retain=st.retain).wait(2.0)
        finally:
            self.client.stop()
            if self.outbox is not None:
                self.outbox.close()

    def request_stop(self) -> None:
        """Ask a running loop to stop taking inputs and finish (safe from a signal handler)."""
        self._stop_requested.set()

    def __enter__(self) -> "DeviceAgent":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def in_flight(self) -> int:
        """Requests sent and not yet answered (nor timed out)."""
        return len(self._pending)

    # ------------------------------------------------------------- ids and frames
    def _next_request_id(self) -> int:
        # a random 32-bit prefix per run + a counter: unique within a run, and across
        # runs with overwhelming odds, so the cloud's duplicate filter never confuses two.
        self._id_counter += 1
        return self._id_prefix | (self._id_counter & 0xFFFFFFFF)

    def _publish(self, rid: int, p: _Pending) -> None:
        self._seq += 1
        frame = Frame.features(p.feature, request_id=rid, device_id=self.device_id,
                               bundle_id=p.bundle_id or self.bundle.bundle_id, seq=self._seq,
                               scale=p.scale, zero_point=p.zero_point)
        payload = encode_frame(frame, compress=self.compress, key=self.key)
        fd = topics.delivery(topics.FEATURES)
        self.client.publish(self.features_topic, payload, qos=fd.qos, retain=fd.retain)
        p.t_sent = time.monotonic()
        p.attempts += 1
        self.stats.frames_sent += 1
        self.stats.bytes_sent += len(payload)
        if p.attempts > 1:
            self.stats.resends += 1

    def _recover_outbox(self) -> None:
        if self.outbox is None:
            return
        stale = []
        for e in self.outbox.pending():
            if e.bundle_id != self.bundle.bundle_id:
                stale.append(e.request_id)
                continue
            if e.request_id in self._pending:
                continue
            now = time.monotonic()
            self._pending[e.request_id] = _Pending(e.name, e.tensor, now, 0.0, recovered=True, scale=e.scale,
                                                   zero_point=e.zero_point, bundle_id=e.bundle_id)
            self.stats.recovered += 1
        if stale:
            log.warning("outbox: dropping %d pending input(s) made with another bundle", len(stale))
            self.outbox.remove(stale)
        if self.stats.recovered:
            log.info("outbox: re-sending %d input(s) left from the last run", self.stats.recovered)
            for rid, p in list(self._pending.items()):
                if p.recovered and p.attempts == 0:
                    self._publish(rid, p)

    # ------------------------------------------------------------- submitting
    def _submit_batch(self, names: Sequence[str], x: np.ndarray) -> list[DeviceResult]:
        """Run the head on a batch and publish one frame per input.  Returns immediate failures."""
        t0 = time.monotonic()
        feats = self.head.features(x)
        head_s = (time.monotonic() - t0) / max(1, len(x))
        feat = self.manifest.feature
        scale = feat.scale if feat.quantized else None
        zp = feat.zero_point if feat.quantized else None
        new = []
        for name, f in zip(names, feats):
            rid = self._next_request_id()
            new.append((rid, _Pending(str(name), f, t0, head_s, scale=scale, zero_point=zp,
                                      bundle_id=self.bundle.bundle_id)))
        failed: list[DeviceResult] = []
        if self.outbox is not None:
            entries = [OutboxEntry(rid, p.name, p.bundle_id, p.feature, scale, zp, now_us()) for rid, p in new]
            try:
                for rid in self.outbox.add(entries):
                    gone = self._pending.pop(rid, None)
                    self.stats.dropped += 1
                    if gone is not None:
                        failed.append(DeviceResult(gone.name, rid, attempts=gone.attempts,
                                                   error="dropped: the outbox was full"))
            except OutboxFull as exc:
                self.stats.failed_inputs += len(new)
                return failed + [DeviceResult(p.name, rid, error=f"outbox full: {exc.message}", attempts=0)
                                 for rid, p in new]
        for rid, p in new:
            self._pending[rid] = p
            self.stats.requests += 1
            self.stats.head_ms.append(head_s * 1000)
            self._publish(rid, p)
        return failed

    # ------------------------------------------------------------- receiving
    def _handle(self, item, done: list[int]) -> DeviceResult | None:
        if item is _FATAL:
            self.client.raise_if_failed()
            return None
        if item is _RECONNECTED:
            # The broker may have lost what it had accepted (a restart without persistence):
            # send every unanswered request again; the cloud answers each request id once.
            n = 0
            for rid, p in list(self._pending.items()):
                self._publish(rid, p)
                n += 1
            if n:
                log.info("reconnected: re-sent %d unanswered request(s)", n)
            return None
        t_recv, payload = item
        try:
            frame = decode_frame(payload)
            if frame.mac is not None and self.key is not None:
                frame = decode_frame(payload, key=self.key)
        except FrameError as exc:
            self.stats.bad_frames += 1
            log.warning("ignoring a result that does not decode: %s", exc.message)
            return None
        if frame.kind != RESULT or frame.device_id != self.device_id:
            self.stats.bad_frames += 1
            log.warning("ignoring a %s frame for device %r on my results topic", frame.kind, frame.device_id)
            return None
        rid = frame.request_id
        p = self._pending.pop(rid, None)
        if p is None:
            if rid in self._answered_recent:
                self.stats.duplicates += 1
                log.debug("duplicate result for request %d ignored", rid)
            else:
                self.stats.unmatched += 1
                log.debug("result for unknown request %d ignored", rid)
            return None
        self._remember_answered(rid)
        done.append(rid)
        self.stats.answered += 1
        latency_ms = (t_recv - p.t_submit) * 1000
        cloud_ms = (frame.t_done_us - frame.t_recv_us) / 1000 if frame.t_done_us and frame.t_recv_us else None
        if not frame.ok:
            self.stats.worker_errors += 1
            return DeviceResult(p.name, rid, latency_ms=latency_ms, head_ms=p.head_s * 1000, cloud_ms=cloud_ms,
                                attempts=p.attempts, error=f"worker: {frame.error}", recovered=p.recovered)
        probs = np.asarray(frame.dequantized() if frame.scale is not None else frame.tensor,
                           dtype=np.float32).reshape(-1)
        index = int(frame.label)
        labels = self.manifest.labels
        label = labels[index] if index < len(labels) else str(index)
        prob = float(probs[index]) if index < probs.size else None
        if self.manifest.output.kind == "logits" and probs.size:
            e = np.exp(probs - probs.max())
            prob = float(e[index] / e.sum())
        self.stats.latencies_ms.append(latency_ms)
        return DeviceResult(p.name, rid, label=label, index=index, probability=prob, latency_ms=latency_ms,
                            head_ms=p.head_s * 1000, cloud_ms=cloud_ms, attempts=p.attempts,
                            recovered=p.recovered, probabilities=probs)

    def _remember_answered(self, rid: int) -> None:
        self._answered_recent[rid] = None
        if len(self._answered_recent) > 8 * self.max_in_flight + 4096:
            # dicts keep insertion order: forget the oldest
            for old in list(self._answered_recent)[:len(self._answered_recent) // 2]:
                del self._answered_recent[old]

    def _housekeeping(self, now: float) -> tuple[list[DeviceResult], float | None]:
        """Expire and resend; return timed-out results and the time until the next deadline."""
        out: list[DeviceResult] = []
        next_due: float | None = None
        for rid, p in list(self._pending.items()):
            if p.attempts == 0:
                continue
            if self.timeout is not None:
                due = p.t_submit + self.timeout
                if now >= due:
                    del self._pending[rid]
                    self.stats.timeouts += 1
                    out.append(DeviceResult(p.name, rid, head_ms=p.head_s * 1000, attempts=p.attempts,
                                            error=f"timeout: no answer within {self.timeout:g} s",
                                            recovered=p.recovered))
                    continue
                next_due = due if next_due is None else min(next_due, due)
            if self.resend_after is not None and self.client.connected:
                due = p.t_sent + self.resend_after
                if now >= due:
                    self._publish(rid, p)
                    due = p.t_sent + self.resend_after
                next_due = due if next_due is None else min(next_due, due)
        return out, (None if next_due is None else max(0.0, next_due - now))

    def _drain(self, block: bool) -> Iterator[DeviceResult]:
        """Yield results that arrived; with ``block``, wait (bounded) for at least one event."""
        got_event = False
        while True:
            now = time.monotonic()
            expired, wait = self._housekeeping(now)
            yield from expired
            if expired:
                got_event = True
            try:
                if block and not got_event:
                    t = 0.5 if wait is None else min(0.5, max(wait, 0.001))
                    item = self._queue.get(timeout=t)
                else:
                    item = self._queue.get_nowait()
            except queue.Empty:
                if not block or got_event or self._stop_requested.is_set() or not self._pending:
                    return
                continue
            done: list[int] = []
            items = [item]
            while True:  # take all that is there, so the outbox is updated in one transaction
                try:
                    items.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            results = [r for r in (self._handle(i, done) for i in items) if r is not None]
            if done and self.outbox is not None:
                self.outbox.remove(done)
            got_event = got_event or bool(results) or bool(done)
            yield from results

    # ------------------------------------------------------------- run loops
    def _pump(self, batches: Iterable[tuple[list[str], Any]], drain_grace: float | None = None
              ) -> Iterator[DeviceResult]:
        """Send batches (names, head inputs or failures) within the window; yield results as they come."""
        if not self._started:
            self.start()
        self.client.raise_if_failed()
        yield from self._drain(block=False)
        for names, x in batches:
            if isinstance(x, DeviceResult):          # an input that failed before the head
                yield x
                continue
            for i in range(0, len(names), self.batch_size):
                chunk_names, chunk = names[i:i + self.batch_size], x[i:i + self.batch_size]
                while len(self._pending) + len(chunk_names) > self.max_in_flight:
                    if self._stop_requested.is_set():
                        break
                    yield from self._drain(block=True)
                if self._stop_requested.is_set():
                    break
                yield from self._submit_batch(chunk_names, chunk)
                yield from self._drain(block=False)
            if self._stop_requested.is_set():
                log.info("stop requested: not taking more inputs; waiting for %d answer(s)", len(self._pending))
                break
        deadline = None
        if self._stop_requested.is_set():
            deadline = time.monotonic() + (drain_grace if drain_grace is not None else min(self.timeout or 5.0, 5.0))
        while self._pending:
            if deadline is not None and time.monotonic() >= deadline:
                break
            yield from self._drain(block=True)
        if self._stop_requested.is_set():
            self.stats.stopped_early = True
            kept = " (kept in the outbox)" if self.outbox is not None else ""
            for rid, p in list(self._pending.items()):
                del self._pending[rid]
                self.stats.abandoned += 1
                yield DeviceResult(p.name, rid, head_ms=p.head_s * 1000, attempts=p.attempts,
                                   error=f"stopped: no answer before the stop{kept}", recovered=p.recovered)
        self.stats.seconds = time.monotonic() - self._t_start

    def run_arrays(self, x: np.ndarray, ids: Iterable[Any] | None = None) -> Iterator[DeviceResult]:
        """Send a numpy batch of images (float head input such as MNIST in [0, 1], or uint8 pixels).

        ``ids`` name the inputs in the results (default: their index).  Yields one
        :class:`DeviceResult` per input, in the order answers arrive.
        """
        x = self.preprocessor.arrays(x)
        names = [str(i) for i in (ids if ids is not None else range(len(x)))]
        if len(names) != len(x):
            raise UsageError(f"{len(names)} ids for {len(x)} images", fix="give one id per image")

        def batches():
            for i in range(0, len(x), self.batch_size):
                yield names[i:i + self.batch_size], x[i:i + self.batch_size]
        return self._pump(batches())

    def run_samples(self, samples: Iterable[sources.Sample], batch_size: int | None = None
                    ) -> Iterator[DeviceResult]:
        """Send :class:`device.sources.Sample` objects; an unreadable one yields a failed result."""
        bs = batch_size or self.batch_size

        def batches():
            names: list[str] = []
            xs: list[np.ndarray] = []
            for s in samples:
                if self._stop_requested.is_set():
                    break
                try:
                    xs.append(self.preprocessor(s))
                    names.append(s.name)
                except UsageError as exc:
                    self.stats.failed_inputs += 1
                    log.warning("skipping %s: %s", s.name, exc.message)
                    yield [s.name], DeviceResult(s.name, 0, attempts=0, error=f"input: {exc.message}")
                    continue
                if len(xs) >= bs:
                    yield names, np.stack(xs)
                    names, xs = [], []
            if xs:
                yield names, np.stack(xs)
        return self._pump(batches())

    def run_inputs(self, specs: Iterable[str], *, camera_interval: float = 0.0) -> Iterator[DeviceResult]:
        """Send image files, folders, globs and ``camera[:N]`` (see :mod:`device.sources`)."""
        specs = list(specs)
        samples = sources.open_inputs(specs, camera_interval=camera_interval)
        live = any(sources.parse_camera_spec(s) is not False for s in specs if not os.path.exists(s))
        return self.run_samples(samples, batch_size=1 if live else None)

    def flush(self) -> Iterator[DeviceResult]:
        """Send nothing new: wait for what is pending (inputs left in the outbox by a previous run)."""
        return self._pump(())

    def infer(self, x: np.ndarray, name: str = "0") -> DeviceResult:
        """One image, one answer (blocking)."""
        results = list(self.run_arrays(np.asarray(x)[None], ids=[name]))
        return results[0]


# --------------------------------------------------------------------------- the command

@dataclasses.dataclass
class RunSummary:
    """What ``edgesplit device run`` returns to the command line."""

    stats: AgentStats

    @property
    def ok(self) -> bool:
        return self.stats.ok

    @property
    def exit_code(self) -> int:
        # a stop asked for (SIGTERM from systemd) is a clean exit even with answers outstanding
        return 0 if self.ok or self.stats.stopped_early else 1

    def summary(self) -> str:
        return self.stats.summary()

    def to_dict(self) -> dict:
        return self.stats.to_dict()


def load_credentials(directory: str | os.PathLike) -> dict:
    """Read a device credential directory written by ``edgesplit broker config`` (``broker.json``,
    ``password``, ``ca.crt``) into DeviceAgent keyword arguments plus ``broker``/``device_id``/``fleet``."""
    d = Path(directory)
    info_path = d / "broker.json"
    try:
        info = json.loads(info_path.read_text())
    except FileNotFoundError:
        raise UsageError(f"{info_path} does not exist: {d} is not a device credential directory",
                         fix="give the directory `edgesplit broker config` wrote for this device "
                             "(devices/<device-id>/)") from None
    except (OSError, ValueError) as exc:
        raise UsageError(f"cannot read {info_path}: {exc}", fix="write it again with `edgesplit broker config`") from None
    if info.get("role", "device") != "device":
        raise UsageError(f"{d} holds the credentials of a {info.get('role')} user, not of a device",
                         fix="give the device's directory (devices/<device-id>/)")
    out: dict[str, Any] = {"broker": info.get("broker_url"), "device_id": info.get("device_id"),
                           "fleet": info.get("fleet"), "username": info.get("username"),
                           "client_id": info.get("client_id")}
    if info.get("password_file"):
        out["password"] = read_password_file(d / info["password_file"])
    if info.get("ca_file"):
        out["tls_ca"] = str(d / info["ca_file"])
    return {k: v for k, v in out.items() if v is not None}


def run(bundle: str, broker: str | None, device_id: str | None, inputs: Sequence[str], *,
        fleet: str | None = None, timeout: float | None = 30.0, max_in_flight: int = DEFAULT_MAX_IN_FLIGHT,
        batch_size: int = DEFAULT_BATCH, num_threads: int | None = None, interpreter: str | None = None,
        key_file: str | None = None, outbox: str | None = None, client_id: str | None = None,
        camera_interval: float = 0.0, credentials: str | None = None, username: str | None = None,
        password_file: str | None = None, tls_ca: str | None = None, resend_after: float | None = 10.0,
        on_result: Callable[[DeviceResult], None] | None = None) -> RunSummary:
    """``edgesplit device run``: send ``inputs`` and hand each result to ``on_result``.

    ``credentials``: a device directory from ``edgesplit broker config`` (broker URL,
    user, password, CA, device id, fleet); explicit arguments win over it.
    SIGTERM (systemd stopping the service) stops taking inputs, waits briefly for
    answers in flight and exits cleanly with ``stopped``.
    """
    if not inputs and not outbox:
        raise UsageError("no inputs given", fix="give image files, folders, globs, or 'camera' "
                                                "(or only --outbox FILE to re-send what it holds)")
    creds = load_credentials(credentials) if credentials else {}
    broker = broker or creds.pop("broker", None)
    creds.pop("broker", None)
    if device_id and creds.get("device_id") and device_id != creds["device_id"]:
        raise UsageError(f"--device-id {device_id} does not match the credentials of {creds['device_id']}",
                         fix="drop --device-id, or give that device's credential directory")
    device_id = device_id or creds.pop("device_id", None)
    creds.pop("device_id", None)
    fleet = fleet or creds.pop("fleet", None) or "default"
    creds.pop("fleet", None)
    if not broker:
        raise UsageError("no broker given", fix="pass --broker mqtt://host:1883 (or --credentials DIR)")
    if resend_after is not None and not resend_after > 0:
        raise UsageError(f"--resend-after must be a positive number of seconds, got {resend_after}",
                         fix="e.g. --resend-after 10 (or 0 for never)")
    if not device_id:
        raise UsageError("no device id given", fix="pass --device-id ID (or --credentials DIR)")
    if username:
        creds["username"] = username
    if password_file:
        creds["password"] = read_password_file(password_file)
    if tls_ca:
        creds["tls_ca"] = tls_ca
    if client_id:
        creds["client_id"] = client_id
    key = None
    if key_file:
        from protocol import signing

        key = signing.load_key(key_file)
    # expand and check the inputs before connecting anywhere: a typo (or a missing
    # picamera2) should not need a broker to be reported
    specs = [str(s) for s in inputs]
    samples = sources.open_inputs(specs, camera_interval=camera_interval) if specs else iter(())
    live = any(sources.parse_camera_spec(s) is not False for s in specs if not os.path.exists(s))
    agent = DeviceAgent(bundle, broker, device_id, fleet, max_in_flight=max_in_flight, batch_size=batch_size,
                        timeout=timeout, num_threads=num_threads, interpreter=interpreter, key=key, outbox=outbox,
                        resend_after=resend_after, **creds)
    previous = None
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGTERM, lambda *_: agent.request_stop())
    try:
        with agent:
            for r in agent.run_samples(samples, batch_size=1 if live else None):
                if on_result is not None:
                    on_result(r)
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    return RunSummary(agent.stats)
