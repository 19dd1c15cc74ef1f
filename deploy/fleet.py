"""``edgesplit fleet``: publish a bundle to a fleet over MQTT, with canaries first; roll back; watch.

::

    edgesplit fleet publish BUNDLE --fleet F --config SITE [--canary N | --devices ID ...] [--url URL]
    edgesplit fleet rollback --fleet F --config SITE
    edgesplit fleet status --fleet F --config SITE [--watch S] [--json]

``SITE`` is what ``edgesplit broker config --out SITE`` wrote: the operator's broker user
(``SITE/operator/<user>/``) and the fleet's signing key (``SITE/fleet/fleet.key``); ``--broker``,
``--credentials`` and ``--key`` name them one by one instead.

**publish** signs an announcement of the bundle (``protocol.announce``: its id, the archive's
size and sha256, every file's sha256, each chunk's) and publishes the archive as retained chunks
(``protocol.transfer``; or only a ``--url`` the devices can reach).  Without ``--canary`` or
``--devices`` it announces to the whole fleet.  With ``--canary N`` it announces to N online
devices first and waits: once each canary reports ``active`` (its probation passed) and its
errors stay under ``--max-error-rate`` of its requests for ``--soak`` seconds, the rollout goes
on by itself to the whole fleet; when a canary refuses the bundle, rolls back, or errs too
often, the rollout halts, says why, and returns the canaries still on it to the bundle they
had (exit 1).  **rollback** announces the bundle the fleet had before the newest announcement
to every device (they keep it, so no download).  **status** prints the table of
``deploy.fleet_view`` once, or every ``--watch`` seconds.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import secrets
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Callable

import msgspec

from deploy.fleet_view import FleetView
from protocol import announce, topics, transfer
from protocol.errors import ConfigError, UsageError
from protocol.manifest import load_bundle, write_tarball

log = logging.getLogger(__name__)

__all__ = ["FleetAccess", "publish", "rollback", "status", "RolloutResult"]


# --------------------------------------------------------------------------- access

@dataclasses.dataclass(frozen=True)
class FleetAccess:
    """How the operator reaches the fleet's broker, and the key it signs with."""

    broker_url: str
    username: str | None = None
    password: str | None = dataclasses.field(default=None, repr=False)
    ca: str | None = None
    signing_key: str | None = None
    public_key: str | None = None

    @classmethod
    def find(cls, *, config: str | None = None, broker: str | None = None, credentials: str | None = None,
             key: str | None = None) -> "FleetAccess":
        """From ``edgesplit broker config``'s ``--out`` directory (its operator) and/or the pieces one by one."""
        info: dict = {}
        cdir = Path(credentials) if credentials else None
        if config:
            ops = Path(config) / "operator"
            users = sorted(p for p in ops.iterdir() if p.is_dir()) if ops.is_dir() else []
            if cdir is None:
                if not users:
                    raise UsageError(f"{config} has no operator/<user>/ directory",
                                     fix="write it with `edgesplit broker config --out DIR ...` (it makes the "
                                         "'operator' user), or give --broker, --credentials and --key")
                cdir = users[0]
        if cdir is not None:
            bj = cdir / "broker.json"
            try:
                info = json.loads(bj.read_text())
            except (OSError, ValueError) as exc:
                raise UsageError(f"cannot read {bj}: {exc}", fix="give the operator's directory of "
                                 "`edgesplit broker config` (SITE/operator/<user>/)") from None
            if info.get("role") != "operator":
                raise UsageError(f"{cdir} holds the credentials of a {info.get('role')} user, not of the operator",
                                 fix="give SITE/operator/<user>/ (devices and cloud users cannot publish bundles)")
        url = broker or info.get("broker_url")
        if not url:
            raise UsageError("no broker given",
                             fix="pass --config SITE (from `edgesplit broker config`) or --broker URL")

        def inside(name):
            return str(cdir / name) if cdir is not None and name and (cdir / name).is_file() else None

        password = None
        pw = inside(info.get("password_file", "password"))
        if pw:
            password = Path(pw).read_text().strip()
        return cls(broker_url=url, username=info.get("username"), password=password,
                   ca=inside(info.get("ca_file") or "ca.crt") if url.startswith("mqtts") else None,
                   signing_key=key or info.get("signing_key"), public_key=inside(info.get("fleet_key", "fleet.pub")))

    def client(self):
        from protocol.mqtt import Backoff, MqttClient

        return MqttClient(self.broker_url, client_id=f"edgesplit-operator-{uuid.uuid4().hex[:10]}",
                          username=self.username, password=self.password, tls_ca=self.ca,
                          backoff=Backoff(0.2, 5.0), max_inflight=200)

    def signer(self) -> announce.SigningKey:
        if not self.signing_key:
            raise UsageError("no signing key", fix="pass --config SITE or --key SITE/fleet/fleet.key")
        return announce.load_signing_key(self.signing_key)

    def verify_keys(self) -> list[announce.VerifyKey]:
        if self.signing_key and Path(self.signing_key).is_file():
            return [self.signer().public]
        return [announce.load_verify_key(self.public_key)] if self.public_key else []


def _connect(access: FleetAccess, fleet: str, keys) -> tuple[object, FleetView]:
    client = access.client()
    view = FleetView(client, fleet, keys)
    if not client.start(wait_connected=15):
        client.stop()
        raise ConfigError(f"cannot reach the broker {client.broker}", fix="check --broker and that it runs")
    view.settle()
    return client, view


# --------------------------------------------------------------------------- publish

@dataclasses.dataclass
class RolloutResult:
    fleet: str
    bundle_id: str
    ok: bool
    lines: list[str]
    table: str
    seconds: float
    halted: str = ""

    def summary(self) -> str:
        return "\n".join([*self.lines, "", self.table])


def _archive(path: Path, bundle) -> tuple[Path, Path | None]:
    """The bundle's .tar.gz (the one beside its directory when it is that bundle), else a fresh pack."""
    if path.name.endswith((".tar.gz", ".tgz")):
        return path, None
    beside = path.parent / (path.name + ".tar.gz")
    if beside.is_file():
        try:
            with tempfile.TemporaryDirectory(prefix="edgesplit-check-") as tmp:
                if load_bundle(beside, extract_to=tmp).bundle_id == bundle.bundle_id:
                    return beside, None
        except UsageError:
            pass
    tmp = Path(tempfile.mkdtemp(prefix="edgesplit-publish-"))
    return write_tarball(bundle.root, tmp / f"{bundle.bundle_id}.tar.gz"), tmp


def _seq(view: FleetView) -> int:
    newest = view.newest()
    return max(time.time_ns() // 1000, (newest.seq + 1) if newest else 1)


def _announce(client, signer, fleet: str, ann: announce.Announcement, devices: list[str] | None) -> None:
    d = topics.delivery(topics.ANNOUNCE)
    if devices is None:
        targets = [(topics.fleet_announce(fleet), msgspec.structs.replace(ann, devices=None))]
    else:
        targets = [(topics.device_announce(fleet, dev), msgspec.structs.replace(ann, devices=[dev])) for dev in devices]
    for topic, a in targets:
        if not client.publish(topic, announce.encode(a, signer), qos=d.qos, retain=d.retain).wait(30):
            raise ConfigError(f"the broker did not take the announcement on {topic}",
                              fix="check that this user may publish there (the operator's ACL)")


def _clear_device_announcements(client, view: FleetView, fleet: str) -> None:
    for topic in list(view.announcements):
        if topic != topics.fleet_announce(fleet):
            client.publish(topic, b"", qos=1, retain=True).wait(10)


def publish(bundle: str | os.PathLike, fleet: str, access: FleetAccess, *, devices: list[str] | None = None,
            canary: int | None = None, url: str | None = None, chunk_size: int = announce.DEFAULT_CHUNK_SIZE,
            max_error_rate: float = 0.05, soak_s: float = 30.0, timeout_s: float = 900.0, wait: bool = True,
            say: Callable[[str], None] | None = None) -> RolloutResult:
    """Announce ``bundle`` to ``fleet`` (see the module docstring); a halted rollout has ``ok`` False."""
    t0 = time.monotonic()
    lines: list[str] = []

    def note(text: str) -> None:
        lines.append(text)
        (say or (lambda s: print(s, file=sys.stderr, flush=True)))(text)

    fleet = topics.check_id(fleet, "fleet id")
    if devices and canary:
        raise UsageError("--devices and --canary do not go together", fix="give one of them")
    if canary is not None and canary < 1:
        raise UsageError(f"--canary needs at least 1 device, got {canary}", fix="e.g. --canary 1")
    path = Path(bundle)
    b = load_bundle(path)
    if b.manifest.probe is None:
        raise UsageError(f"bundle {b.bundle_id} has no self-test probe: devices refuse such a bundle",
                         fix=f"convert it again with this edgesplit: {b.manifest.convert_command()}")
    signer = access.signer()
    tarball, tmp = _archive(path, b)
    ref = announce.bundle_ref(b, tarball, chunk_size=chunk_size, url=url)
    client, view = _connect(access, fleet, [signer.public])
    try:
        current = view.fleet_announcement()
        newest = view.newest()
        if current is not None and current.bundle_id != b.bundle_id:
            previous_id, previous = current.bundle_id, current.bundle
        elif current is not None:
            previous_id, previous = current.previous_id, current.previous
        else:   # the bundle the fleet was installed with: the devices keep it, nobody announced it
            running = [d.bundle for d in view.reported() if d.bundle and d.bundle != b.bundle_id]
            previous_id, previous = (max(set(running), key=running.count) if running else ""), None
        if not url:
            t = time.monotonic()
            transfer.publish_chunks(client, fleet, ref, tarball)
            note(f"published bundle {ref.describe()} as {len(ref.chunks)} retained chunk(s) of {ref.chunk_size:,} B "
                 f"in {time.monotonic() - t:.1f} s")
        stale = [a.previous for a in (current, newest) if a is not None and a.previous is not None
                 and a.previous.bundle_id not in (b.bundle_id, previous_id)]
        for old in {s.bundle_id: s for s in stale}.values():
            transfer.clear_chunks(client, fleet, old)
            note(f"cleared the chunks of bundle {old.bundle_id} (neither the new nor the previous one)")
        ann = announce.Announcement(fleet=fleet, seq=_seq(view), issued_us=time.time_ns() // 1000, action="install",
                                    bundle_id=b.bundle_id, bundle=ref, previous_id=previous_id or "",
                                    previous=previous, rollout=secrets.token_hex(4))
        if devices:
            _announce(client, signer, fleet, ann, list(devices))
            note(f"announced {b.bundle_id} to {', '.join(devices)} (seq {ann.seq})")
            ok = not wait or _wait_active(view, list(devices), b.bundle_id, ann.seq, timeout_s, note)
        elif canary:
            ok = _staged(client, signer, view, fleet, ann, canary, max_error_rate, soak_s, timeout_s, note)
        else:
            _announce(client, signer, fleet, ann, None)
            note(f"announced {b.bundle_id} to every device of fleet {fleet} (seq {ann.seq})")
            ok = not wait or _wait_active(view, None, b.bundle_id, ann.seq, timeout_s, note)
        time.sleep(0.2)
        result = RolloutResult(fleet, b.bundle_id, ok, lines, view.table(), time.monotonic() - t0,
                               halted="" if ok else lines[-1])
    finally:
        client.stop()
        if tmp is not None:
            import shutil

            shutil.rmtree(tmp, ignore_errors=True)
    return result


def _failed(report, bundle_id: str, seq: int) -> str | None:
    if report is not None and report.target == bundle_id and report.seq >= seq \
            and report.state in ("refused", "rolled-back"):
        return f"{report.state} {report.reason}: {report.detail}"
    return None


def _wait_active(view: FleetView, devices: list[str] | None, bundle_id: str, seq: int, timeout_s: float,
                 note) -> bool:
    """Wait until the devices (None: every online one) run ``bundle_id``; False (noted) if one refuses."""
    def settled(v: FleetView) -> bool:
        ds = [v.devices[d] for d in devices if d in v.devices] if devices else \
            [d for d in v.reported() if d.status == "online" and d.report is not None]
        return all((d.bundle == bundle_id and d.report.healthy) or _failed(d.report, bundle_id, seq)
                   for d in ds) and \
            (devices is None or len(ds) == len(devices))

    if not view.wait(settled, timeout_s):
        note(f"not every device runs {bundle_id} after {timeout_s:.0f} s (see the table)")
        return False
    bad = [(d.device, _failed(d.report, bundle_id, seq)) for d in view.reported()
           if (devices is None or d.device in devices) and _failed(d.report, bundle_id, seq)]
    for dev, why in bad:
        note(f"{dev}: {why}")
    if not bad:
        note(f"every {'named ' if devices else 'online '}device runs {bundle_id}")
    return not bad


def _staged(client, signer, view: FleetView, fleet: str, ann, n: int, max_error_rate: float, soak_s: float,
            timeout_s: float, note) -> bool:
    online = [d.device for d in view.reported() if d.status == "online" and d.report is not None]
    if len(online) < n:
        raise UsageError(f"--canary {n}: only {len(online)} device(s) of fleet {fleet} are online and reporting",
                         fix="wait for the devices, or use fewer canaries")
    # canaries that already run another bundle than most are poor witnesses: prefer the usual ones
    canaries = sorted(online)[:n]
    _announce(client, signer, fleet, ann, canaries)
    note(f"announced {ann.bundle_id} to canary {', '.join(canaries)} (seq {ann.seq}); the rest stay on "
         f"{ann.previous_id or 'their bundle'}")
    bid = ann.bundle_id

    def canaries_done(v: FleetView) -> bool:
        return all((v.devices[c].report and v.devices[c].bundle == bid and v.devices[c].report.healthy
                    and v.devices[c].report.state == "active") or _failed(v.devices[c].report, bid, ann.seq)
                   for c in canaries)

    if not view.wait(canaries_done, timeout_s):
        why = f"canary {', '.join(canaries)} did not report {bid} healthy within {timeout_s:.0f} s"
        note(why)
        _return_canaries(client, signer, view, fleet, ann, canaries, note)
        return False
    for c in canaries:
        why = _failed(view.devices[c].report, bid, ann.seq)
        if why:
            note(f"canary {c}: {why}; halting: the other devices stay on {ann.previous_id or 'their bundle'}")
            _return_canaries(client, signer, view, fleet, ann, canaries, note)
            return False
    note(f"canary {', '.join(canaries)}: active {bid}, probation passed; watching errors for {soak_s:g} s")
    start = {c: view.devices[c].report for c in canaries}
    deadline = time.monotonic() + soak_s
    while time.monotonic() < deadline:
        time.sleep(min(1.0, max(0.0, deadline - time.monotonic())))
        for c in canaries:
            now, then = view.devices[c].report, start[c]
            if now is None or now.bundle != bid or _failed(now, bid, ann.seq):
                note(f"canary {c}: {now.line() if now else 'no report'}; halting")
                _return_canaries(client, signer, view, fleet, ann, canaries, note)
                return False
            requests = now.requests - then.requests
            errors = now.errors - then.errors
            if requests > 0 and errors / requests > max_error_rate and errors >= 2:
                note(f"canary {c}: {errors} errors in {requests} requests ({100 * errors / requests:.0f} % > "
                     f"{100 * max_error_rate:.0f} %); halting")
                _return_canaries(client, signer, view, fleet, ann, canaries, note)
                return False
    for c in canaries:
        d = view.devices[c].report
        note(f"canary {c}: {d.requests - start[c].requests} requests, {d.errors - start[c].errors} errors in "
             f"{soak_s:g} s")
    fleet_ann = msgspec.structs.replace(ann, seq=_seq(view), issued_us=time.time_ns() // 1000)
    _announce(client, signer, fleet, fleet_ann, None)
    _clear_device_announcements(client, view, fleet)
    note(f"announced {bid} to every device of fleet {fleet} (seq {fleet_ann.seq})")
    return _wait_active(view, None, bid, fleet_ann.seq, timeout_s, note)


def _return_canaries(client, signer, view: FleetView, fleet: str, ann, canaries: list[str], note) -> None:
    back = [c for c in canaries if view.devices[c].bundle == ann.bundle_id]
    if not back or not ann.previous_id:
        return
    rb = msgspec.structs.replace(ann, seq=_seq(view), issued_us=time.time_ns() // 1000, action="rollback",
                             bundle_id=ann.previous_id, bundle=ann.previous, previous_id=ann.bundle_id,
                             previous=ann.bundle)
    _announce(client, signer, fleet, rb, back)
    note(f"returned {', '.join(back)} to {ann.previous_id}")
    view.wait(lambda v: all(v.devices[c].bundle == ann.previous_id for c in back), 60)


# --------------------------------------------------------------------------- rollback and status

def rollback(fleet: str, access: FleetAccess, *, timeout_s: float = 300.0, wait: bool = True,
             say: Callable[[str], None] | None = None) -> RolloutResult:
    """Announce the bundle the fleet ran before the newest announcement, to every device."""
    t0 = time.monotonic()
    lines: list[str] = []

    def note(text: str) -> None:
        lines.append(text)
        (say or (lambda s: print(s, file=sys.stderr, flush=True)))(text)

    signer = access.signer()
    client, view = _connect(access, topics.check_id(fleet, "fleet id"), [signer.public])
    try:
        newest = view.newest()
        if newest is None or not newest.previous_id:
            raise UsageError(f"fleet {fleet} has no announcement with a previous bundle to go back to",
                             fix="publish a bundle first (edgesplit fleet publish)")
        rb = announce.Announcement(fleet=fleet, seq=_seq(view), issued_us=time.time_ns() // 1000,
                                   action="rollback", bundle_id=newest.previous_id, bundle=newest.previous,
                                   previous_id=newest.bundle_id, previous=newest.bundle,
                                   rollout=secrets.token_hex(4))
        _announce(client, signer, fleet, rb, None)
        _clear_device_announcements(client, view, fleet)
        note(f"announced a rollback of fleet {fleet} from {newest.bundle_id} to {rb.bundle_id} (seq {rb.seq})")
        ok = not wait or _wait_active(view, None, rb.bundle_id, rb.seq, timeout_s, note)
        time.sleep(0.2)
        return RolloutResult(fleet, rb.bundle_id, ok, lines, view.table(), time.monotonic() - t0)
    finally:
        client.stop()


def status(fleet: str, access: FleetAccess, *, watch: float = 0.0, as_json: bool = False,
           out=None, rounds: int | None = None) -> FleetView:
    """Print the fleet's table once (or every ``watch`` seconds until Ctrl+C, or ``rounds`` times)."""
    out = out or sys.stdout
    try:
        keys = access.verify_keys()
    except UsageError:
        keys = []
    client, view = _connect(access, topics.check_id(fleet, "fleet id"), keys)
    try:
        n = 0
        while True:
            text = json.dumps(view.to_dict(), indent=2) if as_json else view.table()
            if watch and getattr(out, "isatty", lambda: False)():
                out.write("\x1b[H\x1b[J")
            out.write(text + "\n")
            out.flush()
            n += 1
            if not watch or (rounds is not None and n >= rounds):
                return view
            time.sleep(watch)
    except KeyboardInterrupt:
        return view
    finally:
        client.stop()
