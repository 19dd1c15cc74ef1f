"""The fleet as its retained topics tell it: every device's availability and report, the announcements.

One MQTT client subscribes to the fleet's ``status``, ``report``, ``dead-letter`` and ``announce``
topics; the broker hands it every retained one at once, and the rest as it comes.
:meth:`FleetView.table` is what ``edgesplit fleet status`` prints::

    device   status   state        bundle            last seen  outbox  req/s  p95 ms  errors  note
    pi-001   online   active       3f9c1a2b4c5d6e7f  1 s        0        4.0    11.9       0
    pi-002   online   updating     5e6f7a8b9c0d1e2f  0 s        0        3.9    12.4       0  40 %
    pi-003   offline  rolled-back  3f9c1a2b4c5d6e7f  5 min      12       0.0       -       3  self-test: ...
"""
from __future__ import annotations

import dataclasses
import threading
import time

from protocol import announce, topics
from protocol.errors import EdgesplitError
from protocol.report import DeviceReport, decode_report

__all__ = ["FleetView", "DeviceView"]


@dataclasses.dataclass
class DeviceView:
    device: str
    status: str = "?"                     # online / stopped / offline (the retained status)
    report: DeviceReport | None = None
    dead_letters: int = 0                 # seen by this view since it started
    dead_letter_reasons: dict = dataclasses.field(default_factory=dict)

    @property
    def bundle(self) -> str:
        return self.report.bundle if self.report else ""

    def age_s(self, now_us: int | None = None) -> float | None:
        if self.report is None:
            return None
        now_us = time.time_ns() // 1000 if now_us is None else now_us
        return max(0.0, (now_us - self.report.time_us) / 1e6)

    def to_dict(self) -> dict:
        return {"device": self.device, "status": self.status, "dead_letters_seen": self.dead_letters,
                "report": None if self.report is None else {f: getattr(self.report, f)
                                                            for f in self.report.__struct_fields__}}


def _age(s: float | None) -> str:
    if s is None:
        return "never"
    if s < 120:
        return f"{s:.0f} s"
    if s < 7200:
        return f"{s / 60:.0f} min"
    return f"{s / 3600:.0f} h" if s < 172800 else f"{s / 86400:.0f} d"


class FleetView:
    """The fleet ``fleet`` as ``client`` (an unstarted or started MqttClient) hears it."""

    def __init__(self, client, fleet: str, keys=()):
        self.client, self.fleet = client, topics.check_id(fleet, "fleet id")
        self.keys = list(keys)
        self.devices: dict[str, DeviceView] = {}
        self.announcements: dict[str, announce.Announcement] = {}     # topic -> the retained announcement
        self._lock = threading.Lock()
        self._last_message = time.monotonic()
        self.changed = threading.Condition(self._lock)
        for kind, handler in ((topics.STATUS, self._on_status), (topics.REPORT, self._on_report),
                              (topics.DEAD_LETTER, self._on_dead_letter), (topics.ANNOUNCE, self._on_announce)):
            client.subscribe(topics.all_of(kind, self.fleet), handler, qos=1)
        client.subscribe(topics.fleet_announce(self.fleet), self._on_announce, qos=1)

    def _device(self, topic: str) -> DeviceView:
        dev = topic.split("/")[3]
        return self.devices.setdefault(dev, DeviceView(dev))

    def _touch(self) -> None:
        self._last_message = time.monotonic()
        self.changed.notify_all()

    def _on_status(self, topic: str, payload: bytes) -> None:
        with self._lock:
            if payload:
                self._device(topic).status = payload.decode("utf-8", "replace")[:16]
            self._touch()

    def _on_report(self, topic: str, payload: bytes) -> None:
        rep = decode_report(payload)
        with self._lock:
            if rep is not None:
                self._device(topic).report = rep
            self._touch()

    def _on_dead_letter(self, topic: str, payload: bytes) -> None:
        try:
            reason = topics.decode_dead_letter(payload).reason
        except EdgesplitError:
            reason = "?"
        with self._lock:
            d = self._device(topic)
            d.dead_letters += 1
            d.dead_letter_reasons[reason] = d.dead_letter_reasons.get(reason, 0) + 1
            self._touch()

    def _on_announce(self, topic: str, payload: bytes) -> None:
        with self._lock:
            if not payload:
                self.announcements.pop(topic, None)
            elif self.keys:
                try:
                    self.announcements[topic] = announce.decode(payload, self.keys, fleet=self.fleet)
                except EdgesplitError:
                    pass
            self._touch()

    # ------------------------------------------------------------- reading
    def settle(self, quiet: float = 0.5, timeout: float = 5.0) -> None:
        """Wait until the retained messages are in: nothing new for ``quiet`` s (at most ``timeout``)."""
        deadline = time.monotonic() + timeout
        self.client.wait_connected(timeout)
        while time.monotonic() < deadline and time.monotonic() - self._last_message < quiet:
            time.sleep(0.05)

    def wait(self, predicate, timeout: float) -> bool:
        """Wait (woken by every message) until ``predicate(view)`` holds; False after ``timeout`` s."""
        deadline = time.monotonic() + timeout
        with self._lock:
            while not predicate(self):
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self.changed.wait(min(left, 1.0))
        return True

    def newest(self) -> announce.Announcement | None:
        """The announcement with the highest seq, fleet-wide or per device."""
        anns = list(self.announcements.values())
        return max(anns, key=lambda a: a.seq) if anns else None

    def fleet_announcement(self) -> announce.Announcement | None:
        return self.announcements.get(topics.fleet_announce(self.fleet))

    def reported(self) -> list[DeviceView]:
        """Devices that have said anything (status or report), by id."""
        return [self.devices[k] for k in sorted(self.devices)]

    def table(self, now_us: int | None = None) -> str:
        rows = [("device", "status", "state", "bundle", "last seen", "outbox", "req/s", "p95 ms", "errors", "note")]
        for d in self.reported():
            r = d.report
            if r is None:
                rows.append((d.device, d.status, "-", "-", "never", "-", "-", "-", "-", "no report yet"))
                continue
            note = ""
            if r.state == "updating":
                note = (f"{100 * r.progress:.0f} % " if r.progress is not None else "") + (r.detail or "")
            elif r.state in ("refused", "rolled-back"):
                note = f"{r.target}: {r.reason}: {r.detail}"
            elif not r.healthy:
                note = "probation"
            if d.dead_letter_reasons:
                note += ("; " if note else "") + "dead letters " + ", ".join(
                    f"{k} {v}" for k, v in sorted(d.dead_letter_reasons.items()))
            rows.append((d.device, d.status, r.state, r.bundle, _age(d.age_s(now_us)), str(r.outbox),
                         f"{r.rate_per_s:.1f}", "-" if r.p95_ms is None else f"{r.p95_ms:.1f}", str(r.errors),
                         note[:90]))
        widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
        right = {5, 6, 7, 8}
        lines = ["  ".join(c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths)))
                 .rstrip() for row in rows]
        ann = self.newest()
        head = [f"fleet {self.fleet}: {len(rows) - 1} device(s)"
                + (f"; announced {ann.bundle_id} (seq {ann.seq}, {ann.action}"
                   + (f", to {', '.join(ann.devices)}" if ann.devices else ", to every device") + ")" if ann else "")]
        return "\n".join(head + lines)

    def to_dict(self) -> dict:
        ann = self.newest()
        return {"fleet": self.fleet, "announced": None if ann is None else {
                    "bundle_id": ann.bundle_id, "seq": ann.seq, "action": ann.action, "devices": ann.devices,
                    "previous_id": ann.previous_id},
                "devices": [d.to_dict() for d in self.reported()]}
