"""How long one message takes through the broker and back, and whether that looks like Nagle's algorithm.

Measured on this project's machine (loopback, a Mosquitto 2.0 without ``set_tcp_nodelay true``, its
default): one request at a time through the broker to another client and back took 44 ms instead of
0.2 ms — the broker's small writes wait for an ACK that the other side delays (Nagle's algorithm meeting
delayed ACKs) — and a device with 16 requests in flight saw 43.6 ms per round trip.  The configurations
edgesplit writes set ``set_tcp_nodelay true``; a broker someone else runs may not.

:func:`round_trip_ms` opens two short-lived connections with the caller's credentials and plays a device
and a worker: one sends a QoS 1 message on a topic nobody else reads (``edgesplit/v1/_probe/<random>/req``),
the other answers it on ``.../res``, one at a time, and each answer is timed.  Like a device, the sender
then gets two packets from the broker per round (the PUBACK, then the answer): that second small write is
the one Nagle's algorithm holds back.  A broker whose
ACL keeps that topic from us gives no answer: the probe then says it could not measure.
:func:`nagle_advice` turns the median into the warning (with the fix) when it is at least
:data:`NAGLE_MS` on a loopback or private (LAN) address.
"""
from __future__ import annotations

import ipaddress
import logging
import queue
import socket
import statistics
import threading
import time
import uuid

log = logging.getLogger("protocol.mqtt")

__all__ = ["round_trip_ms", "nagle_advice", "probe_in_background", "probe_like", "NAGLE_MS"]

NAGLE_MS = 20.0


def round_trip_ms(url: str, *, rounds: int = 5, timeout: float = 2.0, **client_options) -> list[float] | None:
    """Round trips (ms) of ``rounds`` messages sent one at a time from one connection to another; None when
    the broker delivered nothing (an ACL, or it is unreachable)."""
    from protocol.mqtt.client import Backoff, MqttClient

    topic = f"edgesplit/v1/_probe/{uuid.uuid4().hex[:12]}"
    got: queue.SimpleQueue = queue.SimpleQueue()
    base = client_options.pop("client_id", None) or f"edgesplit-probe-{uuid.uuid4().hex[:8]}"
    client_options.setdefault("backoff", Backoff(0.1, 0.5))
    rx = MqttClient(url, client_id=f"{base}-rx", **client_options)
    tx = MqttClient(url, client_id=f"{base}-tx", **client_options)
    rx.subscribe(f"{topic}/req", lambda t, p: rx.publish(f"{topic}/res", p, qos=1), qos=1)
    tx.subscribe(f"{topic}/res", lambda t, p: got.put(time.perf_counter()), qos=1)
    out: list[float] = []
    try:
        if not (rx.start(wait_connected=timeout) and tx.start(wait_connected=timeout)):
            return None
        for _ in range(rounds):
            t0 = time.perf_counter()
            tx.publish(f"{topic}/req", b"probe", qos=1)
            try:
                out.append((got.get(timeout=timeout) - t0) * 1e3)
            except queue.Empty:
                return out or None
    except Exception as exc:            # a probe never stops its caller
        log.debug("round-trip probe of %s failed: %s", url, exc)
        return out or None
    finally:
        tx.stop(timeout=0.5)
        rx.stop(timeout=0.5)
    return out


def _near(host: str) -> bool:
    """Loopback or a private (LAN) address, where a round trip should take about a millisecond."""
    try:
        addr = ipaddress.ip_address(host)
    except ValueError:
        if host == "localhost":
            return True
        try:
            addr = ipaddress.ip_address(socket.gethostbyname(host))
        except OSError:
            return False
    return addr.is_loopback or addr.is_private


def nagle_advice(rtts: list[float] | None, host: str) -> str | None:
    """The warning and its fix when the median round trip looks like Nagle's algorithm; None otherwise."""
    if not rtts:
        return None
    median = statistics.median(rtts)
    if median < NAGLE_MS or not _near(host):
        return None
    return (f"a message takes {median:.0f} ms through the broker at {host} and back, on a loopback or LAN "
            f"address where about 1 ms is usual: that looks like Nagle's algorithm meeting delayed ACKs on the "
            f"broker's connections (unless the link itself adds delay). Fix: put `set_tcp_nodelay true` in mosquitto.conf (edgesplit's generated configs do) "
            f"and restart the broker")


def probe_like(client, who: str) -> threading.Thread:
    """:func:`probe_in_background` with the broker, user, password and TLS files of a started MqttClient."""
    b = client.broker
    host = f"[{b.host}]" if ":" in b.host else b.host
    return probe_in_background(f"{'mqtts' if b.tls else 'mqtt'}://{host}:{b.port}", who, username=b.username,
                               password=b.password, tls_ca=b.ca, tls_cert=b.cert, tls_key=b.key,
                               client_id=f"{client.client_id[:40]}-probe")


def probe_in_background(url: str, who: str, **client_options) -> threading.Thread:
    """At start-up: measure the round trip on a thread of its own and log a warning when it looks like Nagle."""
    def run() -> None:
        from protocol.mqtt.url import parse_url

        rtts = round_trip_ms(url, **client_options)
        host = parse_url(url).host
        advice = nagle_advice(rtts, host)
        if advice:
            log.warning("%s: %s", who, advice)
        elif rtts:
            log.debug("%s: broker round trip %.1f ms (median of %d)", who, statistics.median(rtts), len(rtts))
        else:
            log.debug("%s: could not measure the broker round trip (the ACL keeps the probe topic out?)", who)

    t = threading.Thread(target=run, name="broker-probe", daemon=True)
    t.start()
    return t
