"""The device agent: inputs → head → feature frames over MQTT → results, matched by request id.

::

    from device.config import DeviceConfig
    from device.transport import open_agent

    cfg = DeviceConfig(device_id="pi-01", fleet="lab", bundle="bundle/", broker_url="mqtt://127.0.0.1:1883")
    with open_agent(cfg) as agent:            # or DeviceAgent(cfg, a client of your own)
        for r in agent.run_arrays(x_test[:1000], ids=range(1000)):
            print(r.to_json())
        print(agent.stats.summary())

The agent takes its settings (:class:`~device.config.DeviceConfig`) and an MQTT
client made outside it (:mod:`device.transport`): it never decides how to reach the
broker.  Behaviour:

* publishes each feature tensor as one frame, QoS 1, never retained (a retained
  tensor would hand the last private input to every late subscriber), on
  ``edgesplit/v1/<fleet>/<device>/features``; at most ``max_in_flight``
  requests are unanswered at a time, so a slow cloud slows the device down
  instead of flooding the broker;
* results arrive on its own results topic (subscribed on every connect by
  :mod:`protocol.mqtt`), are matched by request id, and a duplicate answer is
  ignored; with a key, a result is decoded once and used only with a valid MAC:
  an unsigned or badly signed one is counted (``unauthenticated``) and dropped;
* availability is three-valued (see :mod:`device.transport`); the agent publishes
  ``stopped`` (retained) when it stops cleanly;
* after a reconnect, and when a request has waited ``resend_after`` seconds,
  unanswered requests are published again as new frames with the same request
  id (the cloud answers a request id once);
* with an outbox (:class:`device.outbox.SqliteOutbox`) every accepted input is
  stored before it is published and re-sent after a restart: what the device
  accepted survives a crash, which paho's in-memory queue does not;
* a broker that refuses the credentials raises :class:`ConfigError` (exit 78).

Never imports TensorFlow.
"""
from __future__ import annotations

import dataclasses
import logging
import queue
import secrets
import threading
import time
from typing import Any, Iterable, Iterator, Sequence

import numpy as np

from device import sources
from device.config import DeviceConfig
from device.outbox import OutboxEntry, OutboxFull, SqliteOutbox
from device.results import AgentStats, DeviceResult
from device.switching import BundleSwitching
from protocol import topics
from protocol.errors import FrameError, Reason, UsageError
from protocol.frame import RESULT, Frame, decode_frame, encode_frame, now_us
from protocol.manifest import Bundle, load_bundle
from runtime.preprocess import Preprocessor
from runtime.split import Head

log = logging.getLogger(__name__)

__all__ = ["DeviceAgent", "DeviceResult", "AgentStats"]


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
    x: np.ndarray | None = None     # the head input, kept while its bundle is on probation (a rollback re-runs it)


# --------------------------------------------------------------------------- the agent

class DeviceAgent(BundleSwitching):
    """Runs a bundle's head on a device and talks to the cloud through ``client`` (see the module docstring).

    ``config``: the settings used are ``device_id``, ``fleet``, ``bundle``, ``timeout``
    (0: wait for ever), ``resend_after`` (0: never), ``max_in_flight``, ``batch``,
    ``threads``, ``interpreter`` and ``outbox_path``.  ``client``: an unstarted
    :class:`protocol.mqtt.MqttClient` (:func:`device.transport.mqtt_client` makes the
    device's); from then on the agent starts and stops it.  ``key``: the device's MAC
    key (bytes): every frame is signed and only signed results are accepted.
    ``bundle``/``outbox``: an already loaded bundle or open outbox instead of the
    config's paths.  ``updater``: a :class:`device.update.Updater` taking bundle updates.
    """

    def __init__(self, config: DeviceConfig, client, *, key: bytes | None = None, bundle: Bundle | None = None,
                 outbox: SqliteOutbox | None = None, compress: str = "auto", connect_timeout: float = 10.0,
                 updater=None):
        self.config = config
        self.device_id, self.fleet = config.device_id, config.fleet
        self.bundle = bundle if bundle is not None else load_bundle(config.bundle)
        self.manifest = self.bundle.manifest
        # checked against the manifest once, here: a head that does not match is a BundleError
        self.head = Head(self.bundle, num_threads=config.threads or None, backend=config.interpreter or None)
        self.preprocessor = Preprocessor(self.manifest.input)
        self.max_in_flight = config.max_in_flight
        self.batch_size = min(config.batch, self.max_in_flight)
        self.timeout = config.timeout or None
        self.resend_after = config.resend_after or None
        self.key = key
        self.compress = compress
        self.connect_timeout = connect_timeout

        self.features_topic = topics.features(self.fleet, self.device_id)
        self.results_topic = topics.results(self.fleet, self.device_id)
        self.status_topic = topics.status(self.fleet, self.device_id)

        if outbox is None and config.outbox_path is not None:
            outbox = SqliteOutbox(config.outbox_path, device_id=self.device_id)
        self.outbox = outbox

        self.stats = AgentStats(device_id=self.device_id, bundle_id=self.bundle.bundle_id,
                                interpreter=f"{self.head.backend.name} {self.head.backend.version}")
        self._queue: queue.Queue = queue.Queue()
        self._pending: dict[int, _Pending] = {}
        self._answered_recent: dict[int, None] = {}     # bounded memory of answered ids, for duplicates
        self._id_prefix = secrets.randbits(32) << 32
        self._id_counter = 0
        self._seq = 0
        self._connects_seen = 0
        self._started = self._stopped = False
        self._stop_requested = threading.Event()
        self._t_start = 0.0
        self.client = client
        self.client.subscribe(self.results_topic, self._on_message, qos=topics.delivery(topics.RESULTS).qos)
        self._init_updates(updater)             # device.switching: manifests, held answers, the updater

    # ------------------------------------------------------------- the network
    def _on_message(self, topic: str, payload: bytes) -> None:
        # the network thread: hand over, decode on the agent's thread
        self._queue.put((time.monotonic(), payload))

    def _check_link(self) -> None:
        """Raise a fatal broker error; after a reconnect, send every unanswered request again."""
        self.client.raise_if_failed()
        connects = self.client.connects
        if connects == self._connects_seen:
            return
        again = self._connects_seen > 0
        self._connects_seen = self.stats.connects = connects
        if again:
            # The broker may have lost what it had accepted (a restart without persistence):
            # send every unanswered request again; the cloud answers each request id once.
            for rid, p in list(self._pending.items()):
                self._publish(rid, p)
            if self._pending:
                log.info("reconnected: re-sent %d unanswered request(s)", len(self._pending))

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
        else:
            from protocol.mqtt.probe import probe_like

            probe_like(self.client, f"device {self.device_id}")    # warns when the broker looks like Nagle
        self._connects_seen = self.stats.connects = self.client.connects
        self._recover_outbox()
        self.updater.start()
        return self

    def stop(self) -> None:
        """Publish ``stopped`` (retained) and disconnect cleanly; the broker then drops our will."""
        if self._stopped or not self._started:
            return
        self._stopped = True
        self.stats.seconds = time.monotonic() - self._t_start
        self.stats.connects = self.client.connects
        try:
            self.updater.stop()
            if self.client.connected and self.client.error is None:
                st = topics.delivery(topics.STATUS)
                self.client.publish(self.status_topic, topics.STATUS_STOPPED.encode(), qos=st.qos,
                                    retain=st.retain).wait(2.0)
        finally:
            self.client.stop()
            if self.outbox is not None:
                self.outbox.close()
            for f in self.on_stop:
                f()

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
        fd = topics.delivery(topics.FEATURES)       # QoS 1, never retained: a tensor is a private input
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
            if e.bundle_id not in self.manifests:       # the cloud serves the bundles this device keeps
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
        keep = self.updater.holds(self.bundle.bundle_id)
        for i, (name, f) in enumerate(zip(names, feats)):
            rid = self._next_request_id()
            new.append((rid, _Pending(str(name), f, t0, head_s, scale=scale, zero_point=zp,
                                      bundle_id=self.bundle.bundle_id, x=x[i] if keep else None)))
        failed: list[DeviceResult] = []
        if self.outbox is not None:
            # stored (committed) before it is published: an input the device accepted survives a crash
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
        t_recv, payload = item
        try:
            # one decode; with a key the MAC is required and checked before anything is read
            frame = decode_frame(payload, key=self.key)
        except FrameError as exc:
            if exc.reason is Reason.BAD_MAC:
                self.stats.unauthenticated += 1
                log.warning("dropping a result without a valid MAC: %s", exc.message)
            else:
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
        r = DeviceResult.of_frame(frame, p.name, self.manifests.get(p.bundle_id, self.manifest),
                                  latency_ms=(t_recv - p.t_submit) * 1000, head_ms=p.head_s * 1000,
                                  attempts=p.attempts, recovered=p.recovered)
        self.updater.observe(p.bundle_id, r.ok, r.error or "")
        if not r.ok and self.updater.holds(p.bundle_id):
            self._held.append((rid, p, r))      # handed out once the probation ends (or run again)
            self.stats.worker_errors += 1
            return None
        if r.ok:
            self.stats.latencies_ms.append(r.latency_ms)
        else:
            self.stats.worker_errors += 1
        return r

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
                    self.updater.observe(p.bundle_id, False, "timeout")
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
            self._check_link()
            yield from self.maintain()
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

    def flush(self) -> Iterator[DeviceResult]:
        """Send nothing new: wait for what is pending (inputs left in the outbox by a previous run)."""
        return self._pump(())

    def infer(self, x: np.ndarray, name: str = "0") -> DeviceResult:
        """One image, one answer (blocking)."""
        results = list(self.run_arrays(np.asarray(x)[None], ids=[name]))
        return results[0]
