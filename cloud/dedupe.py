"""Exactly-once answers: recognise a re-sent request by (device id, request id).

A device re-sends a request it has no answer for — after a reconnect, after
``resend_after`` seconds, or from its outbox after a restart — as a *new* frame
(new sequence number and send time, same request id).  The worker must not run
the tail twice for it, and the device must still get its answer.  The window
remembers every request it has seen, bounded in size and age (an
``OrderedDict``, oldest first out), and for a request whose answer went out it
keeps the answer's topic and payload (a result frame is ~100 bytes).

The rule for a duplicate (see :meth:`DedupeWindow.check`):

* the original is still being served (same batch) → **drop** it: the answer
  about to be published is the one the device waits for;
* the answer was published *before* the duplicate arrived → **re-publish the
  same answer**: the device re-sent because it never got it (a broker restart
  without persistence, a clean-session device that was offline), so dropping
  it would leave the request unanswered for ever;
* the answer was published *after* the duplicate arrived → **drop** it: that
  answer left after the device's re-send, so the device gets it (or, if it is
  lost too, re-sends again and lands in the case above).

An error result (the tail failed) is an answer like any other: a re-send gets
it again rather than a second run.  Every request therefore gets an answer; a
device sees the same answer at most a few times and ignores all but the first
(``device.agent`` keeps answered ids), so every request is answered exactly
once *at the device*.  The window
is per worker process: a re-send that the broker hands to another worker of
the shared subscription is run again there (the device still ignores the
second answer).  A request forgotten by the window (older than ``max_age_s``
or pushed out by ``max_entries`` newer ones) is served again as new.
"""
from __future__ import annotations

import dataclasses
import enum
import logging
import threading
import time
from collections import OrderedDict
from typing import Callable

log = logging.getLogger(__name__)

__all__ = ["DedupeWindow", "Verdict", "DedupeStats"]

DEFAULT_MAX_ENTRIES = 100_000    # ~30 MB at worst (a key, an entry and a ~100-byte result each)
DEFAULT_MAX_AGE_S = 600.0        # well beyond a device's re-send interval and timeout


class Verdict(enum.Enum):
    NEW = "new"                  # serve it
    IN_FLIGHT = "in-flight"      # duplicate of a request being served: drop
    ANSWERED = "answered"        # duplicate that arrived after the answer went out: re-publish it
    OVERTAKEN = "overtaken"      # duplicate whose answer went out after it arrived: drop


@dataclasses.dataclass
class DedupeStats:
    new: int = 0
    in_flight: int = 0           # duplicates dropped while the original was being served
    republished: int = 0         # duplicates answered again with the stored answer
    overtaken: int = 0           # duplicates dropped because the answer left after they arrived
    forgotten: int = 0           # entries pushed out by the size bound (age expiry is not counted)

    @property
    def duplicates(self) -> int:
        return self.in_flight + self.republished + self.overtaken


class _Entry:
    __slots__ = ("seen_us", "answered_us", "topic", "payload")

    def __init__(self, seen_us: int):
        self.seen_us = seen_us           # when the first copy arrived (wall clock, µs)
        self.answered_us: int | None = None
        self.topic: str | None = None
        self.payload: bytes | None = None


class DedupeWindow:
    """Requests seen in the last ``max_age_s`` seconds, at most ``max_entries`` of them.

    ``check(device, request_id, t_recv_us)`` → a :class:`Verdict` (and the stored
    answer for ``ANSWERED``); ``answered(device, request_id, topic, payload)``
    records the answer once it is published; ``forget`` drops a request that
    could not be served, so its re-send is tried again.  Thread-safe.
    ``clock`` returns wall-clock µs (the clock frames' receive times use).
    """

    def __init__(self, max_entries: int = DEFAULT_MAX_ENTRIES, max_age_s: float = DEFAULT_MAX_AGE_S,
                 clock: Callable[[], int] | None = None):
        if max_entries < 1 or not max_age_s > 0:
            raise ValueError(f"DedupeWindow needs max_entries >= 1 and max_age_s > 0, got {max_entries}, "
                             f"{max_age_s}")
        self.max_entries = int(max_entries)
        self.max_age_us = int(max_age_s * 1_000_000)
        self._clock = clock or (lambda: time.time_ns() // 1000)
        self._entries: OrderedDict[tuple[str, int], _Entry] = OrderedDict()
        self._lock = threading.Lock()
        self.stats = DedupeStats()

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: object) -> bool:
        return key in self._entries

    def check(self, device_id: str, request_id: int, t_recv_us: int | None = None
              ) -> tuple[Verdict, tuple[str, bytes] | None]:
        """Is this frame a request seen before?  ``t_recv_us``: when it arrived (default now).

        Returns ``(verdict, (topic, payload))`` — the stored answer only for ``ANSWERED``.
        A ``NEW`` request is remembered from now on (as being served).
        """
        now = self._clock()
        t = now if t_recv_us is None else int(t_recv_us)
        key = (device_id, int(request_id))
        with self._lock:
            self._expire(now)
            e = self._entries.get(key)
            if e is None:
                self._entries[key] = _Entry(t)
                self.stats.new += 1
                while len(self._entries) > self.max_entries:
                    self._entries.popitem(last=False)
                    self.stats.forgotten += 1
                return Verdict.NEW, None
            # Not moved to the end: age counts from the first copy, so a device that keeps
            # re-sending cannot keep an entry (and its stored answer) alive for ever.
            if e.answered_us is None:
                self.stats.in_flight += 1
                return Verdict.IN_FLIGHT, None
            if t >= e.answered_us:
                self.stats.republished += 1
                return Verdict.ANSWERED, (e.topic, e.payload)
            self.stats.overtaken += 1
            return Verdict.OVERTAKEN, None

    def answered(self, device_id: str, request_id: int, topic: str, payload: bytes,
                 at_us: int | None = None) -> None:
        """Record the answer published for a request (``at_us``: when, default now)."""
        key = (device_id, int(request_id))
        with self._lock:
            e = self._entries.get(key)
            if e is None:                 # forgotten meanwhile (tiny window): remember it again
                e = self._entries[key] = _Entry(self._clock())
            e.answered_us = self._clock() if at_us is None else int(at_us)
            e.topic, e.payload = topic, bytes(payload)

    def forget(self, device_id: str, request_id: int) -> None:
        """Drop a request (it could not be served): its next copy is treated as new."""
        with self._lock:
            self._entries.pop((device_id, int(request_id)), None)

    def _expire(self, now: int) -> None:
        oldest = now - self.max_age_us
        entries = self._entries
        while entries:
            e = next(iter(entries.values()))
            if e.seen_us >= oldest:
                break
            entries.popitem(last=False)
