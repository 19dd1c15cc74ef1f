"""The agent's side of bundle updates (``device.update`` decides; this runs on the agent's thread).

A :class:`~device.agent.DeviceAgent` switches bundles between two batches: the new head takes
the next inputs, while requests already sent keep the bundle they were made with (their
results are read with that bundle's manifest; the cloud answers each with its own tail).  While
a new bundle is on probation its inputs are kept and its failed answers held back, so that a
rollback can run them again with the bundle it returns to.
"""
from __future__ import annotations

import logging

import numpy as np

from device.results import DeviceResult
from runtime.preprocess import Preprocessor

log = logging.getLogger("device.agent")

__all__ = ["BundleSwitching", "NoUpdates"]


class NoUpdates:
    """The updater of an agent that takes no bundle updates: it never holds, switches or reports."""

    state = "active"
    dead_letters = 0

    def attach(self, agent) -> None:
        pass

    def start(self) -> None:
        pass

    def stop(self) -> None:
        pass

    def holds(self, bundle_id: str) -> bool:
        return False

    def observe(self, bundle_id: str, ok: bool, why: str = "") -> None:
        pass

    def maintain(self, agent) -> list:
        return []


class BundleSwitching:
    """Mixed into :class:`~device.agent.DeviceAgent` (uses its ``_pending``, ``outbox``, ``_submit_batch``)."""

    def _init_updates(self, updater) -> None:
        self.manifests = {self.bundle.bundle_id: self.manifest}   # of every bundle a pending request was made with
        self._held: list = []                   # (request id, pending, result): failed answers held in a probation
        self.updater = updater if updater is not None else NoUpdates()
        self.on_stop: list = []                 # called once the agent has stopped (e.g. its metrics page)
        self.updater.attach(self)

    def use_bundle(self, bundle, head) -> None:
        """Run ``bundle`` from the next batch on; requests already sent keep theirs."""
        self.bundle, self.head, self.manifest = bundle, head, bundle.manifest
        self.manifests[bundle.bundle_id] = bundle.manifest
        self.preprocessor = Preprocessor(self.manifest.input)
        self.stats.bundle_id = bundle.bundle_id

    def maintain(self) -> list[DeviceResult]:
        """Between batches: let the updater switch bundles or roll back; results to hand out."""
        return self.updater.maintain(self)

    def release_held(self) -> list[DeviceResult]:
        """The failed answers held during a probation that passed."""
        held, self._held = self._held, []
        return [r for _, _, r in held]

    def rerun(self, bundle_id: str) -> list[DeviceResult]:
        """Run the inputs of ``bundle_id``'s unanswered and held requests again with the running bundle;
        results for those that cannot be (no input kept: recovered from the outbox after a restart)."""
        redo = [(rid, p) for rid, p in self._pending.items() if p.bundle_id == bundle_id]
        redo += [(rid, p) for rid, p, _ in self._held]
        self._held = []
        for rid, _ in redo:
            self._pending.pop(rid, None)
        if self.outbox is not None:
            self.outbox.remove([rid for rid, _ in redo])
        again = [p for _, p in redo if p.x is not None]
        lost = [DeviceResult(p.name, rid, attempts=p.attempts,
                             error=f"made with bundle {bundle_id}, which was rolled back")
                for rid, p in redo if p.x is None]
        if again:
            log.info("re-running %d input(s) of bundle %s with %s", len(again), bundle_id, self.bundle.bundle_id)
            lost += self._submit_batch([p.name for p in again], np.stack([p.x for p in again]))
        return lost
