"""MQTT topic names, their QoS/retain rules, and the dead-letter message.

Every topic is versioned and per device::

    edgesplit/v1/<fleet>/<device>/features      device -> cloud, QoS 1, never retained
    edgesplit/v1/<fleet>/<device>/results       cloud -> device, QoS 1, never retained
    edgesplit/v1/<fleet>/<device>/status        device (and its last will), QoS 1, retained
    edgesplit/v1/<fleet>/<device>/dead-letter   cloud -> operators (and the device), QoS 1, never retained
    edgesplit/v1/<fleet>/<device>/report        device -> operators: update state and counters, QoS 1, retained
    edgesplit/v1/<fleet>/<device>/announce      operator -> one device: a signed bundle announcement, retained

A fleet's own topics have four or six levels, so no device filter (five levels) matches them::

    edgesplit/v1/<fleet>/announce               operator -> the whole fleet, signed, QoS 1, retained
    edgesplit/v1/<fleet>/bundle/<bundle-id>/<n> chunk n of a bundle's .tar.gz, QoS 1, retained

Cloud workers share one subscription, ``$share/<group>/edgesplit/v1/<fleet>/+/features``,
so the broker spreads the devices' frames over them.  A tensor or result topic
is never retained: a retained tensor would hand the last private input to every
late subscriber.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import NamedTuple

import msgspec

from protocol.errors import TopicError

log = logging.getLogger(__name__)

ROOT = "edgesplit"
VERSION = "v1"
PREFIX = f"{ROOT}/{VERSION}"

FEATURES = "features"
RESULTS = "results"
STATUS = "status"
DEAD_LETTER = "dead-letter"
REPORT = "report"
ANNOUNCE = "announce"
KINDS = (FEATURES, RESULTS, STATUS, DEAD_LETTER, REPORT, ANNOUNCE)
CHUNK = "bundle"        # the fleet-level folder of bundle chunks

# Three-valued availability, as Frigate does it: "online" after connect and
# every reconnect, "stopped" on a clean exit, "offline" as the retained will.
STATUS_ONLINE = "online"
STATUS_STOPPED = "stopped"
STATUS_OFFLINE = "offline"
STATUS_VALUES = (STATUS_ONLINE, STATUS_STOPPED, STATUS_OFFLINE)

MAX_ID_CHARS = 64
# Characters MQTT gives a meaning to ('+', '#', '/'), NUL, and ':' which
# mosquitto's password file uses as its separator (device ids become user names).
_FORBIDDEN = {"+": "a wildcard", "#": "a wildcard", "/": "the level separator",
              "\x00": "NUL", ":": "the password-file separator"}


@dataclass(frozen=True)
class Delivery:
    """How a kind of message is published: QoS and retain flag."""

    qos: int
    retain: bool


# The one place that says how each kind travels.
DELIVERY = {
    FEATURES: Delivery(qos=1, retain=False),
    RESULTS: Delivery(qos=1, retain=False),
    STATUS: Delivery(qos=1, retain=True),
    DEAD_LETTER: Delivery(qos=1, retain=False),
    REPORT: Delivery(qos=1, retain=True),
    ANNOUNCE: Delivery(qos=1, retain=True),
    CHUNK: Delivery(qos=1, retain=True),
}


def delivery(kind: str) -> Delivery:
    """QoS and retain flag for a topic kind (``features``, ``results``, ``status``, ``dead-letter``)."""
    try:
        return DELIVERY[kind]
    except KeyError:
        raise TopicError(f"unknown topic kind {kind!r}", fix=f"use one of {', '.join(KINDS)}") from None


def check_id(value: object, what: str = "device id") -> str:
    """Return ``value`` if it is a valid fleet/device/group id, else raise TopicError.

    Valid: a non-empty str of at most 64 printable characters with no
    whitespace and none of ``+ # / :`` (nor NUL).
    """
    if not isinstance(value, str):
        raise TopicError(f"{what} must be a string, got {type(value).__name__}",
                         fix=f"pass the {what} as text, e.g. 'pi-01'")
    if not value:
        raise TopicError(f"{what} is empty", fix=f"give a {what} such as 'pi-01'")
    if len(value) > MAX_ID_CHARS:
        raise TopicError(f"{what} {value[:20]!r}... is {len(value)} characters long, the limit is {MAX_ID_CHARS}",
                         fix=f"use a shorter {what}")
    for ch in value:
        if ch in _FORBIDDEN:
            raise TopicError(f"{what} {value!r} contains {ch!r} ({_FORBIDDEN[ch]})",
                             fix=f"use letters, digits, '-', '_' or '.' in the {what}")
        if ch.isspace() or not ch.isprintable():
            raise TopicError(f"{what} {value!r} contains whitespace or the unprintable character {ch!r}",
                             fix=f"use letters, digits, '-', '_' or '.' in the {what}")
    return value


def topic(fleet: str, device: str, kind: str) -> str:
    """``edgesplit/v1/<fleet>/<device>/<kind>`` with both ids validated."""
    if kind not in KINDS:
        raise TopicError(f"unknown topic kind {kind!r}", fix=f"use one of {', '.join(KINDS)}")
    return f"{PREFIX}/{check_id(fleet, 'fleet id')}/{check_id(device, 'device id')}/{kind}"


def features(fleet: str, device: str) -> str:
    """Topic a device publishes its feature frames on."""
    return topic(fleet, device, FEATURES)


def results(fleet: str, device: str) -> str:
    """Topic the cloud answers a device on."""
    return topic(fleet, device, RESULTS)


def status(fleet: str, device: str) -> str:
    """Retained availability topic of a device (also its last will)."""
    return topic(fleet, device, STATUS)


def dead_letter(fleet: str, device: str) -> str:
    """Topic where a worker puts the frames it rejected from ``device`` (see DeadLetter)."""
    return topic(fleet, device, DEAD_LETTER)


def report(fleet: str, device: str) -> str:
    """Retained topic where a device says its update state and counters (``protocol.report``)."""
    return topic(fleet, device, REPORT)


def device_announce(fleet: str, device: str) -> str:
    """Retained topic of the bundle announcements addressed to one device (canaries, ``--devices``)."""
    return topic(fleet, device, ANNOUNCE)


def fleet_announce(fleet: str) -> str:
    """``edgesplit/v1/<fleet>/announce``: the retained bundle announcement for the whole fleet."""
    return f"{PREFIX}/{check_id(fleet, 'fleet id')}/{ANNOUNCE}"


def chunk(fleet: str, bundle_id: str, index: int) -> str:
    """``edgesplit/v1/<fleet>/bundle/<bundle-id>/<index>``: one retained chunk of a bundle's .tar.gz."""
    if not isinstance(index, int) or index < 0:
        raise TopicError(f"chunk index {index!r} is not a whole number >= 0", fix="number chunks from 0")
    return f"{chunks_filter(fleet, bundle_id)[:-1]}{index}"


def chunks_filter(fleet: str, bundle_id: str = "+") -> str:
    """Filter for a bundle's chunks (``+``: every bundle's) in ``fleet``."""
    bundle_id = bundle_id if bundle_id == "+" else check_id(bundle_id, "bundle id")
    return f"{PREFIX}/{check_id(fleet, 'fleet id')}/{CHUNK}/{bundle_id}/+"


def _filter(fleet: str, kind: str) -> str:
    fleet = fleet if fleet == "+" else check_id(fleet, "fleet id")
    return f"{PREFIX}/{fleet}/+/{kind}"


def all_features(fleet: str = "+") -> str:
    """Plain (non-shared) filter for every device's features in ``fleet`` (``+``: every fleet)."""
    return _filter(fleet, FEATURES)


def all_dead_letters(fleet: str = "+") -> str:
    """Filter for every dead letter in ``fleet`` (``+``: every fleet)."""
    return _filter(fleet, DEAD_LETTER)


def all_of(kind: str, fleet: str = "+") -> str:
    """Filter for one kind of every device's topics in ``fleet`` (e.g. ``all_of(REPORT, "lab")``)."""
    if kind not in KINDS:
        raise TopicError(f"unknown topic kind {kind!r}", fix=f"use one of {', '.join(KINDS)}")
    return _filter(fleet, kind)


def shared_features(group: str, fleet: str = "+") -> str:
    """``$share/<group>/edgesplit/v1/<fleet>/+/features``: one subscription shared by a group of workers."""
    return f"$share/{check_id(group, 'share group')}/{_filter(fleet, FEATURES)}"


class Topic(NamedTuple):
    """A parsed topic name."""

    fleet: str
    device: str
    kind: str


def parse(name: str) -> Topic:
    """Split a concrete topic name into (fleet, device, kind); TopicError if it is not one of ours."""
    if not isinstance(name, str):
        raise TopicError(f"topic must be a string, got {type(name).__name__}", fix="pass the topic name as text")
    if name.startswith("$share/"):
        raise TopicError(f"{name!r} is a shared-subscription filter, not a topic name",
                         fix="parse the topic a message arrived on (message.topic)")
    parts = name.split("/")
    if len(parts) != 5 or parts[0] != ROOT:
        raise TopicError(f"{name!r} is not an edgesplit topic",
                         fix=f"expected {PREFIX}/<fleet>/<device>/<{'|'.join(KINDS)}>")
    if parts[1] != VERSION:
        raise TopicError(f"topic {name!r} is of protocol version {parts[1]!r}, this edgesplit speaks {VERSION!r}",
                         fix="run the same edgesplit version on devices and cloud")
    _, _, fleet, device, kind = parts
    if kind not in KINDS:
        raise TopicError(f"topic {name!r} ends in unknown kind {kind!r}", fix=f"use one of {', '.join(KINDS)}")
    return Topic(check_id(fleet, "fleet id"), check_id(device, "device id"), kind)


# --------------------------------------------------------------------------- dead letters

DEAD_LETTER_VERSION = 1
DEFAULT_PREFIX_BYTES = 256  # enough for any frame header; the private tensor mostly stays out


class DeadLetter(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """What a worker publishes on the dead-letter topic (JSON; bytes as base64).

    ``payload`` is only the first ``prefix_bytes`` of the rejected payload (enough
    to debug its header): the rest is a private tensor and stays out of the log.
    """

    reason: str                       # short code, e.g. "bad-mac", "replay", "unknown-bundle"
    topic: str                        # the topic the rejected payload arrived on
    payload_size: int                 # its full length in bytes
    payload: bytes                    # its first bytes (a bounded prefix)
    time_us: int                      # when it was rejected, microseconds since the epoch
    detail: str = ""                  # the decoder's message
    worker: str = ""                  # who rejected it
    v: int = DEAD_LETTER_VERSION

    @property
    def truncated(self) -> bool:
        return len(self.payload) < self.payload_size


_dl_encoder = msgspec.json.Encoder()
_dl_decoder = msgspec.json.Decoder(DeadLetter)


def encode_dead_letter(reason: str, topic: str, payload: bytes, *, detail: str = "", worker: str = "",
                       prefix_bytes: int = DEFAULT_PREFIX_BYTES, time_us: int | None = None) -> bytes:
    """JSON dead-letter message for a rejected ``payload`` that arrived on ``topic``."""
    view = memoryview(payload if payload is not None else b"").cast("B")
    letter = DeadLetter(reason=str(reason)[:64], topic=str(topic)[:1024], payload_size=view.nbytes,
                        payload=bytes(view[:max(0, int(prefix_bytes))]),
                        time_us=time.time_ns() // 1000 if time_us is None else int(time_us),
                        detail=str(detail)[:1024], worker=str(worker)[:128])
    return _dl_encoder.encode(letter)


def decode_dead_letter(data: bytes) -> DeadLetter:
    """Parse a dead-letter message; TopicError if it is not one."""
    try:
        return _dl_decoder.decode(data)
    except msgspec.MsgspecError as e:
        raise TopicError(f"not a dead-letter message: {e}", fix="read it with the same edgesplit version") from None
