"""A realistic edge model for scaling: MobileNetV2 alpha=0.35 at 96x96 with RANDOM weights.

Random weights: cost only, no accuracy.  ``keras.applications.MobileNetV2(weights=None,
alpha=0.35, input_shape=(96, 96, 3))`` is built with a fixed seed (nothing is downloaded);
its cuts come from the same cut analysis as every model (``converter.cuts.list_cuts``).
From the valid cuts, the block boundaries (the outputs of each inverted-residual block,
where the tensor is narrowest) are taken, a spread of them in a quick run.  Each is split
and converted to int8 (calibrated on random images in [-1, 1]); head and tail are timed
with the real LiteRT interpreter on one thread, round robin, beside the whole model; the
planner then predicts the end-to-end latency of every option at 1 and 20 Mbit/s, 40 ms RTT.
"""
from __future__ import annotations

import hashlib
import os
import random
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

from bench import common  # noqa: E402

LABEL = "random weights: cost only, no accuracy"
INPUT = (96, 96, 3)
HEADER = 62          # frame header of an int8 feature frame (bench_head measures it)


def build():
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import keras

    keras.utils.set_random_seed(0)
    return keras.applications.MobileNetV2(weights=None, alpha=0.35, input_shape=INPUT)


def block_cuts(cuts) -> list:
    """The cuts at block boundaries (a block's output), plus the stem and the pooled features."""
    keep = [c for c in cuts if c.name.endswith(("_project_BN", "_add")) or c.name in
            ("Conv1_relu", "out_relu", "global_average_pooling2d")]
    # a block whose output feeds an add is represented by that add (same shape, later)
    return keep


def spread(items: list, k: int) -> list:
    if len(items) <= k:
        return items
    idx = sorted({round(i * (len(items) - 1) / (k - 1)) for i in range(k)})
    return [items[i] for i in idx]


def convert(model, cut: str, calib: np.ndarray, cache: Path) -> tuple[Path, Path]:
    from converter.quantize import convert_split
    from converter.split import split_model

    head, tail = cache / f"{cut}-head.tflite", cache / f"{cut}-tail.tflite"
    if head.is_file() and tail.is_file():
        return head, tail
    t0 = time.perf_counter()
    conv = convert_split(split_model(model, cut), "int8", calib)
    head.write_bytes(conv.head)
    tail.write_bytes(conv.tail)
    print(f"  converted {cut} in {time.perf_counter() - t0:.0f} s", flush=True)
    return head, tail


def main(argv=None) -> int:
    def extra(p):
        p.add_argument("--cuts", type=int, default=None, help="how many block-boundary cuts (default all, quick 5)")
        p.add_argument("--runs", type=int, default=None,
                       help="timed calls per model per repeat (default 100, quick 25)")

    args = common.parse_args("MobileNetV2 alpha 0.35 96x96, random weights: cost per cut", extra, argv)
    runs = args.runs or (25 if args.quick else 100)
    rep = common.Report("mobilenet", f"MobileNetV2 alpha=0.35 at 96x96 ({LABEL})", quick=args.quick,
                        settings={"model": "keras.applications.MobileNetV2(weights=None, alpha=0.35, "
                                           "input_shape=(96, 96, 3)), seed 0", "weights": LABEL, "quant": "int8",
                                  "calibration": "64 random images in [-1, 1]", "threads": 1,
                                  "runs_per_repeat": runs, "repeats": args.repeats},
                        measures="head and tail latency per cut (one input, one thread), bytes sent, MACs, and "
                                 "the planner's predicted end-to-end latency per option")
    from converter import cuts as cuts_mod
    from converter import planner
    from converter.quantize import to_tflite
    from runtime.interpreter import Model

    model = build()
    all_cuts = cuts_mod.list_cuts(model)
    blocks = block_cuts(all_cuts)
    chosen = spread(blocks, args.cuts or (5 if args.quick else len(blocks)))
    digest = hashlib.sha256(b"".join(np.asarray(w).tobytes() for w in model.get_weights())).hexdigest()[:10]
    cache = common.cache_root() / "mobilenet" / digest
    cache.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    calib = rng.uniform(-1, 1, size=(64, *INPUT)).astype(np.float32)
    full_path = cache / "full-int8.tflite"
    if not full_path.is_file():
        full_path.write_bytes(to_tflite(model, "int8", calib))
    paths = {c.name: convert(model, c.name, calib, cache) for c in chosen}

    x = rng.uniform(-1, 1, size=(1, *INPUT)).astype(np.float32)
    models = {("full", "full"): Model(full_path, num_threads=1)}
    inputs = {("full", "full"): x}
    for c in chosen:
        h, t = paths[c.name]
        models[(c.name, "head")] = Model(h, num_threads=1)
        models[(c.name, "tail")] = Model(t, num_threads=1)
        inputs[(c.name, "head")] = x
        inputs[(c.name, "tail")] = rng.uniform(0, 1, size=(1, *c.shape)).astype(np.float32)
    keys = list(models)
    for k in keys:
        for _ in range(3):
            models[k].run(inputs[k])
    per = {k: [] for k in keys}
    rnd = random.Random(0)
    clock = time.perf_counter
    for r in range(args.repeats):
        order = keys[:]
        rnd.shuffle(order)
        ms = {k: [] for k in keys}
        for _ in range(runs):
            for k in order:
                t = clock()
                models[k].run(inputs[k])
                ms[k].append((clock() - t) * 1e3)
        for k in keys:
            per[k].append(float(np.median(ms[k])))
        print(f"  repeat {r + 1}/{args.repeats} done", flush=True)
    s = {k: common.repeats_summary(v) for k, v in per.items()}
    full_ms = s[("full", "full")]["median"]

    # the planner, with this machine as the device and as the cloud
    result_bytes = HEADER + 4 * 1000
    prof = {"schema": "edgesplit.profile/1", "input": {"bytes": int(np.prod(INPUT)),
                                                       "frame_bytes": int(np.prod(INPUT)) + HEADER},
            "cuts": [{"model": "mobilenetv2", "cut": c.name, "quant": "int8", "bundle_id": "0" * 16,
                      "head_ms": {"median": s[(c.name, "head")]["median"]},
                      "tail_ms": {"median": s[(c.name, "tail")]["median"]},
                      "frame_bytes_raw": c.bytes_int8 + HEADER, "frame_bytes_wire": None,
                      "result_bytes": result_bytes} for c in chosen]}
    report = {"schema": "edgesplit.audit/1", "model": "mobilenetv2", "input": {"bytes": int(np.prod(INPUT))},
              "cuts": [{"name": c.name, "cost": {"bytes_int8": c.bytes_int8, "head_macs": c.head_macs,
                                                  "tail_macs": c.tail_macs}} for c in chosen]}
    plans = {rate: planner.plan(report, uplink=rate, rtt="40ms", device_profile=prof, cloud_profile=prof)
             for rate in ("1mbit", "20mbit")}
    rows = []
    for c in chosen:
        h, t = s[(c.name, "head")], s[(c.name, "tail")]
        rows.append([c.name, "x".join(map(str, c.shape)), f"{c.bytes_int8:,}",
                     common.ratio(c.bytes_int8, float(np.prod(INPUT))), f"{c.head_macs / 1e6:.1f}",
                     common.fmt_spread(h), common.fmt_spread(t), common.ratio(h["median"], full_ms),
                     *(common.fmt(plans[r].option(c.name).latency_ms, ".1f") for r in plans)])
    rows.append(["whole model on the device", "-", "0", "-", f"{(all_cuts[-1].head_macs) / 1e6:.1f}",
                 common.fmt_spread(s[("full", "full")]), "-", "1.00x",
                 *(common.fmt(plans[r].option("device").latency_ms, ".1f") for r in plans)])
    rows.append(["raw image to the cloud", "96x96x3", f"{int(np.prod(INPUT)):,}", "1.00x", "0", "-",
                 common.fmt(full_ms, ".3f"), "-", *(common.fmt(plans[r].option("raw").latency_ms, ".1f")
                                                    for r in plans)])
    rep.table("cuts", ["cut", "feature", "int8 B", "B vs raw image", "head MMACs", "head ms", "tail ms",
                       "head / whole", "pred. ms 1 Mbit/s", "pred. ms 20 Mbit/s"], rows,
              title=f"MobileNetV2 0.35 96x96 ({LABEL}): {len(chosen)} of {len(all_cuts)} valid cuts "
                    f"({len(blocks)} block boundaries)",
              notes=["head/tail ms: median of per-repeat medians (± half the range), one thread, interleaved",
                     "predicted: `edgesplit plan` with these timings for both device and cloud, 40 ms RTT, "
                     "uncompressed int8 frames (random weights make compression figures meaningless), a "
                     f"{result_bytes:,} B result (1,000 float32 scores)",
                     "raw image: 27,648 B of uint8 pixels; the cloud runs the whole model"])
    for r, p in plans.items():
        top = [o for o in p.options][:5]
        rep.table(f"plan-{r}", ["#", "option", "sent B", "predicted ms", "breakdown"],
                  [[str(o.rank), o.name, "-" if o.bytes_up is None else f"{o.bytes_up:,.0f}",
                    f"{o.latency_ms:.1f}", o.breakdown()] for o in top],
                  title=f"Planner, {r}, 40 ms RTT: the five fastest options (pick: {p.pick.name if p.pick else '-'})",
                  notes=[p.reason])
    excl = {r: planner.plan(report, uplink=r, rtt="40ms", device_profile=prof, cloud_profile=prof,
                            exclude=["device"]) for r in ("1mbit", "20mbit")}
    for r, p in excl.items():
        rep.note(f"{r}, whole model on the device excluded: the planner picks {p.pick.name} "
                 f"({p.pick.latency_ms:.1f} ms, sends {p.pick.bytes_up:,.0f} B)")
    rep.data.update(latency_ms={f"{k[0]}/{k[1]}": v for k, v in s.items()},
                    cuts=[c.to_dict() for c in chosen], plans={r: p.to_dict() for r, p in plans.items()},
                    all_cuts=[c.name for c in all_cuts])
    rep.note(f"shared machine: load average {rep.machine['load_avg_1_5_15']} on {rep.machine['cores']} cores")
    rep.finish(args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
