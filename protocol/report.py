"""What a device says about itself on its retained ``report`` topic (JSON): the bundle it runs, the
state of its last update, and its counters.  ``edgesplit fleet status`` and staged rollouts read it.

``state`` is one of::

    active        running ``bundle`` (``healthy`` once its first answers came back right)
    updating      fetching, checking or self-testing ``target`` (``progress`` 0..1)
    rolled-back   went back to ``bundle`` from ``target`` (``reason``: an ``UpdateReason`` code)
    refused       stayed on ``bundle``, refused ``target`` (``reason``)

and :meth:`DeviceReport.line` writes it as people read it: ``active 3f9c…``,
``updating 3f9c… 40 %``, ``rolled-back self-test: …``.  Availability (online / stopped /
offline, with the last will) stays on the ``status`` topic.
"""
from __future__ import annotations

from typing import Literal, Optional

import msgspec

__all__ = ["DeviceReport", "encode_report", "decode_report", "STATES"]

VERSION = 1
STATES = ("active", "updating", "rolled-back", "refused")


class DeviceReport(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    device: str
    time_us: int
    bundle: str                          # the active bundle
    state: Literal["active", "updating", "rolled-back", "refused"] = "active"
    healthy: bool = True                 # the active bundle left its probation (or never had one)
    target: str = ""                     # the bundle being fetched, refused or rolled back from
    reason: str = ""                     # UpdateReason code
    detail: str = ""                     # the message for people
    progress: Optional[float] = None     # of a download, 0..1
    previous: str = ""                   # the bundle kept for a rollback
    seq: int = 0                         # the announcement acted on last
    requests: int = 0                    # since the agent started
    answered: int = 0                    # answered without error
    errors: int = 0                      # error answers, timeouts, dead letters of its own frames
    dead_letters: int = 0
    outbox: int = 0                      # inputs kept for a resend
    in_flight: int = 0
    connects: int = 0
    rate_per_s: float = 0.0              # answers per second since the last report
    p95_ms: Optional[float] = None       # since the last report
    interval_s: float = 0.0              # seconds between reports (a late report means trouble)
    v: int = VERSION

    def line(self) -> str:
        """The state as one short phrase."""
        if self.state == "active":
            return f"active {self.bundle}" + ("" if self.healthy else " (probation)")
        if self.state == "updating":
            pct = f" {100 * self.progress:.0f} %" if self.progress is not None else ""
            return f"updating {self.target}{pct}"
        return f"{self.state} {self.reason}: {self.detail}" if self.detail else f"{self.state} {self.reason}"


_encoder = msgspec.json.Encoder()
_decoder = msgspec.json.Decoder(DeviceReport)


def encode_report(report: DeviceReport) -> bytes:
    return _encoder.encode(report)


def decode_report(payload: bytes) -> DeviceReport | None:
    """The report, or None for a payload that is not one (an empty retained clear, another version)."""
    try:
        return _decoder.decode(payload)
    except (msgspec.MsgspecError, ValueError):
        return None
