"""The paho client the adapter drives, and the check that decides whether it may be tuned.

* :class:`PlainClient` is paho's own client; only its public ``reconnect()`` is wrapped, to keep
  the TLS verification failure paho swallows (the adapter turns it into one clear ConfigError).
* :class:`LeanClient` also overrides a few of paho's *private* methods to do less per message
  (its docstring says what and why; docs/performance.md has the measurements).
* :func:`client_class` picks LeanClient only when the installed paho's internals are the ones
  LeanClient was written against (paho 2.0, 2.1 and 2.2: same signatures, same packet records,
  same attributes), checked at run time; otherwise PlainClient, said once in the log.  A paho
  that moved its internals costs CPU per message, never a lost or garbled message.
"""
from __future__ import annotations

import collections
import functools
import inspect
import logging
import ssl
import threading

import paho.mqtt as paho_package
import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.matcher import MQTTMatcher
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

log = logging.getLogger(__name__)

__all__ = ["PlainClient", "LeanClient", "client_class", "internals_mismatch", "READ_AGAINST"]


class PlainClient(paho.Client):
    """paho's client, remembering a TLS verification failure (paho swallows the exception)."""

    tls_failure: ssl.SSLCertVerificationError | None = None

    def reconnect(self, *args, **kwargs):
        try:
            return super().reconnect(*args, **kwargs)
        except ssl.SSLCertVerificationError as exc:
            self.tls_failure = exc
            raise

    def speak_311(self, clean_session: bool) -> bool:
        """From the next connection on, speak MQTT 3.1.1 (a broker refused 5), as paho itself steps down
        from 3.1.1 to 3.1; False when this paho keeps the protocol elsewhere (the refusal stays final)."""
        if not all(hasattr(self, a) for a in ("_protocol", "_connect_properties")):   # (_clean_session: 3.1.1 only)
            return False
        self._protocol, self._clean_session, self._connect_properties = paho.MQTTv311, clean_session, None
        if hasattr(self, "_will_properties"):
            self._will_properties = None
        return True


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


class LeanClient(PlainClient):
    """paho's client doing less per message than paho: reading the socket in chunks, waking its network
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

    def reconnect(self, *args, **kwargs):
        self._drop_read_buffer()
        return super().reconnect(*args, **kwargs)

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


# ----------------------------------------------------------------- the run-time check

READ_AGAINST = ((2, 0), (2, 1), (2, 2))      # paho versions whose internals LeanClient was read against

# paho's methods LeanClient overrides or calls, with their parameters in those versions
_METHODS = {
    "_packet_queue": ("self", "command", "packet", "mid", "qos", "info"),
    "loop_write": ("self",),
    "_packet_write": ("self",),
    "_handle_pubackcomp": ("self", "cmd"),
    "_update_inflight": ("self",),
    "_sock_close": ("self",),
    "_sock_recv": ("self", "bufsize"),
    "loop_read": ("self", "max_packets"),
    "_do_on_publish": ("self", "mid", "reason_code", "properties"),
    "_sock_send": ("self", "buf"),
    "_call_socket_register_write": ("self",),
    "_easy_log": ("self", "level", "fmt", "*args"),
}
# attributes of a paho client LeanClient reads or writes, and what they hold
_ATTRIBUTES = {"_out_packet": collections.deque, "_out_messages": dict, "_inflight_messages": int,
               "_in_packet": dict, "_on_message_filtered": MQTTMatcher}
_PRESENT = ("_sockpairW", "_thread", "_sock", "_last_msg_out", "_out_message_mutex", "_msgtime_mutex")
_MODULE_NAMES = ("time_func", "DISCONNECT", "PUBLISH", "PINGREQ", "MQTT_ERR_SUCCESS", "MQTT_ERR_AGAIN",
                 "MQTT_ERR_CONN_LOST", "MQTT_LOG_ERR", "MQTT_LOG_DEBUG")
# the record paho's _packet_queue appends to _out_packet, which LeanClient builds and reads itself
_PACKET_KEYS = {"command", "mid", "qos", "pos", "to_process", "packet", "info"}


def _parameters(fn) -> tuple[str, ...]:
    return tuple(("*" if p.kind is p.VAR_POSITIONAL else "**" if p.kind is p.VAR_KEYWORD else "") + p.name
                 for p in inspect.signature(fn).parameters.values())


def internals_mismatch(base: type = paho.Client, version: str | None = None) -> list[str]:
    """What differs between ``base`` (paho's client class) and the internals LeanClient overrides;
    empty when LeanClient may be used.  ``version`` defaults to the installed paho's."""
    version = paho_package.__version__ if version is None else version
    problems = []
    try:
        major_minor = tuple(int(x) for x in version.split(".")[:2])
    except ValueError:
        major_minor = ()
    if major_minor not in READ_AGAINST:
        problems.append(f"version {version} (read against "
                        f"{', '.join('.'.join(map(str, v)) for v in READ_AGAINST)})")
    for name, want in _METHODS.items():
        fn = getattr(base, name, None)
        if not callable(fn):
            problems.append(f"no {name}()")
            continue
        try:
            got = _parameters(fn)
        except (TypeError, ValueError):
            got = ("?",)
        if got != want:
            problems.append(f"{name}({', '.join(got[1:])}) instead of {name}({', '.join(want[1:])})")
    missing = [n for n in _MODULE_NAMES if not hasattr(paho, n)]
    if missing:
        problems.append(f"paho.mqtt.client lacks {', '.join(missing)}")
    if problems:
        return problems
    # A throwaway client, never connected: its attributes, and the record _packet_queue appends
    # (with no socket and no network thread, paho's loop_write returns at once).
    try:
        c = base(CallbackAPIVersion.VERSION2)
        for name, kind in _ATTRIBUTES.items():
            if not isinstance(getattr(c, name, None), kind):
                problems.append(f"client.{name} is not a {kind.__name__}")
        problems += [f"no client.{n}" for n in _PRESENT if not hasattr(c, n)]
        root = getattr(getattr(c, "_on_message_filtered", None), "_root", None)
        if not (hasattr(root, "_children") and hasattr(root, "_content")):
            problems.append("the topic matcher has no _root._children/_content")
        if not problems:
            base._packet_queue(c, paho.PINGREQ, bytearray(b"\xc0\x00"), 0, 0)
            queued = c._out_packet[-1] if c._out_packet else {}
            if not isinstance(queued, dict) or set(queued) != _PACKET_KEYS:
                problems.append(f"queued packets are {sorted(queued) if isinstance(queued, dict) else queued!r}, "
                                f"not {sorted(_PACKET_KEYS)}")
    except Exception as exc:          # any surprise in paho's internals means: do not tune it
        problems.append(f"a bare client failed the check ({type(exc).__name__}: {exc})")
    return problems


@functools.lru_cache(maxsize=None)
def client_class() -> type[PlainClient]:
    """LeanClient when the installed paho is the one it was written against, else PlainClient (said once)."""
    problems = internals_mismatch()
    if not problems:
        return LeanClient
    log.warning("paho-mqtt %s: its internals differ from those edgesplit tunes (%s); using paho's own "
                "client: the same messages, more CPU per message", paho_package.__version__, "; ".join(problems))
    return PlainClient
