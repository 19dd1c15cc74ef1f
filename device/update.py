"""Bundle updates over the air: signed announcements in, a checked and self-tested bundle switched to,
rolled back by itself when it does not answer right.

The :class:`Updater` rides on the agent's MQTT client.  It follows the fleet's and its own
device's retained ``announce`` topics and acts on the newest signed announcement (the highest
``seq``; one it acted on before is not acted on again, so a replay cannot take it back):

1. **fetch** the bundle's ``.tar.gz`` from the retained chunk topics or a URL, chunk by chunk,
   each checked against the announcement's sha256 and resumable (``protocol.transfer``);
2. **verify and unpack** it into a new directory: the archive's sha256, then every file's
   against the manifest and the announcement (``device.bundles.BundleStore.install``); refuse a
   bundle made for another input than the running one;
3. **self-test**: run the new head on the probe inputs stored in the manifest at convert time
   and compare with the expected features stored beside them (``runtime.probe``);
4. **switch** between two batches, on the agent's thread (requests already sent keep their
   bundle and are answered by its tail; the cloud serves both), keeping the previous bundle;
5. **probation**: the new bundle's first answers must come back right.  An error answer, a dead
   letter for one of its frames (the device reads its own dead-letter topic) or a timeout is a
   failure; ``max_errors`` failures before ``probation`` good answers roll the device back to
   the previous bundle by itself, and the inputs whose answers failed or were still pending are
   run again with it, so none is lost.  No failure for ``probation_seconds`` also ends a probation.

Every step is reported on the retained ``report`` topic (``protocol.report``): ``updating``,
``active <id>``, ``refused <reason>``, ``rolled-back <reason>``, with the counters
``edgesplit fleet status`` shows.  A refusal leaves the running bundle serving: nothing accepted
is lost.  A process killed at any step restarts on one complete bundle (``device.bundles``).

Never imports TensorFlow.
"""
from __future__ import annotations

import logging
import queue
import threading
import time

from device.bundles import BundleStore, failpoint
from protocol import announce, topics, transfer
from protocol.errors import BundleError, EdgesplitError, UpdateError, UpdateReason
from protocol.frame import now_us, peek_ids
from protocol.report import DeviceReport, encode_report
from protocol.stats import percentiles

log = logging.getLogger(__name__)

__all__ = ["Updater", "Probation"]


class Probation:
    """The first answers of a bundle just switched to: passed, failed or still running."""

    def __init__(self, bundle_id: str, *, answers: int, max_errors: int, seconds: float,
                 since: float | None = None):
        self.bundle_id = bundle_id
        self.answers, self.max_errors, self.seconds = answers, max_errors, seconds
        self.since = time.monotonic() if since is None else since
        self.ok = 0
        self.failures: list[str] = []

    def result(self, ok: bool, why: str = "") -> None:
        if ok:
            self.ok += 1
        else:
            self.failures.append(why)

    def verdict(self, now: float | None = None) -> str | None:
        """``"fail"``, ``"pass"`` or None (not yet)."""
        if len(self.failures) >= self.max_errors:
            return "fail"
        if self.ok >= self.answers:
            return "pass"
        if (time.monotonic() if now is None else now) - self.since >= self.seconds and not self.failures:
            return "pass"
        return None

    def why(self) -> str:
        shown = "; ".join(dict.fromkeys(f for f in self.failures if f))[:300]
        return f"{len(self.failures)} of its first {self.ok + len(self.failures)} answers failed ({shown})"


class Updater:
    """Takes bundle updates for one agent (see the module docstring).

    ``config``: a :class:`~device.config.DeviceConfig` (``probation``, ``max_errors``,
    ``probation_seconds``, ``download_stall``, ``report_interval``, ``threads``, ``interpreter``);
    ``store``: the opened :class:`BundleStore`; ``keys``: the fleet's public key(s).
    """

    def __init__(self, config, store: BundleStore, keys, *, window: int = transfer.DEFAULT_WINDOW):
        self.config = config
        self.device_id, self.fleet = config.device_id, config.fleet
        self.store = store
        self.keys = keys if isinstance(keys, list) else [keys]
        self.window = window
        self.agent = None
        self._inbox: queue.Queue = queue.Queue()
        self._latest: dict[str, announce.Announcement] = {}     # topic -> newest valid announcement
        self._lock = threading.Lock()
        self._ready = None                  # (announcement, bundle, head) waiting for the agent's thread
        self._taken = threading.Event()
        self._rollback: str | None = None   # why the running probation failed
        self.probation: Probation | None = None
        self._previous = None               # (bundle, head) of the bundle before a switch, for a rollback
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._state = dict(state="active", target="", reason="", detail="", progress=None)
        self.dead_letters = 0
        self._last_report = (time.monotonic(), 0, 0)
        self._report_now = threading.Event()

    @property
    def state(self) -> str:
        """``active``, ``updating``, ``rolled-back`` or ``refused`` (``protocol.report``)."""
        return self._state["state"]

    # ------------------------------------------------------------- wiring
    def attach(self, agent) -> None:
        """Subscribe on the agent's client (before it starts) and resume a probation a restart cut short."""
        self.agent = agent
        c = agent.client
        c.subscribe(topics.fleet_announce(self.fleet), self._on_announce, qos=1)
        c.subscribe(topics.device_announce(self.fleet, self.device_id), self._on_announce, qos=1)
        c.subscribe(topics.dead_letter(self.fleet, self.device_id), self._on_dead_letter, qos=1)
        p = self.store.state.get("probation")
        if p and p.get("bundle") == agent.bundle.bundle_id:
            self.probation = self._new_probation(p["bundle"])
            log.info("update: bundle %s is still on probation after a restart", p["bundle"])

    def _new_probation(self, bundle_id: str) -> Probation:
        c = self.config
        return Probation(bundle_id, answers=c.probation, max_errors=c.max_errors, seconds=c.probation_seconds)

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="edgesplit-update", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(10)
        if self.agent is not None and self.agent.client.connected:
            self.publish_report().wait(2.0)

    # ------------------------------------------------------------- the network thread
    def _on_announce(self, topic: str, payload: bytes) -> None:
        self._inbox.put((topic, payload))

    def _on_dead_letter(self, topic: str, payload: bytes) -> None:
        try:
            letter = topics.decode_dead_letter(payload)
        except EdgesplitError:
            return
        ids = peek_ids(letter.payload)
        with self._lock:
            self.dead_letters += 1
            p = self.probation
            if p is not None and ids is not None and ids[2] == p.bundle_id:
                p.result(False, f"dead letter {letter.reason}")
                self._check_probation()

    # ------------------------------------------------------------- the agent's thread
    def holds(self, bundle_id: str) -> bool:
        """Is ``bundle_id`` on probation (its failed answers held, its inputs kept for a rollback)?"""
        p = self.probation
        return p is not None and p.bundle_id == bundle_id

    def observe(self, bundle_id: str, ok: bool, why: str = "") -> None:
        """An answer (or a timeout) for a request made with ``bundle_id``."""
        with self._lock:
            p = self.probation
            if p is not None and p.bundle_id == bundle_id:
                p.result(ok, why)
                self._check_probation()

    def _check_probation(self) -> None:
        p = self.probation
        if p is not None and self._rollback is None and p.verdict() == "fail":
            self._rollback = p.why()

    def maintain(self, agent) -> list:
        """Called by the agent between batches: switch to a ready bundle, end a probation, roll back.
        Returns results to hand out (held answers released, inputs that could not be run again)."""
        out = []
        cand = self._ready
        if cand is not None:
            self._ready = None
            self._switch(agent, *cand)
            self._taken.set()
        p = self.probation
        if p is not None:
            with self._lock:
                self._check_probation()
                why, verdict = self._rollback, p.verdict()
            if why is not None:
                out += self._roll_back(agent, why)
            elif verdict == "pass":
                self._passed(agent, p)
                out += agent.release_held()
        return out

    def _switch(self, agent, ann, bundle, head) -> None:
        old = agent.bundle.bundle_id
        rollback = ann.action == "rollback"
        if not rollback:
            self.store.state["probation"] = {"bundle": bundle.bundle_id, "since_us": now_us(), "from": old}
        # a rollback keeps no previous: the bundle it leaves is the one that failed
        self.store.switch(bundle.bundle_id, previous=None if rollback else BundleStore.KEEP)
        self.store.state["applied_seq"] = ann.seq        # only once switched: a switch cut short is done again
        self._previous = (agent.bundle, agent.head)
        agent.use_bundle(bundle, head)
        self.probation = None if rollback else self._new_probation(bundle.bundle_id)
        self.store.note("rolled-back" if rollback else "switched", bundle.bundle_id,
                        UpdateReason.FLEET_ROLLBACK.value if rollback else "")
        self.store.save()
        if rollback:
            self._set(state="rolled-back", target=old, reason=UpdateReason.FLEET_ROLLBACK.value,
                      detail=f"the fleet went back from {old} to {bundle.bundle_id}")
            self.store.gc(keep=())
        else:
            self._set(state="active", target="", reason="", detail="")
        log.info("update: now running bundle %s (was %s)%s", bundle.bundle_id, old,
                 "" if rollback else "; on probation")

    def _passed(self, agent, p: Probation) -> None:
        self.probation = None
        self.store.state.pop("probation", None)
        self.store.note("active", p.bundle_id)
        self.store.save()
        self.store.gc(keep=())
        self._previous = None
        self._set(state="active")
        log.info("update: bundle %s passed its probation (%d good answers, %d failed)", p.bundle_id, p.ok,
                 len(p.failures))

    def _roll_back(self, agent, why: str) -> list:
        bad = agent.bundle.bundle_id
        prev_id = self.store.previous_id
        self.probation, self._rollback = None, None
        if self._previous is not None and self._previous[0].bundle_id == prev_id:
            bundle, head = self._previous
        else:
            bundle, head = self._load_head(self.store.load(prev_id))
        self.store.state.pop("probation", None)
        self.store.switch(prev_id, previous=None)
        agent.use_bundle(bundle, head)
        self._previous = None
        self.store.note("rolled-back", bad, UpdateReason.ANSWERS_FAILED.value, why)
        self.store.save()
        self.store.gc(keep=())
        self._set(state="rolled-back", target=bad, reason=UpdateReason.ANSWERS_FAILED.value, detail=why)
        log.warning("update: rolled back from bundle %s to %s: %s", bad, prev_id, why)
        return agent.rerun(bad)

    # ------------------------------------------------------------- the update thread
    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                topic, payload = self._inbox.get(timeout=0.25)
            except queue.Empty:
                pass
            else:
                self._consider(topic, payload)
                continue                    # take every announcement waiting before acting on one
            target = self._target()
            if target is not None:
                try:
                    self._act(target)
                except UpdateError as exc:
                    self._refuse(target, exc.reason, exc.message)
                except EdgesplitError as exc:
                    self._refuse(target, UpdateReason.BAD_BUNDLE, exc.message)
                except OSError as exc:
                    self._refuse(target, UpdateReason.IO_ERROR, str(exc))
                except Exception as exc:    # never let an update take the device down
                    log.exception("update: unexpected error")
                    self._refuse(target, UpdateReason.BAD_BUNDLE, f"{type(exc).__name__}: {exc}")
            if self._report_due():
                self.publish_report()

    def _consider(self, topic: str, payload: bytes) -> None:
        if not payload:                     # a cleared retained announcement
            self._latest.pop(topic, None)
            return
        device = None if topic == topics.fleet_announce(self.fleet) else self.device_id
        try:
            ann = announce.decode(payload, self.keys, fleet=self.fleet, device=device)
        except UpdateError as exc:
            log.warning("update: refused an announcement on %s: %s", topic, exc.message)
            self._set(state="refused", target="", reason=exc.reason.value, detail=exc.message)
            self.publish_report()
            return
        self._latest[topic] = ann

    def _target(self):
        if not self._latest:
            return None
        ann = max(self._latest.values(), key=lambda a: a.seq)
        return ann if ann.seq > self.store.state.get("applied_seq", 0) else None

    def _act(self, ann) -> None:
        agent = self.agent
        active = agent.bundle
        bid = ann.bundle_id
        if bid == active.bundle_id:
            self.store.state["applied_seq"] = ann.seq
            self.store.save()
            self._set(state="active", target="", reason="", detail="")
            self.publish_report()
            return
        log.info("update: announcement %d: %s bundle %s", ann.seq, ann.action, bid)
        bundle = None
        if self.store.has(bid):
            try:
                bundle = self.store.load(bid)       # kept from before, or unpacked before a restart
            except BundleError as exc:
                log.warning("update: the stored copy of %s is broken (%s); fetching it again", bid, exc.message)
        if bundle is None:
            ref = ann.bundle
            if ref is None:
                raise UpdateError(UpdateReason.NOT_HELD, f"asked to go back to bundle {bid}, which this device "
                                  f"does not hold", fix="publish that bundle (edgesplit fleet publish)")
            if tuple(ref.input_shape) != tuple(active.manifest.input.shape):
                raise UpdateError(UpdateReason.INPUT_MISMATCH, f"bundle {bid} takes input {list(ref.input_shape)}; "
                                  f"this device runs {list(active.manifest.input.shape)}",
                                  fix="convert the new model for the same input, or install a new device package")
            bundle = self._fetch(ann, ref)
            if bundle is None:
                return                          # stopping
        if bundle.manifest.input != active.manifest.input:
            raise UpdateError(UpdateReason.INPUT_MISMATCH, f"bundle {bid} expects other input preprocessing than "
                              f"the running bundle {active.bundle_id}",
                              fix="convert the new model with the same input, or install a new device package")
        self._set(state="updating", target=bid, reason="", detail="self-test", progress=1.0)
        bundle, head = self._load_head(bundle)
        from runtime.probe import check_head

        result = check_head(head, bundle)
        if not result.ok:
            raise UpdateError(UpdateReason.SELF_TEST, result.message, fix="convert the bundle again and publish it")
        log.info("update: %s", result.message)
        self._taken.clear()
        self._ready = (ann, bundle, head)
        while not self._taken.wait(0.25):       # the agent switches between two batches
            if self._stop.is_set():
                return

    def _fetch(self, ann, ref):
        self._set(state="updating", target=ref.bundle_id, reason="", detail="download", progress=0.0)
        self.publish_report()
        part = transfer.PartFile(ref, self.store.incoming)
        killed = [False]

        def progress(p: transfer.PartFile) -> None:
            self._state["progress"] = round(p.progress, 3)
            if p.progress >= 0.5 and not killed[0]:
                killed[0] = True
                failpoint("update:download")
            if self._report_due():
                self.publish_report()

        tarball = transfer.fetch(self.agent.client, self.fleet, part, stop=self._stop, on_progress=progress,
                                 window=self.window, stall_s=self.config.download_stall)
        if tarball is None:
            return None
        self._set(detail="verify")
        try:
            return self.store.install(tarball, ref)
        finally:
            part.discard()

    def _load_head(self, bundle):
        from runtime.split import Head

        c = self.config
        return bundle, Head(bundle, num_threads=c.threads or None, backend=c.interpreter or None)

    def _refuse(self, ann, reason: UpdateReason, message: str) -> None:
        log.warning("update: refused bundle %s: %s", ann.bundle_id, message)
        self.store.state["applied_seq"] = max(ann.seq, self.store.state.get("applied_seq", 0))
        self.store.note("refused", ann.bundle_id, reason.value, message)
        self.store.save()
        self.store.gc(keep=())
        self._set(state="refused", target=ann.bundle_id, reason=reason.value, detail=message)
        self.publish_report()

    # ------------------------------------------------------------- reports
    def _set(self, **fields) -> None:
        if fields.get("state", "updating") != "updating":
            fields.setdefault("progress", None)
        self._state.update(fields)
        self._report_now.set()

    def _report_due(self) -> bool:
        return self._report_now.is_set() or time.monotonic() - self._last_report[0] >= self.config.report_interval

    def report(self) -> DeviceReport:
        """The report as of now (counters of the agent since it started)."""
        agent = self.agent
        st = agent.stats
        now = time.monotonic()
        t0, answered0, lat0 = self._last_report
        lat = st.latencies_ms[lat0:]
        p = percentiles(lat) if lat else {}
        s = self._state
        return DeviceReport(
            device=self.device_id, time_us=now_us(), bundle=agent.bundle.bundle_id, state=s["state"],
            healthy=self.probation is None, target=s["target"], reason=s["reason"], detail=s["detail"],
            progress=s["progress"], previous=self.store.previous_id or "",
            seq=self.store.state.get("applied_seq", 0), requests=st.requests,
            answered=st.answered - st.worker_errors, errors=st.worker_errors + st.timeouts + self.dead_letters,
            dead_letters=self.dead_letters, outbox=len(agent.outbox) if agent.outbox is not None else 0,
            in_flight=agent.in_flight, connects=st.connects,
            rate_per_s=round((st.answered - answered0) / max(now - t0, 1e-3), 3),
            p95_ms=round(p["p95"], 3) if p else None, interval_s=self.config.report_interval)

    def publish_report(self):
        """Publish the report (retained) now; the Delivery."""
        rep = self.report()
        st = self.agent.stats
        self._last_report = (time.monotonic(), st.answered, len(st.latencies_ms))
        self._report_now.clear()
        d = topics.delivery(topics.REPORT)
        return self.agent.client.publish(topics.report(self.fleet, self.device_id), encode_report(rep),
                                         qos=d.qos, retain=d.retain)
