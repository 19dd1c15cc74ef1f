"""The cloud worker: feature frames in, tail results out, bad frames to the dead-letter topic.

Every worker takes frames from its source (``cloud.sources``): by default the MQTT shared
subscription ``$share/<group>/edgesplit/v1/<fleet>/+/features``, so N workers (processes,
hosts) split the devices' frames on the broker; or, past one broker, a NATS JetStream work-queue
stream (``--source nats://...``) whose frames are acknowledged only once answered.  A
frame is decoded (``protocol.frame``; with per-device keys its MAC is checked
and a ``protocol.signing.ReplayWindow`` refuses replays), checked against the
bundle it names (``cloud.registry``), recognised if it re-sends a request
already seen (``cloud.dedupe``: the tail never runs twice for one request, a
missed answer is re-published), batched with the frames that arrived with it
(``cloud.batcher``), run through the tail, and answered on its device's
results topic with the same request id (QoS 1, never retained; signed with the device's key
when the worker holds keys, and withheld, counted, never sent unsigned when it cannot be).  Anything
wrong with a frame — undecodable, bad or missing MAC, unknown device, replay,
unknown bundle, wrong shape or dtype, device id not matching its topic — goes
to the dead-letter topic with the reason and is counted; the worker never
stops on input.  Every received frame is counted exactly once as answered,
an error result, dead-lettered, or a duplicate.  SIGTERM drains: unsubscribe,
answer every frame already received, wait for the broker's acknowledgements,
exit 0.  Answers always leave over MQTT QoS 1, whatever the source.
"""
from __future__ import annotations

import collections
import dataclasses
import logging
import multiprocessing
import os
import signal
import socket
import threading
import time
from pathlib import Path
from typing import NamedTuple

import numpy as np

from cloud.batcher import MicroBatcher
from cloud.dedupe import DedupeWindow, Verdict
from cloud.registry import Registry, Served
from cloud.sources import open_source
from cloud.updates import GiveUp, Parked
from protocol import signing, topics
from protocol.errors import ConfigError, EdgesplitError, FrameError, Reason, TopicError, UsageError
from protocol.frame import Frame, decode_frame, encode_frame, now_us
from protocol.mqtt import MqttClient, parse_url

log = logging.getLogger(__name__)

DEFAULT_GROUP = "edgesplit"
DEFAULT_REPLAY_WINDOW_S = 120.0


class _Item(NamedTuple):
    topic: str
    payload: bytes
    t_recv_us: int
    token: object = None        # the source's handle for acknowledging it (NATS); None for MQTT


@dataclasses.dataclass
class WorkerStats:
    """Counters of one worker (or the sum over several).

    ``received == answered + errors + dead_lettered + duplicates + refused`` once the
    worker has caught up: every frame lands in exactly one of those.
    """

    received: int = 0
    answered: int = 0
    dead_lettered: int = 0
    errors: int = 0             # frames answered with an error result (the tail failed), or not answered
                                # because the answer could not be signed (sign_failures)
    duplicates: int = 0         # re-sent requests recognised and not run again (cloud.dedupe)
    republished: int = 0        # of those, answered again with the stored answer
    refused: int = 0            # arrived after a drain had begun and were not taken
    sign_failures: int = 0      # answers for a keyed device that could not be signed: withheld, never sent unsigned
    redelivered: int = 0        # frames a queue source delivered again (a worker died or could not ack)
    queue_delivered_seq: int = 0  # a queue source's consumer at close: highest stream sequence delivered ...
    queue_deliveries: int = 0     # ... and deliveries made (see queue_dropped)
    batches: int = 0            # tail invocations
    batched_frames: int = 0     # frames that went through those invocations
    seconds: float = 0.0
    reasons: collections.Counter = dataclasses.field(default_factory=collections.Counter)

    @property
    def mean_batch(self) -> float:
        return self.batched_frames / self.batches if self.batches else 0.0

    @property
    def queue_dropped(self) -> int:
        """Frames a queue source's stream dropped at its bound before any worker got them (every worker of
        the group summed: below the delivered sequence, a frame was delivered or dropped)."""
        if not self.queue_deliveries:
            return 0
        return max(0, self.queue_delivered_seq - self.queue_deliveries + self.redelivered)

    @property
    def settled(self) -> int:
        """Frames accounted for so far (equals ``received`` when nothing is queued)."""
        return self.answered + self.errors + self.dead_lettered + self.duplicates + self.refused

    def line(self) -> str:
        why = ", ".join(f"{k} {v}" for k, v in self.reasons.most_common()) or "none"
        rate = self.answered / self.seconds if self.seconds > 0 else 0.0
        extra = f", refused while draining {self.refused}" if self.refused else ""
        if self.sign_failures:
            extra += f", answers withheld (could not sign) {self.sign_failures}"
        if self.redelivered or self.queue_dropped:
            extra += f", redelivered by the queue {self.redelivered}, dropped at its bound {self.queue_dropped}"
        return (f"received {self.received}, answered {self.answered}, dead-lettered {self.dead_lettered} "
                f"({why}), errors {self.errors}, duplicates {self.duplicates} (re-answered "
                f"{self.republished}){extra}, batches {self.batches} (mean {self.mean_batch:.1f}), "
                f"{rate:.0f} answers/s over {self.seconds:.0f} s")

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["reasons"] = dict(self.reasons)
        d["mean_batch"] = self.mean_batch
        d["queue_dropped"] = self.queue_dropped
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "WorkerStats":
        names = {f.name for f in dataclasses.fields(cls)}
        d = {k: v for k, v in d.items() if k in names}
        d["reasons"] = collections.Counter(d.get("reasons", {}))
        return cls(**d)

    def __add__(self, other: "WorkerStats") -> "WorkerStats":
        out = WorkerStats()
        for f in dataclasses.fields(self):
            a, b = getattr(self, f.name), getattr(other, f.name)
            biggest = f.name in ("seconds", "queue_delivered_seq", "queue_deliveries")   # the latest snapshot
            setattr(out, f.name, max(a, b) if biggest else a + b)
        return out


def _default_name() -> str:
    host = "".join(c if c.isalnum() or c in "-_." else "-" for c in socket.gethostname())[:32] or "host"
    return f"{host}-{os.getpid()}"


def load_keys(paths) -> dict[str, bytes]:
    """Per-device frame keys for ``--keys``: directories of ``<device-id>.key`` files and/or
    single ``<device-id>.key`` files (``protocol.signing``'s format), merged."""
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    keys: dict[str, bytes] = {}
    for p in map(Path, paths):
        if p.is_dir():
            found = signing.load_keys(p)
        elif p.is_file() and p.name.endswith(signing.KEY_SUFFIX):
            found = {topics.check_id(p.name[:-len(signing.KEY_SUFFIX)]): signing.load_key(p)}
        elif p.exists():
            raise UsageError(f"key file {p} is not named <device-id>{signing.KEY_SUFFIX}",
                             fix="name each key file after its device, e.g. pi-001.key, or give their directory")
        else:
            raise UsageError(f"key directory or file {p} does not exist",
                             fix="give the folder holding <device-id>.key files (protocol.signing.write_key)")
        for dev, k in found.items():
            if dev in keys and keys[dev] != k:
                raise UsageError(f"two different keys for device {dev!r} in {', '.join(map(str, paths))}",
                                 fix="keep one <device-id>.key per device")
            keys[dev] = k
    if not keys:
        raise UsageError(f"no <device-id>{signing.KEY_SUFFIX} file in {', '.join(map(str, paths))}",
                         fix="write one key per device with protocol.signing.write_key, or drop --keys")
    return keys


class Worker:
    """One source of frames (``source``: None, the MQTT shared subscription on ``broker``; or a
    ``nats://`` URL), one MQTT client for the answers, one batching thread, the registry's tails.

    ``keys``: per-device frame keys ({device_id: key}, a callable, or one key for all):
    every frame must then carry a valid MAC, strangers are refused, and a
    ``ReplayWindow`` of ``replay_window_s`` seconds refuses replays.  ``dedupe``: the
    window of requests seen (default :class:`cloud.dedupe.DedupeWindow()`).  ``follow``: the
    options of a :class:`cloud.updates.BundleFollower` (``keys``, ``cache_dir``, ``idle_s``):
    load announced bundles without a restart.  ``metrics``: serve Prometheus metrics on
    ``(host, port)`` (``cloud.metrics``).
    """

    def __init__(self, registry: Registry, broker: str, *, group: str = DEFAULT_GROUP, fleet: str = "+",
                 max_batch: int = 32, max_wait_ms: float = 0.0, name: str | None = None,
                 keys: signing.KeySource | None = None, replay_window_s: float | None = DEFAULT_REPLAY_WINDOW_S,
                 dedupe: DedupeWindow | None = None, stats_every: float = 0.0, source: str | None = None,
                 probe: bool = True, follow: dict | None = None, metrics: tuple[str, int] | None = None,
                 **mqtt_options):
        self.registry = registry
        self.name = name or _default_name()
        self.keys = keys
        # Replay protection only means something when frames are signed: without a MAC
        # anyone can mint a fresh sequence number and send time.
        self.replay = (signing.ReplayWindow(replay_window_s) if keys is not None and replay_window_s
                       else None)
        self.dedupe = dedupe if dedupe is not None else DedupeWindow()
        self.stats = WorkerStats()
        self._topics: dict[str, tuple[topics.Topic, str]] = {}   # features topic -> (parsed, results topic)
        self._started_at: float | None = None
        self._stats_every = stats_every
        self._probe = probe             # measure the broker round trip at start-up (protocol.mqtt.probe)
        self._stop_stats = threading.Event()
        self._sign_failure_logged = False
        # no '.' (a host name's): NATS's MQTT gateway refuses client ids holding one
        mqtt_options.setdefault("client_id", f"edgesplit-cloud-{self.name}".replace(".", "-"))
        self.client = MqttClient(broker, **mqtt_options)
        self._published: list = []      # deliveries of the batch being answered (batch thread only)
        self.source = open_source(source, client=self.client, group=group, fleet=fleet, max_batch=max_batch,
                                  name=f"edgesplit-cloud-{self.name}", on_fatal=mqtt_options.get("on_fatal"))
        self.filter = self.source.name
        self.batcher = MicroBatcher(self._run_batch, max_batch=max_batch, max_wait_s=max_wait_ms / 1000.0,
                                    name=f"batcher-{self.name}")
        self.follower = None
        if follow:
            from cloud.updates import BundleFollower

            self.follower = BundleFollower(self, fleet=fleet, **follow)
        self.metrics = None
        if metrics and metrics[1]:
            from cloud.metrics import serve

            self.metrics = serve(self, *metrics)

    # ------------------------------------------------------------------ lifecycle
    def start(self, wait_connected: float | None = None) -> bool:
        self._started_at = time.monotonic()
        ok = self.client.start(wait_connected=wait_connected)
        if ok and self._probe:
            from protocol.mqtt.probe import probe_like

            probe_like(self.client, f"worker {self.name}")      # warns when the broker looks like Nagle
        ok = self.source.start(self._on_message, wait_connected) and ok
        if self.follower is not None:
            self.follower.start()
        if self._stats_every > 0:
            threading.Thread(target=self._stats_loop, name="stats", daemon=True).start()
        return ok

    @property
    def ready(self) -> bool:
        """Connected to the broker and taking frames from the source."""
        return self.client.connected and self.source.ready

    def stop(self, drain_timeout: float = 30.0) -> WorkerStats:
        """Drain: stop new frames at the broker, answer every received one, flush, disconnect."""
        self._stop_stats.set()
        self.source.stop_intake(timeout=min(5.0, drain_timeout))
        if self.follower is not None:
            self.follower.stop()            # frames it held are dead-lettered, through the batcher
        if not self.batcher.close(drain_timeout):
            log.warning("worker %s: %d frame(s) still queued after %.0f s of draining",
                        self.name, self.batcher.pending, drain_timeout)
        self.source.close(timeout=min(10.0, drain_timeout))      # its last acks wait for the answers' PUBACKs
        for k, v in self.source.counters().items():
            setattr(self.stats, k, v)
        self.client.stop(timeout=min(10.0, drain_timeout))
        if self.metrics is not None:
            self.metrics.close()
        self._touch()
        return self.stats

    def _touch(self) -> None:
        if self._started_at is not None:
            self.stats.seconds = time.monotonic() - self._started_at

    def _stats_loop(self) -> None:
        while not self._stop_stats.wait(self._stats_every):
            self._touch()
            log.info("worker %s: %s", self.name, self.stats.line())
            if self.source.state_line():
                log.info("worker %s: %s", self.name, self.source.state_line())

    # ------------------------------------------------------------------ network thread
    def _on_message(self, topic: str, payload: bytes, token: object = None) -> bool:
        self.stats.received += 1
        if not self.batcher.put(_Item(topic, payload, now_us(), token)):
            self.stats.refused += 1
            log.warning("worker %s is draining; a frame on %s arrived after the unsubscribe", self.name, topic)
            return False
        return True

    # ------------------------------------------------------------------ batch thread
    def _run_batch(self, batch: list[_Item]) -> None:
        """Answer a batch, then let the source acknowledge its frames once the answers are acknowledged."""
        self._published = []
        try:
            self._process(batch)
        finally:
            self.source.settle([i.token for i in batch if i.token is not None], self._published)

    def _publish(self, topic: str, payload: bytes, kind: str) -> None:
        d = topics.delivery(kind)
        self._published.append(self.client.publish(topic, payload, qos=d.qos, retain=d.retain))

    def _process(self, batch: list[_Item]) -> None:
        groups: dict[str, list] = collections.defaultdict(list)
        served_by: dict[str, Served] = {}
        for item in batch:
            frame = None
            if isinstance(item, GiveUp):            # held for a bundle that did not come (cloud.updates)
                self._dead_letter(item.item, item.where, Reason.UNKNOWN_BUNDLE, item.why)
                continue
            if isinstance(item, Parked):            # held until its bundle was loaded: checked already
                item, where, reply, frame, _ = item
            else:
                try:
                    where, reply = self._parse_topic(item.topic)
                except TopicError as exc:
                    self._dead_letter(item, None, Reason.BAD_TOPIC, exc.message)
                    continue
            try:
                if frame is None:
                    frame = decode_frame(item.payload, key=self.keys)   # MAC checked before the tensor
                    if frame.device_id != where.device:
                        raise FrameError(Reason.DEVICE_MISMATCH,
                                         f"a frame of device {frame.device_id!r} arrived on the topic "
                                         f"of device {where.device!r}")
                    if self.replay is not None:
                        self.replay.check_frame(frame)              # only after the MAC proved seq and time
                served = self.registry.lookup(frame)
                tensor = served.check(frame)
            except FrameError as exc:
                detail = exc.message
                if exc.reason is Reason.UNKNOWN_BUNDLE and self.follower is not None:
                    if self.follower.park(Parked(item, where, reply, frame, time.monotonic())):
                        continue                    # announced, still loading: answered once it is
                    why = self.follower.why_not(frame.bundle_id)
                    detail = f"bundle {frame.bundle_id} is not served here: {why}" if why else detail
                self._dead_letter(item, where, exc.reason, detail)
                continue
            except Exception as exc:  # a decoder bug must not take the worker down
                log.exception("unexpected error on a frame from %s", item.topic)
                self._dead_letter(item, where, Reason.INTERNAL_ERROR, f"{type(exc).__name__}: {exc}")
                continue
            verdict, stored = self.dedupe.check(frame.device_id, frame.request_id, item.t_recv_us)
            if verdict is not Verdict.NEW:
                self.stats.duplicates += 1
                if verdict is Verdict.ANSWERED:
                    self.stats.republished += 1
                    self._publish(stored[0], stored[1], topics.RESULTS)
                log.debug("request %d of %s re-sent: %s", frame.request_id, frame.device_id, verdict.value)
                continue
            served_by[served.bundle_id] = served
            groups[served.bundle_id].append((item, reply, frame, tensor))
        for bundle_id, rows in groups.items():
            self._answer(served_by[bundle_id], rows)
        self._touch()

    def _parse_topic(self, name: str) -> tuple[topics.Topic, str]:
        """The parsed features topic and the results topic that answers it."""
        # devices publish on a few topics again and again: parse (and validate) each once
        hit = self._topics.get(name)
        if hit is None:
            where = topics.parse(name)
            if len(self._topics) >= 100_000:
                self._topics.clear()
            hit = self._topics[name] = (where, topics.results(where.fleet, where.device))
        return hit

    def _answer(self, served: Served, rows: list) -> None:
        t0 = time.perf_counter()
        try:
            outputs = served.run([r[3] for r in rows])
            if self.metrics is not None:
                self.metrics.batch(len(rows), time.perf_counter() - t0)
        except Exception as exc:
            log.exception("tail of bundle %s failed on a batch of %d", served.bundle_id, len(rows))
            for item, reply, frame, _ in rows:
                self._publish_result(reply, Frame.error_result(frame, f"the tail failed: {exc}",
                                                               t_recv_us=item.t_recv_us))
                self.stats.errors += 1
            return
        self.stats.batches += 1
        self.stats.batched_frames += len(rows)
        outputs = np.asarray(outputs, dtype=np.float32)
        labels = [None] * len(rows)
        if outputs.ndim >= 2 and outputs.shape[-1] > 0:
            # one argmax for the batch (Frame.result's default: the top class of the first row)
            labels = outputs.reshape(len(rows), -1, outputs.shape[-1])[:, 0].argmax(axis=-1).tolist()
        for (item, reply, frame, _), y, label in zip(rows, outputs, labels):
            try:
                result = Frame.result(frame, y, t_recv_us=item.t_recv_us, label=label)
            except FrameError as exc:
                result = Frame.error_result(frame, f"could not encode the result: {exc.message}",
                                            t_recv_us=item.t_recv_us)
                ok = False
            else:
                ok = True
            if self._publish_result(reply, result) and ok:
                self.stats.answered += 1
            else:
                self.stats.errors += 1

    def _publish_result(self, topic: str, result: Frame) -> bool:
        """Publish ``result`` on ``topic``, signed when the worker holds keys; False when it could not be signed.

        A worker with keys only serves devices that sign, and such a device refuses an unsigned
        answer: sending one would hand an attacker's forgery the same look as ours.  So an answer
        that cannot be signed (the device's key gone from the key store since its frame was
        checked, an unusable key) is counted, said once, and withheld; the device re-sends.
        """
        try:
            payload = encode_frame(result, key=self.keys)
        except EdgesplitError as exc:
            if self.keys is None:
                raise
            self.stats.sign_failures += 1
            if not self._sign_failure_logged:
                self._sign_failure_logged = True
                log.error("worker %s cannot sign its answer to %r (%s); withholding it, never sending it "
                          "unsigned (further ones are counted as sign_failures, not logged)", self.name,
                          result.device_id, exc.message)
            else:
                log.debug("cannot sign the answer to %r: %s", result.device_id, exc.message)
            return False
        self._publish(topic, payload, topics.RESULTS)
        # kept so that a re-send arriving after this moment gets the same answer again
        self.dedupe.answered(result.device_id, result.request_id, topic, payload)
        return True

    def _dead_letter(self, item: _Item, where: topics.Topic | None, reason: Reason, detail: str) -> None:
        self.stats.dead_lettered += 1
        self.stats.reasons[reason.value] += 1          # plain strings: the counters travel as JSON
        fleet, device = (where.fleet, where.device) if where is not None else _salvage_ids(item.topic)
        log.debug("dead letter from %s: %s (%s)", item.topic, reason, detail)
        try:
            msg = topics.encode_dead_letter(reason, item.topic, item.payload, detail=detail, worker=self.name)
            self._publish(topics.dead_letter(fleet, device), msg, topics.DEAD_LETTER)
        except Exception:
            log.exception("could not publish a dead letter for %s", item.topic)


def _salvage_ids(topic: str) -> tuple[str, str]:
    """Fleet and device for the dead letter of a frame whose topic did not parse."""
    parts = topic.split("/")
    out = []
    for i in (2, 3):
        try:
            out.append(topics.check_id(parts[i]))
        except (IndexError, TopicError):
            out.append("unknown")
    return out[0], out[1]


# ---------------------------------------------------------------------- running workers

@dataclasses.dataclass
class CloudRun:
    """What ``edgesplit cloud`` reports when it stops."""

    broker: str
    group: str
    bundles: list[str]
    workers: int
    stats: WorkerStats
    per_worker: list[WorkerStats]
    restarted: int = 0        # workers started again after being killed (their counters are lost)
    source: str | None = None  # a NATS source (None: the shared subscription on the broker)

    def summary(self) -> str:
        where = f"{self.broker}" if self.source is None else f"{self.source}, answering on {self.broker}"
        lines = [f"cloud: {self.workers} worker(s) on {where} (group {self.group}), bundles "
                 f"{', '.join(self.bundles)}", f"  total: {self.stats.line()}"]
        if self.restarted:
            lines.append(f"  restarted {self.restarted} killed worker(s); their counters are not in the total")
        if len(self.per_worker) > 1:
            lines += [f"  worker {i}: {s.line()}" for i, s in enumerate(self.per_worker)]
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return {"broker": self.broker, "source": self.source, "group": self.group, "bundles": list(self.bundles), "workers": self.workers,
                "restarted": self.restarted, "total": self.stats.to_dict(),
                "per_worker": [s.to_dict() for s in self.per_worker]}


def _wait_for_signal(stop: threading.Event) -> dict:
    def handler(signum, frame):
        log.info("%s: draining", signal.Signals(signum).name)
        stop.set()

    return {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}


def run_worker(bundles: list[str], broker: str, *, group: str = DEFAULT_GROUP, fleet: str = "+",
               max_batch: int = 32, max_wait_ms: float = 0.0, stats_every: float = 30.0,
               num_threads: int | None = None, keys=None, name: str | None = None,
               stop: threading.Event | None = None, ready=None, **options) -> WorkerStats:
    """One worker in this process until SIGTERM/SIGINT (or ``stop`` is set); returns its counters.

    ``options`` go to :class:`Worker` (``replay_window_s``, ``dedupe``, MQTT options such as
    ``backoff``).  Raises ConfigError (exit 78) when the broker refuses the worker's credentials.
    """
    stop = stop or threading.Event()
    in_main = threading.current_thread() is threading.main_thread()
    old = _wait_for_signal(stop) if in_main else {}     # first: a SIGTERM while loading still drains
    fatal: list[ConfigError] = []

    def on_fatal(err):
        fatal.append(err)
        stop.set()

    try:
        # a worker that follows announcements may start empty: it learns its bundles from them
        registry = (Registry.load(bundles, num_threads=num_threads) if bundles or not options.get("follow")
                    else Registry(num_threads=num_threads))
        worker = Worker(registry, broker, group=group, fleet=fleet, max_batch=max_batch, max_wait_ms=max_wait_ms,
                        name=name, keys=keys, stats_every=stats_every, on_fatal=on_fatal, **options)
    except BaseException:
        for s, h in old.items():
            signal.signal(s, h)
        raise
    try:
        announced = worker.start(wait_connected=10)
        if not announced:
            log.warning("worker %s: broker %s or its source not reachable yet; retrying in the background",
                        worker.name, worker.client.broker)
        else:
            log.info("worker %s ready on %s (%s)", worker.name, worker.client.broker, worker.filter)
        if ready is not None:
            ready(worker)
        while not stop.wait(0.5):
            if not announced and worker.ready:
                announced = True
                log.info("worker %s ready on %s (%s)", worker.name, worker.client.broker, worker.filter)
    finally:
        stats = worker.stop()
        for s, h in old.items():
            signal.signal(s, h)
    if fatal:
        raise fatal[0]
    log.info("worker %s stopped: %s", worker.name, stats.line())
    return stats


def _child(kwargs: dict, results) -> None:
    """Entry point of a worker process started by :func:`serve`."""
    logging.basicConfig(level=kwargs.pop("log_level", logging.INFO), format="%(message)s")
    try:
        stats = run_worker(**kwargs)
    except ConfigError as exc:
        results.put((kwargs.get("name"), "config", exc.message, exc.fix))
        raise SystemExit(exc.exit_code)
    except EdgesplitError as exc:
        results.put((kwargs.get("name"), "error", exc.message, exc.fix))
        raise SystemExit(exc.exit_code)
    results.put((kwargs.get("name"), "stats", stats.to_dict(), None))


def serve(bundles: list[str], broker: str, *, workers: int = 1, group: str = DEFAULT_GROUP, fleet: str = "+",
          max_batch: int = 32, max_wait_ms: float = 0.0, stats_every: float = 30.0,
          num_threads: int | None = None, keys=None,
          replay_window_s: float | None = DEFAULT_REPLAY_WINDOW_S, password: str | None = None,
          source: str | None = None, follow: dict | None = None,
          metrics: tuple[str, int] | None = None) -> CloudRun:
    """``edgesplit cloud``: run ``workers`` worker processes on one source until SIGTERM.

    ``source``: where the frames come from (``cloud.sources``): None or the broker's own
    ``mqtt://`` URL for the shared subscription, or ``nats://host:port[,...]`` for a JetStream
    work queue; the answers go to ``broker`` (MQTT) either way.

    ``keys``: a directory of ``<device-id>.key`` files, or such files (a list of paths):
    frames must then be signed by their device (see :func:`load_keys`).  ``password``: the
    broker password when the URL names only the user (see :func:`protocol.mqtt.read_password_file`).
    ``follow``: a :class:`cloud.updates.BundleFollower`'s options (``keys``: the fleet.pub path):
    take announced bundles.  ``metrics``: (host, port): worker ``i`` serves its metrics on port + i.
    """
    if workers < 1:
        raise UsageError(f"--workers must be at least 1, got {workers}")
    if not bundles and not follow:
        raise UsageError("no bundle to serve", fix="pass --bundle DIR_OR_TAR_GZ (several allowed), or --fleet-key "
                                                   "fleet.pub to serve what the fleet's operator announces")
    if follow:
        from protocol.announce import load_verify_key

        log.info("following bundle announcements signed by fleet key %s", load_verify_key(follow["keys"]).key_id)
    topics.check_id(group, "share group")
    parse_url(broker, password=password)  # a bad URL fails here, once, not in every child
    source = _check_source(source, broker)
    if keys is not None:
        keys = load_keys(keys)
        log.info("frames must be signed: keys of %d device(s) loaded", len(keys))
    from protocol.manifest import load_bundle
    ids = [load_bundle(b).bundle_id for b in bundles]   # fail here, once, on a bad bundle
    common = dict(bundles=[str(Path(b)) for b in bundles], broker=broker, group=group, fleet=fleet,
                  max_batch=max_batch, max_wait_ms=max_wait_ms, stats_every=stats_every,
                  num_threads=num_threads, keys=keys, replay_window_s=replay_window_s, source=source)
    if follow:
        common["follow"] = dict(follow, keys=str(follow["keys"]))
    if password is not None:
        common["password"] = password
    if workers == 1:
        stats = run_worker(**common, metrics=metrics)
        return CloudRun(str(parse_url(broker)), group, ids, 1, stats, [stats], source=_shown(source))

    ctx = multiprocessing.get_context("spawn")
    results = ctx.Queue()
    base = _default_name()
    level = logging.getLogger().getEffectiveLevel()

    def spawn(i: int, generation: int = 0):
        suffix = f"-w{i}" + (f"r{generation}" if generation else "")
        kw = dict(common, name=f"{base}{suffix}", log_level=level,
                  metrics=(metrics[0], metrics[1] + i) if metrics and metrics[1] else None)
        p = ctx.Process(target=_child, args=(kw, results), name=f"cloud-worker-{i}", daemon=False)
        p.start()
        return p

    procs = [spawn(i) for i in range(workers)]
    restarts: list[float] = []            # times of recent restarts, for the crash-loop limit
    restarted = 0
    stop = threading.Event()
    old = _wait_for_signal(stop)
    try:
        while not stop.wait(0.5):
            fatal = None
            for i, p in enumerate(procs):
                if p.exitcode is None:
                    continue
                if p.exitcode < 0 and p.exitcode != -signal.SIGTERM:
                    # killed (OOM killer, kill -9): the others carry on; what it had taken but not
                    # answered is re-sent by the devices (resend after a timeout), so start a new one
                    now = time.monotonic()
                    restarts[:] = [t for t in restarts if now - t < 60] + [now]
                    if len(restarts) > 3 * workers:
                        log.error("workers keep dying (%d restarts in a minute); stopping", len(restarts))
                        fatal = p
                        break
                    log.error("worker %s was killed (%s); the others carry on; starting a new one", p.name,
                              signal.Signals(-p.exitcode).name)
                    restarted += 1
                    procs[i] = spawn(i, restarted)
                    continue
                fatal = p
                break
            if fatal is not None:
                # a refused login (78) is reported once, below, from the child's message
                (log.debug if fatal.exitcode == 78 else log.error)(
                    "worker %s exited with code %s; stopping the others", fatal.name, fatal.exitcode)
                break
    finally:
        for p in procs:
            if p.exitcode is None:
                p.terminate()            # SIGTERM: the child drains
        for p in procs:
            p.join(60)
            if p.exitcode is None:
                p.kill()
                p.join()
        for s, h in old.items():
            signal.signal(s, h)
    per, problems = [], []
    while not results.empty():
        name, kind, a, b = results.get()
        if kind == "stats":
            per.append(WorkerStats.from_dict(a))
        else:
            problems.append((kind, a, b))
    for kind, message, fix in problems:
        if kind == "config":
            raise ConfigError(message, fix=fix)
    if problems:
        raise EdgesplitError(problems[0][1], fix=problems[0][2])
    total = sum(per, WorkerStats())
    return CloudRun(str(parse_url(broker)), group, ids, workers, total, per, restarted=restarted,
                    source=_shown(source))


def _check_source(source: str | None, broker: str) -> str | None:
    """None for the broker's shared subscription; a checked ``nats://`` URL; a UsageError otherwise."""
    from cloud.sources import is_nats_url

    if source is None:
        return None
    if is_nats_url(source):
        from cloud.sources.nats import parse_nats_url

        parse_nats_url(source)
        return source
    if source.split("://", 1)[0].lower() in ("mqtt", "mqtts"):
        if parse_url(source) != parse_url(broker):
            raise UsageError(f"--source {parse_url(source)} is another MQTT broker than --broker {parse_url(broker)}",
                             fix="the shared subscription is on the broker the answers go to: drop --source, or "
                                 "give the same URL to both")
        return None
    raise UsageError(f"--source {source!r} is neither an MQTT nor a NATS URL",
                     fix="mqtt://host:1883 (the shared subscription) or nats://host:4222[,host:4222...] "
                         "(a JetStream work queue)")


def _shown(source: str | None) -> str | None:
    if source is None:
        return None
    from cloud.sources.nats import parse_nats_url

    return str(parse_nats_url(source))
