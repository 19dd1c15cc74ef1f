"""Performance against what the code controls, and scale past one broker: five tables from one run.

1. **pipeline efficiency** per cut on loopback: η = (echo CPU per request + model CPU per request) ÷
   end-to-end CPU per request.  CPU seconds of every process involved (this process as the device or the
   requester, the broker, the worker or the echo server, from /proc) over the requests answered.  The
   echo is a bare MQTT echo of the same feature frames (QoS 1, same window, reply the size of a result);
   the model is the head (batches of 32, as the agent runs it) and the tail (at the batch size the
   worker really ran) alone in this process.  η = 1: the pipeline costs nothing beyond the broker's echo
   and the model; goal ≥ 0.9.
2. **cloud worker efficiency**: a paused worker gets N queued frames, is resumed, and answers them;
   answers per CPU second of the worker process ÷ the bare tail interpreter's frames per CPU second at
   the same batch size; goal ≥ 0.7.
3. **a gRPC peer**: a bidirectional streaming split as SPLINTER builds it (grpcio; the int8 tensor's
   bytes, scale and zero point in a protobuf message; the same head on this side, the same tail in a
   server process; one tail run per message), one at a time and with a window of 64, beside our MQTT
   path (device agent, Mosquitto, one worker); goal: throughput ≥ gRPC's, one-at-a-time latency ≤ 1.2×.
4. **scale**: answers/s of 1, 2 and 4 workers answering N queued frames, on one Mosquitto and on a
   3-node NATS cluster (JetStream work queue; ``edgesplit cloud --source nats://``).
5. **Nagle**: the broker round trip the doctor measures and a device with 16 requests in flight, batch 1,
   against a stock Mosquitto (no ``set_tcp_nodelay``) and the configuration edgesplit writes; whether
   the doctor warns.

The machine has 2 cores shared by everything: read the ratios.
"""
from __future__ import annotations

import json
import os
import queue
import signal
import statistics
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

from bench import common  # noqa: E402
from bench.bench_cloud import _Collector, _frames  # noqa: E402
from bench.bench_e2e import _proc_cpu_s, _result_frame_bytes  # noqa: E402
from bench.bench_echo import Requester, echo_id, serve_echo, stamp  # noqa: E402

MODEL = "paper-cnn"
HERE = Path(__file__).resolve()


# =========================================================================== helper processes

def role_worker(cfg: dict) -> None:
    from cloud.worker import run_worker

    stats = run_worker(cfg["bundles"], cfg["url"], name=f"bench-{os.getpid()}", stats_every=0,
                       group=cfg.get("group", "edgesplit"), source=cfg.get("source"),
                       max_batch=cfg.get("max_batch", 32), ready=lambda w: common.ready())
    print(json.dumps(stats.to_dict()), flush=True)


def role_echo(cfg: dict) -> None:
    serve_echo(cfg["url"], cfg["filter"])


def _split_messages():
    """The SPLINTER-style messages, built from a descriptor here (no protoc step)."""
    from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

    f = descriptor_pb2.FieldDescriptorProto
    fdp = descriptor_pb2.FileDescriptorProto(name="edgesplit_bench_split.proto", package="splitbench",
                                             syntax="proto3")
    t = fdp.message_type.add(name="Tensor")
    for i, (name, kind, label) in enumerate([("id", f.TYPE_UINT64, f.LABEL_OPTIONAL),
                                             ("data", f.TYPE_BYTES, f.LABEL_OPTIONAL),
                                             ("scale", f.TYPE_FLOAT, f.LABEL_OPTIONAL),
                                             ("zero_point", f.TYPE_INT32, f.LABEL_OPTIONAL),
                                             ("shape", f.TYPE_INT32, f.LABEL_REPEATED)], 1):
        t.field.add(name=name, number=i, type=kind, label=label)
    r = fdp.message_type.add(name="Result")
    for i, (name, kind, label) in enumerate([("id", f.TYPE_UINT64, f.LABEL_OPTIONAL),
                                             ("probs", f.TYPE_FLOAT, f.LABEL_REPEATED),
                                             ("label", f.TYPE_INT32, f.LABEL_OPTIONAL)], 1):
        r.field.add(name=name, number=i, type=kind, label=label)
    pool = descriptor_pool.DescriptorPool()
    pool.Add(fdp)
    return (message_factory.GetMessageClass(pool.FindMessageTypeByName("splitbench.Tensor")),
            message_factory.GetMessageClass(pool.FindMessageTypeByName("splitbench.Result")))


METHOD = "/splitbench.Split/Infer"


def role_grpc(cfg: dict) -> None:
    """The gRPC peer's cloud side: one streaming RPC, the same tail, one run per message."""
    from concurrent import futures

    import grpc

    from cloud.registry import Registry
    from protocol.manifest import load_bundle

    Tensor, Result = _split_messages()
    b = load_bundle(cfg["bundle"])
    served = Registry.load([b.root]).get(b.bundle_id)

    def infer(requests, context):
        for m in requests:
            x = np.frombuffer(m.data, np.int8).reshape(tuple(m.shape))
            probs = np.asarray(served.run([x]), np.float32)[0]
            yield Result(id=m.id, probs=probs.ravel().tolist(), label=int(np.argmax(probs)))

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("splitbench.Split", {
        "Infer": grpc.stream_stream_rpc_method_handler(infer, request_deserializer=Tensor.FromString,
                                                        response_serializer=Result.SerializeToString)}),))
    server.add_insecure_port(f"127.0.0.1:{cfg['port']}")
    server.start()
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    common.ready()
    while not stop.wait(0.5):
        pass
    server.stop(2)
    print("{}", flush=True)


ROLES = {"worker": role_worker, "echo": role_echo, "grpc": role_grpc}


def _role(kind: str, workdir: Path, **cfg) -> common.Role:
    path = workdir / f"{kind}-{uuid.uuid4().hex[:6]}.json"
    path.write_text(json.dumps(cfg))
    r = common.Role([common.PYTHON, HERE, "--role", kind, "--config", path], name=f"scale-{kind}")
    r.wait_ready(180)
    return r


# =========================================================================== measurements

class _Cpu:
    """CPU seconds of this process and of other processes (by pid) over a phase."""

    def __init__(self, **pids):
        self.pids = pids

    def __enter__(self):
        self.t0 = time.process_time()
        self.c0 = {k: _proc_cpu_s(p) for k, p in self.pids.items()}
        return self

    def __exit__(self, *exc):
        self.seconds = {"self": time.process_time() - self.t0}
        for k, p in self.pids.items():
            now = _proc_cpu_s(p)
            self.seconds[k] = None if now is None or self.c0[k] is None else now - self.c0[k]

    @property
    def total(self) -> float:
        return sum(v for v in self.seconds.values() if v is not None)


def _agent(url: str, bundle, *, window: int, batch: int, fleet: str):
    from device.agent import DeviceAgent
    from device.config import DeviceConfig
    from device.transport import mqtt_client

    dev = f"bench-{uuid.uuid4().hex[:6]}"
    c = DeviceConfig(device_id=dev, fleet=fleet, bundle=bundle.root, broker_url=url, threads=1, timeout=600,
                     resend_after=0, max_in_flight=window, batch=batch, client_id=f"bench-{uuid.uuid4().hex[:8]}")
    return DeviceAgent(c, mqtt_client(c), bundle=bundle, connect_timeout=30)


def _run_agent(agent, x) -> dict:
    t0 = time.perf_counter()
    res = [r for r in agent.run_arrays(x) if r.ok]
    wall = time.perf_counter() - t0
    return {"answered": len(res), "lost": len(x) - len(res), "throughput": len(res) / wall,
            "p50_ms": statistics.median(r.latency_ms for r in res) if res else float("nan")}


def _head_cpu_ms(bundle, x, batch: int = 32) -> float:
    from runtime.split import Head

    head = Head(bundle, num_threads=1)
    xin = bundle.manifest.input.pixels_to_input(x) if x.dtype == np.uint8 else x
    head.features(xin[:batch])
    t0 = time.process_time()
    for s in range(0, len(xin), batch):
        head.features(xin[s:s + batch])
    return 1e3 * (time.process_time() - t0) / len(xin)


def _tail_cpu(bundle, payloads, batch: int) -> float:
    """Tail interpreter alone: ms of CPU per frame at ``batch`` (tensors decoded beforehand)."""
    from cloud.registry import Registry
    from protocol.frame import decode_frame

    served = Registry.load([bundle.root]).get(bundle.bundle_id)
    tensors = [served.check(decode_frame(p)) for p in payloads]
    batch = max(1, int(round(batch)))
    served.run(tensors[:batch])
    t0 = time.process_time()
    for s in range(0, len(tensors), batch):
        served.run(tensors[s:s + batch])
    return 1e3 * (time.process_time() - t0) / len(tensors)


def _path_cpu(bundle, payloads, batch: float) -> float:
    """The worker's path without MQTT (decode, check, tail, result encode): ms of CPU per frame."""
    from cloud.registry import Registry
    from protocol.frame import Frame, decode_frame, encode_frame

    served = Registry.load([bundle.root]).get(bundle.bundle_id)
    batch = max(1, int(round(batch)))
    t0 = time.process_time()
    for s in range(0, len(payloads), batch):
        frames = [decode_frame(p) for p in payloads[s:s + batch]]
        out = served.run([served.check(f) for f in frames])
        for f, y in zip(frames, out):
            encode_frame(Frame.result(f, np.asarray(y, np.float32), t_recv_us=1))
    return 1e3 * (time.process_time() - t0) / len(payloads)


def efficiency(cut, bundle, x, broker, workdir, n, repeats) -> dict:
    """Table 1: η for one cut."""
    fleet = f"eta{uuid.uuid4().hex[:5]}"
    payloads = _frames(bundle, x[:n], "eta", 0)
    reply = _result_frame_bytes(bundle.bundle_id, bundle.manifest.output.shape)
    e2e, echo, e2e_parts, echo_parts = [], [], [], []
    worker = _role("worker", workdir, bundles=[str(bundle.root)], url=broker.url)
    try:
        with _agent(broker.url, bundle, window=64, batch=32, fleet=fleet) as agent:
            _run_agent(agent, x[:50])
            for _ in range(repeats):
                with _Cpu(broker=broker.pid, worker=worker.proc.pid) as cpu:
                    r = _run_agent(agent, x[:n])
                e2e.append(1e3 * cpu.total / max(1, r["answered"]))
                e2e_parts.append({k: 1e3 * (v or 0) / max(1, r["answered"]) for k, v in cpu.seconds.items()})
    finally:
        wstats = worker.stop() or {}
    mean_batch = wstats.get("mean_batch") or 1.0
    prefix = f"bench/{fleet}"
    server = _role("echo", workdir, url=broker.url, filter=f"{prefix}/+/req")
    req = Requester(broker.url, prefix, "echo")
    try:
        req.run(50, lambda i: stamp(payloads[i % len(payloads)], i, reply), echo_id, window=64, first_id=10**9)
        for rep in range(repeats):
            with _Cpu(broker=broker.pid, server=server.proc.pid) as cpu:
                r = req.run(n, lambda i: stamp(payloads[i % len(payloads)], i, reply), echo_id, window=64,
                            first_id=rep * 10**7)
            echo.append(1e3 * cpu.total / max(1, r["answered"]))
            echo_parts.append({k: 1e3 * (v or 0) / max(1, r["answered"]) for k, v in cpu.seconds.items()})
    finally:
        req.stop()
        server.stop()
    head_ms = _head_cpu_ms(bundle, x[:n])
    tail_ms = _tail_cpu(bundle, payloads, mean_batch)
    e2e_ms, echo_ms = statistics.median(e2e), statistics.median(echo)
    return {"cut": cut, "e2e_cpu_ms": e2e_ms, "echo_cpu_ms": echo_ms, "head_cpu_ms": head_ms, "tail_cpu_ms": tail_ms,
            "mean_batch": mean_batch, "eta": (echo_ms + head_ms + tail_ms) / e2e_ms, "e2e_runs": e2e,
            "echo_runs": echo, "e2e_parts": {k: statistics.median(p[k] for p in e2e_parts) for k in e2e_parts[0]},
            "echo_parts": {k: statistics.median(p[k] for p in echo_parts) for k in echo_parts[0]}}


def _queued(url, bundle, x, workdir, *, workers: int, n: int, publish_url: str | None = None,
            source: str | None = None, group: str = "edgesplit", cpu: bool = False) -> dict:
    """N frames queued for paused workers; answers/s from resuming them to the last answer (and their CPU)."""
    from protocol import topics
    from protocol.mqtt import Backoff, MqttClient

    fleet, device = f"q{uuid.uuid4().hex[:5]}", f"d{uuid.uuid4().hex[:5]}"
    roles = [_role("worker", workdir, bundles=[str(bundle.root)], url=url, source=source, group=group)
             for _ in range(workers)]
    pub = MqttClient(publish_url or url, client_id=f"bench-pub-{uuid.uuid4().hex[:6]}", backoff=Backoff(0.1, 1.0),
                     max_inflight=1000)
    pub.start(wait_connected=30)
    col = _Collector(url, topics.results(fleet, device))
    try:
        warm = _frames(bundle, x[:20], device, 10**8)
        for p in warm:
            pub.publish(topics.features(fleet, device), p, qos=1)
        col.wait(len(warm), 60)
        payloads = _frames(bundle, x[:n], device, 0)
        for r in roles:
            os.kill(r.proc.pid, signal.SIGSTOP)
        base = col.n
        ds = [pub.publish(topics.features(fleet, device), p, qos=1) for p in payloads]
        for d in ds:
            d.wait(60)
        time.sleep(0.3)
        c0 = [_proc_cpu_s(r.proc.pid) for r in roles]
        t0 = time.perf_counter()
        for r in roles:
            os.kill(r.proc.pid, signal.SIGCONT)
        ok = col.wait(base + n, 600)
        c1 = [_proc_cpu_s(r.proc.pid) for r in roles]
        done = col.n - base
        wall = col.last - t0
    finally:
        for r in roles:
            try:
                os.kill(r.proc.pid, signal.SIGCONT)
            except ProcessLookupError:
                pass
        stats = [r.stop() or {} for r in roles]
        pub.stop(timeout=2)
        col.client.stop(timeout=2)
    batches = sum(s.get("batches", 0) for s in stats)
    framed = sum(s.get("batched_frames", 0) for s in stats)
    cpu_s = sum(b - a for a, b in zip(c0, c1) if a is not None and b is not None)
    return {"answers_per_s": done / wall if ok and wall > 0 else float("nan"), "lost": n - done,
            "worker_cpu_s": cpu_s, "answers_per_cpu_s": done / cpu_s if cpu_s else float("nan"),
            "mean_batch": framed / batches if batches else None}


def grpc_peer(bundle, x, workdir, n, n_lat) -> dict:
    import grpc

    from deploy.broker import free_port
    from runtime.split import Head

    Tensor, Result = _split_messages()
    port = free_port()
    server = _role("grpc", workdir, bundle=str(bundle.root), port=port)
    head = Head(bundle, num_threads=1)
    spec = bundle.feature
    xin = bundle.manifest.input.pixels_to_input(x) if x.dtype == np.uint8 else x
    out = {}
    try:
        channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        stub = channel.stream_stream(METHOD, request_serializer=Tensor.SerializeToString,
                                     response_deserializer=Result.FromString)

        def stream(count: int, window: int) -> dict:
            room = threading.Semaphore(window)
            starts: dict[int, float] = {}

            def requests():
                for s in range(0, count, 32 if window > 1 else 1):
                    feats = head.features(xin[s:min(count, s + (32 if window > 1 else 1))])
                    for j, f in enumerate(feats):
                        room.acquire()
                        starts[s + j] = time.perf_counter()
                        yield Tensor(id=s + j, data=np.ascontiguousarray(f).tobytes(), scale=spec.scale,
                                     zero_point=spec.zero_point, shape=list(f.shape))

            lat = []
            t0 = time.perf_counter()
            for r in stub(requests()):
                lat.append((time.perf_counter() - starts.pop(r.id)) * 1e3)
                room.release()
                if len(lat) == count:
                    break
            wall = time.perf_counter() - t0
            return {"throughput": len(lat) / wall, "p50_ms": statistics.median(lat), "answered": len(lat)}

        stream(20, 1)
        out["one"] = stream(n_lat, 1)
        out["window"] = stream(n, 64)
        channel.close()
    finally:
        server.stop()
    return out


def mqtt_peer(bundle, x, broker, workdir, n, n_lat) -> dict:
    worker = _role("worker", workdir, bundles=[str(bundle.root)], url=broker.url)
    fleet = f"g{uuid.uuid4().hex[:5]}"
    try:
        with _agent(broker.url, bundle, window=1, batch=1, fleet=fleet) as a:
            _run_agent(a, x[:20])
            one = _run_agent(a, x[:n_lat])
        with _agent(broker.url, bundle, window=64, batch=32, fleet=fleet) as a:
            _run_agent(a, x[:50])
            win = _run_agent(a, x[:n])
    finally:
        worker.stop()
    return {"one": one, "window": win}


def nagle(bundle, x, workdir, n) -> dict:
    """Stock Mosquitto (no set_tcp_nodelay) against the generated configuration."""
    from deploy import broker as db
    from device.doctor import run_doctor
    from protocol.mqtt.probe import round_trip_ms

    out = {}
    for name in ("stock", "edgesplit"):
        if name == "stock":
            port = db.free_port()
            conf = workdir / "stock.conf"
            conf.write_text(f"listener {port} 127.0.0.1\nallow_anonymous true\n"
                            + ("user root\n" if os.geteuid() == 0 else ""))
            b = db.start_mosquitto(config_path=conf, workdir=workdir / "stock")
        else:
            b = db.start_mosquitto(workdir=workdir / "ours")
        try:
            rtts = round_trip_ms(b.url, rounds=9)
            checks = {c.name: c for c in run_doctor(broker=b.url, skip=("bundle", "camera")).checks}
            worker = _role("worker", workdir, bundles=[str(bundle.root)], url=b.url)
            try:
                with _agent(b.url, bundle, window=1, batch=1, fleet=f"n{uuid.uuid4().hex[:5]}") as a:
                    _run_agent(a, x[:10])
                    one = _run_agent(a, x[:min(n, 100)])
                with _agent(b.url, bundle, window=16, batch=1, fleet=f"n{uuid.uuid4().hex[:5]}") as a:
                    _run_agent(a, x[:30])
                    dev = _run_agent(a, x[:n])
            finally:
                worker.stop()
            rt = checks.get("round trip")
            out[name] = {"rtt_ms": statistics.median(rtts) if rtts else None, "device": dev, "one": one,
                         "doctor": rt.status if rt else None, "doctor_detail": rt.detail if rt else None}
        finally:
            b.cleanup()
    return out


# =========================================================================== main

def main(argv=None) -> int:
    def extra(p):
        p.add_argument("--role", choices=sorted(ROLES), default=None, help=argparse_hidden())
        p.add_argument("--config", default=None, help=argparse_hidden())
        p.add_argument("--n", type=int, default=None, help="requests per measurement (default 1000, quick 300)")
        p.add_argument("--cuts", default=None, help="cuts for the efficiency table (default all six; quick "
                                                    "pool2,dense1)")
        p.add_argument("--only", default=None, help="comma-separated tables: eta,worker,grpc,scale,nagle")

    args = common.parse_args("pipeline and worker efficiency, a gRPC peer, scale, Nagle", extra, argv)
    if args.role:
        ROLES[args.role](json.loads(Path(args.config).read_text()))
        return 0
    n = args.n or (300 if args.quick else 1000)
    n_lat = 50 if args.quick else 200
    repeats = 1 if args.quick else min(args.repeats, 3)
    cuts = (args.cuts or ("pool2,dense1" if args.quick else ",".join(common.PAPER_CUTS))).split(",")
    only = set((args.only or "eta,worker,grpc,scale,nagle").split(","))
    rep = common.Report("scale", "What the code controls, a gRPC peer, and scale past one broker", quick=args.quick,
                        settings={"model": MODEL, "n": n, "one_at_a_time_n": n_lat, "repeats": repeats,
                                  "cuts": cuts, "window": 64, "qos": 1, "worker_max_batch": 32},
                        measures="CPU seconds per request of every process (from /proc), answers/s, latency "
                                 "p50; see the module docstring of bench/bench_scale.py")
    from deploy.broker import start_mosquitto
    from protocol.manifest import load_bundle

    x, _ = common.mnist_test(max(n, n_lat) + 100)
    workdir = Path(tempfile.mkdtemp(prefix="edgesplit-bench-scale-"))
    bundles = {c: load_bundle(common.bundle_for(MODEL, c, "int8")) for c in sorted(set(cuts) | {"pool2"})}
    pool2 = bundles["pool2"]
    with start_mosquitto(workdir=workdir / "mosquitto") as broker:
        if "eta" in only:
            rows = []
            for cut in cuts:
                print(f"  η: {cut} ...", flush=True)
                r = efficiency(cut, bundles[cut], x, broker, workdir, n, repeats)
                rep.data.setdefault("eta", {})[cut] = r
                ep, cp = r["e2e_parts"], r["echo_parts"]
                rows.append([cut, f"{r['echo_cpu_ms']:.3f}", f"{r['head_cpu_ms']:.3f}", f"{r['tail_cpu_ms']:.3f}",
                             f"{r['mean_batch']:.1f}", f"{r['e2e_cpu_ms']:.3f}",
                             f"{ep['self']:.3f} / {ep['broker']:.3f} / {ep['worker']:.3f}",
                             f"{cp['self']:.3f} / {cp['broker']:.3f} / {cp['server']:.3f}", f"{r['eta']:.2f}",
                             "MET" if r["eta"] >= 0.9 else "NOT MET"])
                rep.target(f"pipeline efficiency η, {cut}", r["eta"], 0.9, ">=")
            rep.table("eta", ["cut", "echo CPU ms/req", "head CPU ms/req", "tail CPU ms/req", "tail batch",
                              "end-to-end CPU ms/req", "e2e: device / broker / worker",
                              "echo: requester / broker / server", "η", "η ≥ 0.9"], rows,
                      title=f"Pipeline efficiency per cut, loopback, {n} requests, window 64 (median of {repeats})",
                      notes=["CPU of every process: the device (or the echo's requester), Mosquitto, the worker "
                             "(or the echo server)", "η = (echo + head + tail) / end to end: what the pipeline "
                             "costs beyond a bare MQTT echo of the same frames and the model itself"])
        if "worker" in only:
            rows = []
            for cut in ([c for c in ("pool2", "dense1") if c in bundles] if not args.quick else ["pool2"]):
                b = bundles[cut]
                print(f"  worker efficiency: {cut} ...", flush=True)
                q = _queued(broker.url, b, x, workdir, workers=1, n=n)
                payloads = _frames(b, x[:n], "tail", 0)
                path_ms = _path_cpu(b, payloads, q["mean_batch"] or 1)
                tail_ms = _tail_cpu(b, payloads, q["mean_batch"] or 1)
                tail32 = _tail_cpu(b, payloads, 32)
                tail_rate = 1e3 / tail_ms
                eff = q["answers_per_cpu_s"] / tail_rate
                rep.data.setdefault("worker", {})[cut] = dict(q, tail_cpu_ms=tail_ms, tail32_cpu_ms=tail32, eff=eff,
                                                              path_cpu_ms=path_ms)
                rows.append([cut, f"{q['answers_per_s']:,.0f}", f"{q['answers_per_cpu_s']:,.0f}",
                             f"{q['mean_batch']:.1f}", f"{tail_rate:,.0f}", f"{1e3 / tail32:,.0f}",
                             f"{1e3 / q['answers_per_cpu_s']:.3f} = {path_ms:.3f} + {1e3 / q['answers_per_cpu_s'] - path_ms:.3f}",
                             f"{eff:.2f}", "MET" if eff >= 0.7 else "NOT MET"])
                rep.target(f"cloud worker efficiency, {cut}", eff, 0.7, ">=")
            rep.table("worker", ["cut", "answers/s", "answers per worker CPU s", "mean batch",
                                 "tail alone frames per CPU s (same batch)", "tail alone, batch 32",
                                 "worker CPU ms/frame = codec+tail + MQTT and the rest", "efficiency", "≥ 0.7"], rows,
                      title=f"Cloud worker efficiency: {n} queued frames, one worker, Mosquitto",
                      notes=["efficiency = answers per CPU second of the worker process ÷ the bare tail "
                             "interpreter's frames per CPU second at the worker's own mean batch",
                             "codec+tail: the worker's path without MQTT (decode, check, tail, result encode) in this "
                             "process at the same batch; the rest is the MQTT client (receive, PUBACKs, publish), "
                             "dedupe, batching and the Python around them"])
        if "grpc" in only:
            print("  gRPC peer and MQTT path (pool2) ...", flush=True)
            g = grpc_peer(pool2, x, workdir, n, n_lat)
            m = mqtt_peer(pool2, x, broker, workdir, n, n_lat)
            rep.data["grpc"] = {"grpc": g, "mqtt": m}
            rows = [["gRPC stream (SPLINTER-style)", f"{g['one']['p50_ms']:.2f}", f"{g['one']['throughput']:,.0f}",
                     f"{g['window']['throughput']:,.0f}", f"{g['window']['p50_ms']:.1f}"],
                    ["edgesplit MQTT (agent, Mosquitto, worker)", f"{m['one']['p50_ms']:.2f}",
                     f"{m['one']['throughput']:,.0f}", f"{m['window']['throughput']:,.0f}",
                     f"{m['window']['p50_ms']:.1f}"]]
            rep.table("grpc", ["path", "one at a time p50 ms", "one at a time req/s", "window 64 req/s",
                               "window 64 p50 ms"], rows,
                      title=f"pool2 against a gRPC streaming split peer, loopback ({n_lat} one at a time, {n} windowed)",
                      notes=["same head (this process, LiteRT, one thread) and same tail (another process); gRPC "
                             "runs the tail once per message, our worker micro-batches what queued",
                             "MQTT makes four hops per request through a broker process; gRPC two, point to point"])
            rep.target("MQTT windowed throughput ÷ gRPC's", m["window"]["throughput"] / g["window"]["throughput"],
                       1.0, ">=")
            rep.target("MQTT one-at-a-time latency ÷ gRPC's", m["one"]["p50_ms"] / g["one"]["p50_ms"], 1.2, "<=")
        if "scale" in only:
            from deploy.cluster import start_cluster

            rows = []
            counts = (1, 2, 4)
            res = {"mosquitto": {}, "nats": {}}
            for w in counts:
                print(f"  scale: {w} worker(s) on Mosquitto ...", flush=True)
                res["mosquitto"][w] = _queued(broker.url, pool2, x, workdir, workers=w, n=n)
            with start_cluster(3, workdir=workdir / "nats") as cluster:
                for w in counts:
                    print(f"  scale: {w} worker(s) on the 3-node NATS cluster ...", flush=True)
                    res["nats"][w] = _queued(cluster.mqtt_url(0), pool2, x, workdir, workers=w, n=n,
                                             publish_url=cluster.mqtt_url(1), source=cluster.nats_url)
            rep.data["scale"] = res
            for engine, label in (("mosquitto", "one Mosquitto"), ("nats", "3-node NATS cluster, JetStream")):
                one = res[engine][1]["answers_per_s"]
                rows.append([label] + [f"{res[engine][w]['answers_per_s']:,.0f} ({res[engine][w]['answers_per_s'] / one:.2f}×)"
                                       for w in counts] + [str(sum(res[engine][w]["lost"] for w in counts))])
            rep.table("scale", ["engine", "1 worker answers/s", "2 workers", "4 workers", "lost"], rows,
                      title=f"Scale: {n} queued pool2 frames answered by 1, 2, 4 workers",
                      notes=["every worker, the broker or the three NATS nodes, and the collector share this "
                             "machine's 2 cores: more workers than cores cannot add throughput here; on the NATS "
                             "cluster devices publish to node 2 and answers leave from node 1"])
        if "nagle" in only:
            print("  Nagle: stock Mosquitto against ours ...", flush=True)
            ng = nagle(pool2, x, workdir, n)
            rep.data["nagle"] = ng
            rows = [[name, f"{r['rtt_ms']:.1f}" if r["rtt_ms"] is not None else "-", f"{r['one']['p50_ms']:.1f}",
                     f"{r['device']['p50_ms']:.1f}", f"{r['device']['throughput']:,.0f}", r["doctor"] or "-"]
                    for name, r in (("stock Mosquitto (no set_tcp_nodelay)", ng["stock"]),
                                    ("edgesplit's config (set_tcp_nodelay true)", ng["edgesplit"]))]
            rep.table("nagle", ["broker", "probe round trip ms", "device one at a time p50 ms",
                                "device 16 in flight, batch 1: p50 ms", "req/s", "doctor 'round trip'"], rows,
                      title="Nagle's algorithm: the broker round trip the doctor measures, and a device",
                      notes=[f"doctor on the stock broker: {ng['stock']['doctor_detail']}"])
            rep.target("the doctor flags the stock broker (1 = yes)", int(ng["stock"]["doctor"] == "FAIL"), 1, ">=")
            rep.target("device one-at-a-time p50 with edgesplit's config (ms)", ng["edgesplit"]["one"]["p50_ms"],
                       20.0, "<=")
    rep.note(f"shared machine: load average {rep.machine['load_avg_1_5_15']} on {rep.machine['cores']} cores")
    rep.finish(args.out)
    return 0


def argparse_hidden():
    import argparse

    return argparse.SUPPRESS


if __name__ == "__main__":
    raise SystemExit(main())
