"""Bundle update time over a shaped link: a paper-cnn bundle published to a device behind 1 Mbit/s, 40 ms RTT.

The device service runs in a network namespace whose veth is shaped with ``tc tbf`` (both ways)
and reaches Mosquitto through a relay that adds 20 ms each way (``bench.netlink``); the operator
and a cloud worker (which follows the announcements too) sit on loopback.  The device runs
paper-cnn cut at pool2 and answers two requests a second all along; ``edgesplit fleet publish``
announces the dense1 bundle (another cut: another head and tail).  For each way of sending it —
retained MQTT chunks of 64 KiB or 16 KiB, or a URL on the shaped link — the table gives the
archive's bytes, the bytes that crossed the link, the seconds from the announcement to the first
``updating`` report and to the switch, what the link's rate alone would take, and the p95 latency
of the requests made while it downloaded.  Between variants ``fleet rollback`` returns the device
to pool2 (which it keeps: no download), and the device drops dense1, so each variant fetches it anew.
"""
from __future__ import annotations

import functools
import http.server
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import PYTHON, ROOT, Report, bundle_for, fmt, parse_args  # noqa: E402
from protocol.stats import percentiles  # noqa: E402

FLEET = "bench"


def _png(path: Path, x) -> None:
    from PIL import Image

    tmp = path.with_name("." + path.name)
    Image.fromarray((x.reshape(28, 28) * 255).astype("uint8"), "L").save(tmp)
    os.replace(tmp, path)


class _Watch:
    """(time, state, bundle, progress) of every report of the device, as the operator receives them."""

    def __init__(self, access):
        from deploy.fleet_view import FleetView

        self.client = access.client()
        self.view = FleetView(self.client, FLEET)
        self.events: list[tuple[float, str, str, str, float | None]] = []
        self._stop = threading.Event()
        self.client.start(wait_connected=10)
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self):
        last = None
        while not self._stop.wait(0.02):
            d = self.view.devices.get("pi-001")
            r = d.report if d else None
            if r is not None and (r.state, r.bundle, r.target, r.progress) != last:
                last = (r.state, r.bundle, r.target, r.progress)
                self.events.append((time.monotonic(), *last))

    def first(self, pred, after: float) -> float | None:
        return next((t for t, *e in self.events if t >= after and pred(*e)), None)

    def stop(self):
        self._stop.set()
        self.client.stop()


def main(argv=None) -> int:
    args = parse_args(__doc__.splitlines()[0], lambda p: (
        p.add_argument("--rate", default="1mbit", help="link rate both ways (default 1mbit)"),
        p.add_argument("--from-cut", default="pool2"), p.add_argument("--to-cut", default="dense1")), argv)
    from bench import netlink

    reason = netlink.unavailable_reason()
    if reason:
        print(f"skipped: {reason}")
        return 0
    from deploy.broker import start_mosquitto
    from deploy.fleet import FleetAccess, publish, rollback
    from device.config import dump_config
    from protocol import announce
    from protocol.manifest import load_bundle

    a, b = bundle_for("paper-cnn", args.from_cut), bundle_for("paper-cnn", args.to_cut)
    b_tar = b.parent / (b.name + ".tar.gz")
    variants = [("MQTT chunks, 64 KiB", 65536, False), ("MQTT chunks, 16 KiB", 16384, False),
                ("URL (HTTP on the shaped link)", 65536, True)]
    if args.quick:
        variants = variants[:1]
    rep = Report("update", "Bundle update over a shaped link (paper-cnn)", quick=args.quick, settings={
        "rate": args.rate, "rtt_ms": 40, "from": f"paper-cnn {args.from_cut}", "to": f"paper-cnn {args.to_cut}",
        "requests_per_s": 2, "window_chunks": 8}, measures=__doc__.split("\n\n")[1].replace("\n", " "))
    tmp = Path(tempfile.mkdtemp(prefix="edgesplit-bench-update-"))
    priv, pub, _ = announce.generate_keys(tmp / "fleet")
    broker = start_mosquitto("127.0.0.1", None, workdir=tmp / "broker")
    access = FleetAccess(broker_url=broker.url, signing_key=str(priv), public_key=str(pub))
    from bench.common import Role

    worker = Role([PYTHON, "-m", "edgesplit", "cloud", "--bundle", a, "--broker", broker.url, "--fleet", FLEET,
                   "--fleet-key", pub, "--bundle-cache", tmp / "cloud-cache", "--stats-every", "0"], name="update-cloud")
    rows, raw = [], []
    x = None
    try:
        from bench.common import mnist_test

        x, _ = mnist_test(200)
        with netlink.ShapedLink(rate=args.rate) as link, \
                link.relay(("127.0.0.1", broker.port), delay_ms=20) as relay:
            state = tmp / "device"
            (state / "inbox").mkdir(parents=True)
            cfg = tmp / "device.toml"
            cfg.write_text(dump_config({
                "device_id": "pi-001", "fleet": FLEET, "bundle": str(a), "state_dir": str(state),
                "broker": {"url": relay.url, "password_file": "", "ca_file": ""},
                "inputs": {"sources": [str(state / "inbox")], "poll_interval": 0.1, "settle": 0.1},
                "agent": {"report_interval": 0.5, "resend_after": 10.0, "outbox": "outbox.sqlite",
                          "results": "results.jsonl"},
                "update": {"fleet_key": str(pub), "probation": 4, "probation_seconds": 10.0}}))
            env = dict(os.environ, PYTHONPATH=str(ROOT))
            dev = link.popen([PYTHON, "-m", "edgesplit", "device", "serve", "--config", str(cfg)], env=env,
                             stdout=open(tmp / "device.out", "w"), stderr=open(tmp / "device.log", "w"))
            watch = _Watch(access)
            stop_feed = threading.Event()
            fed: dict[str, float] = {}

            def feed():
                i = 0
                while not stop_feed.wait(0.5):
                    name = f"img-{i:05d}.png"
                    _png(state / "inbox" / name, x[i % len(x)])
                    fed[name] = time.monotonic()
                    i += 1

            threading.Thread(target=feed, daemon=True).start()
            deadline = time.monotonic() + 120
            while not (watch.view.devices.get("pi-001") and watch.view.devices["pi-001"].report):
                if time.monotonic() > deadline or dev.poll() is not None:
                    raise RuntimeError("the device did not report; see " + str(tmp / "device.log"))
                time.sleep(0.2)
            server = None
            for label, chunk, use_url in variants:
                url = None
                if use_url:
                    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(b.parent))
                    handler.log_message = lambda *a, **k: None
                    server = http.server.ThreadingHTTPServer((link.host_addr, 0), handler)
                    threading.Thread(target=server.serve_forever, daemon=True).start()
                    url = f"http://{link.host_addr}:{server.server_address[1]}/{b_tar.name}"
                down0 = relay.stats.to_dict().get("bytes_down", 0)
                t0 = time.monotonic()
                result = publish(b, FLEET, access, chunk_size=chunk, url=url, timeout_s=600, say=lambda s: None)
                bid = load_bundle(b).bundle_id
                t_upd = watch.first(lambda st, bu, ta, pr: st == "updating" and ta == bid, t0)
                t_sw = watch.first(lambda st, bu, ta, pr: bu == bid, t0)
                down = relay.stats.to_dict().get("bytes_down", 0) - down0
                size = b_tar.stat().st_size
                during = [n for n, t in fed.items() if t_upd and t_sw and t_upd <= t <= t_sw]
                raw.append({"variant": label, "ok": result.ok, "t_updating": t_upd and t_upd - t0,
                            "t_switch": t_sw and t_sw - t0, "bytes": size, "relay_bytes_down": down,
                            "during": during})
                rows.append([label, f"{size:,}", f"{down:,}" if not use_url else "(HTTP, not relayed)",
                             fmt(t_upd - t0 if t_upd else None, ".2f"), fmt(t_sw - t0 if t_sw else None, ".1f"),
                             fmt(size * 8 / netlink.parse_rate(args.rate), ".1f"), "ok" if result.ok else "FAILED"])
                if server is not None:
                    server.shutdown()
                    server = None
                rollback(FLEET, access, timeout_s=120, say=lambda s: None)
            stop_feed.set()
            time.sleep(3)
            import json

            res = [json.loads(ln) for ln in (state / "results.jsonl").read_text().splitlines() if ln.strip()]
            lat = {Path(r["input"]).name: r.get("latency_ms") for r in res if r.get("latency_ms") is not None}
            for row, rw in zip(rows, raw):
                p = percentiles([lat[n] for n in rw["during"] if n in lat])
                row.append(fmt(p.get("p95"), ".0f") if p else "-")
                rw["p95_during_ms"] = p.get("p95") if p else None
            lost = [n for n in fed if n not in lat]
            rep.note(f"{len(fed)} requests made during the run, {len(fed) - len(lost)} answered, "
                     f"{len(lost)} unanswered at the end")
            watch.stop()
            dev.terminate()
            dev.wait(60)
    finally:
        worker.stop()
        broker.cleanup()
    rep.table("update", ["how", "archive B", "bytes down the link", "s to updating", "s to switch",
                         "link alone s", "result", "p95 ms during"], rows,
              title=f"paper-cnn {args.from_cut} -> {args.to_cut} over {args.rate}, 40 ms RTT",
              notes=["s to switch: from the announcement to the device's first report naming the new bundle "
                     "(fetched, every sha256 checked, unpacked, self-tested, switched)",
                     "link alone: the archive's bits at the link's rate, no protocol overhead",
                     "bytes down the link: what the relay carried to the device meanwhile (chunks, MQTT and TLS-less "
                     "framing, the answers to its requests)"])
    rep.data["runs"] = raw
    rep.finish(args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
