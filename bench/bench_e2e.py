"""End to end through Mosquitto: split at every cut against the alternatives a user would pick instead.

Variants, all answered by a process playing the cloud on the same machine:

* ``split-<cut>`` — the real device agent (``device.agent.DeviceAgent``: head on one thread,
  int8 frames, compressed when it pays) and the real cloud worker (``cloud.worker``, micro-batching);
* ``device`` — the whole model (int8) on the device, no network;
* ``raw-uint8`` — the image's uint8 pixels in a frame, uncompressed; the cloud runs the whole
  float32 model;
* ``raw-png`` — the image as PNG; the cloud decodes it and runs the whole model;
* ``naive-json`` — a naive split at pool2: the float32 head's output as a JSON list, the
  float32 tail in the cloud.

Each variant runs N requests with at most ``window`` unanswered (throughput, latency under
load), then requests one at a time (latency of one request, what the planner predicts), and
the broker ceiling: a bare echo with the variant's own payloads, QoS and window on the same
broker in the same run.  Links: loopback, and shaped links from ``bench.netlink`` (a network
namespace whose veth is rate-limited with ``tc tbf``, delay added by a TCP relay): 40 ms RTT at
1 Mbit/s and at 20 Mbit/s.  The planner's prediction for every option is set beside the
measured one-at-a-time median, and the error reported.

Roles (``--role worker|server|device --config FILE``) are the helper processes this
benchmark starts; they print READY and, at the end, one JSON line.
"""
from __future__ import annotations

import json
import logging
import os
import re
import struct
import sys
import tempfile
import time
import uuid
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

from bench import common  # noqa: E402
from bench.bench_echo import Requester, echo_id, echo_reply, stamp  # noqa: E402
from protocol.tensors import json_default  # noqa: E402

log = logging.getLogger("bench.e2e")

MODEL = "paper-cnn"
JSON_CUT = "pool2"
RAW_BUNDLE_ID = "00000000000000aa"     # the raw-image frames name no real bundle
LINKS = {"loopback": None, "1mbit": "1mbit", "20mbit": "20mbit"}
RELAY_DELAY_MS = 20.0                 # per direction: 40 ms RTT
WARMUP = 20
_HOP_SHIPPED = 0.5                    # converter.planner.HOP_MS, printed in the notes


# =========================================================================== roles (helper processes)

def role_worker(cfg: dict) -> None:
    """The real cloud worker serving every split bundle, until SIGTERM; prints its stats."""
    from cloud.worker import run_worker

    stats = run_worker(cfg["bundles"], cfg["url"], name=f"bench-{os.getpid()}", stats_every=0,
                       max_batch=cfg.get("max_batch", 32), max_wait_ms=cfg.get("max_wait_ms", 0.0),
                       ready=lambda w: common.ready())
    print(json.dumps(stats.to_dict()), flush=True)


def role_server(cfg: dict) -> None:
    """The cloud side of the raw/PNG/JSON variants and the echo, until SIGTERM."""
    import io
    import signal
    import threading

    from PIL import Image

    from cloud.batcher import MicroBatcher
    from protocol.frame import Frame, decode_frame, encode_frame, now_us
    from protocol.manifest import load_bundle
    from protocol.mqtt import Backoff, MqttClient
    from runtime.interpreter import Model

    full = Model(cfg["full_model"])
    jb = load_bundle(cfg["json_bundle"])
    jtail = Model(jb.tail_path)
    client = MqttClient(cfg["url"], client_id=f"bench-server-{uuid.uuid4().hex[:6]}", backoff=Backoff(0.1, 1.0),
                        max_inflight=1000)
    counts = {"echo": 0, "batches": 0}

    def process(batch):
        groups: dict[str, list] = {}
        for topic, payload, t_recv in batch:
            groups.setdefault(topic.rsplit("/", 2)[-2], []).append((topic, payload, t_recv))
        for mode, rows in groups.items():
            counts["batches"] += 1
            if mode == "raw-uint8":
                frames = [decode_frame(p) for _, p, _ in rows]
                x = np.stack([f.tensor for f in frames]).astype(np.float32) / np.float32(255)
                probs = full.run(x)
                for (topic, _, t), f, pr in zip(rows, frames, probs):
                    client.publish(topic[:-4] + "/res", encode_frame(Frame.result(f, pr, t_recv_us=t)), qos=1)
            elif mode == "raw-png":
                ids = [struct.unpack_from("<Q", p, 0)[0] for _, p, _ in rows]
                imgs = [np.asarray(Image.open(io.BytesIO(p[8:])), np.uint8) for _, p, _ in rows]
                x = np.stack(imgs).reshape((len(imgs), *full.sample_shape)).astype(np.float32) / np.float32(255)
                probs = full.run(x)
                for (topic, _, _), i, pr in zip(rows, ids, probs):
                    client.publish(topic[:-4] + "/res", struct.pack("<Q", i) + pr.astype("<f4").tobytes(), qos=1)
            elif mode == "naive-json":
                reqs = [json.loads(p) for _, p, _ in rows]
                x = np.stack([np.asarray(r["data"], np.float32).reshape(r["shape"]) for r in reqs])
                probs = jtail.run(x)
                for (topic, _, _), r, pr in zip(rows, reqs, probs):
                    body = {"id": r["id"], "label": int(np.argmax(pr)), "probs": [float(v) for v in pr]}
                    client.publish(topic[:-4] + "/res", json.dumps(body).encode(), qos=1)
            counts[mode] = counts.get(mode, 0) + len(rows)

    batcher = MicroBatcher(process, max_batch=32, max_wait_s=0.0, name="bench-server")

    def on(topic: str, payload: bytes) -> None:
        if topic.rsplit("/", 2)[-2].startswith("echo"):
            counts["echo"] += 1
            client.publish(topic[:-4] + "/res", echo_reply(payload), qos=1)
        else:
            batcher.put((topic, payload, now_us()))

    client.subscribe(f"bench/{cfg['run']}/+/+/req", on, qos=1)
    client.start(wait_connected=30)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    common.ready()
    while not stop.wait(0.5):
        pass
    batcher.close(10)
    client.stop(timeout=2)
    print(json.dumps(counts), flush=True)


# --------------------------------------------------------------------------- device role

_TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def _proc_cpu_s(pid: int | None) -> float | None:
    """User + system CPU seconds of process ``pid`` (all its threads), from /proc; None if unreadable."""
    if not pid:
        return None
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / _TICK
    except (OSError, IndexError, ValueError):
        return None


class _CpuMeter:
    """CPU seconds used during a phase by this process (the device or the requester), the broker and
    the process playing the cloud, divided by the requests answered: where the machine's time went."""

    def __init__(self, cfg: dict, cloud: str):
        self.pids = {"broker": cfg.get("pids", {}).get("broker"), "cloud": cfg.get("pids", {}).get(cloud)}

    def __enter__(self) -> "_CpuMeter":
        self.t0 = time.process_time()
        self.c0 = {k: _proc_cpu_s(v) for k, v in self.pids.items()}
        return self

    def __exit__(self, *exc) -> None:
        self.device_s = time.process_time() - self.t0
        self.other_s = {k: (None if self.c0[k] is None or _proc_cpu_s(v) is None else _proc_cpu_s(v) - self.c0[k])
                        for k, v in self.pids.items()}

    def per_request_ms(self, n: int) -> dict:
        if not n:
            return {}
        out = {"device": 1e3 * self.device_s / n}
        out.update({k: None if v is None else 1e3 * v / n for k, v in self.other_s.items()})
        parts = [v for v in out.values() if v is not None]
        out["total"] = sum(parts) if len(parts) == 3 else None
        return out


def _metered(cfg: dict, cloud: str, fn) -> dict:
    with _CpuMeter(cfg, cloud) as m:
        r = fn()
    r["cpu_ms"] = m.per_request_ms(r.get("answered", 0))
    return r


def _result_frame_bytes(bundle_id: str, out_shape) -> int:
    from protocol.frame import Frame, encode_frame

    req = Frame.features(np.zeros((1,), np.int8), request_id=1, device_id="bench", bundle_id=bundle_id, seq=1,
                         scale=0.1, zero_point=0)
    return len(encode_frame(Frame.result(req, np.zeros(out_shape, np.float32), t_recv_us=1, t_done_us=2)))


def _agent_phase(agent, pixels, n):
    b0, f0 = agent.stats.bytes_sent, agent.stats.frames_sent
    t0 = time.perf_counter()
    res = list(agent.run_arrays(pixels[:n]))
    wall = time.perf_counter() - t0
    ok = [r for r in res if r.ok]
    frames = agent.stats.frames_sent - f0
    return {"n": n, "answered": len(ok), "lost": n - len(ok), "seconds": wall,
            "throughput": len(ok) / wall if wall > 0 else float("nan"),
            "bytes_per_request": (agent.stats.bytes_sent - b0) / frames if frames else None,
            "latency_ms": common.summarize(r.latency_ms for r in ok)}


def _split_variant(v, pixels, cfg) -> dict:
    from device.agent import DeviceAgent
    from device.config import DeviceConfig
    from device.transport import mqtt_client
    from protocol.frame import Frame, encode_frame
    from protocol.manifest import load_bundle
    from runtime.split import Head

    b = load_bundle(v["bundle"])
    dev = f"bench-{v['cut']}"

    def make_agent(window: int, batch: int) -> DeviceAgent:
        c = DeviceConfig(device_id=dev, fleet=cfg["fleet"], bundle=b.root, broker_url=cfg["url"], threads=1,
                         timeout=900, resend_after=0, max_in_flight=window, batch=batch,
                         client_id=f"bench-{uuid.uuid4().hex[:8]}")
        return DeviceAgent(c, mqtt_client(c), bundle=b, connect_timeout=30)

    out = {"throughput": [], "echo": []}
    with make_agent(cfg["window"], 32) as agent:
        list(agent.run_arrays(pixels[:WARMUP]))
        for _ in range(v["repeats"]):
            out["throughput"].append(_metered(cfg, "worker", lambda: _agent_phase(agent, pixels, v["n"])))
    with make_agent(1, 1) as agent:
        list(agent.run_arrays(pixels[:5]))
        out["latency"] = _agent_phase(agent, pixels, v["n_lat"])
    head = Head(b, num_threads=1)
    spec = b.manifest.feature
    xin = b.manifest.input.pixels_to_input(pixels[:v["n"]])
    head.features(xin[:32])
    out["head_only"] = []
    for _ in range(v["repeats"]):
        t0 = time.perf_counter()
        for s in range(0, len(xin), 32):
            head.features(xin[s:s + 32])
        wall = time.perf_counter() - t0
        out["head_only"].append({"throughput": len(xin) / wall, "seconds": wall})
    if v["echo"]:
        feats = head.features(xin)
        scale = spec.scale if spec.quantized else None
        zp = spec.zero_point if spec.quantized else None
        payloads = [encode_frame(Frame.features(f, request_id=i, device_id=dev, bundle_id=b.bundle_id, seq=i,
                                                scale=scale, zero_point=zp)) for i, f in enumerate(feats)]
        out["echo"] = _echo(cfg, v, payloads, _result_frame_bytes(b.bundle_id, b.manifest.output.shape))
    return out


def _echo(cfg, v, payloads, reply_bytes) -> list:
    req = Requester(cfg["url"], cfg["prefix"], f"echo-{v['name']}")
    try:
        req.run(WARMUP, lambda i: stamp(payloads[i % len(payloads)], i, reply_bytes), echo_id,
                window=cfg["window"], first_id=10**9)
        return [_metered(cfg, "server", lambda: req.run(v["n"], lambda i: stamp(payloads[i % len(payloads)], i,
                                                                             reply_bytes),
                                                         echo_id, window=cfg["window"], first_id=r * 10**7))
                for r in range(v["repeats"])]
    finally:
        req.stop()


def _request_variant(v, pixels, cfg, make, parse, reply_bytes) -> dict:
    req = Requester(cfg["url"], cfg["prefix"], v["name"])
    out = {"throughput": [], "echo": []}
    try:
        req.run(WARMUP, make, parse, window=cfg["window"], first_id=10**9)
        for r in range(v["repeats"]):
            out["throughput"].append(_metered(cfg, "server", lambda: req.run(v["n"], make, parse,
                                                                             window=cfg["window"],
                                                                             first_id=r * 10**7)))
        out["latency"] = req.run(v["n_lat"], make, parse, window=1, first_id=9 * 10**7)
    finally:
        req.stop()
    if v["echo"]:
        out["echo"] = _echo(cfg, v, [make(i) for i in range(min(v["n"], len(pixels)))], reply_bytes)
    return out


def _raw_variant(v, pixels, cfg) -> dict:
    from protocol.frame import Frame, decode_frame, encode_frame

    n_img = len(pixels)

    def make(i):
        return encode_frame(Frame.features(pixels[i % n_img], request_id=i, device_id="bench-raw",
                                           bundle_id=RAW_BUNDLE_ID, seq=i), compress="raw")

    return _request_variant(v, pixels, cfg, make, lambda p: decode_frame(p).request_id,
                            _result_frame_bytes(RAW_BUNDLE_ID, (10,)))


def _png_variant(v, pixels, cfg) -> dict:
    import io

    from PIL import Image

    n_img = len(pixels)

    def make(i):
        buf = io.BytesIO()
        Image.fromarray(pixels[i % n_img][:, :, 0], "L").save(buf, format="PNG")
        return struct.pack("<Q", i) + buf.getvalue()

    return _request_variant(v, pixels, cfg, make, lambda p: struct.unpack_from("<Q", p, 0)[0], 8 + 40)


def _json_variant(v, pixels, cfg) -> dict:
    from protocol.manifest import load_bundle
    from runtime.interpreter import Model

    b = load_bundle(v["bundle"])
    head = Model(b.head_path, num_threads=1)
    n_img = len(pixels)
    x = np.asarray(pixels, np.float32) / np.float32(255)

    def make(i):
        y = head.run(x[i % n_img][None])[0]
        return json.dumps({"id": i, "shape": list(y.shape), "data": y.ravel().tolist()}).encode()

    reply = len(json.dumps({"id": 10**7, "label": 3, "probs": [float(np.float32(0.123456789))] * 10}))
    return _request_variant(v, pixels, cfg, make, lambda p: json.loads(p)["id"], reply)


def _device_variant(v, pixels, cfg) -> dict:
    from runtime.interpreter import Model

    m = Model(v["model"], num_threads=1)
    x = np.asarray(pixels, np.float32) / np.float32(255)
    n = v["n"]
    for i in range(WARMUP):
        m.run(x[i:i + 1])
    out = {"throughput": [], "echo": []}
    for _ in range(v["repeats"]):
        t0 = time.perf_counter()
        for s in range(0, n, 32):
            m.run(x[s:s + 32])
        wall = time.perf_counter() - t0
        out["throughput"].append({"n": n, "answered": n, "lost": 0, "seconds": wall, "throughput": n / wall,
                                  "bytes_per_request": 0, "latency_ms": {"n": 0}})
    lat = []
    for i in range(v["n_lat"]):
        t0 = time.perf_counter()
        m.run(x[i:i + 1])
        lat.append((time.perf_counter() - t0) * 1e3)
    out["latency"] = {"n": v["n_lat"], "answered": v["n_lat"], "lost": 0, "latency_ms": common.summarize(lat),
                      "bytes_per_request": 0}
    return out


VARIANT_KINDS = {"split": _split_variant, "raw-uint8": _raw_variant, "raw-png": _png_variant,
                 "naive-json": _json_variant, "device": _device_variant}


def role_device(cfg: dict) -> None:
    pixels = np.load(cfg["images"])
    common.ready()
    results = {}
    for v in cfg["variants"]:
        t0 = time.perf_counter()
        print(f"[{cfg['link']}] {v['name']}: n {v['n']}, one at a time {v['n_lat']} ...", file=sys.stderr,
              flush=True)
        try:
            results[v["name"]] = VARIANT_KINDS[v["kind"]](v, pixels, cfg)
        except Exception as exc:  # one broken variant must not lose the others' figures
            log.exception("variant %s failed", v["name"])
            results[v["name"]] = {"error": f"{type(exc).__name__}: {exc}"}
        results[v["name"]]["seconds"] = time.perf_counter() - t0
        print(f"[{cfg['link']}] {v['name']}: done in {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
    print(json.dumps(results, default=json_default), flush=True)


ROLES = {"worker": role_worker, "server": role_server, "device": role_device}


# =========================================================================== orchestration

def _tbf_burst(link) -> int:
    """The token bucket's burst in bytes on the namespace's uplink (what tc reports), for the planner."""
    try:
        text = link.qdiscs()
        m = re.search(r"eth0.*?burst (\d+(?:\.\d+)?)([KMG]?)b", text, re.S)
        if m:
            return int(float(m.group(1)) * {"": 1, "K": 1024, "M": 2**20, "G": 2**30}[m.group(2)])
    except Exception as exc:  # the qdisc listing is informative only
        log.debug("cannot read the tbf burst: %s", exc)
    return max(3200, int((link.up_bps or 0) / 8 * 0.004))


def _variants(link: str, args, prof, rate_bps: float | None) -> list[dict]:
    cut_bytes = {c.cut: c.frame_bytes for c in prof.cuts}
    est = {"raw-uint8": prof.input["frame_bytes"], "raw-png": 350.0, "naive-json": 40_000.0}
    out = []

    def add(name, kind, wire, **extra):
        n, n_lat = args.n, args.n_lat
        if rate_bps:
            per_req_s = (wire or 100) * 8 / rate_bps
            n = int(min(n, max(30, args.budget_s / per_req_s)))
            n_lat = int(min(n_lat, max(10, args.budget_s / (per_req_s + 2 * RELAY_DELAY_MS / 1e3))))
        out.append(dict(name=name, kind=kind, n=n, n_lat=n_lat, repeats=1 if rate_bps else args.repeats,
                        echo=bool(rate_bps is None or not args.quick), **extra))

    if link == "loopback":
        add("device", "device", None, model=str(args.full8))
    add("raw-uint8", "raw-uint8", est["raw-uint8"])
    add("raw-png", "raw-png", est["raw-png"])
    for cut in args.cuts:
        add(f"split-{cut}", "split", cut_bytes[cut], bundle=str(args.bundles[cut]), cut=cut)
    add("naive-json", "naive-json", est["naive-json"], bundle=str(args.json_bundle))
    return out


def _run_link(link_name: str, args, prof, run: str, broker, workdir: Path, pids: dict) -> tuple[dict, dict]:
    rate = LINKS[link_name]
    info = {"link": link_name}
    ctx = None
    if rate is not None:
        from bench import netlink

        reason = netlink.unavailable_reason()
        if reason:
            print(f"skipping the {link_name} link: {reason}", flush=True)
            return {}, {"link": link_name, "skipped": reason}
        ctx = netlink.ShapedLink(rate=rate)
        ctx.open()
    try:
        if ctx is not None:
            relay = ctx.relay(("127.0.0.1", broker.port), delay_ms=RELAY_DELAY_MS)
            url = relay.url
            info.update(rate_bps=ctx.up_bps, burst_bytes=_tbf_burst(ctx), rtt_ms=2 * RELAY_DELAY_MS,
                        qdiscs=ctx.qdiscs())
            popen = ctx.popen
        else:
            url, popen = broker.url, None
        rate_bps = info.get("rate_bps")
        cfg = {"url": url, "link": link_name, "fleet": f"b{run}-{link_name}",
               "prefix": f"bench/{run}/{link_name}", "pids": pids,
               "images": str(workdir / "images.npy"), "window": args.window,
               "variants": _variants(link_name, args, prof, rate_bps)}
        cfg_path = workdir / f"device-{link_name}.json"
        cfg_path.write_text(json.dumps(cfg))
        t0 = time.perf_counter()
        role = common.Role([common.PYTHON, __file__, "--role", "device", "--config", cfg_path],
                           name=f"device-{link_name}", popen=popen, stderr_to_log=False)
        role.wait_ready(300)
        results = role.result(timeout=4 * 3600) or {}
        info["seconds"] = time.perf_counter() - t0
        info["variants"] = cfg["variants"]
        if ctx is not None:
            info["relay"] = relay.stats.to_dict() if hasattr(relay.stats, "to_dict") else str(relay.stats)
        return results, info
    finally:
        if ctx is not None:
            ctx.close()


# --------------------------------------------------------------------------- tables

def _med(runs: list, key: str) -> dict:
    vals = [r.get(key) for r in runs if r and r.get(key) is not None]
    return common.repeats_summary(vals)


def _lat(runs: list, q: str) -> dict:
    return common.repeats_summary([r["latency_ms"].get(q) for r in runs if r and r.get("latency_ms", {}).get("n")])


def _option_name(variant: str) -> str:
    """The planner's name for a variant (a cut, "raw" or "device")."""
    if variant.startswith("split-"):
        return variant[6:]
    return "raw" if variant == "raw-uint8" else variant


def _predicted(plan, variant: str) -> float | None:
    if plan is None:
        return None
    try:
        return plan.option(_option_name(variant)).latency_ms
    except KeyError:
        return None


def _err(pred, meas):
    return None if pred is None or not meas else (pred - meas) / meas


def _pct(e) -> str:
    return "-" if e is None else f"{100 * e:+.0f}%"


def _cpu(runs: list) -> dict:
    """Median over repeats of each process's CPU ms per answered request."""
    out = {}
    for k in ("device", "broker", "cloud", "total"):
        vals = [r["cpu_ms"][k] for r in runs if r and r.get("cpu_ms", {}).get(k) is not None]
        out[k] = float(np.median(vals)) if vals else None
    return out


def _tables(rep, link: str, res: dict, device_ref: dict | None, plans: dict, prof_dict: dict) -> dict:
    rows_t, rows_l, rows_c = [], [], []
    summary = {}
    dev_p50 = (device_ref or {}).get("latency", {}).get("latency_ms", {}).get("median")
    tail_ms = {c["cut"]: c["tail_ms"]["median"] for c in prof_dict["cuts"]}
    for name, r in res.items():
        if "error" in r:
            rows_t.append([name, "failed: " + r["error"][:60]] + [""] * 9)
            continue
        thr = _med(r["throughput"], "throughput")
        echo = _med(r.get("echo") or [], "throughput")
        head = _med(r.get("head_only") or [], "throughput")
        lost = sum(x.get("lost", 0) for x in r["throughput"]) + r["latency"].get("lost", 0)
        bpr = np.median([x["bytes_per_request"] for x in r["throughput"] if x.get("bytes_per_request") is not None]
                        or [float("nan")])
        ratio = thr["median"] / echo["median"] if echo.get("n") else None
        rows_t.append([name, common.fmt(bpr, ",.0f") if name != "device" else "0 (no network)",
                       f"{r['throughput'][0]['n']:,} x{len(r['throughput'])}", common.fmt_spread(thr, ",.0f"),
                       common.fmt_spread(echo, ",.0f") if echo.get("n") else "-", common.fmt(ratio, ".2f"),
                       common.fmt_spread(head, ",.0f") if head.get("n") else "-",
                       common.fmt(_lat(r["throughput"], "p50").get("median"), ".1f"),
                       common.fmt(_lat(r["throughput"], "p95").get("median"), ".1f"),
                       common.fmt(_lat(r["throughput"], "p99").get("median"), ".1f"), str(lost)])
        lat = r["latency"]["latency_ms"]
        pred, pred_cal = _predicted(plans.get("shipped"), name), _predicted(plans.get("calibrated"), name)
        e, e_cal = _err(pred, lat.get("median")), _err(pred_cal, lat.get("median"))
        rows_l.append([name, str(lat.get("n", 0)), common.fmt(lat.get("median"), ".1f"),
                       common.fmt(lat.get("p95"), ".1f"), common.fmt(lat.get("p99"), ".1f"),
                       common.ratio(lat.get("median"), dev_p50),
                       common.fmt(pred, ".1f"), _pct(e), common.fmt(pred_cal, ".1f"), _pct(e_cal)])
        cpu_e2e, cpu_echo = _cpu(r["throughput"]), _cpu(r.get("echo") or [])
        compute = None
        if name.startswith("split-") and head.get("n") and name[6:] in tail_ms:
            compute = 1e3 / head["median"] + tail_ms[name[6:]]
        extra = None
        if compute is not None and cpu_e2e["total"] is not None and cpu_echo["total"] is not None:
            extra = cpu_e2e["total"] - cpu_echo["total"] - compute
        if name != "device" and link == "loopback":
            rows_c.append([name] + [common.fmt(cpu_e2e[k], ".3f") for k in ("device", "broker", "cloud", "total")]
                          + [common.fmt(cpu_echo["total"], ".3f"), common.fmt(compute, ".3f"),
                             common.fmt(extra, "+.3f"), common.fmt(ratio, ".2f"),
                             common.ratio(cpu_echo["total"], cpu_e2e["total"])])
        summary[name] = {"throughput": thr, "echo": echo, "head_only": head, "ratio_to_echo": ratio, "lost": lost,
                         "bytes_per_request": float(bpr), "latency_one": lat,
                         "predicted_ms": pred, "predicted_calibrated_ms": pred_cal, "error": e, "error_calibrated": e_cal,
                         "cpu_ms_per_request": cpu_e2e, "echo_cpu_ms_per_request": cpu_echo,
                         "model_compute_ms": compute, "cpu_beyond_echo_and_model_ms": extra,
                         "loaded_latency": {q: _lat(r["throughput"], q) for q in ("p50", "p95", "p99")}}
    where = "loopback (127.0.0.1)" if link == "loopback" else \
        f"a shaped link: {link}, 40 ms RTT (tbf rate both ways, relay delay 20 ms each way)"
    rep.table(f"throughput-{link}", ["option", "bytes/req", "requests", "req/s", "echo req/s", "e2e/echo",
                                     "head-only req/s", "p50 ms", "p95 ms", "p99 ms", "lost"], rows_t,
              title=f"Throughput over {where}, window {rep.settings['window']}",
              notes=["req/s: median over repeats (± half the range); echo: bare MQTT echo with the same payloads, "
                     "QoS 1 and window, same broker, same run",
                     "head-only: the device's head alone, batches of 32 as the agent runs it, no network (the "
                     "device's compute ceiling)",
                     "p50/p95/p99: latency with the window full (queueing included), median over repeats; bytes/req: MQTT "
                     "payload",
                     "device: the whole int8 model on one thread, batches of 32, no network"])
    if rows_c:
        rep.table(f"cpu-{link}", ["option", "device", "broker", "cloud", "total", "echo total", "model alone",
                                  "beyond echo + model", "e2e/echo req/s", "echo/e2e CPU"], rows_c,
                  title=f"Where the CPU goes over {where}: CPU ms per answered request, throughput phase",
                  notes=["device: the process sending (the device agent, or for raw/PNG/JSON and the echo the "
                         "requester); cloud: the worker (split) or the bench server (raw, PNG, JSON, echo); broker: "
                         "Mosquitto; from /proc, all threads, median over repeats",
                         "echo total: the same three processes during the bare echo with the same payloads",
                         "model alone: the head per image in batches of 32 (head-only above) + the tail one at a "
                         "time (profile), each alone on an idle core",
                         "beyond echo + model: total - echo total - model alone: the frames, the agent's and the "
                         "worker's bookkeeping, and the model running slower beside the other processes on "
                         "shared cores",
                         "when the cores are the limit, e2e/echo req/s follows echo/e2e CPU: the model's work is "
                         "what the echo does not do"])
    rep.table(f"latency-{link}", ["option", "n", "p50 ms", "p95 ms", "p99 ms", "p50 vs device", "planner ms",
                                  "error",
                                  "planner ms (cal.)", "error (cal.)"], rows_l,
              title=f"One request at a time over {where}",
              notes=["from the input on the device to the answer back on the device (median of n requests)",
                     "planner: `edgesplit plan` with this run's profile (this machine, 1 thread), the link's rate, "
                     f"RTT and tbf burst and its shipped constants ({_HOP_SHIPPED} ms per MQTT hop); error = "
                     "(predicted - measured) / measured",
                     "cal.: the same with the per-hop overhead calibrated on this run's loopback figures"
                     + (f" ({plans['calibrated'].link.hop_ms:.2f} ms per hop)" if plans.get("calibrated") else "")])
    return summary


def _report_from_profile(prof_dict: dict) -> dict:
    return {"schema": "edgesplit.audit/1", "model": MODEL, "input": {"bytes": 784},
            "cuts": [{"name": c["cut"], "cost": {"bytes_int8": c["feature_bytes"], "frame_bytes": c["frame_bytes_wire"],
                                                  "head_ms": c["head_ms"]["median"], "tail_ms": c["tail_ms"]["median"]}}
                     for c in prof_dict["cuts"]]}


def _plan_for(link: str, info: dict, prof_dict: dict, hop_ms: float | None = None):
    from converter import planner

    kw = {} if hop_ms is None else {"hop_ms": hop_ms}
    report = _report_from_profile(prof_dict)
    if link == "loopback":
        return planner.plan(report, uplink="10gbit", rtt="0.05ms", device_profile=prof_dict, cloud_profile=prof_dict,
                            **kw)
    return planner.plan(report, uplink=info["rate_bps"], rtt=f"{info['rtt_ms']}ms", burst=info["burst_bytes"],
                        device_profile=prof_dict, cloud_profile=prof_dict, **kw)


def _calibrate_hop_ms(loopback: dict, prof_dict: dict) -> float | None:
    """Per-hop MQTT overhead of this stack on this machine: loopback measured minus the rest."""
    from converter import planner

    bare = _plan_for("loopback", {}, prof_dict, hop_ms=0.0)
    excess = []
    for name, r in loopback.items():
        if not name.startswith("split-") or "error" in r:
            continue
        meas = r["latency"]["latency_ms"].get("median")
        pred = _predicted(bare, name)
        if meas and pred is not None:
            excess.append(meas - pred)
    if not excess:
        return None
    return max(0.0, float(np.median(excess)) / planner.HOPS)


def _run_config(args, links, prof, workdir: Path, full32) -> tuple[dict, dict, dict]:
    """Broker (Mosquitto with edgesplit's generated configuration), worker and server, and the device on each link."""
    from deploy.broker import start_mosquitto

    run = uuid.uuid4().hex[:8]
    results, infos, extra = {}, {}, {}
    with start_mosquitto() as broker:
        wcfg = workdir / "worker.json"
        wcfg.write_text(json.dumps({"url": broker.url, "bundles": [str(b) for b in args.bundles.values()]}))
        scfg = workdir / "server.json"
        scfg.write_text(json.dumps({"url": broker.url, "run": run, "full_model": str(full32),
                                    "json_bundle": str(args.json_bundle)}))
        worker = common.Role([common.PYTHON, __file__, "--role", "worker", "--config", wcfg], name="worker")
        server = common.Role([common.PYTHON, __file__, "--role", "server", "--config", scfg], name="server")
        try:
            worker.wait_ready()
            server.wait_ready()
            pids = {"broker": broker.process.pid, "worker": worker.proc.pid, "server": server.proc.pid}
            for lk in links:
                print(f"\n-- link {lk}", flush=True)
                results[lk], infos[lk] = _run_link(lk, args, prof, run, broker, workdir, pids)
        finally:
            extra["worker_stats"] = worker.stop()
            extra["server_counts"] = server.stop()
    return results, infos, extra


# --------------------------------------------------------------------------- main

def main(argv=None) -> int:
    def extra(p):
        p.add_argument("--links", default="loopback,1mbit,20mbit",
                       help="comma-separated: loopback, 1mbit, 20mbit (default all three)")
        p.add_argument("--n", type=int, default=None, help="requests per variant (default 1000, quick 150)")
        p.add_argument("--n-lat", type=int, default=None, help="one-at-a-time requests (default 200, quick 20)")
        p.add_argument("--window", type=int, default=64, help="unanswered requests allowed (the agent's default)")
        p.add_argument("--cuts", default=",".join(common.PAPER_CUTS), help="cuts of paper-cnn to split at")
        p.add_argument("--budget-s", type=float, default=None,
                       help="on shaped links, cap each phase at about this much link time (default 40, quick 3)")

    args = common.parse_args("end to end through Mosquitto: every cut against the alternatives", extra, argv)
    args.n = args.n or (150 if args.quick else 1000)
    args.n_lat = args.n_lat or (20 if args.quick else 200)
    args.budget_s = args.budget_s or (3.0 if args.quick else 40.0)
    args.cuts = [c for c in args.cuts.split(",") if c]
    links = [lk for lk in args.links.split(",") if lk]
    for lk in links:
        if lk not in LINKS:
            raise SystemExit(f"unknown link {lk!r}: use {', '.join(LINKS)}")
    if args.quick and args.repeats == 3:
        args.repeats = 2
    rep = common.Report("e2e", "End to end through Mosquitto: split at every cut vs the alternatives",
                        quick=args.quick,
                        settings={"model": MODEL, "cuts": args.cuts, "requests": args.n, "one_at_a_time": args.n_lat,
                                  "window": args.window, "repeats_loopback": args.repeats, "repeats_shaped": 1,
                                  "links": links, "shaped_budget_s": args.budget_s, "qos": 1,
                                  "device_threads": 1, "frames": "int8, compress=auto (zstd when it saves >= 10 %)",
                                  "cloud": "edgesplit cloud worker, max batch 32, no wait (its defaults; split); same "
                                           "batching for raw/PNG/JSON",
                                  "broker": "Mosquitto with edgesplit's generated configuration (set_tcp_nodelay, "
                                            "max_queued_messages 100000); every client sets TCP_NODELAY"},
                        measures="requests/s, latency under load and one at a time, bytes per request, against the "
                                 "bare-echo ceiling and the planner's prediction")
    # ----------------------------------------------------------- artefacts
    args.bundles = {c: common.bundle_for(MODEL, c, "int8") for c in args.cuts}
    args.json_bundle = common.bundle_for(MODEL, JSON_CUT, "none")
    args.full8 = common.full_model_tflite(MODEL, "int8")
    full32 = common.full_model_tflite(MODEL, "none")
    workdir = Path(tempfile.mkdtemp(prefix="edgesplit-bench-e2e-"))
    n_img = max(args.n, args.n_lat) + WARMUP
    x, _ = common.mnist_test(n_img)
    np.save(workdir / "images.npy", np.round(x * 255).astype(np.uint8))
    from device.profile import profile

    print("profiling the heads and tails for the planner ...", flush=True)
    prof = profile([args.bundles[c] for c in args.cuts], runs=30 if args.quick else 100, threads=1,
                   inputs=x[:200], part="both")
    prof_dict = prof.to_dict()
    rep.data["profile"] = prof_dict

    results, infos, extra = _run_config(args, links, prof, workdir, full32)
    rep.data.update(links=infos, raw=results, **extra)

    # ----------------------------------------------------------- tables, planner check, targets
    device_ref = (results.get("loopback") or {}).get("device")
    summaries = {}
    hop_cal = _calibrate_hop_ms(results.get("loopback") or {}, prof_dict)
    rep.data["calibrated_hop_ms"] = hop_cal
    for lk in links:
        if not results.get(lk):
            continue
        res = dict(results[lk])
        if lk != "loopback" and device_ref is not None:
            res = {"device": device_ref, **res}
        plans = {"shipped": _plan_for(lk, infos[lk], prof_dict)}
        if hop_cal is not None:
            plans["calibrated"] = _plan_for(lk, infos[lk], prof_dict, hop_ms=hop_cal)
        summaries[lk] = _tables(rep, lk, res, device_ref, plans, prof_dict)
        rep.data.setdefault("plans", {})[lk] = {k: p.to_dict() for k, p in plans.items()}
    rep.data["summary"] = summaries
    header = max(c.frame_header_bytes for c in prof.cuts)
    pool2 = next((c for c in prof.cuts if c.cut == "pool2"), None)
    rep.target("frame header bytes (largest over the cuts)", header, 64, "<=")
    if pool2 is not None:
        rep.target("frame header as % of an int8 pool2 frame", 100 * pool2.frame_header_bytes / pool2.feature_bytes,
                   2.0, "<=")
    loop = summaries.get("loopback", {})
    ratios = {k: v["ratio_to_echo"] for k, v in loop.items() if k.startswith("split-") and v["ratio_to_echo"]}
    if ratios:
        worst = min(ratios, key=ratios.get)
        cpu = loop[worst]
        why = ""
        if cpu.get("model_compute_ms") is not None and cpu["echo_cpu_ms_per_request"].get("total"):
            why = (f"; CPU per request at {worst[6:]}: echo {cpu['echo_cpu_ms_per_request']['total']:.2f} ms, "
                   f"e2e {cpu['cpu_ms_per_request']['total']:.2f} ms of which the model alone "
                   f"{cpu['model_compute_ms']:.2f} ms")
        rep.target("e2e req/s as a fraction of the echo ceiling (worst split cut, loopback)", ratios[worst], 0.8,
                   ">=", f"{worst}; every cut: " + ", ".join(f"{k[6:]} {v:.2f}" for k, v in ratios.items()) + why)
    lost = sum(v["lost"] for s in summaries.values() for v in s.values())
    rep.target("requests lost (every variant, every link)", lost, 0, "<=")
    for lk in [lk for lk in summaries if lk != "loopback"]:
        for key, label in (("error", "shipped constants"),
                           ("error_calibrated", "hop overhead calibrated on loopback in this run")):
            errs = {k: v[key] for k, v in summaries[lk].items() if v.get(key) is not None}
            cut_errs = {k: v for k, v in errs.items() if k.startswith("split-")}
            if cut_errs:
                worst = max(cut_errs, key=lambda k: abs(cut_errs[k]))
                rep.target(f"planner error on the {lk} link, {label} (worst cut; |predicted - measured| / measured)",
                           abs(cut_errs[worst]), 0.2, "<=",
                           f"{worst}; every option: " + ", ".join(f"{k} {100 * v:+.0f}%" for k, v in errs.items()))
    rep.note(f"the machine is shared: load average {rep.machine['load_avg_1_5_15']} at the start on "
             f"{rep.machine['cores']} cores; every process (device, broker, worker, relay) competes for them")
    rep.finish(args.out)
    return 0


if __name__ == "__main__":
    if "--role" in sys.argv:
        i = sys.argv.index("--role")
        role, cfg_path = sys.argv[i + 1], sys.argv[sys.argv.index("--config") + 1]
        logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        ROLES[role](json.loads(Path(cfg_path).read_text()))
        raise SystemExit(0)
    raise SystemExit(main())
