"""A shaped network link on this machine: a network namespace, a veth pair, tc rate limits, a TCP relay.

Used by the hardware-in-the-loop tests (a Pi-like device in its own namespace) and
by the shaped-link benchmarks::

    from bench.netlink import ShapedLink

    with ShapedLink(rate="20mbit") as link:             # namespace + veth pair + tbf both ways
        with link.relay(("127.0.0.1", broker_port), delay_ms=40, jitter_ms=10, cut_fraction=0.02) as relay:
            dev = link.popen([python, "-m", "edgesplit", "device", "serve", ...], cpus="0")   # runs in the namespace
            ...                                        # inside it, the broker is at relay.url
        print(relay.stats.summary())

What is where::

    root namespace                              link namespace (edgesplit-<pid>-<token>)
    127.0.0.1:<port>  the real service          lo
    esh<token>  host_addr/30  <-- veth -->      eth0  ns_addr/30  (no default route)
      relay listens on host_addr:<port>,          processes started with link.popen / link.run
      forwards to the real service

* **Rate** comes from the kernel: ``tc qdisc ... tbf`` on each end of the veth pair
  (the host end shapes what goes *down* to the namespace, the namespace end what goes
  *up*).  ``netem`` does not exist on every kernel (not on this one), so:
* **delay, jitter and connection cuts** come from :class:`Relay`, a small asyncio TCP
  relay in this process: every chunk is held ``delay ± jitter`` ms per direction
  (order is kept, as on a TCP path), and a chosen fraction of connections is cut
  mid-stream with a reset after a random number of bytes.  The relay is bounded in
  time and bytes and stops by itself.
* **Addresses** are a private /30 picked per link that overlaps nothing this machine
  already uses; it exists only on the two veth ends.  The namespace has no default
  route: the only address it can reach is ``host_addr`` (so an install run there is
  provably offline).
* **Clean-up** always happens: the context manager, an ``atexit`` hook, and on the
  next start the namespaces left by a harness process that died (SIGKILL).  Only the
  processes this harness started, and what runs inside its own namespaces, are ended.

Needs root (CAP_NET_ADMIN) and iproute2; :func:`unavailable_reason` says why not
when it cannot run (tests skip with that reason).  ``python -m bench.netlink`` runs a
self-test that prints the measured RTT and throughput of a shaped link.
"""
from __future__ import annotations

import asyncio
import atexit
import dataclasses
import functools
import ipaddress
import json
import logging
import os
import random
import re
import secrets
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
from typing import Iterable, Sequence

from protocol.stats import percentiles

log = logging.getLogger(__name__)

__all__ = ["ShapedLink", "Relay", "RelayStats", "parse_rate", "unavailable_reason", "reap_stale", "selftest"]

NETNS_PREFIX = "edgesplit-"
_SBIN = ("/usr/sbin", "/sbin", "/usr/bin", "/bin")
_CHUNK = 64 * 1024
# tc's units (tc-tbf(8)): "bit" suffixes are bits per second, "bps" suffixes bytes per second
_RATE_UNITS = {"bit": 1, "kbit": 1e3, "mbit": 1e6, "gbit": 1e9, "bps": 8, "kbps": 8e3, "mbps": 8e6, "gbps": 8e9}
# private blocks to pick a /30 from, in order of preference
_POOLS = (ipaddress.ip_network("10.200.0.0/13"), ipaddress.ip_network("172.30.0.0/15"),
          ipaddress.ip_network("192.168.200.0/22"))

_open_links: set["ShapedLink"] = set()
_open_relays: set["Relay"] = set()
_registry_lock = threading.Lock()


# --------------------------------------------------------------------------- tools

def _tool(name: str) -> str | None:
    """Path of a system tool; /usr/sbin is often missing from PATH for non-login shells."""
    found = shutil.which(name)
    if found:
        return found
    return next((f"{d}/{name}" for d in _SBIN if os.access(f"{d}/{name}", os.X_OK)), None)


def _run(argv: Sequence[str], *, check: bool = True, timeout: float = 30.0) -> subprocess.CompletedProcess:
    log.debug("$ %s", " ".join(argv))
    proc = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise RuntimeError(f"`{' '.join(argv)}` failed (exit {proc.returncode}): "
                           f"{(proc.stderr or proc.stdout).strip()}")
    return proc


def parse_rate(rate: str | int | float) -> int:
    """A rate like ``"20mbit"``, ``"500kbit"``, ``"1gbit"``, ``"2mbps"`` (bytes) or a number (bit/s) -> bit/s."""
    if isinstance(rate, (int, float)) and not isinstance(rate, bool):
        bps = float(rate)
    else:
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(rate))
        unit = (m.group(2).lower() if m else "") or "bit"
        if not m or unit not in _RATE_UNITS:
            raise ValueError(f"rate {rate!r} is not like 20mbit, 500kbit or 1gbit "
                             f"(units: {', '.join(_RATE_UNITS)})")
        bps = float(m.group(1)) * _RATE_UNITS[unit]
    if bps < 8000:
        raise ValueError(f"rate {rate!r} is below 8 kbit/s: tbf cannot shape that usefully")
    return int(bps)


@functools.lru_cache(maxsize=None)
def unavailable_reason() -> str | None:
    """Why a ShapedLink cannot be made here (None when it can).  Probes once with a real namespace."""
    if not sys.platform.startswith("linux"):
        return "network namespaces need Linux"
    if os.geteuid() != 0:
        return ("creating a network namespace and a veth pair needs root (CAP_NET_ADMIN): run the HIL "
                "suite as root, as CI does")
    for tool in ("ip", "tc", "taskset"):
        if _tool(tool) is None:
            pkg = "util-linux" if tool == "taskset" else "iproute2"
            return f"`{tool}` is not installed: apt-get install {pkg}"
    probe = f"{NETNS_PREFIX}probe-{os.getpid()}-{secrets.token_hex(2)}"
    try:
        made = _run([_tool("ip"), "netns", "add", probe], check=False)
        if made.returncode != 0:
            return f"`ip netns add` does not work here: {(made.stderr or made.stdout).strip()}"
        _run([_tool("ip"), "netns", "del", probe], check=False)
    except (OSError, subprocess.SubprocessError) as exc:
        return f"`ip netns` does not work here: {exc}"
    return None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _netns_pids(name: str) -> list[int]:
    proc = _run([_tool("ip"), "netns", "pids", name], check=False)
    return [int(p) for p in proc.stdout.split() if p.isdigit()] if proc.returncode == 0 else []


def reap_stale() -> list[str]:
    """Delete namespaces (and their veth pairs) left by a harness process that no longer runs.

    Their names carry the harness's pid (``edgesplit-<pid>-<token>``); what still runs
    inside one was started by that dead harness and is ended first.  Returns the names.
    """
    ip = _tool("ip")
    if ip is None:
        return []
    listed = _run([ip, "netns", "list"], check=False).stdout
    reaped = []
    for line in listed.splitlines():
        name = line.split()[0] if line.split() else ""
        m = re.fullmatch(re.escape(NETNS_PREFIX) + r"(\d+)-([0-9a-f]+)", name)
        if not m or _pid_alive(int(m.group(1))):
            continue
        for pid in _netns_pids(name):
            log.warning("ending pid %d left in the stale namespace %s", pid, name)
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        _run([ip, "netns", "del", name], check=False)
        _run([ip, "link", "del", f"esh{m.group(2)}"], check=False)
        reaped.append(name)
    if reaped:
        log.info("removed stale namespaces: %s", ", ".join(reaped))
    return reaped


def _used_networks() -> list[ipaddress.IPv4Network]:
    """Networks of every IPv4 address and of every specific route in the root namespace."""
    ip = _tool("ip")
    nets = []
    for line in _run([ip, "-4", "-o", "addr", "show"], check=False).stdout.splitlines():
        m = re.search(r"\binet\s+(\S+)", line)
        if m:
            nets.append(ipaddress.ip_interface(m.group(1)).network)
    for line in _run([ip, "-4", "route", "show", "table", "all"], check=False).stdout.splitlines():
        dest = line.split()[0] if line.split() else ""
        if dest in ("default", "broadcast", "local", "unreachable", "blackhole", "prohibit"):
            dest = line.split()[1] if len(line.split()) > 1 else ""
        try:
            net = ipaddress.ip_network(dest if "/" in dest else f"{dest}/32", strict=False)
        except ValueError:
            continue
        # a broad route (10.0.0.0/8 to a VPN) does not conflict: our /30 is more specific
        if net.prefixlen >= 16:
            nets.append(net)
    return nets


def _pick_subnet(rng: random.Random) -> ipaddress.IPv4Network:
    used = _used_networks()
    for pool in _POOLS:
        for _ in range(64):
            n = rng.randrange(pool.num_addresses // 4)
            cand = ipaddress.ip_network(f"{pool.network_address + 4 * n}/30")
            if not any(cand.overlaps(u) for u in used):
                return cand
    raise RuntimeError("no free private /30 found for the link: every candidate overlaps an address or route "
                       "of this machine")


# --------------------------------------------------------------------------- the link

class ShapedLink:
    """A network namespace joined to this host by a veth pair, rate-limited with tc ``tbf``.

    ``rate`` shapes both directions; ``up`` (namespace -> host) and ``down`` (host ->
    namespace) override it per direction; None leaves a direction unshaped.
    ``queue_ms`` bounds tbf's queue (what does not fit is dropped, as on a real link).
    """

    def __init__(self, rate: str | int | None = None, *, up: str | int | None = None,
                 down: str | int | None = None, queue_ms: float = 200.0, seed: int | None = None):
        self._rates = (up if up is not None else rate, down if down is not None else rate)
        self.queue_ms = queue_ms
        self._rng = random.Random(seed if seed is not None else secrets.randbits(64))
        token = secrets.token_hex(4)
        self.name = f"{NETNS_PREFIX}{os.getpid()}-{token}"
        self.host_if = f"esh{token}"            # <= 15 characters (IFNAMSIZ)
        self.ns_if = "eth0"
        self.subnet: ipaddress.IPv4Network | None = None
        self.host_addr = ""
        self.ns_addr = ""
        self._procs: list[subprocess.Popen] = []
        self._relays: list[Relay] = []
        self._opened = False
        self._closed = False
        self.up_bps: int | None = None           # tbf rate (bit/s) and bucket (bytes) per direction
        self.down_bps: int | None = None
        self.up_burst: int | None = None
        self.down_burst: int | None = None

    # ------------------------------------------------------------- lifecycle
    def open(self) -> "ShapedLink":
        if self._opened:
            return self
        reason = unavailable_reason()
        if reason:
            raise RuntimeError(reason)
        reap_stale()
        ip = _tool("ip")
        self._opened = True
        with _registry_lock:
            _open_links.add(self)
        try:
            _run([ip, "netns", "add", self.name])
            self.subnet = _pick_subnet(self._rng)
            hosts = list(self.subnet.hosts())
            self.host_addr, self.ns_addr = str(hosts[0]), str(hosts[1])
            _run([ip, "link", "add", self.host_if, "type", "veth", "peer", "name", self.ns_if, "netns", self.name])
            _run([ip, "addr", "add", f"{self.host_addr}/30", "dev", self.host_if])
            _run([ip, "link", "set", self.host_if, "up"])
            self.run([ip, "addr", "add", f"{self.ns_addr}/30", "dev", self.ns_if])
            self.run([ip, "link", "set", self.ns_if, "up"])
            self.run([ip, "link", "set", "lo", "up"])
            self.shape(up=self._rates[0], down=self._rates[1])
            log.info("link %s: %s (host %s) <-> %s (namespace %s), up %s, down %s", self.name, self.host_addr,
                     self.host_if, self.ns_addr, self.ns_if, self._rates[0] or "unshaped",
                     self._rates[1] or "unshaped")
        except BaseException:
            self.close()
            raise
        return self

    def close(self) -> None:
        """End what was started in the namespace, stop the relays, delete the namespace and the veth pair."""
        if self._closed or not self._opened:
            return
        self._closed = True
        for relay in self._relays:
            relay.stop()
        for p in self._procs:
            if p.poll() is None:
                try:
                    if os.getpgid(p.pid) == p.pid:
                        os.killpg(p.pid, signal.SIGKILL)     # its own session: its children go too
                    else:
                        p.kill()
                except (ProcessLookupError, PermissionError):
                    p.kill()
        for p in self._procs:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                log.warning("pid %d did not exit after SIGKILL", p.pid)
        ip = _tool("ip")
        # anything still inside our namespace (e.g. started through an sshd we ran there) is ours
        for pid in _netns_pids(self.name):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        _run([ip, "netns", "del", self.name], check=False)
        _run([ip, "link", "del", self.host_if], check=False)   # gone with the namespace, normally
        with _registry_lock:
            _open_links.discard(self)
        log.info("link %s removed", self.name)

    def __enter__(self) -> "ShapedLink":
        return self.open()

    def __exit__(self, *exc) -> None:
        self.close()

    def exists(self) -> bool:
        """True while the namespace is listed by ``ip netns``."""
        out = _run([_tool("ip"), "netns", "list"], check=False).stdout
        return any(line.split()[:1] == [self.name] for line in out.splitlines())

    # ------------------------------------------------------------- shaping
    @staticmethod
    def burst_for(bps: int) -> int:
        """tbf bucket size in bytes for a rate: a few ms worth of bytes, never less than two full frames."""
        return max(3200, int(bps / 8 * 0.004))

    def _tbf(self, dev: str, rate, in_ns: bool) -> tuple[int | None, int | None]:
        tc = _tool("tc")
        argv_del = [tc, "qdisc", "del", "dev", dev, "root"]
        if rate is None:
            (self.run if in_ns else _run)(argv_del, check=False)
            return None, None
        bps = parse_rate(rate)
        burst = self.burst_for(bps)
        argv = [tc, "qdisc", "replace", "dev", dev, "root", "tbf", "rate", f"{bps}bit", "burst", str(burst),
                "latency", f"{self.queue_ms:g}ms"]
        (self.run if in_ns else _run)(argv)
        return bps, burst

    def shape(self, rate: str | int | None = None, *, up: str | int | None = None,
              down: str | int | None = None) -> None:
        """(Re)shape the link: ``rate`` both ways, or ``up``/``down``; None for a direction removes its limit."""
        up = up if up is not None else rate
        down = down if down is not None else rate
        self.up_bps, self.up_burst = self._tbf(self.ns_if, up, in_ns=True)
        self.down_bps, self.down_burst = self._tbf(self.host_if, down, in_ns=False)
        self._rates = (up, down)

    def qdiscs(self) -> str:
        """What tc reports for both ends (for logs and reports)."""
        tc = _tool("tc")
        host = _run([tc, "-s", "qdisc", "show", "dev", self.host_if], check=False).stdout.strip()
        ns = self.run([tc, "-s", "qdisc", "show", "dev", self.ns_if], check=False).stdout.strip()
        return f"host {self.host_if}: {host}\nnamespace {self.ns_if}: {ns}"

    # ------------------------------------------------------------- processes in the namespace
    def exec_argv(self, argv: Sequence[str], *, cpus: str | None = None) -> list[str]:
        """``argv`` prefixed to run inside the namespace (and pinned to ``cpus`` with taskset)."""
        pre = [_tool("ip"), "netns", "exec", self.name]
        if cpus is not None:
            pre += [_tool("taskset"), "-c", str(cpus)]
        return pre + [str(a) for a in argv]

    def run(self, argv: Sequence[str], *, cpus: str | None = None, check: bool = True, timeout: float = 60.0,
            **kw) -> subprocess.CompletedProcess:
        """Run a command inside the namespace and wait (output captured as text unless told otherwise)."""
        if not self._opened or self._closed:
            raise RuntimeError(f"link {self.name} is not open")
        if "stdout" in kw or "stderr" in kw:
            kw.setdefault("stdout", subprocess.PIPE)
        else:
            kw.setdefault("capture_output", True)
        kw.setdefault("text", True)
        full = self.exec_argv(argv, cpus=cpus)
        log.debug("[%s] $ %s", self.name, " ".join(map(str, argv)))
        proc = subprocess.run(full, timeout=timeout, **kw)
        if check and proc.returncode != 0:
            out = proc.stderr or proc.stdout or ""
            out = out.decode(errors="replace") if isinstance(out, bytes) else out
            raise RuntimeError(f"`{' '.join(map(str, argv))}` in {self.name} failed (exit {proc.returncode}): "
                               f"{out.strip()[-2000:]}")
        return proc

    def popen(self, argv: Sequence[str], *, cpus: str | None = None, **kw) -> subprocess.Popen:
        """Start a process inside the namespace, in its own session; it is ended when the link closes.

        ``ip netns exec`` and ``taskset`` exec the command, so ``.pid`` is the command's own pid.
        """
        if not self._opened or self._closed:
            raise RuntimeError(f"link {self.name} is not open")
        kw.setdefault("start_new_session", True)
        p = subprocess.Popen(self.exec_argv(argv, cpus=cpus), **kw)
        self._procs.append(p)
        return p

    # ------------------------------------------------------------- relay
    def relay(self, target: tuple[str, int], *, port: int = 0, **impairments) -> "Relay":
        """A started :class:`Relay` on ``host_addr`` forwarding to ``target``; stopped with the link."""
        r = Relay((self.host_addr, port), target, **impairments).start()
        self._relays.append(r)
        return r

    def __repr__(self) -> str:
        return (f"ShapedLink({self.name}, host {self.host_addr}, namespace {self.ns_addr}, "
                f"up {self.up_bps or 'unshaped'} bit/s, down {self.down_bps or 'unshaped'} bit/s)")


# --------------------------------------------------------------------------- the relay

@dataclasses.dataclass
class RelayStats:
    """What a relay did.  ``held_ms`` are the delays really applied to chunks (order kept)."""

    connections: int = 0
    cut: int = 0                 # connections cut on purpose, mid-stream
    refused: int = 0             # the target did not accept a connection
    bytes_up: int = 0            # client -> target
    bytes_down: int = 0          # target -> client
    chunks: int = 0
    stopped: str = ""            # "", "stopped", "max_seconds", "max_bytes"
    held_ms: list = dataclasses.field(default_factory=list, repr=False)

    def held_percentiles(self) -> dict:
        p = percentiles(self.held_ms, (50, 95))
        return {k: p[k] for k in ("min", "p50", "p95", "max")} if p else {}

    def to_dict(self) -> dict:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "held_ms"}
        d["held_ms"] = self.held_percentiles()
        return d

    def summary(self) -> str:
        h = self.held_percentiles()
        held = (f", held {h['min']:.1f}/{h['p50']:.1f}/{h['max']:.1f} ms min/p50/max" if h else "")
        return (f"relay: {self.connections} connection(s), {self.cut} cut, {self.refused} refused, "
                f"{self.bytes_up} B up, {self.bytes_down} B down in {self.chunks} chunks{held}"
                + (f"; stopped ({self.stopped})" if self.stopped else ""))


class _Conn:
    __slots__ = ("index", "cut_at", "forwarded", "transports", "cut")

    def __init__(self, index: int, cut_at: int | None):
        self.index = index
        self.cut_at = cut_at
        self.forwarded = 0
        self.transports: list[asyncio.BaseTransport] = []
        self.cut = False


class Relay:
    """A TCP relay with per-direction delay and jitter and connections cut mid-stream.

    ``listen``: (address, port) to accept on (port 0: any free one; see ``.address``);
    ``target``: where to forward.  ``delay_ms``/``jitter_ms``: each chunk is held
    uniform(delay - jitter, delay + jitter) ms in each direction (``up_delay_ms``,
    ``down_delay_ms``, ``up_jitter_ms``, ``down_jitter_ms`` set one direction); chunks
    keep their order, so a late chunk delays those behind it, as on a TCP path.
    ``cut_fraction``: each connection is cut with this probability; ``cut_connections``:
    connection numbers (1 = the first accepted) that are always cut; ``cut_next(n)`` arms
    the next n connections.  A cut connection
    is reset on both sides (RST) after ``cut_after`` = (lo, hi) bytes forwarded, drawn
    uniformly; the chunk that crosses the point is delivered only in part.
    The relay stops by itself after ``max_seconds`` or ``max_bytes``.
    """

    def __init__(self, listen: tuple[str, int], target: tuple[str, int], *, delay_ms: float = 0.0,
                 jitter_ms: float = 0.0, up_delay_ms: float | None = None, down_delay_ms: float | None = None,
                 up_jitter_ms: float | None = None, down_jitter_ms: float | None = None,
                 cut_fraction: float = 0.0, cut_connections: Iterable[int] = (),
                 cut_after: tuple[int, int] = (16 * 1024, 256 * 1024), seed: int | None = None,
                 max_seconds: float = 900.0, max_bytes: int = 4 << 30, max_buffer_chunks: int = 64):
        if not 0.0 <= cut_fraction <= 1.0:
            raise ValueError(f"cut_fraction must be within [0, 1], got {cut_fraction}")
        if not 0 < cut_after[0] <= cut_after[1]:
            raise ValueError(f"cut_after must be (lo, hi) bytes with 0 < lo <= hi, got {cut_after}")
        self.listen = (listen[0], int(listen[1]))
        self.target = (target[0], int(target[1]))
        up_d = delay_ms if up_delay_ms is None else up_delay_ms
        down_d = delay_ms if down_delay_ms is None else down_delay_ms
        up_j = jitter_ms if up_jitter_ms is None else up_jitter_ms
        down_j = jitter_ms if down_jitter_ms is None else down_jitter_ms
        for v in (up_d, down_d, up_j, down_j):
            if v < 0:
                raise ValueError("delays and jitters must be >= 0 ms")
        self._delay = {"up": (up_d / 1000.0, up_j / 1000.0), "down": (down_d / 1000.0, down_j / 1000.0)}
        self.cut_fraction = float(cut_fraction)
        self.cut_connections = frozenset(int(c) for c in cut_connections)
        self.cut_after = (int(cut_after[0]), int(cut_after[1]))
        self.seed = seed if seed is not None else secrets.randbits(32)
        self._rng = random.Random(self.seed)
        self.max_seconds = float(max_seconds)
        self.max_bytes = int(max_bytes)
        self._max_buffer = int(max_buffer_chunks)
        self.stats = RelayStats()
        self.address: tuple[str, int] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._stop_event: asyncio.Event | None = None
        self._conns: set[_Conn] = set()
        self._tasks: set[asyncio.Task] = set()
        self._count = 0
        self._armed = 0
        self._arm_lock = threading.Lock()

    # ------------------------------------------------------------- public
    @property
    def url(self) -> str:
        """``mqtt://host:port`` of the listening side (what a client in the namespace connects to)."""
        if self.address is None:
            raise RuntimeError("the relay is not started")
        return f"mqtt://{self.address[0]}:{self.address[1]}"

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self) -> "Relay":
        if self._thread is not None:
            return self
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run, name=f"relay-{self.listen[0]}", daemon=True)
        self._thread.start()
        self._ready.wait(15)
        if self._error is not None:
            self._thread.join(5)
            raise RuntimeError(f"the relay could not listen on {self.listen[0]}:{self.listen[1]}: {self._error}")
        if self.address is None:
            raise RuntimeError("the relay did not start within 15 s")
        with _registry_lock:
            _open_relays.add(self)
        log.info("relay %s:%d -> %s:%d, delay up %.0f±%.0f ms down %.0f±%.0f ms, cut %.1f %% %s",
                 *self.address, *self.target, self._delay["up"][0] * 1e3, self._delay["up"][1] * 1e3,
                 self._delay["down"][0] * 1e3, self._delay["down"][1] * 1e3, 100 * self.cut_fraction,
                 sorted(self.cut_connections) or "")
        return self

    def stop(self) -> RelayStats:
        """Close the listener and every connection; returns the stats."""
        loop, thread = self._loop, self._thread
        if thread is not None and thread.is_alive() and loop is not None:
            try:
                loop.call_soon_threadsafe(self._request_stop, "stopped")
            except RuntimeError:     # the loop closed in between
                pass
            thread.join(15)
        with _registry_lock:
            _open_relays.discard(self)
        return self.stats

    def wait(self, timeout: float | None = None) -> bool:
        """Wait until the relay has stopped (by ``stop()`` or by itself); True if it has."""
        if self._thread is not None:
            self._thread.join(timeout)
        return not self.running

    def cut_next(self, count: int = 1) -> None:
        """Cut the next ``count`` connections accepted (each after ``cut_after`` bytes), whatever the fraction."""
        with self._arm_lock:
            self._armed += int(count)

    def cut_all(self) -> int:
        """Reset every open connection now (a link going down); returns how many."""
        if not self.running or self._loop is None:
            return 0
        fut = asyncio.run_coroutine_threadsafe(self._cut_all(), self._loop)
        return fut.result(10)

    def __enter__(self) -> "Relay":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # ------------------------------------------------------------- the loop thread
    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        try:
            self._loop.run_until_complete(self._main())
        except BaseException as exc:    # reported to start(); never kill the harness
            self._error = self._error or exc
            self._ready.set()
        finally:
            self._loop.close()

    async def _main(self) -> None:
        self._stop_event = asyncio.Event()
        try:
            server = await asyncio.start_server(self._handle, self.listen[0], self.listen[1], reuse_address=True)
        except OSError as exc:
            self._error = exc
            self._ready.set()
            return
        self.address = server.sockets[0].getsockname()[:2]
        self._ready.set()
        try:
            await asyncio.wait_for(self._stop_event.wait(), timeout=self.max_seconds)
        except asyncio.TimeoutError:
            self.stats.stopped = "max_seconds"
            log.warning("relay %s:%d stopped by itself after %.0f s", *self.address, self.max_seconds)
        server.close()
        await self._cut_all(count=False)
        for t in list(self._tasks):
            t.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        await server.wait_closed()

    def _request_stop(self, reason: str) -> None:
        if not self.stats.stopped:
            self.stats.stopped = reason
        if self._stop_event is not None:
            self._stop_event.set()

    async def _cut_all(self, count: bool = True) -> int:
        n = 0
        for c in list(self._conns):
            if not c.cut:
                self._reset(c, count=count)
                n += 1
        return n

    def _reset(self, conn: _Conn, count: bool = True) -> None:
        """RST both sides: SO_LINGER 0 then abort, so the peers see a reset, not a clean close."""
        if conn.cut:
            return
        conn.cut = True
        if count:
            self.stats.cut += 1
        for tr in conn.transports:
            sock = tr.get_extra_info("socket")
            if sock is not None:
                try:
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                except OSError:
                    pass
            tr.abort()

    async def _handle(self, c_reader: asyncio.StreamReader, c_writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        self._tasks.add(task)
        self._count += 1
        index = self._count
        self.stats.connections += 1
        with self._arm_lock:
            armed = self._armed > 0
            self._armed -= armed
        cut = (armed or index in self.cut_connections
               or (self.cut_fraction > 0 and self._rng.random() < self.cut_fraction))
        conn = _Conn(index, self._rng.randint(*self.cut_after) if cut else None)
        try:
            try:
                t_reader, t_writer = await asyncio.wait_for(asyncio.open_connection(*self.target), 10)
            except (OSError, asyncio.TimeoutError) as exc:
                self.stats.refused += 1
                log.debug("relay: target %s:%d refused connection %d: %s", *self.target, index, exc)
                c_writer.transport.abort()
                return
            conn.transports = [c_writer.transport, t_writer.transport]
            self._conns.add(conn)
            log.debug("relay: connection %d%s", index, f" (cut after {conn.cut_at} B)" if cut else "")
            await asyncio.gather(self._pipe(c_reader, t_writer, conn, "up"),
                                 self._pipe(t_reader, c_writer, conn, "down"), return_exceptions=True)
        except asyncio.CancelledError:
            pass            # the relay is stopping: end quietly (asyncio logs a cancelled handler as an error)
        finally:
            self._conns.discard(conn)
            for tr in conn.transports:
                if not tr.is_closing():
                    tr.close()
            self._tasks.discard(task)

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, conn: _Conn,
                    direction: str) -> None:
        loop = asyncio.get_running_loop()
        mean, jitter = self._delay[direction]
        queue: asyncio.Queue = asyncio.Queue(maxsize=self._max_buffer)

        async def take_in() -> None:
            last_due = 0.0
            try:
                while True:
                    data = await reader.read(_CHUNK)
                    if not data:
                        break
                    now = loop.time()
                    hold = max(0.0, self._rng.uniform(mean - jitter, mean + jitter)) if (mean or jitter) else 0.0
                    due = max(last_due, now + hold)      # TCP keeps order: no overtaking
                    last_due = due
                    await queue.put((now, due, data))
            except (ConnectionError, OSError):
                pass
            finally:
                await queue.put(None)

        intake = asyncio.create_task(take_in())
        try:
            while True:
                item = await queue.get()
                if item is None:
                    if not conn.cut and writer.can_write_eof() and not writer.transport.is_closing():
                        writer.write_eof()           # pass a half-close on
                    break
                t_in, due, data = item
                wait = due - loop.time()
                if wait > 0:
                    await asyncio.sleep(wait)
                if conn.cut:
                    break
                if conn.cut_at is not None and conn.forwarded + len(data) >= conn.cut_at:
                    part = data[:max(0, conn.cut_at - conn.forwarded)]
                    if part:
                        writer.write(part)
                        self._count_bytes(direction, len(part), loop.time() - t_in)
                    log.debug("relay: cutting connection %d after %d B", conn.index, conn.cut_at)
                    self._reset(conn)
                    break
                writer.write(data)
                await writer.drain()
                conn.forwarded += len(data)
                self._count_bytes(direction, len(data), loop.time() - t_in)
                if self.stats.bytes_up + self.stats.bytes_down >= self.max_bytes:
                    log.warning("relay stopped by itself after %d bytes", self.max_bytes)
                    self._request_stop("max_bytes")
                    break
        except (ConnectionError, OSError):
            pass
        finally:
            intake.cancel()
            await asyncio.gather(intake, return_exceptions=True)

    def _count_bytes(self, direction: str, n: int, held_s: float) -> None:
        if direction == "up":
            self.stats.bytes_up += n
        else:
            self.stats.bytes_down += n
        self.stats.chunks += 1
        if len(self.stats.held_ms) < 200_000:
            self.stats.held_ms.append(held_s * 1000.0)


@atexit.register
def _close_everything() -> None:
    """The safety net: a harness that forgot (or could not) close still leaves nothing behind."""
    with _registry_lock:
        relays, links = list(_open_relays), list(_open_links)
    for r in relays:
        try:
            r.stop()
        except Exception:     # at exit: best effort, never raise
            pass
    for link in links:
        try:
            link.close()
        except Exception:
            pass


# --------------------------------------------------------------------------- self-test

_PROBE_CLIENT = r"""
import json, socket, struct, sys, time
host, port, n_rtt, n_bytes = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
def conn(cmd):
    s = socket.create_connection((host, port), timeout=60)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    s.sendall(cmd)
    return s
def recv_exact(s, n):
    got = 0
    while got < n:
        b = s.recv(min(1 << 16, n - got))
        if not b:
            raise SystemExit("connection closed early")
        got += len(b)
out = {}
s = conn(b"e")
rtts = []
for _ in range(n_rtt):
    t = time.perf_counter(); s.sendall(b"x"); recv_exact(s, 1); rtts.append((time.perf_counter() - t) * 1e3)
s.close()
out["rtt_ms"] = sorted(rtts)
s = conn(b"u" + struct.pack("!Q", n_bytes))
t = time.perf_counter(); blob = b"\0" * (1 << 16); left = n_bytes
while left:
    k = min(left, len(blob)); s.sendall(blob[:k]); left -= k
recv_exact(s, 1); out["up_bps"] = n_bytes * 8 / (time.perf_counter() - t); s.close()
s = conn(b"d" + struct.pack("!Q", n_bytes))
t = time.perf_counter(); recv_exact(s, n_bytes); out["down_bps"] = n_bytes * 8 / (time.perf_counter() - t)
s.close()
print(json.dumps(out))
"""


class _ProbeServer:
    """Echo / sink / source on 127.0.0.1 for the self-test: 'e' echo, 'u'+len sink, 'd'+len source."""

    def __init__(self):
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self._stop = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while not self._stop:
            try:
                c, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(c,), daemon=True).start()

    @staticmethod
    def _serve(c: socket.socket):
        with c:
            try:
                cmd = c.recv(1)
                if cmd == b"e":
                    while True:
                        b = c.recv(1 << 16)
                        if not b:
                            return
                        c.sendall(b)
                n = struct.unpack("!Q", _recv_exact(c, 8))[0]
                if cmd == b"u":
                    _recv_exact(c, n, keep=False)
                    c.sendall(b"k")
                elif cmd == b"d":
                    blob = b"\0" * (1 << 16)
                    while n:
                        k = min(n, len(blob))
                        c.sendall(blob[:k])
                        n -= k
            except OSError:
                return

    def close(self):
        self._stop = True
        _close_listener(self.sock)


def _close_listener(sock: socket.socket) -> None:
    """Close a listening socket so that a thread blocked in accept() returns (close alone leaves it listening)."""
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    sock.close()


def _recv_exact(s: socket.socket, n: int, keep: bool = True) -> bytes:
    parts, got = [], 0
    while got < n:
        b = s.recv(min(1 << 16, n - got))
        if not b:
            raise ConnectionError("closed early")
        got += len(b)
        if keep:
            parts.append(b)
    return b"".join(parts)


def selftest(rate: str | None = "20mbit", delay_ms: float = 20.0, jitter_ms: float = 5.0, n_rtt: int = 20,
             n_bytes: int = 2 << 20) -> dict:
    """Measure a shaped link end to end (client in the namespace, server on the host, through the relay)."""
    server = _ProbeServer()
    try:
        with ShapedLink(rate=rate) as link:
            relay = link.relay(("127.0.0.1", server.port), delay_ms=delay_ms, jitter_ms=jitter_ms)
            proc = link.run([sys.executable, "-I", "-c", _PROBE_CLIENT, relay.address[0], str(relay.address[1]),
                             str(n_rtt), str(n_bytes)], timeout=300)
            got = json.loads(proc.stdout)
            relay.stop()
            rtt = got["rtt_ms"]
            return {"rate": rate, "delay_ms": delay_ms, "jitter_ms": jitter_ms, "subnet": str(link.subnet),
                    "rtt_ms": {"min": rtt[0], "p50": rtt[len(rtt) // 2], "max": rtt[-1]},
                    "up_mbit_s": got["up_bps"] / 1e6, "down_mbit_s": got["down_bps"] / 1e6,
                    "relay": relay.stats.to_dict()}
    finally:
        server.close()


def main(argv: list[str] | None = None) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="python -m bench.netlink",
                                description="measure a shaped link: namespace + veth + tbf + delay relay")
    p.add_argument("--rate", default="20mbit", help="tbf rate both ways, e.g. 1mbit, 20mbit ('none': unshaped)")
    p.add_argument("--delay", type=float, default=20.0, help="relay delay per direction, ms (RTT is twice it)")
    p.add_argument("--jitter", type=float, default=5.0, help="relay jitter per direction, ± ms")
    p.add_argument("--bytes", type=int, default=2 << 20, help="bytes to push each way for the throughput")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    reason = unavailable_reason()
    if reason:
        print(f"cannot make a shaped link here: {reason}", file=sys.stderr)
        return 2
    r = selftest(None if args.rate == "none" else args.rate, args.delay, args.jitter, n_bytes=args.bytes)
    print(f"link {r['subnet']}: rate {r['rate']}, relay delay {r['delay_ms']:g}±{r['jitter_ms']:g} ms per direction")
    print(f"  RTT ms     min {r['rtt_ms']['min']:.1f}  p50 {r['rtt_ms']['p50']:.1f}  max {r['rtt_ms']['max']:.1f}")
    print(f"  throughput up {r['up_mbit_s']:.1f} Mbit/s, down {r['down_mbit_s']:.1f} Mbit/s")
    print(f"  {RelayStats(**{k: v for k, v in r['relay'].items() if k != 'held_ms'}).summary()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
