"""Cloud worker frames/s with and without micro-batching, one worker and two, at 1,000 queued frames.

Two measurements, both with the real code:

* **worker through Mosquitto** — worker processes (``cloud.worker.run_worker``) on one shared
  subscription are paused (SIGSTOP), 1,000 feature frames are published, the broker queues
  them, the workers are resumed (SIGCONT) and the time until the last answer arrives at a
  collector gives frames/s.  Micro-batching (max batch 32, no wait: the defaults) against
  one frame at a time (max batch 1, no wait), with one worker and with two.
* **tail alone** — the same frames through the worker's own path without MQTT (decode,
  check against the bundle, tail, result frame, encode) in batches of 32 against one by one,
  in this process: the part micro-batching can speed up.
"""
from __future__ import annotations

import json
import os
import signal
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

MODEL = "paper-cnn"
E2E = Path(__file__).resolve().parent / "bench_e2e.py"


def _frames(bundle, x: np.ndarray, device: str, first_id: int) -> list[bytes]:
    from protocol.frame import Frame, encode_frame
    from runtime.split import Head

    head = Head(bundle, num_threads=1)
    spec = bundle.feature
    feats = np.concatenate([head.features(x[s:s + 64]) for s in range(0, len(x), 64)])
    return [encode_frame(Frame.features(f, request_id=first_id + i, device_id=device, bundle_id=bundle.bundle_id,
                                        seq=first_id + i, scale=spec.scale, zero_point=spec.zero_point))
            for i, f in enumerate(feats)]


# --------------------------------------------------------------------------- tail alone

def tail_alone(bundle, payloads: list[bytes], batch: int) -> float:
    """frames/s of decode + check + tail + result encode, in batches of ``batch``."""
    from cloud.registry import Registry
    from protocol.frame import Frame, decode_frame, encode_frame

    served = Registry.load([bundle.root]).get(bundle.bundle_id)
    t0 = time.perf_counter()
    for s in range(0, len(payloads), batch):
        frames = [decode_frame(p) for p in payloads[s:s + batch]]
        out = served.run([served.check(f) for f in frames])
        for f, y in zip(frames, out):
            encode_frame(Frame.result(f, np.asarray(y, np.float32), t_recv_us=1))
    return len(payloads) / (time.perf_counter() - t0)


def invoke_alone(bundle, payloads: list[bytes], batch: int) -> float:
    """frames/s of the tail interpreter alone (tensors decoded and checked beforehand), in batches of ``batch``."""
    from cloud.registry import Registry
    from protocol.frame import decode_frame

    served = Registry.load([bundle.root]).get(bundle.bundle_id)
    tensors = [served.check(decode_frame(p)) for p in payloads]
    served.run(tensors[:batch])
    t0 = time.perf_counter()
    for s in range(0, len(tensors), batch):
        served.run(tensors[s:s + batch])
    return len(tensors) / (time.perf_counter() - t0)


# --------------------------------------------------------------------------- through Mosquitto

class _Collector:
    def __init__(self, url: str, topic: str):
        from protocol.mqtt import Backoff, MqttClient

        self.n = 0
        self.last = 0.0
        self.lock = threading.Lock()
        self.client = MqttClient(url, client_id=f"bench-collect-{uuid.uuid4().hex[:6]}", backoff=Backoff(0.1, 1.0),
                                 max_inflight=1000)
        self.client.subscribe(topic, self._on, qos=1)
        self.client.start(wait_connected=30)

    def _on(self, topic, payload):
        with self.lock:
            self.n += 1
            self.last = time.perf_counter()

    def wait(self, n: int, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self.lock:
                if self.n >= n:
                    return True
            time.sleep(0.005)
        return False


def through_broker(url: str, bundle, payloads_for, *, workers: int, max_batch: int, max_wait_ms: float,
                   repeats: int, n: int, workdir: Path, fleet: str) -> dict:
    """frames/s of ``workers`` worker processes answering ``n`` frames queued while they were paused."""
    from protocol import topics
    from protocol.mqtt import Backoff, MqttClient

    device = f"q{uuid.uuid4().hex[:6]}"
    cfg = workdir / f"worker-{workers}-{max_batch}.json"
    cfg.write_text(json.dumps({"url": url, "bundles": [str(bundle.root)], "max_batch": max_batch,
                               "max_wait_ms": max_wait_ms}))
    roles = [common.Role([common.PYTHON, E2E, "--role", "worker", "--config", cfg], name=f"worker-{workers}-{i}")
             for i in range(workers)]
    for r in roles:
        r.wait_ready()
    pub = MqttClient(url, client_id=f"bench-pub-{uuid.uuid4().hex[:6]}", backoff=Backoff(0.1, 1.0),
                     max_inflight=1000)
    pub.start(wait_connected=30)
    col = _Collector(url, topics.results(fleet, device))
    rates, lost = [], 0
    try:
        for rep in range(repeats):
            payloads = payloads_for(device, (rep + 1) * 10**6)
            for r in roles:
                os.kill(r.proc.pid, signal.SIGSTOP)
            base = col.n
            deliveries = [pub.publish(topics.features(fleet, device), p, qos=1) for p in payloads[:n]]
            for d in deliveries:
                d.wait(30)
            time.sleep(0.2)                       # let the broker hand the frames to the (stopped) workers
            t0 = time.perf_counter()
            for r in roles:
                os.kill(r.proc.pid, signal.SIGCONT)
            ok = col.wait(base + n, timeout=600)
            done = col.n - base
            lost += n - done
            rates.append(done / (col.last - t0) if ok and col.last > t0 else float("nan"))
    finally:
        for r in roles:
            try:
                os.kill(r.proc.pid, signal.SIGCONT)
            except ProcessLookupError:
                pass
        stats = [r.stop() for r in roles]
        pub.stop(timeout=2)
        col.client.stop(timeout=2)
    batches = sum((s or {}).get("batches", 0) for s in stats)
    framed = sum((s or {}).get("batched_frames", 0) for s in stats)
    return {"rates": rates, "summary": common.repeats_summary(rates), "lost": lost,
            "mean_batch": framed / batches if batches else None, "worker_stats": stats}


# --------------------------------------------------------------------------- main

def main(argv=None) -> int:
    def extra(p):
        p.add_argument("--n", type=int, default=1000, help="queued frames (default 1000)")
        p.add_argument("--cuts", default=None, help="cuts of paper-cnn (default pool2,conv1,dense1; quick pool2,dense1)")

    args = common.parse_args("cloud worker frames/s with and without micro-batching", extra, argv)
    cuts = (args.cuts or ("pool2,dense1" if args.quick else "pool2,conv1,dense1")).split(",")
    rep = common.Report("cloud", "Cloud worker: micro-batching and a second worker, 1,000 queued frames",
                        quick=args.quick,
                        settings={"model": MODEL, "cuts": cuts, "queued_frames": args.n, "repeats": args.repeats,
                                  "batched": "max batch 32, no wait (the defaults)",
                                  "one_at_a_time": "max batch 1, wait 0", "qos": 1,
                                  "interpreter_threads": "LiteRT default per worker"},
                        measures="frames answered per second once 1,000 frames wait for the worker(s), from "
                                 "resuming the paused workers to the last answer at a collector")
    from deploy.broker import start_mosquitto
    from protocol.manifest import load_bundle

    x, _ = common.mnist_test(args.n)
    workdir = Path(tempfile.mkdtemp(prefix="edgesplit-bench-cloud-"))
    rows_tail, rows_mqtt = [], []
    ratios = {}
    fleet = f"c{uuid.uuid4().hex[:6]}"
    with start_mosquitto() as broker:
        for cut in cuts:
            b = load_bundle(common.bundle_for(MODEL, cut, "int8"))
            base = _frames(b, x, "tailonly", 0)
            one, many, inv1, inv32 = [], [], [], []
            for _ in range(args.repeats):           # alternate, so both see the same load
                one.append(tail_alone(b, base, 1))
                many.append(tail_alone(b, base, 32))
                inv1.append(invoke_alone(b, base, 1))
                inv32.append(invoke_alone(b, base, 32))
            s1, s32 = common.repeats_summary(one), common.repeats_summary(many)
            i1, i32 = common.repeats_summary(inv1), common.repeats_summary(inv32)
            rows_tail.append([cut, common.fmt_spread(s1, ",.0f"), common.fmt_spread(s32, ",.0f"),
                              common.ratio(s32["median"], s1["median"]), common.fmt_spread(i1, ",.0f"),
                              common.fmt_spread(i32, ",.0f"), common.ratio(i32["median"], i1["median"])])
            rep.data.setdefault("invoke_alone", {})[cut] = {"one": i1, "batch32": i32}
            rep.data.setdefault("tail_alone", {})[cut] = {"one": s1, "batch32": s32}

            def payloads_for(device, first_id, b=b):
                return [p for p in _frames(b, x, device, first_id)]

            results = {}
            for workers in (1, 2):
                for label, mb, mw in (("one at a time", 1, 0.0), ("micro-batched", 32, 0.0)):
                    print(f"  {cut}: {workers} worker(s), {label} ...", flush=True)
                    results[(workers, label)] = through_broker(
                        broker.url, b, payloads_for, workers=workers, max_batch=mb, max_wait_ms=mw,
                        repeats=args.repeats, n=args.n, workdir=workdir, fleet=fleet)
            ref = results[(1, "one at a time")]["summary"]["median"]
            for (workers, label), r in results.items():
                rows_mqtt.append([cut, str(workers), label, common.fmt_spread(r["summary"], ",.0f"),
                                  common.ratio(r["summary"]["median"], ref), common.fmt(r["mean_batch"], ".1f"),
                                  str(r["lost"])])
            rep.data.setdefault("through_broker", {})[cut] = {f"{w}-{lab}": r for (w, lab), r in results.items()}
            ratios[cut] = results[(1, "micro-batched")]["summary"]["median"] / ref
    rep.table("worker", ["cut", "workers", "mode", "frames/s", "vs 1 worker one at a time", "mean batch", "lost"],
              rows_mqtt, title=f"Workers through Mosquitto, {args.n} queued frames (median over {args.repeats} "
                               "repeats, ± half the range)",
              notes=["the workers are paused while the frames are published, then resumed: every frame is queued "
                     "when the clock starts", "two workers share one subscription ($share/...) and this machine's "
                     "two cores with the broker and the collector"])
    rep.table("tail", ["cut", "one at a time frames/s", "batches of 32 frames/s", "batched / one",
                       "tail alone: one", "tail alone: batches of 32", "tail alone: batched / one"], rows_tail,
              title="The worker's path without MQTT (decode, check, tail, encode the result), 1,000 frames",
              notes=["what micro-batching can speed up: one tail invocation per 32 frames instead of per frame",
                     "tail alone: the interpreter only (frames decoded and checked beforehand), one thread: when "
                     "it barely gains from batches, the tail is compute-bound (int8 GEMM runs at the same MACs/s "
                     "for one row or 32) and batching can only save the per-frame overhead around it"])
    for cut, r in ratios.items():
        rep.target(f"micro-batching speed-up at {args.n} queued frames, {cut}, 1 worker through Mosquitto", r, 2.0,
                   ">=")
        t = rep.data["tail_alone"][cut]
        rep.target(f"micro-batching speed-up of the worker's path without MQTT, {cut}",
                   t["batch32"]["median"] / t["one"]["median"], 2.0, ">=")
    rep.note(f"shared machine: load average {rep.machine['load_avg_1_5_15']} on {rep.machine['cores']} cores")
    rep.finish(args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
