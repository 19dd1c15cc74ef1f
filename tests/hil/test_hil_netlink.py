"""The shaped-link harness itself (bench.netlink): isolation, clean-up, relay integrity, delay and cuts."""
from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading

import pytest

from bench import netlink
from hil.targets import need_netns

pytestmark = [pytest.mark.hil, pytest.mark.timeout(120)]

# a client run inside the namespace: send N random bytes to host:port, read what comes back
CLIENT = r"""
import hashlib, json, os, socket, sys
host, port, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
data = os.urandom(n)
s = socket.create_connection((host, port), timeout=30)
got, err = b"", None
try:
    s.sendall(data)
    s.shutdown(socket.SHUT_WR)
    while True:
        b = s.recv(65536)
        if not b:
            break
        got += b
except OSError as exc:
    err = type(exc).__name__
print(json.dumps({"sent": hashlib.sha256(data).hexdigest(), "got": hashlib.sha256(got).hexdigest(),
                  "n_got": len(got), "error": err}))
"""


class EchoServer:
    """Echoes every connection back on 127.0.0.1 (the 'real service' behind the relay)."""

    def __init__(self):
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                c, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._echo, args=(c,), daemon=True).start()

    @staticmethod
    def _echo(c):
        with c:
            try:
                while True:
                    b = c.recv(65536)
                    if not b:
                        return
                    c.sendall(b)
            except OSError:
                return

    def close(self):
        # shutdown wakes the thread blocked in accept(); close alone would leave the port listening
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()


@pytest.fixture
def echo():
    s = EchoServer()
    yield s
    s.close()


def _client(link, relay, n: int) -> dict:
    out = link.run([sys.executable, "-I", "-c", CLIENT, relay.address[0], str(relay.address[1]), str(n)])
    return json.loads(out.stdout)


def _links() -> str:
    return subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True).stdout


def test_namespace_sees_only_its_link_and_is_gone_after_close(echo):
    need_netns()
    with netlink.ShapedLink(rate="20mbit") as link:
        name, host_if = link.name, link.host_if
        assert link.exists() and host_if in _links()
        routes = link.run(["ip", "-4", "route"]).stdout
        assert "default" not in routes and str(link.subnet) in routes       # nothing beyond the /30
        # the host's loopback services are not reachable from inside: only through a relay
        probe = link.run(["bash", "-c", f"exec 3<>/dev/tcp/127.0.0.1/{echo.port}"], check=False)
        assert probe.returncode != 0
        qdiscs = link.qdiscs()
        assert qdiscs.count("tbf") >= 2 and "20Mbit" in qdiscs
        assert link.subnet.is_private and link.subnet.prefixlen == 30
    assert not link.exists() and host_if not in _links()
    assert name not in subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout


def test_link_is_removed_when_the_body_fails():
    need_netns()
    with pytest.raises(RuntimeError, match="boom"):
        with netlink.ShapedLink() as link:
            sleeper = link.popen(["sleep", "600"])
            raise RuntimeError("boom")
    assert not link.exists() and link.host_if not in _links()
    assert sleeper.poll() is not None                         # what ran inside was ended


def test_relay_delivers_every_byte_both_ways_and_holds_them(echo):
    need_netns()
    with netlink.ShapedLink(rate="20mbit") as link:
        relay = link.relay(("127.0.0.1", echo.port), delay_ms=30, jitter_ms=10)
        got = _client(link, relay, 1 << 20)
        stats = relay.stop()
    assert got["error"] is None and got["n_got"] == 1 << 20 and got["got"] == got["sent"]
    assert stats.bytes_up == stats.bytes_down == 1 << 20 and stats.cut == 0
    # every chunk was held at least delay - jitter in each direction (a lower bound: cannot flake)
    assert min(stats.held_ms) >= 20.0


def test_relay_cuts_chosen_connections_mid_stream_and_leaves_the_others(echo):
    need_netns()
    with netlink.ShapedLink() as link:
        relay = link.relay(("127.0.0.1", echo.port), cut_connections={1}, cut_after=(50_000, 50_000))
        cut = _client(link, relay, 400_000)
        whole = _client(link, relay, 400_000)
        relay.cut_next(1)
        armed = _client(link, relay, 400_000)
        stats = relay.stop()
    assert cut["n_got"] < 400_000 and cut["got"] != cut["sent"]           # reset mid-stream
    assert whole["error"] is None and whole["got"] == whole["sent"]
    assert armed["n_got"] < 400_000
    assert stats.connections == 3 and stats.cut == 2


def test_relay_stops_by_itself(echo):
    need_netns()
    with netlink.ShapedLink() as link:
        relay = link.relay(("127.0.0.1", echo.port), max_seconds=0.5)
        assert relay.wait(10) and relay.stats.stopped == "max_seconds"


def test_rates_are_parsed_like_tc():
    assert netlink.parse_rate("20mbit") == 20_000_000
    assert netlink.parse_rate("500kbit") == 500_000
    assert netlink.parse_rate("2mbps") == 16_000_000
    with pytest.raises(ValueError, match="not like"):
        netlink.parse_rate("fast")


def test_measured_link_figures(hil_report):
    """Not asserted (timings): what the harness gives at 20 Mbit/s, 40 ± 10 ms per direction."""
    need_netns()
    r = netlink.selftest(rate="20mbit", delay_ms=40, jitter_ms=10, n_bytes=2 << 20)
    hil_report["shaped link self-test (20mbit, relay 40±10 ms each way)"] = {
        "rtt_ms": {k: round(v, 1) for k, v in r["rtt_ms"].items()},
        "up_mbit_s": round(r["up_mbit_s"], 1), "down_mbit_s": round(r["down_mbit_s"], 1)}
    assert r["relay"]["bytes_up"] >= 2 << 20, json.dumps(r)
