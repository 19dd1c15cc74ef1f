"""A JetStream work-queue stream as a worker's source: ``--source nats://host:port[,host:port...]``.

Devices publish MQTT (3.1.1, QoS 1) to any node of a NATS cluster; NATS maps the topic
``edgesplit/v1/<fleet>/<device>/features`` to the subject ``edgesplit.v1.<fleet>.<device>.features``
(a ``.`` inside a level becomes ``//``).  The stream ``EDGESPLIT_FEATURES`` keeps those subjects as a
work queue (each frame is removed once acknowledged), on file, replicated over up to three nodes, and
**bounded**: ``max_bytes`` (default 1 GiB) and ``max_age`` (default 10 min).  At the bound JetStream
discards the *oldest* frames (discard "old"): under a backlog the fresh frames are served and the stale
ones, which their devices have re-sent or given up on, go.  The devices are not told (their MQTT
publish was acknowledged); a device re-sends what stays unanswered (``resend_after``).  The frames
dropped so are counted from the consumer's own bookkeeping (see :meth:`NatsSource.counters`) and a
warning is logged when the stream passes 80 % of a bound.

Every worker of a group pulls from one durable consumer (named after the group) with explicit acks:
a frame is acknowledged only after its answer (or dead letter) was published and the MQTT broker
acknowledged it; a frame not acknowledged within ``ack_wait`` (default 30 s: a worker died, hung, or
lost its MQTT broker) is delivered again, to whichever worker pulls next.

URL options (``nats://user:pass@h1:4222,h2:4222?replicas=3&max_bytes=1GiB``): ``stream``,
``replicas`` (default: the cluster's size, at most 3), ``max_bytes``, ``max_age``, ``ack_wait``,
``window`` (frames a worker holds unacknowledged; default 4 x max batch), ``ca``/``cert``/``key``
(TLS, with ``tls://``).
"""
from __future__ import annotations

import asyncio
import dataclasses
import logging
import queue
import re
import ssl
import threading
import time
import urllib.parse

from protocol import topics
from protocol.errors import ConfigError, UsageError

log = logging.getLogger(__name__)

DEFAULT_STREAM = "EDGESPLIT_FEATURES"
DEFAULT_MAX_BYTES = 1 << 30
DEFAULT_MAX_AGE_S = 600.0
DEFAULT_ACK_WAIT_S = 30.0
WARN_FILL = 0.8
_OPTIONS = ("stream", "replicas", "max_bytes", "max_age", "ack_wait", "window", "ca", "cert", "key")
_EXAMPLE = "nats://127.0.0.1:4222,127.0.0.1:4223,127.0.0.1:4224 (or tls://user:pass@nats.example:4222?ca=ca.pem)"
_SIZE = {"": 1, "b": 1, "k": 1000, "kb": 1000, "kib": 1024, "m": 10**6, "mb": 10**6, "mib": 1 << 20,
         "g": 10**9, "gb": 10**9, "gib": 1 << 30, "t": 10**12, "tb": 10**12, "tib": 1 << 40}
_TIME = {"": 1.0, "s": 1.0, "ms": 1e-3, "m": 60.0, "min": 60.0, "h": 3600.0, "d": 86400.0}


def parse_size(text: str, what: str) -> int:
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", str(text))
    unit = m.group(2).lower() if m else None
    if m is None or unit not in _SIZE or float(m.group(1)) <= 0:
        raise UsageError(f"{what} {text!r} is not a size", fix=f"write it like 1GiB, 512MB or 100000 (bytes)")
    return int(float(m.group(1)) * _SIZE[unit])


def parse_duration(text: str, what: str) -> float:
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", str(text))
    unit = m.group(2).lower() if m else None
    if m is None or unit not in _TIME or float(m.group(1)) <= 0:
        raise UsageError(f"{what} {text!r} is not a duration", fix="write it like 30s, 10m, 2h or 500ms")
    return float(m.group(1)) * _TIME[unit]


@dataclasses.dataclass(frozen=True)
class NatsUrl:
    """A parsed ``--source nats://...``; ``str()`` hides the password."""

    servers: tuple[str, ...]              # nats://host:port (or tls://host:port) each
    tls: bool = False
    username: str | None = None
    password: str | None = dataclasses.field(default=None, repr=False)
    stream: str = DEFAULT_STREAM
    replicas: int | None = None
    max_bytes: int = DEFAULT_MAX_BYTES
    max_age_s: float = DEFAULT_MAX_AGE_S
    ack_wait_s: float = DEFAULT_ACK_WAIT_S
    window: int | None = None
    ca: str | None = None
    cert: str | None = None
    key: str | None = None

    def __str__(self) -> str:
        auth = f"{self.username}{':***' if self.password is not None else ''}@" if self.username else ""
        hosts = ",".join(s.split("://", 1)[1] for s in self.servers)
        return f"{'tls' if self.tls else 'nats'}://{auth}{hosts}"


def parse_nats_url(url: str) -> NatsUrl:
    """Parse ``nats://[user[:pass]@]host:port[,host:port...][?options]``; UsageError with the fix."""
    if not isinstance(url, str) or "://" not in url:
        raise UsageError(f"source {url!r} is not a URL", fix=f"write it like {_EXAMPLE}")
    scheme, rest = url.split("://", 1)
    scheme = scheme.lower()
    if scheme not in ("nats", "tls"):
        raise UsageError(f"source scheme {scheme!r} is not a NATS one", fix=f"use nats:// or tls://, e.g. {_EXAMPLE}")
    rest, _, query = rest.partition("?")
    auth, at, hosts = rest.rpartition("@")
    if not at:
        auth, hosts = "", rest
    user, _, password = auth.partition(":")
    servers = []
    for part in hosts.rstrip("/").split(","):
        host, colon, port = part.strip().rpartition(":")
        if not colon:
            host, port = part.strip(), "4222"
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise UsageError(f"source {url!r}: {part!r} is not host:port", fix=f"write it like {_EXAMPLE}")
        servers.append(f"{scheme}://{host}:{int(port)}")
    opts: dict = {}
    for name, value in urllib.parse.parse_qsl(query, keep_blank_values=True):
        if name not in _OPTIONS:
            raise UsageError(f"unknown NATS source option {name!r}", fix=f"known options: {', '.join(_OPTIONS)}")
        if name == "stream":
            if not re.fullmatch(r"[A-Za-z0-9_-]{1,64}", value):
                raise UsageError(f"stream name {value!r} is not usable", fix="use letters, digits, '-' and '_'")
            opts["stream"] = value
        elif name in ("replicas", "window"):
            if not value.isdigit() or int(value) < 1 or (name == "replicas" and int(value) > 5):
                raise UsageError(f"{name}={value!r} is not a usable count",
                                 fix="replicas: 1, 3 or 5 (the nodes that keep each frame); window: 1 or more")
            opts[name] = int(value)
        elif name == "max_bytes":
            opts["max_bytes"] = parse_size(value, "max_bytes")
        elif name in ("max_age", "ack_wait"):
            opts[f"{name}_s"] = parse_duration(value, name)
        else:
            opts[name] = value
    return NatsUrl(tuple(servers), tls=scheme == "tls", username=urllib.parse.unquote(user) or None,
                   password=urllib.parse.unquote(password) if password else None, **opts)


def features_subject(fleet: str = "+") -> str:
    """The NATS subject of every device's features in ``fleet`` (``+``: every fleet)."""
    fleet = "*" if fleet == "+" else topic_level_to_token(topics.check_id(fleet, "fleet id"))
    return f"{topics.ROOT}.{topics.VERSION}.{fleet}.*.{topics.FEATURES}"


def topic_level_to_token(level: str) -> str:
    return level.replace(".", "//")          # as NATS's MQTT gateway maps it


def subject_to_topic(subject: str) -> str:
    """``edgesplit.v1.lab.pi//01.features`` -> ``edgesplit/v1/lab/pi.01/features``."""
    return "/".join(token.replace("//", ".") for token in subject.split("."))


def _durable_name(group: str) -> str:
    return re.sub(r"[^A-Za-z0-9_-]", "_", topics.check_id(group, "share group"))


_STOP = object()


class NatsSource:
    """One worker's pull from the group's durable consumer; acknowledgements after the answers."""

    kind = "nats"

    def __init__(self, url: str, *, group: str, fleet: str = "+", max_batch: int = 32, name: str = "worker",
                 on_fatal=None):
        try:
            import nats  # noqa: F401
        except ImportError:
            raise ConfigError("a NATS source needs the nats-py package, which is not installed",
                              fix="pip install 'nats-py==2.16.0' (in the cloud extra: pip install "
                                  "'edgesplit[cloud]')") from None
        self.url = parse_nats_url(url)
        self.subject = features_subject(fleet)
        self.durable = _durable_name(group)
        self.client_name = name
        self._on_fatal = on_fatal          # called with a ConfigError that comes after start() returned
        self.max_batch = max_batch
        self.window = self.url.window or 4 * max_batch
        self.name = f"consumer {self.durable} of stream {self.url.stream} ({self.subject}) on {self.url}"
        self._deliver = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._acks: queue.SimpleQueue = queue.SimpleQueue()
        self._acker: threading.Thread | None = None
        self._intake_stopped: asyncio.Event | None = None
        self._pull_done = threading.Event()
        self._room: asyncio.Event | None = None
        self._unacked = 0                 # loop thread only
        self._js = None
        self._nc = None
        self._state = ""
        self._fill_warned = False
        self.received = self.redelivered = self.acked = self.unconfirmed = self.ack_failures = 0
        self._snapshot = (0, 0)           # (delivered stream seq, deliveries) of the consumer at close

    # ------------------------------------------------------------ the worker's calls
    def start(self, deliver, wait: float | None = 10.0) -> bool:
        self._deliver = deliver
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run, name="nats-source", daemon=True)
        self._thread.start()
        self._acker = threading.Thread(target=self._ack_loop, name="nats-acker", daemon=True)
        self._acker.start()
        self._ready.wait(wait)
        if self._error is not None:
            raise self._error
        return self._ready.is_set()

    def settle(self, tokens, deliveries) -> None:
        if tokens:
            self._acks.put((tokens, deliveries))

    def refuse(self, token) -> None:
        try:
            self._call(self._nak(token))
        except RuntimeError:             # the loop is gone: the frame is delivered again after ack_wait
            pass

    def stop_intake(self, timeout: float = 5.0) -> None:
        if self._loop is not None and self._intake_stopped is not None and not self._loop.is_closed():
            try:
                self._loop.call_soon_threadsafe(self._intake_stopped.set)
            except RuntimeError:         # closed in between (the source had failed)
                return
            self._pull_done.wait(timeout)

    def close(self, timeout: float = 10.0) -> None:
        """After the worker drained: send the last acknowledgements, read the consumer's counters, disconnect."""
        if self._thread is None:
            return
        self._acks.put(_STOP)
        if self._acker is not None:
            self._acker.join(timeout)
        if self._loop is not None and self._thread.is_alive():
            try:
                self._call(self._finish(timeout)).result(timeout + 5)
            except Exception as exc:
                log.debug("closing the NATS source: %s", exc)
        self._thread.join(timeout)

    def counters(self) -> dict:
        """``redelivered``: frames this worker got again after some worker did not acknowledge them;
        ``queue_delivered_seq``/``queue_deliveries``: the consumer's highest delivered stream sequence and
        its number of deliveries when this worker closed.  In a work queue a frame below that sequence
        was either delivered or dropped at the stream's bound, so, summed over every worker of a group,
        dropped = delivered_seq - deliveries + redelivered (``WorkerStats.queue_dropped``)."""
        return {"redelivered": self.redelivered, "queue_delivered_seq": self._snapshot[0],
                "queue_deliveries": self._snapshot[1]}

    def state_line(self) -> str:
        return self._state

    @property
    def ready(self) -> bool:
        return self._ready.is_set() and self._error is None

    # ------------------------------------------------------------ the loop thread
    def _call(self, coro):
        return asyncio.run_coroutine_threadsafe(coro, self._loop)

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        try:
            self._loop.run_until_complete(self._main())
        except BaseException as exc:      # reported to start(); the worker decides
            if self._intake_stopped is not None and self._intake_stopped.is_set():
                log.debug("the NATS source ended while stopping: %s", exc)   # a drain, not a failure
            else:
                if self._error is None:
                    self._error = exc if isinstance(exc, ConfigError) else ConfigError(
                        f"the NATS source failed: {type(exc).__name__}: {exc}", fix=f"check --source {self.url}")
                self._ready.set()
                if self._on_fatal is not None:
                    self._on_fatal(self._error)
        finally:
            self._pull_done.set()
            pending = [t for t in asyncio.all_tasks(self._loop) if not t.done()]
            for t in pending:             # nats-py's own readers: end them before the loop goes
                t.cancel()
            if pending:
                self._loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
            self._loop.close()

    async def _connect(self):
        import nats

        tls = None
        if self.url.tls:
            tls = ssl.create_default_context(cafile=self.url.ca)
            if self.url.cert:
                tls.load_cert_chain(self.url.cert, self.url.key)
        outage = {"logged": False}

        async def on_error(exc):
            log.debug("NATS: %s", exc)

        async def on_disconnect():
            if not outage["logged"] and not self._intake_stopped.is_set():
                outage["logged"] = True
                log.warning("NATS source lost its server; reconnecting to another node of %s", self.url)

        async def on_reconnect():
            outage["logged"] = False
            log.info("NATS source reconnected to %s", self._nc.connected_url.netloc if self._nc else "?")

        try:
            return await nats.connect(servers=list(self.url.servers), name=self.client_name, user=self.url.username,
                                      password=self.url.password, tls=tls, connect_timeout=5,
                                      max_reconnect_attempts=-1, reconnect_time_wait=0.5, error_cb=on_error,
                                      disconnected_cb=on_disconnect, reconnected_cb=on_reconnect)
        except Exception as exc:
            raise ConfigError(f"cannot reach the NATS servers of {self.url}: {type(exc).__name__}: {exc}",
                              fix="start the cluster (edgesplit broker --cluster 3) or fix --source") from None

    async def _ensure_stream(self, js, nc) -> None:
        from nats.js.api import DiscardPolicy, RetentionPolicy, StorageType, StreamConfig
        from nats.js.errors import NotFoundError

        try:
            info = await js.stream_info(self.url.stream)
        except NotFoundError:
            info = None
        if info is not None:
            cfg = info.config
            if cfg.retention != RetentionPolicy.WORK_QUEUE:
                raise ConfigError(f"stream {self.url.stream} exists and is not a work queue",
                                  fix="delete it, or name another with ?stream=NAME")
            if cfg.max_bytes != self.url.max_bytes or abs((cfg.max_age or 0) - self.url.max_age_s) > 1e-3:
                log.warning("stream %s keeps its own bounds (%s bytes, %s s), not this worker's (%s bytes, %s s)",
                            self.url.stream, cfg.max_bytes, cfg.max_age, self.url.max_bytes, self.url.max_age_s)
            return
        replicas = self.url.replicas or min(3, max(1, len(nc.servers)))
        subject = f"{topics.ROOT}.{topics.VERSION}.*.*.{topics.FEATURES}"
        try:
            await js.add_stream(StreamConfig(name=self.url.stream, subjects=[subject],
                                             retention=RetentionPolicy.WORK_QUEUE, storage=StorageType.FILE,
                                             num_replicas=replicas, max_bytes=self.url.max_bytes,
                                             max_age=self.url.max_age_s, discard=DiscardPolicy.OLD))
        except Exception as exc:
            if "already in use" in str(exc):     # another worker made it first
                return
            if "insufficient resources" in str(exc) or "replicas" in str(exc):
                raise ConfigError(f"cannot create stream {self.url.stream} ({replicas} replica(s)): {exc}",
                                  fix="a cluster of fewer nodes needs ?replicas=1; see docs/broker.md") from None
            raise                                  # anything else may pass (a leader being elected): retried
        log.info("created stream %s on %s: work queue, %d replica(s), at most %s bytes and %.0f s, oldest dropped first",
                 self.url.stream, subject, replicas, self.url.max_bytes, self.url.max_age_s)

    async def _main(self) -> None:
        from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

        self._intake_stopped = asyncio.Event()
        self._room = asyncio.Event()
        self._finished = asyncio.Event()
        self._nc = nc = await self._connect()
        self._js = js = nc.jetstream(timeout=10)
        config = ConsumerConfig(durable_name=self.durable, ack_policy=AckPolicy.EXPLICIT,
                                ack_wait=self.url.ack_wait_s, max_deliver=-1, deliver_policy=DeliverPolicy.ALL,
                                max_ack_pending=100_000, filter_subject=self.subject)
        deadline = time.monotonic() + 120
        while True:         # workers start together and a busy cluster answers slowly: retry what may pass
            try:
                await self._ensure_stream(js, nc)
                sub = await js.pull_subscribe(self.subject, durable=self.durable, stream=self.url.stream,
                                              config=config)
                break
            except ConfigError:
                raise
            except Exception as exc:
                text = f"{type(exc).__name__}: {exc}"
                if "unique" in text or "overlap" in text or time.monotonic() > deadline:
                    raise ConfigError(f"cannot join consumer {self.durable} of stream {self.url.stream}: {text}",
                                      fix="a work-queue stream hands each frame to one consumer: run every worker "
                                          "with the same --group, or give each group its own --fleet") from None
                log.debug("joining consumer %s: %s; retrying", self.durable, text)
                await asyncio.sleep(0.5)
        self._ready.set()
        log.info("NATS source: %s", self.name)
        stats_task = asyncio.ensure_future(self._watch_stream(js))
        try:
            await self._pull(sub)
        finally:
            self._pull_done.set()
        await self._finished.wait()
        stats_task.cancel()
        await asyncio.gather(stats_task, return_exceptions=True)
        try:
            await nc.close()
        except Exception as exc:          # closing during an outage: what was not acked is delivered again
            log.debug("closing the NATS connection: %s", exc)

    async def _pull(self, sub) -> None:
        failing_since = None
        while not self._intake_stopped.is_set():
            room = self.window - self._unacked
            if room <= 0:
                self._room.clear()
                try:
                    await asyncio.wait_for(self._room.wait(), 0.5)
                except asyncio.TimeoutError:
                    pass
                continue
            try:
                msgs = await sub.fetch(min(room, self.max_batch), timeout=0.5)
            except asyncio.TimeoutError:
                continue
            except Exception as exc:             # a node or the stream leader is gone: JetStream elects another
                if failing_since is None:
                    failing_since = time.monotonic()
                    log.debug("NATS fetch failed (%s: %s); retrying", type(exc).__name__, exc)
                elif time.monotonic() - failing_since > 10:
                    log.warning("NATS source: no frames for %.0f s (%s: %s); still retrying",
                                time.monotonic() - failing_since, type(exc).__name__, exc)
                    failing_since = time.monotonic()
                await asyncio.sleep(0.2)
                continue
            failing_since = None
            for m in msgs:
                self.received += 1
                if m.metadata.num_delivered > 1:
                    self.redelivered += 1
                self._unacked += 1
                if not self._deliver(subject_to_topic(m.subject), m.data, m):
                    await self._nak(m)

    async def _nak(self, m) -> None:
        self._unacked -= 1
        try:
            await m.nak()               # delivered again at once, to another worker
        except Exception as exc:
            log.debug("nak failed: %s", exc)

    async def _ack(self, tokens, confirmed: bool) -> None:
        for m in tokens:
            if confirmed:
                try:
                    await m.ack()
                    self.acked += 1
                except Exception as exc:
                    self.ack_failures += 1
                    log.debug("ack failed (the frame will be delivered again): %s", exc)
            else:
                self.unconfirmed += 1
        self._unacked -= len(tokens)
        self._room.set()

    async def _finish(self, timeout: float) -> None:
        try:
            info = await self._js.consumer_info(self.url.stream, self.durable, timeout=min(5.0, timeout))
            self._snapshot = (info.delivered.stream_seq or 0, info.delivered.consumer_seq or 0)
        except Exception as exc:
            log.debug("consumer info at close: %s", exc)
        try:
            await asyncio.wait_for(self._nc.flush(), timeout)     # the last acks are on the wire
        except Exception as exc:
            log.debug("NATS flush: %s", exc)
        self._finished.set()

    async def _watch_stream(self, js) -> None:
        while True:
            try:
                info = await js.stream_info(self.url.stream)
                s, cfg = info.state, info.config
                fill = s.bytes / cfg.max_bytes if cfg.max_bytes and cfg.max_bytes > 0 else 0.0
                self._state = (f"stream {self.url.stream}: {s.messages} frame(s) waiting or in work, "
                               f"{s.bytes / 2**20:.1f} of {cfg.max_bytes / 2**20:.0f} MiB")
                if fill >= WARN_FILL and not self._fill_warned:
                    self._fill_warned = True
                    log.warning("stream %s is %.0f %% full: past %d bytes JetStream drops the oldest frames "
                                "(their devices re-send); add workers or raise ?max_bytes=", self.url.stream,
                                100 * fill, cfg.max_bytes)
                elif fill < WARN_FILL / 2:
                    self._fill_warned = False
            except Exception as exc:
                log.debug("stream info: %s", exc)
            await asyncio.sleep(10)

    # ------------------------------------------------------------ the acker thread
    def _ack_loop(self) -> None:
        """Wait for each batch's MQTT acknowledgements (PUBACKs come in order: the last first), then ack."""
        while True:
            item = self._acks.get()
            if item is _STOP:
                return
            tokens, deliveries = item
            deadline = time.monotonic() + self.url.ack_wait_s
            confirmed = all(d.wait(max(0.0, deadline - time.monotonic())) for d in reversed(deliveries))
            if not confirmed:
                log.warning("the MQTT broker did not acknowledge %d answer(s) within %.0f s; their frames "
                            "are left to be delivered again", len(tokens), self.url.ack_wait_s)
            try:
                self._call(self._ack(tokens, confirmed))
            except RuntimeError:          # the loop is gone: the frames are delivered again after ack_wait
                return
