"""The one MQTT adapter: device and cloud talk to the broker only through this.

Business logic never imports paho; it uses this small surface::

    from protocol.mqtt import MqttClient, Will

    client = MqttClient(
        "mqtt://user:pass@127.0.0.1:1883",      # or mqtts://host:8883?ca=/path/ca.pem
        client_id="pi-01",                     # stable id: needed for persistent sessions
        clean_session=True,                    # False = persistent session (issue 6)
        protocol="3.1.1",                      # or "5" (also ?protocol=5 in the URL)
        will=Will(topic, b"offline", qos=1, retain=True),
        on_online=lambda: client.publish(status, b"online", retain=True),
        on_fatal=lambda err: ...,              # called once with a ConfigError
    )
    client.subscribe("edgesplit/v1/f/pi-01/results", handler, qos=1)   # handler(topic: str, payload: bytes)
    if not client.start(wait_connected=10):    # raises ConfigError if the broker refuses us
        ...                                    # not up yet: paho keeps retrying in the background
    delivery = client.publish(topic, payload, qos=1, retain=False)
    delivery.wait(5.0)                         # True once the broker acknowledged it (PUBACK)
    client.publish(status, b"stopped", retain=True).wait(2)
    client.stop()                              # clean DISCONNECT: the broker drops the will

Also: ``client.connected``, ``client.wait_connected(timeout)``, ``client.error``,
``client.raise_if_failed()``, ``client.unsubscribe(filter, timeout)`` (returns once the
broker's UNSUBACK is in; the handler still sees what arrived before it),
``client.in_flight()`` (publishes not yet acknowledged), ``client.connects``,
``client.session_present``, ``on_offline=`` (called when an established connection is
lost), ``backoff=Backoff(initial, maximum)``, ``max_inflight=``.  ``parse_url(url)`` gives
a :class:`BrokerUrl` whose ``str()`` hides the password; ``filter_matches(filter, topic)``.

Behaviour:

* ``subscribe`` remembers the filter and (re)subscribes in every ``on_connect``, so
  subscriptions survive reconnects.  Handlers are picked with MQTT topic matching;
  a ``$share/<group>/`` prefix is stripped for matching.  A handler that raises is
  logged and the loop carries on.  Handlers run on the network thread: hand heavy
  work to a queue.
* ``on_online()`` runs after every successful CONNACK, after the re-subscribe.
* A broker that is down or drops us is retried forever, with exponential backoff
  and full jitter (``Backoff``).  A CONNACK refusing our credentials, our
  authorisation, our client id or protocol, or a TLS certificate that fails
  verification, is final: the client is never marked connected, stops retrying,
  and the :class:`ConfigError` (exit code 78) is delivered once — raised by
  ``start``/``wait_connected``/``raise_if_failed`` and passed to ``on_fatal``.
  The adapter does not print it: whoever receives it reports it.
* ``publish`` never retains unless asked, returns a :class:`Delivery`; QoS>0
  messages published while offline are queued in memory and sent on reconnect
  (the device's durable outbox is what survives a restart).
* ``stop()`` waits (bounded) for in-flight publishes, then disconnects cleanly.
  It publishes nothing itself.
"""
from __future__ import annotations

import dataclasses
import difflib
import logging
import os
import random
import socket
import ssl
import threading
import time
import urllib.parse
import uuid
from pathlib import Path
from typing import Callable

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.matcher import MQTTMatcher
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from protocol.errors import ConfigError, UsageError

log = logging.getLogger(__name__)

__all__ = ["MqttClient", "Will", "BrokerUrl", "Backoff", "Delivery", "parse_url", "filter_matches",
           "Handler"]

Handler = Callable[[str, bytes], None]

_URL_OPTIONS = ("ca", "cert", "key", "protocol")
# names other tools use for the same things (mosquitto_sub --cafile, paho's ca_certs, ...)
_URL_ALIASES = {"cafile": "ca", "ca_file": "ca", "ca_certs": "ca", "capath": "ca", "certfile": "cert",
                "keyfile": "key", "version": "protocol", "v": "protocol", "mqtt_version": "protocol"}
_PROTOCOLS = {"3.1.1": paho.MQTTv311, "311": paho.MQTTv311, "4": paho.MQTTv311,
              "5": paho.MQTTv5, "5.0": paho.MQTTv5}

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


@dataclasses.dataclass(frozen=True)
class BrokerUrl:
    """A parsed ``mqtt://`` / ``mqtts://`` broker address.  ``str()`` hides the password."""

    host: str
    port: int
    tls: bool = False
    username: str | None = None
    password: str | None = dataclasses.field(default=None, repr=False)
    ca: str | None = None
    cert: str | None = None
    key: str | None = None
    protocol: str = "3.1.1"

    def __str__(self) -> str:
        auth = ""
        if self.username is not None:
            auth = urllib.parse.quote(self.username, safe="") + (":***" if self.password is not None else "") + "@"
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{'mqtts' if self.tls else 'mqtt'}://{auth}{host}:{self.port}"


def parse_url(url: str, *, username: str | None = None, password: str | None = None,
              tls_ca: str | None = None, tls_cert: str | None = None, tls_key: str | None = None,
              protocol: str | int | None = None) -> BrokerUrl:
    """Parse ``mqtt[s]://[user[:pass]@]host[:port][?ca=..&cert=..&key=..&protocol=5]``.

    Explicit arguments win over what the URL says.  Raises UsageError with the fix.
    """
    example = "mqtt://127.0.0.1:1883 or mqtts://user:pass@broker.example:8883?ca=/etc/edgesplit/ca.pem"
    if not isinstance(url, str) or "://" not in url:
        raise UsageError(f"broker address {url!r} is not a URL", fix=f"write it like {example}")
    parts = urllib.parse.urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme not in ("mqtt", "mqtts"):
        raise UsageError(f"broker URL scheme {parts.scheme!r} is not supported",
                         fix=f"use mqtt:// (plain TCP) or mqtts:// (TLS), e.g. {example}")
    tls = scheme == "mqtts"
    try:
        port = parts.port or (8883 if tls else 1883)
    except ValueError:
        raise UsageError(f"broker URL {url!r} has an invalid port", fix=f"write it like {example}") from None
    host = parts.hostname
    if not host:
        raise UsageError(f"broker URL {url!r} has no host", fix=f"write it like {example}")
    if parts.path not in ("", "/"):
        raise UsageError(f"broker URL {url!r} has a path ({parts.path!r}); MQTT over TCP takes none",
                         fix=f"write it like {example}")
    opts: dict[str, str] = {}
    for name, value in urllib.parse.parse_qsl(parts.query, keep_blank_values=True):
        if name not in _URL_OPTIONS:
            near = ([_URL_ALIASES[name]] if name in _URL_ALIASES
                    else difflib.get_close_matches(name, _URL_OPTIONS, n=1))
            raise UsageError(f"unknown broker URL option {name!r}",
                             fix=(f"did you mean {near[0]!r}? " if near else "")
                             + f"known options: {', '.join(_URL_OPTIONS)}")
        opts[name] = value
    user = urllib.parse.unquote(parts.username) if parts.username else None
    pw = urllib.parse.unquote(parts.password) if parts.password is not None else None
    if username is not None:
        user = username
    if password is not None:
        pw = password
    if pw is not None and user is None:
        raise UsageError("a broker password was given without a user name",
                         fix="give both, e.g. mqtt://USER:PASS@host:1883")
    proto = str(protocol if protocol is not None else opts.get("protocol", "3.1.1"))
    if proto not in _PROTOCOLS:
        raise UsageError(f"unknown MQTT protocol version {proto!r}", fix="use 3.1.1 (default) or 5")
    proto = "5" if _PROTOCOLS[proto] == paho.MQTTv5 else "3.1.1"
    ca, cert, key = (tls_ca or opts.get("ca") or None, tls_cert or opts.get("cert") or None,
                     tls_key or opts.get("key") or None)
    if (ca or cert or key) and not tls:
        raise UsageError(f"TLS files were given for a plain mqtt:// broker ({url})",
                         fix="use mqtts://host:8883 to connect with TLS")
    for what, path in (("CA certificate", ca), ("client certificate", cert), ("client key", key)):
        if path and not os.path.isfile(path):
            raise ConfigError(f"the {what} file {path} does not exist",
                              fix="point ?ca=/ --tls-ca at the PEM file the broker's certificate was signed with")
    if bool(cert) != bool(key):
        raise UsageError("a TLS client certificate needs both cert and key", fix="give ?cert=...&key=...")
    return BrokerUrl(host=host, port=port, tls=tls, username=user, password=pw, ca=ca, cert=cert, key=key,
                     protocol=proto)


def read_password_file(path: str | os.PathLike) -> str:
    """The broker password kept in ``path`` (its first line), so that it never shows in the process list.

    With systemd, e.g. ``LoadCredential=broker-password:/etc/edgesplit/cloud/password`` and
    ``--password-file ${CREDENTIALS_DIRECTORY}/broker-password``.  UsageError (exit 2) when the
    file is missing, unreadable or empty.
    """
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UsageError(f"password file {p} does not exist",
                         fix="give the file holding the broker password (the password file of the user's "
                             "directory from `edgesplit broker config`)") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"cannot read the password file {p}: {exc}",
                         fix="make it a readable UTF-8 text file holding the password on its first line") from None
    lines = text.splitlines()
    password = lines[0] if lines else ""
    if not password:
        raise UsageError(f"password file {p} is empty", fix="write the broker password on its first line")
    return password


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


_READ_CHUNK = 64 * 1024    # bytes asked of the socket per recv() on the network thread
_PUBACK_SUCCESS = ReasonCode(PacketTypes.PUBACK)    # shared by every plain PUBACK: read, never changed
_NO_PROPERTIES = Properties(PacketTypes.PUBACK)
_SEND_RUN, _SEND_BYTES = 256, 256 * 1024           # packets joined into one send(): at most so many, about so large


class _Matcher(MQTTMatcher):
    """paho's matcher for ``message_callback_add`` filters, which we never add: its
    ``iter_match`` builds a self-referencing recursive closure for every message, a reference
    cycle that only the garbage collector frees (six objects per message)."""

    def iter_match(self, topic):
        root = self._root
        if not root._children and root._content is None:
            return iter(())
        return super().iter_match(topic)


class _PahoClient(paho.Client):
    """paho's client, remembering a TLS verification failure (paho swallows the exception),
    and doing less per message than paho: reading the socket in chunks, waking its network
    thread once per burst, reading plain PUBACKs itself and sending queued packets together.

    paho asks the socket for one byte (the packet type), then one byte per length byte,
    then the rest: three or four ``recv`` calls per message, each a system call that
    also gives the GIL away to the worker's batching thread and waits to get it back.
    ``_sock_recv`` here reads up to 64 KiB at once and serves paho's small reads from
    that buffer; ``loop_read`` goes on parsing while the buffer holds bytes, since
    ``select`` only wakes the loop for bytes still in the kernel.

    paho also writes a wake-up byte to its socket pair for every packet it queues, so that
    a network thread asleep in ``select`` sends it now: a ``send`` by the queuing thread,
    then a ``select`` wake-up and a ``recv`` on the network thread, per packet.  A worker
    publishing 32 results of a batch paid that 32 times, and once more per PUBACK paho
    queues on its own thread.  ``_packet_queue`` here writes the byte only when it is
    needed: never on the network thread itself (its next ``select`` waits for the socket
    to be writable, since ``want_write()`` is then true), and from other threads only when
    no byte is already on its way.  A byte is on its way from the moment a thread decides
    to send it until ``loop_write`` begins, which clears the mark before draining the
    queue: a packet appended while the mark is set is appended before that drain.

    And each PUBACK for a message we sent cost paho about 30 us: it builds a ReasonCode and
    a Properties object (a dict of every MQTT 5 property name) even for MQTT 3.1.1's two
    bytes, then scans every in-flight message for one queued behind the window.  A worker
    answering thousands of frames a second spent more of its GIL on those PUBACKs than on
    the frames.  ``_handle_pubackcomp`` here reads a plain two-byte PUBACK (3.1.1, or MQTT 5
    "success" without properties) itself and hands paho's usual ``_do_on_publish`` shared
    success objects (our on_publish reads only the mid); ``_update_inflight`` skips the scan
    when every message paho holds is already in flight, so none is queued.  Anything else
    (PUBCOMP, a PUBACK with a reason code or properties) goes through paho unchanged.

    Finally ``_packet_write`` hands the kernel every whole packet waiting in the queue in one
    ``send`` (a batch's 32 results and the PUBACKs of the frames read meanwhile) instead of
    one ``send`` per packet, each of which also let the other thread take the GIL.  Packets
    paho must act on once written (QoS 0 PUBLISH: on_publish; DISCONNECT: close) and a packet
    already partly written end the run and go through paho's own loop.
    """

    tls_failure: ssl.SSLCertVerificationError | None = None
    _rbuf: bytes = b""                   # read from the socket, not yet handed to paho
    _rpos: int = 0
    _wake_sent_to: object = None         # the socket-pair end a wake-up byte went to, not yet served

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._on_message_filtered = _Matcher()

    def _packet_queue(self, command, packet, mid, qos, info=None):
        thread = self._thread
        wake = self._sockpairW
        if thread is None or wake is None:                # no network thread: paho's own way
            return super()._packet_queue(command, packet, mid, qos, info)
        self._out_packet.append({"command": command, "mid": mid, "qos": qos, "pos": 0,
                                 "to_process": len(packet), "packet": packet, "info": info})
        if threading.current_thread() is not thread and self._wake_sent_to is not wake:
            self._wake_sent_to = wake                     # before the send: see the docstring
            try:
                wake.send(b"\0")
            except OSError:       # full of bytes (awake anyway), or closed by loop_stop(): nothing to wake
                pass
        self._call_socket_register_write()
        return paho.MQTT_ERR_SUCCESS

    def loop_write(self):
        self._wake_sent_to = None
        return super().loop_write()

    def _packet_write(self):
        out = self._out_packet
        while len(out) > 1:
            run, size = [], 0
            while out and len(run) < _SEND_RUN and size < _SEND_BYTES:
                p = out[0]
                cmd = p["command"] & 0xF0
                if p["pos"] or cmd == paho.DISCONNECT or (cmd == paho.PUBLISH and p["qos"] == 0):
                    break
                run.append(out.popleft())
                size += p["to_process"]
            if len(run) < 2:
                out.extendleft(reversed(run))
                break
            data = b"".join(p["packet"] for p in run)
            try:
                sent = self._sock_send(data)
            except (AttributeError, ValueError):    # no socket (yet): paho keeps the packets too
                out.extendleft(reversed(run))
                return paho.MQTT_ERR_SUCCESS
            except BlockingIOError:
                out.extendleft(reversed(run))
                return paho.MQTT_ERR_AGAIN
            except OSError as err:
                out.extendleft(reversed(run))
                self._easy_log(paho.MQTT_LOG_ERR, "failed to send on socket: %s", err)
                return paho.MQTT_ERR_CONN_LOST
            with self._msgtime_mutex:
                self._last_msg_out = paho.time_func()
            for i, p in enumerate(run):          # whole packets are done; the first cut one goes back
                if sent >= p["to_process"]:
                    sent -= p["to_process"]
                    continue
                p["pos"] += sent
                p["to_process"] -= sent
                out.extendleft(reversed(run[i:]))
                return paho.MQTT_ERR_AGAIN       # the kernel's buffer is full: wait for select
        return super()._packet_write()

    def _handle_pubackcomp(self, cmd):
        packet = self._in_packet["packet"]
        if cmd != "PUBACK" or len(packet) != 2:
            return super()._handle_pubackcomp(cmd)
        mid = (packet[0] << 8) | packet[1]
        self._easy_log(paho.MQTT_LOG_DEBUG, "Received PUBACK (Mid: %d)", mid)
        with self._out_message_mutex:
            if mid in self._out_messages:
                return self._do_on_publish(mid, _PUBACK_SUCCESS, _NO_PROPERTIES)
        return paho.MQTT_ERR_SUCCESS

    def _update_inflight(self):
        # paho's own counter: messages in _out_messages are either in flight (counted) or
        # queued behind the window; with none queued its scan would send nothing
        if len(self._out_messages) <= self._inflight_messages:
            return paho.MQTT_ERR_SUCCESS
        return super()._update_inflight()

    def reconnect(self):
        self._drop_read_buffer()
        try:
            return super().reconnect()
        except ssl.SSLCertVerificationError as exc:
            self.tls_failure = exc
            raise

    def _drop_read_buffer(self) -> None:
        self._rbuf, self._rpos = b"", 0

    def _sock_close(self) -> None:
        self._drop_read_buffer()          # bytes of a dead connection never reach the next one
        super()._sock_close()

    def _sock_recv(self, bufsize: int) -> bytes:
        if self._rpos >= len(self._rbuf):
            data = super()._sock_recv(max(bufsize, _READ_CHUNK))   # BlockingIOError when empty
            if len(data) <= bufsize:
                self._drop_read_buffer()
                return data               # b"" (connection closed) passes through as is
            self._rbuf, self._rpos = data, 0
        start = self._rpos
        self._rpos = end = min(start + bufsize, len(self._rbuf))
        return self._rbuf[start:end]

    def loop_read(self, max_packets: int = 1):
        rc = super().loop_read(max_packets)
        while rc == paho.MQTT_ERR_SUCCESS and self._sock is not None and self._rpos < len(self._rbuf):
            rc = super().loop_read(max_packets)
        return rc


# ----------------------------------------------------------------- the client


def _no_nagle(client, userdata, sock) -> None:
    """Turn Nagle's algorithm off: one small frame must leave now, not wait for the last ACK.

    Measured in bench/bench_e2e.py: with Nagle on, one request at a time over loopback takes
    about 90 ms (Nagle meeting delayed ACKs) instead of about 10 ms.
    """
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
        c = _PahoClient(**kwargs)
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
            c.enable_logger(logging.getLogger(__name__ + ".paho"))
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
                if code in _FATAL_CONNACK:
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

