"""The broker ceiling: a bare MQTT echo, and the windowed request loop every MQTT benchmark uses.

A :class:`Requester` publishes requests (QoS 1) on ``<prefix>/<mode>/req`` with at most
``window`` unanswered at a time, and takes the answers from ``<prefix>/<mode>/res``,
matched by an id the answer carries.  The echo server (:func:`echo_reply`) answers every
request at once from its network thread with a payload of the size the request asks
for: no decoding, no model, no batching.  Its requests/s on the same broker, with the
same payloads, QoS and window, is the ceiling our end-to-end figures are a fraction of.

Run alone (``python bench/bench_echo.py``) it measures the ceiling over loopback for a
range of payload sizes at QoS 0 and 1 against a Mosquitto it starts itself; the
end-to-end benchmark runs the same echo with each variant's real payloads.
"""
from __future__ import annotations

import queue
import struct
import sys
import time
import uuid
from pathlib import Path
from typing import Callable

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import common  # noqa: E402

_STAMP = struct.Struct("<QI")      # request id, size of the answer wanted


def stamp(payload: bytes, rid: int, reply_bytes: int) -> bytes:
    """``payload`` of the same length with the id and the wanted answer size in its first 12 bytes."""
    b = bytearray(payload)
    if len(b) < _STAMP.size:
        b.extend(bytes(_STAMP.size - len(b)))
    _STAMP.pack_into(b, 0, rid, reply_bytes)
    return bytes(b)


def echo_reply(payload: bytes) -> bytes:
    """What the echo server answers to a stamped request: the id, padded to the size asked for."""
    rid, size = _STAMP.unpack_from(payload, 0)
    out = bytearray(max(size, 8))
    struct.pack_into("<Q", out, 0, rid)
    return bytes(out)


def echo_id(payload: bytes) -> int:
    return struct.unpack_from("<Q", payload, 0)[0]


class Requester:
    """Windowed request/answer loop over one MQTT connection (see the module docstring)."""

    def __init__(self, url: str, prefix: str, mode: str, *, qos: int = 1, client_id: str | None = None):
        from protocol.mqtt import Backoff, MqttClient

        self.req_topic = f"{prefix}/{mode}/req"
        self.res_topic = f"{prefix}/{mode}/res"
        self.qos = qos
        self._q: queue.SimpleQueue = queue.SimpleQueue()
        self.client = MqttClient(url, client_id=client_id or f"bench-{mode}-{uuid.uuid4().hex[:6]}",
                                 backoff=Backoff(0.1, 1.0), max_inflight=1000)
        self.client.subscribe(self.res_topic, lambda t, p: self._q.put((time.perf_counter(), p)), qos=qos)
        if not self.client.start(wait_connected=30):
            raise RuntimeError(f"cannot connect to {url}")

    def run(self, n: int, make: Callable[[int], bytes], parse_id: Callable[[bytes], int], *, window: int,
            first_id: int = 0, stall_s: float = 120.0) -> dict:
        """Send ``n`` requests (``make(id)`` builds each, timed) and wait for their answers."""
        while True:                           # answers left over from an earlier phase
            try:
                self._q.get_nowait()
            except queue.Empty:
                break
        started: dict[int, float] = {}
        lat: list[float] = []
        sent = done = dup = 0
        nbytes = 0
        clock = time.perf_counter
        t0 = last = clock()
        while done < n:
            while sent < n and len(started) < window:
                rid = first_id + sent
                ts = clock()
                payload = make(rid)
                started[rid] = ts
                self.client.publish(self.req_topic, payload, qos=self.qos)
                nbytes += len(payload)
                sent += 1
            try:
                t_recv, payload = self._q.get(timeout=0.5)
            except queue.Empty:
                if clock() - last > stall_s:
                    break
                continue
            ts = started.pop(parse_id(payload), None)
            if ts is None:
                dup += 1
                continue
            last = t_recv
            lat.append((t_recv - ts) * 1e3)
            done += 1
        wall = (last if done else clock()) - t0
        return {"n": n, "answered": done, "lost": n - done, "unmatched": dup, "seconds": wall,
                "throughput": done / wall if wall > 0 else float("nan"),
                "bytes_per_request": nbytes / sent if sent else None, "latency_ms": common.summarize(lat)}

    def stop(self) -> None:
        self.client.stop(timeout=2)


def serve_echo(url: str, filter_: str) -> None:
    """An echo server until SIGTERM: answers every request on ``filter_`` (``.../req``) on ``.../res``."""
    import signal
    import threading

    from protocol.mqtt import Backoff, MqttClient

    client = MqttClient(url, client_id=f"bench-echo-{uuid.uuid4().hex[:6]}", backoff=Backoff(0.1, 1.0),
                        max_inflight=1000)
    qos = 1

    def on(topic: str, payload: bytes) -> None:
        client.publish(topic[:-4] + "/res", echo_reply(payload), qos=qos)

    client.subscribe(filter_, on, qos=qos)
    client.start(wait_connected=30)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    common.ready()
    while not stop.wait(0.5):
        pass
    client.stop(timeout=2)


# --------------------------------------------------------------------------- standalone

def main(argv=None) -> int:
    def extra(p):
        p.add_argument("--n", type=int, default=None, help="requests per payload size (default 2000, quick 300)")
        p.add_argument("--window", type=int, default=64, help="unanswered requests allowed (default 64)")

    args = common.parse_args("the broker ceiling: bare MQTT echo through Mosquitto", extra, argv)
    n = args.n or (300 if args.quick else 2000)
    sizes = [64, 1024, 4096, 16384, 65536] if not args.quick else [64, 1024, 16384]
    from deploy.broker import start_mosquitto

    rep = common.Report("echo", "Broker ceiling: bare MQTT echo over loopback", quick=args.quick,
                        settings={"n": n, "window": args.window, "repeats": args.repeats, "sizes": sizes,
                                  "answer_bytes": 90, "broker": "mosquitto (started here)"},
                        measures="requests/s and round-trip latency of a request answered at once by a bare "
                                 "MQTT client (no decoding, no model), the ceiling for the end-to-end figures")
    run = uuid.uuid4().hex[:8]
    rows = []
    with start_mosquitto() as broker:
        server = common.Role([common.PYTHON, __file__, "--role", "echo"], name="echo",
                             env={"BENCH_ECHO_URL": broker.url, "BENCH_ECHO_FILTER": f"bench/{run}/+/req"})
        server.wait_ready()
        try:
            for qos in (0, 1):
                for size in sizes:
                    req = Requester(broker.url, f"bench/{run}", f"q{qos}s{size}", qos=qos)
                    base = bytes(size)
                    thr, p50 = [], []
                    for r in range(args.repeats):
                        res = req.run(n, lambda i: stamp(base, i, 90), echo_id, window=args.window,
                                      first_id=r * 10 * n)
                        thr.append(res["throughput"])
                        p50.append(res["latency_ms"].get("median", float("nan")))
                    req.stop()
                    t, lt = common.repeats_summary(thr), common.repeats_summary(p50)
                    rows.append([f"QoS {qos}", f"{size:,}", common.fmt_spread(t, ",.0f"),
                                 common.fmt(t["median"] * size * 8 / 1e6, ".1f"), common.fmt_spread(lt, ".2f")])
                    rep.data[f"qos{qos}-{size}"] = {"throughput": t, "latency_p50_ms": lt}
        finally:
            server.stop()
    rep.table("echo", ["QoS", "payload B", "req/s", "payload Mbit/s", "p50 ms (window)"], rows,
              title=f"Echo ceiling over loopback, {n} requests, window {args.window}",
              notes=["median over repeats (± half the range between repeats)",
                     "latency with the window full, so it includes queueing"])
    rep.finish(args.out)
    return 0


if __name__ == "__main__":
    import os

    if "--role" in sys.argv:
        serve_echo(os.environ["BENCH_ECHO_URL"], os.environ["BENCH_ECHO_FILTER"])
        raise SystemExit(0)
    raise SystemExit(main())
