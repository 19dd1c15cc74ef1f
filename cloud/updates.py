"""A worker's side of bundle updates: announced tails loaded without a restart, idle ones dropped.

With the fleet's public key (``edgesplit cloud --fleet-key fleet.pub``) a worker follows the same
signed announcements as the devices (the fleet's and every device's ``announce`` topic, so a
canary's bundle too).  For each bundle an announcement names (the new one and the one it
replaces) that the worker does not serve, it fetches the ``.tar.gz`` from the chunk topics or
the URL (``protocol.transfer``), checks every sha256, unpacks it into its cache
(``<cache>/<bundle-id>/``, shared by the workers of a host), runs the tail's self-test
(``runtime.probe``) and serves it beside the others: old and new bundle ids side by side
through a rollout.

A device may switch before a worker is ready: a frame naming a bundle that is announced but
not loaded yet is held (in memory, bounded) and answered once it is, rather than dead-lettered;
one whose bundle cannot be loaded is dead-lettered (``unknown-bundle``, with why) after the
load failed or ``park_s`` seconds.  (Frames from a NATS source are not held: they are
dead-lettered, and the device re-sends.)  A tail no frame has named for ``idle_s`` seconds is
dropped from memory, unless it is the fleet's current bundle; its files stay in the cache and a
frame naming it loads it again.
"""
from __future__ import annotations

import logging
import os
import queue
import shutil
import threading
import time
from pathlib import Path
from typing import NamedTuple

from protocol import announce, topics, transfer
from protocol.errors import BundleError, EdgesplitError, UpdateError, UpdateReason
from protocol.manifest import load_bundle

log = logging.getLogger(__name__)

__all__ = ["BundleFollower", "Parked", "GiveUp", "DEFAULT_IDLE_S"]

DEFAULT_IDLE_S = 3600.0
DEFAULT_PARK_S = 120.0
MAX_PARKED = 10_000


class Parked(NamedTuple):
    """A frame held until its bundle is loaded, already decoded and checked (``cloud.worker``)."""

    item: object
    where: object
    reply: str
    frame: object
    since: float


class GiveUp(NamedTuple):
    """A held frame whose bundle did not come: the worker dead-letters it (``unknown-bundle``, ``why``)."""

    item: object
    where: object
    why: str


class BundleFollower:
    """Follows a fleet's announcements for one :class:`~cloud.worker.Worker` (see the module docstring)."""

    def __init__(self, worker, keys, *, cache_dir: str | os.PathLike, fleet: str = "+",
                 idle_s: float = DEFAULT_IDLE_S, park_s: float = DEFAULT_PARK_S):
        self.worker = worker
        keys = keys if isinstance(keys, (list, tuple)) else [keys]
        self.keys = [k if isinstance(k, announce.VerifyKey) else announce.load_verify_key(k) for k in keys]
        self.cache = Path(cache_dir)
        self.fleet = fleet
        self.idle_s, self.park_s = idle_s, park_s
        self._inbox: queue.Queue = queue.Queue()
        self._coming: dict[str, tuple[str, announce.BundleRef | None]] = {}   # bundle id -> (fleet, ref)
        self._failed: dict[str, str] = {}                    # bundle id -> why it could not be loaded
        self._current: dict[str, str] = {}                   # fleet -> its announced bundle (never dropped)
        self._parked: dict[str, list[Parked]] = {}
        self._dropped: dict = {}                             # bundle id -> the Bundle whose tail was dropped
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.loaded = 0
        self.dropped = 0
        fl = "+" if fleet == "+" else topics.check_id(fleet, "fleet id")
        worker.client.subscribe(f"{topics.PREFIX}/{fl}/{topics.ANNOUNCE}", self._on_announce, qos=1)
        worker.client.subscribe(f"{topics.PREFIX}/{fl}/+/{topics.ANNOUNCE}", self._on_announce, qos=1)

    # ------------------------------------------------------------- lifecycle
    def start(self) -> None:
        self.cache.mkdir(parents=True, exist_ok=True)
        self._thread = threading.Thread(target=self._run, name=f"updates-{self.worker.name}", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(10)
        with self._lock:
            parked, self._parked = self._parked, {}
        for bid, rows in parked.items():
            self._give_up(rows, f"bundle {bid} was still loading when the worker stopped")

    # ------------------------------------------------------------- threads of the worker
    def _on_announce(self, topic: str, payload: bytes) -> None:
        self._inbox.put((topic, payload))

    def park(self, parked: Parked) -> bool:
        """Hold a frame whose bundle is announced (or cached) but not loaded; False: dead-letter it."""
        bid = parked.frame.bundle_id
        if getattr(parked.item, "token", None) is not None:
            return False
        with self._lock:
            if bid in self._failed or not (bid in self._coming or bid in self._dropped
                                           or (self.cache / bid).is_dir()):
                return False
            rows = self._parked.setdefault(bid, [])
            if sum(len(v) for v in self._parked.values()) >= MAX_PARKED:
                return False
            rows.append(parked)
            self._coming.setdefault(bid, ("", None))            # a cached one: load it again
        return True

    def why_not(self, bundle_id: str) -> str | None:
        """Why an announced bundle is not served here (for the dead letter), or None."""
        return self._failed.get(bundle_id)

    # ------------------------------------------------------------- the follower's thread
    def _run(self) -> None:
        last_sweep = time.monotonic()
        while not self._stop.is_set():
            try:
                topic, payload = self._inbox.get(timeout=0.25)
                self._consider(topic, payload)
            except queue.Empty:
                pass
            with self._lock:
                todo = [(bid, v) for bid, v in self._coming.items() if self.worker.registry.get(bid) is None]
            for bid, (fleet, ref) in todo:
                self._load(bid, fleet, ref)
            if time.monotonic() - last_sweep >= min(5.0, self.idle_s / 4):
                last_sweep = time.monotonic()
                self._sweep()

    def _consider(self, topic: str, payload: bytes) -> None:
        if not payload:
            return
        fleet = topic.split("/")[2]
        try:
            ann = announce.decode(payload, self.keys, fleet=fleet)
        except UpdateError as exc:
            log.warning("worker %s: refused an announcement on %s: %s", self.worker.name, topic, exc.message)
            return
        if ann.devices is None:
            self._current[fleet] = ann.bundle_id
        with self._lock:
            for bid, ref in ((ann.bundle_id, ann.bundle), (ann.previous_id, ann.previous)):
                if bid and self.worker.registry.get(bid) is None and bid not in self._coming:
                    self._failed.pop(bid, None)
                    self._coming[bid] = (fleet, ref)
                    log.info("worker %s: bundle %s announced in fleet %s; loading it", self.worker.name, bid, fleet)

    def _load(self, bid: str, fleet: str, ref) -> None:
        from runtime.probe import check_tail

        reg = self.worker.registry
        try:
            bundle = self._dropped.pop(bid, None) or self._fetch(bid, fleet, ref)
            if bundle is None:
                return
            tail = reg.open_tail(bundle)
            result = check_tail(tail, bundle)
            if not result.ok:
                raise UpdateError(UpdateReason.SELF_TEST, result.message)
            reg.add(bundle, tail)
            self.loaded += 1
        except (EdgesplitError, OSError) as exc:
            why = getattr(exc, "message", str(exc))
            log.error("worker %s: cannot serve bundle %s: %s", self.worker.name, bid, why)
            with self._lock:
                self._failed[bid] = why
                self._coming.pop(bid, None)
                rows = self._parked.pop(bid, [])
            self._give_up(rows, f"bundle {bid} could not be loaded here: {why}")
            return
        with self._lock:
            self._coming.pop(bid, None)
            rows = self._parked.pop(bid, [])
        log.info("worker %s: serving bundle %s (%d held frame(s) released)", self.worker.name, bid, len(rows))
        for r in rows:
            self.worker.batcher.put(r)

    def _fetch(self, bid: str, fleet: str, ref):
        dest = self.cache / bid
        if dest.is_dir():
            try:
                return load_bundle(dest)
            except BundleError as exc:
                log.warning("worker %s: the cached copy of %s is broken (%s)", self.worker.name, bid, exc.message)
                shutil.rmtree(dest, ignore_errors=True)
        if ref is None:
            raise UpdateError(UpdateReason.NOT_HELD, f"bundle {bid} is named but not announced with a way to fetch it")
        part = transfer.PartFile(ref, self.cache / "incoming" / self.worker.name)
        tarball = transfer.fetch(self.worker.client, fleet, part, stop=self._stop)
        if tarball is None:
            return None
        staged = self.cache / f".{bid}.{os.getpid()}.{threading.get_ident()}"
        try:
            load_bundle(tarball, extract_to=staged)          # safe extraction, every sha256 checked
            try:
                os.replace(staged, dest)                     # another worker of this host may have won
            except OSError:
                shutil.rmtree(staged, ignore_errors=True)
        finally:
            part.discard()
            shutil.rmtree(staged, ignore_errors=True)
        return load_bundle(dest)

    def _sweep(self) -> None:
        now = time.monotonic()
        keep = set(self._current.values())
        reg = self.worker.registry
        for bid in reg.ids:
            served = reg.get(bid)
            if served is None or bid in keep or len(reg) <= 1:
                continue
            if now - served.last_used >= self.idle_s:
                reg.remove(bid)
                self._dropped[bid] = served.bundle          # its files stay: a frame naming it loads it again
                self.dropped += 1
                log.info("worker %s: dropped the tail of bundle %s (no frame for %.0f s)", self.worker.name, bid,
                         now - served.last_used)
        late: list[Parked] = []
        with self._lock:
            for bid in list(self._parked):
                rows = self._parked.pop(bid)
                late += [r for r in rows if now - r.since >= self.park_s]
                if any(now - r.since < self.park_s for r in rows):
                    self._parked[bid] = [r for r in rows if now - r.since < self.park_s]
        for r in late:
            self._give_up([r], f"bundle {r.frame.bundle_id} was not loaded within {self.park_s:g} s")

    def _give_up(self, rows: list[Parked], why: str) -> None:
        for r in rows:          # dead-lettered on the batch thread, which owns the worker's publishing
            self.worker.batcher.put(GiveUp(r.item, r.where, why))
