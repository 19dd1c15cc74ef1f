"""The client: one connection to one broker (``MqttClient``), its last will, backoff and deliveries.

The package's docstring (``protocol/mqtt/__init__.py``) is the whole API and its behaviour.
paho is driven through :mod:`protocol.mqtt.paho_client` (tuned or plain, checked at run time).
"""
from __future__ import annotations

import dataclasses
import logging
import random
import socket
import ssl
import threading
import time
import uuid
from typing import Callable

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from protocol.errors import ConfigError, UsageError
from protocol.mqtt.paho_client import client_class
from protocol.mqtt.url import parse_url

log = logging.getLogger("protocol.mqtt")

__all__ = ["MqttClient", "Will", "Backoff", "Delivery", "filter_matches", "Handler"]

Handler = Callable[[str, bytes], None]

# CONNACK reason codes that retrying cannot fix (MQTT 5 numbering; paho maps the
# 3.1.1 return codes 1, 2, 4, 5 onto 132, 133, 134, 135).
_FATAL_CONNACK = {
    132: "the broker does not support this MQTT protocol version",
    133: "the broker rejected the client id",
    134: "bad user name or password",
    135: "not authorised",
    138: "this client is banned",
    140: "bad authentication method",
}


# ----------------------------------------------------------------- values

@dataclasses.dataclass(frozen=True)
class Will:
    """Last will: what the broker publishes for us when we vanish without a DISCONNECT."""

    topic: str
    payload: bytes = b"offline"
    qos: int = 1
    retain: bool = True

    def __post_init__(self):
        if not self.topic or any(c in self.topic for c in "+#"):
            raise UsageError(f"last will topic {self.topic!r} is not a plain topic name",
                             fix="use a topic without wildcards, e.g. edgesplit/v1/<fleet>/<device>/status")
        if self.qos not in (0, 1, 2):
            raise UsageError(f"last will QoS {self.qos} is not 0, 1 or 2")
        if isinstance(self.payload, str):
            object.__setattr__(self, "payload", self.payload.encode())


@dataclasses.dataclass(frozen=True)
class Backoff:
    """Exponential backoff with full jitter: wait uniform(0, min(maximum, initial * 2**attempt))."""

    initial: float = 0.5
    maximum: float = 30.0

    def __post_init__(self):
        if not (0 < self.initial <= self.maximum):
            raise UsageError(f"backoff needs 0 < initial <= maximum, got {self.initial}, {self.maximum}")

    def delay(self, attempt: int, rng: random.Random | None = None) -> float:
        cap = min(self.maximum, self.initial * (2 ** min(attempt, 30)))
        # a tiny floor keeps a zero draw from becoming a busy loop
        return max(0.01, (rng or random).uniform(0.0, cap))


def filter_matches(topic_filter: str, topic: str) -> bool:
    """MQTT topic matching; a ``$share/<group>/`` prefix is ignored."""
    if topic_filter.startswith("$share/"):
        parts = topic_filter.split("/", 2)
        if len(parts) < 3:
            return False
        topic_filter = parts[2]
    return paho.topic_matches_sub(topic_filter, topic)


_MAX_ROUTES = 10_000      # topics whose matching handlers are remembered


class Delivery:
    """A publish in flight.  ``wait(timeout)`` is True once the broker has it (PUBACK for QoS 1).

    The event behind ``wait`` is made only when somebody waits: a worker publishes
    thousands of answers a second and waits on none of them (a ``threading.Event`` per
    publish was ~5 % of its CPU in py-spy).
    """

    __slots__ = ("mid", "topic", "_done", "_event")
    _guard = threading.Lock()            # one for all deliveries: held for a few bytecodes only

    def __init__(self, mid: int, topic: str):
        self.mid = mid
        self.topic = topic
        self._done = False
        self._event: threading.Event | None = None

    @property
    def done(self) -> bool:
        return self._done

    def wait(self, timeout: float | None = None) -> bool:
        if self._done:
            return True
        with Delivery._guard:
            if self._done:
                return True
            if self._event is None:
                self._event = threading.Event()
            event = self._event
        return event.wait(timeout)

    def _set(self) -> None:
        with Delivery._guard:
            self._done = True
            event = self._event
        if event is not None:
            event.set()

    def __repr__(self) -> str:
        return f"Delivery(mid={self.mid}, topic={self.topic!r}, done={self.done})"


# ----------------------------------------------------------------- the client


def _no_nagle(client, userdata, sock) -> None:
    """Turn Nagle's algorithm off: one small frame must leave now, not wait for the last ACK (with Nagle
    on, one request at a time over loopback took ~90 ms instead of ~10: Nagle meeting delayed ACKs)."""
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except (OSError, AttributeError):  # not a TCP socket (e.g. a unix socket): nothing to do
        pass

class MqttClient:
    """One connection to one broker; see the module docstring for the whole API."""

    def __init__(self, url: str, *, client_id: str | None = None, username: str | None = None,
                 password: str | None = None, tls_ca: str | None = None, tls_cert: str | None = None,
                 tls_key: str | None = None, protocol: str | int | None = None, clean_session: bool = True,
                 session_expiry: int = 7 * 24 * 3600, keepalive: int = 30, will: Will | None = None,
                 on_online: Callable[[], None] | None = None, on_offline: Callable[[], None] | None = None,
                 on_fatal: Callable[[ConfigError], None] | None = None, backoff: Backoff | None = None,
                 max_inflight: int = 100):
        self.broker = parse_url(url, username=username, password=password, tls_ca=tls_ca, tls_cert=tls_cert,
                                tls_key=tls_key, protocol=protocol)
        if not clean_session and not client_id:
            raise UsageError("a persistent session needs a stable client id",
                             fix="pass client_id (e.g. the device id) or use clean_session=True")
        self.client_id = client_id or f"edgesplit-{uuid.uuid4().hex[:12]}"
        self.clean_session = clean_session
        self.will = will
        self.backoff = backoff or Backoff()
        self._on_online, self._on_offline, self._on_fatal = on_online, on_offline, on_fatal
        self._keepalive = keepalive
        self._v5 = self.broker.protocol == "5"
        self._session_expiry = session_expiry

        self._lock = threading.Lock()
        self._subs: dict[str, tuple[int, Handler]] = {}
        # topic -> the handlers whose filters match it: a worker sees the same few topics (one per
        # device) again and again, and matching every filter per message cost ~10 % of its CPU
        self._routes: dict[str, tuple[Handler, ...]] = {}
        self._pending_subacks: set[int] = set()
        self._unsubacks: dict[int, threading.Event] = {}
        self._deliveries: dict[int, Delivery] = {}
        self._early: set[int] = set()          # mids acknowledged before publish() returned
        self._connected = threading.Event()
        self._subscribed = threading.Event()
        self._finished = threading.Event()      # fatal error or stop(): no more retries
        self._error: ConfigError | None = None
        self._attempt = 0
        self._outage_logged = False
        self._silent_drops = 0
        self._started = self._stopping = False
        self._rng = random.Random()
        self.connects = 0                       # successful CONNACKs so far
        self.session_present = False            # from the last CONNACK

        self._client = self._make_client(max_inflight)
        self._next_delay()

    # ------------------------------------------------------------ setup
    def _make_client(self, max_inflight: int) -> paho.Client:
        b = self.broker
        kwargs = dict(callback_api_version=CallbackAPIVersion.VERSION2, client_id=self.client_id,
                      protocol=paho.MQTTv5 if self._v5 else paho.MQTTv311)
        if not self._v5:
            kwargs["clean_session"] = self.clean_session
        c = client_class()(**kwargs)   # tuned paho, or plain paho if its internals moved
        c.suppress_exceptions = True            # a bug in a callback must not kill the network thread
        c.max_inflight_messages_set(max_inflight)
        if b.username is not None:
            c.username_pw_set(b.username, b.password)
        if b.tls:
            c.tls_set(ca_certs=b.ca, certfile=b.cert, keyfile=b.key, cert_reqs=ssl.CERT_REQUIRED,
                      tls_version=ssl.PROTOCOL_TLS_CLIENT)
        if self.will is not None:
            c.will_set(self.will.topic, self.will.payload, qos=self.will.qos, retain=self.will.retain)
        if log.isEnabledFor(logging.DEBUG):
            c.enable_logger(logging.getLogger("protocol.mqtt.paho"))
        c.on_socket_open = _no_nagle
        c.on_connect = self._handle_connect
        c.on_connect_fail = self._handle_connect_fail
        c.on_disconnect = self._handle_disconnect
        c.on_message = self._handle_message
        c.on_subscribe = self._handle_subscribe
        c.on_publish = self._handle_publish
        c.on_unsubscribe = self._handle_unsubscribe
        return c

    # ------------------------------------------------------------ public API
    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    @property
    def error(self) -> ConfigError | None:
        """The fatal ConfigError, if the broker refused us."""
        return self._error

    def start(self, wait_connected: float | None = None) -> bool:
        """Start the network thread.  With ``wait_connected`` seconds, wait for the CONNACK and
        the SUBACKs of the subscriptions made so far; True if connected.  Raises ConfigError
        when the broker refuses us."""
        if self._started:
            raise RuntimeError("MqttClient.start() called twice")
        self._started = True
        props = None
        if self._v5:
            props = Properties(PacketTypes.CONNECT)
            props.SessionExpiryInterval = 0 if self.clean_session else self._session_expiry
        self._client.connect_async(self.broker.host, self.broker.port, keepalive=self._keepalive,
                                   clean_start=self.clean_session if self._v5 else paho.MQTT_CLEAN_START_FIRST_ONLY,
                                   properties=props)
        self._client.loop_start()
        log.debug("connecting to %s as %s", self.broker, self.client_id)
        if wait_connected is None:
            return self.connected
        return self.wait_connected(wait_connected)

    def wait_connected(self, timeout: float | None = None) -> bool:
        """Wait until connected and subscribed; True if so, False on timeout; ConfigError if refused."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            self.raise_if_failed()
            if self._connected.is_set() and self._subscribed.is_set():
                return True
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                return False
            self._connected.wait(0.05 if left is None else min(0.05, left))
            if self._connected.is_set():
                self._subscribed.wait(0.05 if left is None else min(0.05, max(left, 0)))
            elif self._finished.is_set():
                self.raise_if_failed()
                return False

    def raise_if_failed(self) -> None:
        if self._error is not None:
            raise self._error

    def subscribe(self, topic_filter: str, handler: Handler, qos: int = 1) -> None:
        """Route messages matching ``topic_filter`` to ``handler(topic, payload)``; survives reconnects."""
        if qos not in (0, 1, 2):
            raise UsageError(f"subscription QoS {qos} is not 0, 1 or 2")
        with self._lock:
            self._subs[topic_filter] = (qos, handler)
            self._routes.clear()
            if self._connected.is_set():
                self._subscribed.clear()
                self._send_subscribe([(topic_filter, qos)])

    def unsubscribe(self, topic_filter: str, timeout: float = 5.0) -> bool:
        """Stop the subscription; messages that arrive before the broker's UNSUBACK still reach the
        handler (a draining worker loses nothing).  True if the broker acknowledged within ``timeout``."""
        with self._lock:
            if topic_filter not in self._subs:
                return True
            done = threading.Event()
            acked = False
            if self._connected.is_set():
                rc, mid = self._client.unsubscribe(topic_filter)
                if rc == paho.MQTT_ERR_SUCCESS and mid is not None:
                    self._unsubacks[mid] = done
        if self._connected.is_set():
            acked = done.wait(timeout)
        with self._lock:
            self._subs.pop(topic_filter, None)
            self._routes.clear()
        return acked

    def publish(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False) -> Delivery:
        """Publish; returns a Delivery.  Offline QoS>0 messages are queued and sent on reconnect."""
        if self._error is not None:
            raise self._error
        info = self._client.publish(topic, payload, qos=qos, retain=retain)
        d = Delivery(info.mid, topic)
        if info.rc == paho.MQTT_ERR_QUEUE_SIZE:
            log.warning("outgoing queue full, dropped a message for %s", topic)
            return d
        with self._lock:
            if info.mid in self._early:
                self._early.discard(info.mid)
                d._set()
            else:
                self._deliveries[info.mid] = d
        return d

    def in_flight(self) -> int:
        """Publishes not yet acknowledged by the broker."""
        with self._lock:
            return len(self._deliveries)

    def stop(self, timeout: float = 5.0) -> None:
        """Wait up to ``timeout`` s for in-flight publishes, DISCONNECT cleanly (no will), stop the thread."""
        if not self._started or self._stopping:
            return
        deadline = time.monotonic() + timeout
        while self._connected.is_set() and self.in_flight() and time.monotonic() < deadline:
            time.sleep(0.01)
        if self.in_flight():
            log.warning("stopping with %d publish(es) not acknowledged by %s", self.in_flight(), self.broker)
        self._stopping = True
        self._finished.set()
        self._client.disconnect()
        self._client.loop_stop()
        self._connected.clear()
        log.debug("disconnected from %s", self.broker)

    def __enter__(self) -> "MqttClient":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    # ------------------------------------------------------------ internals
    def _send_subscribe(self, items: list[tuple[str, int]]) -> None:
        rc, mid = self._client.subscribe(items)
        if rc == paho.MQTT_ERR_SUCCESS and mid is not None:
            self._pending_subacks.add(mid)

    def _next_delay(self) -> None:
        # paho waits its min delay after a failure; setting min = max = a fresh
        # full-jitter draw before each wait turns its plain doubling into ours.
        d = self.backoff.delay(self._attempt, self._rng)
        self._attempt += 1
        self._client.reconnect_delay_set(min_delay=d, max_delay=d)  # type: ignore[arg-type]

    def _fail(self, error: ConfigError) -> None:
        if self._error is not None:
            return
        self._error = error
        self._finished.set()
        self._client.disconnect()               # stops paho's retry loop
        log.debug("giving up on %s: %s", self.broker, error.message)
        if self._on_fatal is not None:
            try:
                self._on_fatal(error)
            except Exception:
                log.exception("on_fatal callback failed")

    def _handle_connect(self, client, userdata, flags, reason_code, properties) -> None:
        try:
            code = reason_code.value if hasattr(reason_code, "value") else int(reason_code)
            if code != 0:
                if code == 132 and self._v5 and self._client.speak_311(self.clean_session):
                    self._v5 = False    # e.g. NATS's MQTT gateway; our frames need nothing of MQTT 5
                    log.warning("broker %s refused MQTT 5; speaking MQTT 3.1.1 with it instead", self.broker)
                elif code in _FATAL_CONNACK:
                    user = self.broker.username
                    self._fail(ConfigError(
                        f"broker {self.broker} refused the connection: {_FATAL_CONNACK[code]} "
                        f"(client id {self.client_id!r}, user {user!r})",
                        fix="check the user name and password (mqtt://USER:PASS@host:port) and the broker's ACL; "
                            "edgesplit does not retry a refused login"))
                else:
                    log.warning("broker %s refused the connection for now (%s); retrying", self.broker, reason_code)
                    self._next_delay()
                return
            self.session_present = bool(flags.session_present)
            self.connects += 1
            self._attempt = 0
            self._silent_drops = 0
            self._outage_logged = False
            self._next_delay()
            with self._lock:
                self._subscribed.clear()
                self._pending_subacks.clear()
                items = [(f, q) for f, (q, _) in self._subs.items()]
                if items:
                    self._send_subscribe(items)
                else:
                    self._subscribed.set()
                self._connected.set()
            log.info("connected to %s as %s%s", self.broker, self.client_id,
                     " (session resumed)" if self.session_present else "")
            if self._on_online is not None:
                self._on_online()
        except Exception:
            log.exception("error in the MQTT connect handler")

    def _handle_connect_fail(self, client, userdata) -> None:
        try:
            exc = getattr(client, "tls_failure", None)
            if exc is not None:
                self._fail(ConfigError(
                    f"TLS verification of broker {self.broker} failed: {exc.verify_message or exc}",
                    fix="pass the CA that signed the broker's certificate (?ca=/path/ca.pem) and connect "
                        "with the host name the certificate was made for"))
                return
            if not self._outage_logged and not self._stopping:
                self._outage_logged = True
                log.warning("broker %s is not reachable; retrying with backoff (up to %.0f s apart)",
                            self.broker, self.backoff.maximum)
            self._next_delay()
        except Exception:
            log.exception("error in the MQTT connect-fail handler")

    def _handle_disconnect(self, client, userdata, flags, reason_code, properties) -> None:
        try:
            was = self._connected.is_set()
            self._connected.clear()
            self._subscribed.clear()
            if self._finished.is_set():
                return
            self._next_delay()
            if was:
                log.warning("lost the connection to %s (%s); reconnecting", self.broker, reason_code)
                if self._on_offline is not None:
                    self._on_offline()
            else:
                # Some brokers (rumqttd) drop a bad login without a CONNACK code: say so once.
                self._silent_drops += 1
                if self._silent_drops == 3:
                    log.warning("broker %s keeps closing the connection before answering the login: wrong "
                                "user name or password on a broker that does not say so, or not an MQTT "
                                "port (%s)? Retrying with backoff.", self.broker,
                                "TLS expected?" if not self.broker.tls else "plain MQTT expected?")
        except Exception:
            log.exception("error in the MQTT disconnect handler")

    def _handle_subscribe(self, client, userdata, mid, reason_codes, properties) -> None:
        try:
            with self._lock:
                self._pending_subacks.discard(mid)
                if not self._pending_subacks and self._connected.is_set():
                    self._subscribed.set()
            for rc in reason_codes:
                if getattr(rc, "is_failure", False):
                    log.warning("broker %s refused a subscription (%s): check the ACL", self.broker, rc)
        except Exception:
            log.exception("error in the MQTT subscribe handler")

    def _handle_unsubscribe(self, client, userdata, mid, reason_codes, properties) -> None:
        with self._lock:
            done = self._unsubacks.pop(mid, None)
        if done is not None:
            done.set()

    def _handle_publish(self, client, userdata, mid, reason_code, properties) -> None:
        with self._lock:
            d = self._deliveries.pop(mid, None)
            if d is None:
                self._early.add(mid)
        if d is not None:
            d._set()

    def _handle_message(self, client, userdata, message) -> None:
        topic = message.topic
        handlers = self._routes.get(topic)
        if handlers is None:
            with self._lock:
                handlers = tuple(h for f, (_, h) in self._subs.items() if filter_matches(f, topic))
                if len(self._routes) >= _MAX_ROUTES:
                    self._routes.clear()
                self._routes[topic] = handlers
        if not handlers:
            log.debug("no handler for message on %s", topic)
        for h in handlers:
            try:
                h(topic, message.payload)
            except Exception:
                log.exception("handler for %s failed; continuing", topic)

