"""The device's bundles on disk: complete bundles by id, the one it runs, the one it keeps to go back to.

::

    <state_dir>/bundles/
      store/<bundle-id>/      complete bundles, every file checked against its sha256, never changed
      current -> store/<id>   the bundle the agent runs (a symlink, replaced atomically)
      previous -> store/<id>  the bundle it ran before (a rollback switches back to it)
      incoming/               downloads: <id>.part, then <id>.tar.gz (protocol.transfer)
      staging/<id>/           an archive being unpacked; a directory moves into store/ only once it
                              is complete and verified
      state.json              the last announcement acted on, a probation in progress, the history

Every step that changes what runs is one ``rename`` (a directory into ``store/``, a symlink over
``current``), so a process killed at any moment (kill -9, a power cut) leaves ``current``
pointing at one complete bundle, old or new.  :meth:`BundleStore.open` finishes or undoes what
a killed run left: it empties ``staging/``, checks the bundle ``current`` names (every sha256),
falls back to ``previous`` and then to the configured bundle if it is broken, and adopts the
configured bundle when a new one was installed by hand (a new device package).

``EDGESPLIT_FAILPOINTS=update:download,update:verified,update:switch`` makes the process kill
itself (SIGKILL) at that step: the tests' way to cut power exactly there.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import time
from pathlib import Path

from protocol.announce import BundleRef
from protocol.errors import BundleError, UpdateError, UpdateReason
from protocol.manifest import MANIFEST_NAME, Bundle, load_bundle, sha256_file

log = logging.getLogger(__name__)

__all__ = ["BundleStore", "failpoint"]

HISTORY = 20


def failpoint(name: str) -> None:
    """Kill this process (SIGKILL) when ``name`` is listed in ``$EDGESPLIT_FAILPOINTS`` (tests only)."""
    if name in os.environ.get("EDGESPLIT_FAILPOINTS", "").split(","):
        log.warning("failpoint %s: killing this process (SIGKILL), as a power cut would", name)
        os.kill(os.getpid(), signal.SIGKILL)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class BundleStore:
    """``root`` (``<state_dir>/bundles``) for a device whose configured bundle is ``factory``."""

    def __init__(self, root: str | os.PathLike, factory: str | os.PathLike):
        self.root = Path(root)
        self.factory = Path(factory)
        self.store = self.root / "store"
        self.incoming = self.root / "incoming"
        self.staging = self.root / "staging"
        self.state_path = self.root / "state.json"
        self.state: dict = {}

    # ------------------------------------------------------------- links and state
    def _link(self, name: str) -> str | None:
        try:
            target = os.readlink(self.root / name)
        except OSError:
            return None
        return Path(target).name

    @property
    def current_id(self) -> str | None:
        return self._link("current")

    @property
    def previous_id(self) -> str | None:
        return self._link("previous")

    def _set_link(self, name: str, bundle_id: str | None) -> None:
        link = self.root / name
        if bundle_id is None:
            link.unlink(missing_ok=True)
            return
        tmp = self.root / f".{name}.tmp"
        tmp.unlink(missing_ok=True)
        os.symlink(f"store/{bundle_id}", tmp)
        os.replace(tmp, link)               # atomic: the link names the old bundle or the new one
        _fsync_dir(self.root)

    def save(self) -> None:
        tmp = self.root / ".state.json.tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(self.state, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.state_path)

    def note(self, result: str, bundle_id: str, reason: str = "", detail: str = "") -> None:
        """Add a line to the history in state.json (the last few updates, for people)."""
        hist = self.state.setdefault("history", [])
        hist.append({"time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "result": result, "bundle": bundle_id,
                     "reason": reason, "detail": detail[:300]})
        del hist[:-HISTORY]

    # ------------------------------------------------------------- bundles
    def has(self, bundle_id: str) -> bool:
        return (self.store / bundle_id / MANIFEST_NAME).is_file()

    def load(self, bundle_id: str) -> Bundle:
        """A bundle of the store, every file checked (BundleError if it is not complete)."""
        return load_bundle(self.store / bundle_id)

    def _move_in(self, staged: Path, bundle_id: str) -> Path:
        for p in staged.iterdir():
            with open(p, "rb") as f:
                os.fsync(f.fileno())
        _fsync_dir(staged)
        dest = self.store / bundle_id
        if dest.exists():                   # a complete copy from an earlier run: keep it
            shutil.rmtree(staged, ignore_errors=True)
        else:
            os.replace(staged, dest)        # atomic: store/ never holds half a bundle
            _fsync_dir(self.store)
        return dest

    def install(self, tarball: Path, ref: BundleRef) -> Bundle:
        """Unpack ``tarball`` and check it is ``ref``'s bundle, file by file; the bundle in the store."""
        staged = self.staging / ref.bundle_id
        shutil.rmtree(staged, ignore_errors=True)
        try:
            loaded = load_bundle(tarball, extract_to=staged)     # safe extraction, every sha256 of the manifest
        except BundleError as exc:
            shutil.rmtree(staged, ignore_errors=True)
            reason = UpdateReason.BAD_SHA256 if "sha256" in exc.message else UpdateReason.BAD_BUNDLE
            raise UpdateError(reason, f"bundle {ref.bundle_id}: {exc.message}", fix="publish it again") from None
        files = {MANIFEST_NAME: sha256_file(staged / MANIFEST_NAME), **loaded.manifest.files}
        if loaded.bundle_id != ref.bundle_id or files != ref.files:
            shutil.rmtree(staged, ignore_errors=True)
            raise UpdateError(UpdateReason.BAD_SHA256, f"the archive announced as {ref.bundle_id} holds bundle "
                              f"{loaded.bundle_id} with other files than the announcement's sha256 list",
                              fix="publish the bundle again with `edgesplit fleet publish`")
        self._move_in(staged, ref.bundle_id)
        failpoint("update:verified")
        return self.load(ref.bundle_id)

    def _adopt(self, bundle: Bundle) -> None:
        """Copy a verified bundle (the configured one) into the store."""
        if self.has(bundle.bundle_id):
            return
        staged = self.staging / bundle.bundle_id
        shutil.rmtree(staged, ignore_errors=True)
        staged.mkdir(parents=True)
        for name in (MANIFEST_NAME, *bundle.manifest.files):
            shutil.copy2(bundle.root / name, staged / name)
        self._move_in(staged, bundle.bundle_id)

    KEEP = "keep"

    def switch(self, bundle_id: str, *, previous: str | None = KEEP) -> None:
        """Run ``bundle_id`` from now on; ``previous`` becomes the bundle that ran until now
        (``KEEP``), or none (``None``: a rollback keeps nothing to go back to)."""
        old = self.current_id
        self.state["switching"] = {"to": bundle_id, "from": old}
        self.save()
        if previous is None:
            self._set_link("previous", None)
        elif old is not None and old != bundle_id:
            self._set_link("previous", old)
        failpoint("update:switch")
        self._set_link("current", bundle_id)
        self.state.pop("switching", None)
        self.save()

    # ------------------------------------------------------------- start-up
    def open(self) -> Bundle:
        """The bundle to run, after finishing or undoing what a killed run left (see the module docstring)."""
        for d in (self.store, self.incoming, self.staging):
            d.mkdir(parents=True, exist_ok=True)
        for p in self.staging.iterdir():
            shutil.rmtree(p, ignore_errors=True)
        for p in self.root.glob(".*.tmp"):
            p.unlink(missing_ok=True)
        try:
            self.state = json.loads(self.state_path.read_text()) if self.state_path.is_file() else {}
        except (OSError, ValueError) as exc:
            log.warning("bundles: %s unreadable (%s); starting it anew", self.state_path, exc)
            self.state = {}
        sw = self.state.pop("switching", None)
        if sw and self.current_id != sw.get("to"):
            log.warning("bundles: a switch to %s was cut short; still running %s", sw.get("to"), self.current_id)
            self.state.pop("probation", None)
        try:
            factory = load_bundle(self.factory)
        except BundleError as exc:
            factory = None
            if self.current_id is None:
                raise
            log.warning("bundles: the configured bundle %s cannot be used (%s); running %s", self.factory,
                        exc.message, self.current_id)
        if factory is not None and factory.bundle_id != self.state.get("factory"):
            # first start, or a new bundle installed by hand (a new device package): it runs now
            self._adopt(factory)
            if self.current_id != factory.bundle_id:
                if self.current_id is not None:
                    self._set_link("previous", self.current_id)
                self._set_link("current", factory.bundle_id)
            self.state["factory"] = factory.bundle_id
            self.state.pop("probation", None)
            self.save()
        active = None
        for name in ("current", "previous"):
            bid = self._link(name)
            if bid is None:
                continue
            try:
                active = self.load(bid)
            except BundleError as exc:
                log.error("bundles: %s bundle %s is broken (%s)", name, bid, exc.message)
                continue
            if name == "previous":
                log.warning("bundles: going back to the previous bundle %s", bid)
                self._set_link("current", bid)
                self.state.pop("probation", None)
            break
        if active is None:
            if factory is None:
                raise BundleError(f"no usable bundle in {self.root} nor at {self.factory}",
                                  fix="install the device package again")
            self._adopt(factory)
            self._set_link("current", factory.bundle_id)
            active = self.load(factory.bundle_id)
        self.save()
        self.gc()
        return active

    def gc(self, keep: tuple[str, ...] | None = None) -> None:
        """Remove bundles that are neither current nor previous; with ``keep``, also the downloads of
        every bundle it does not name (a download cut short is kept until then: it resumes)."""
        wanted = {self.current_id, self.previous_id, *(keep or ())}
        for p in self.store.iterdir():
            if p.name not in wanted:
                shutil.rmtree(p, ignore_errors=True)
        if keep is not None:
            for p in self.incoming.iterdir():
                if p.name.split(".")[0] not in keep:
                    p.unlink(missing_ok=True)
