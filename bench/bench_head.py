"""Head latency per cut (int8, float16, float32) with the real LiteRT interpreter on one thread, the whole
model on the device beside it, and the sizes of what is stored and sent.

Every model is loaded once; each repeat times ``runs`` single-input calls of every model in
turn (round robin, in a shuffled order), so that all of them see the same load on this
shared machine.  Per model: the median of each repeat, then the median over repeats and its
spread; the minimum over all calls is printed too (the least disturbed call).
"""
from __future__ import annotations

import os
import random
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

from bench import common  # noqa: E402
from protocol.stats import percentiles  # noqa: E402

MODEL = "paper-cnn"


def main(argv=None) -> int:
    def extra(p):
        p.add_argument("--runs", type=int, default=None,
                       help="timed calls per model per repeat (default 300, quick 60)")
        p.add_argument("--cuts", default=",".join(common.PAPER_CUTS))
        p.add_argument("--threads", type=int, default=1, help="interpreter threads (default 1, as on a busy Pi)")

    args = common.parse_args("head latency per cut and quantization", extra, argv)
    runs = args.runs or (60 if args.quick else 300)
    cuts = [c for c in args.cuts.split(",") if c]
    rep = common.Report("head", "Head latency per cut, with the whole model on the device beside it",
                        quick=args.quick,
                        settings={"model": MODEL, "cuts": cuts, "quants": ["int8", "float16", "float32"],
                                  "threads": args.threads, "runs_per_repeat": runs, "repeats": args.repeats,
                                  "input": "one MNIST test image, batch 1", "interpreter": "ai_edge_litert (XNNPACK)"},
                        measures="wall time of one head invocation (set input, invoke, read output) per cut and "
                                 "quantization, and of the whole model, on one interpreter thread")
    from runtime.interpreter import Model
    from protocol.frame import Frame, encode_frame, header_size
    from protocol.manifest import load_bundle

    x, _ = common.mnist_test(1)
    models: dict[tuple[str, str], object] = {}
    paths: dict[tuple[str, str], Path] = {}
    bundles = {}
    for q in common.QUANTS:
        paths[("full", q)] = common.full_model_tflite(MODEL, q)
        models[("full", q)] = Model(paths[("full", q)], num_threads=args.threads)
        for c in cuts:
            b = load_bundle(common.bundle_for(MODEL, c, q))
            bundles[(c, q)] = b
            paths[(c, q)] = b.head_path
            models[(c, q)] = Model(b.head_path, num_threads=args.threads)
    keys = list(models)
    for k in keys:                                     # warm-up (first invocations allocate)
        for _ in range(5):
            models[k].run(x)
    per_repeat = {k: [] for k in keys}
    all_ms = {k: [] for k in keys}
    clock = time.perf_counter
    rng = random.Random(0)
    t0 = clock()
    for r in range(args.repeats):
        order = keys[:]
        rng.shuffle(order)
        ms = {k: [] for k in keys}
        for _ in range(runs):
            for k in order:
                m = models[k]
                t = clock()
                m.run(x)
                ms[k].append((clock() - t) * 1e3)
        for k in keys:
            per_repeat[k].append(float(np.median(ms[k])))
            all_ms[k] += ms[k]
        print(f"  repeat {r + 1}/{args.repeats} done ({clock() - t0:.0f} s)", flush=True)
    s = {k: common.repeats_summary(per_repeat[k]) for k in keys}
    mins = {k: float(np.min(all_ms[k])) for k in keys}
    rep.data["latency_ms"] = {f"{k[0]}/{k[1]}": {"summary": s[k], "min": mins[k],
                                                  "p95": percentiles(all_ms[k], (95,))["p95"]} for k in keys}

    rows = []
    for c in cuts + ["full"]:
        i8, f16, f32 = (s[(c, q)]["median"] for q in common.QUANTS)
        full8 = s[("full", "int8")]["median"]
        rows.append([c if c != "full" else "whole model", common.fmt_spread(s[(c, "int8")]),
                     common.fmt_spread(s[(c, "float16")]), common.fmt_spread(s[(c, "none")]),
                     common.fmt(mins[(c, "int8")], ".3f"), common.ratio(i8, full8),
                     common.ratio(mins[(c, "int8")], mins[("full", "int8")]), common.ratio(f32, i8),
                     common.ratio(f16, i8)])
    rep.table("latency", ["cut", "int8 ms", "float16 ms", "float32 ms", "int8 min ms", "int8 head / whole",
                          "same, of the minima", "float32 / int8", "float16 / int8"], rows,
              title=f"Head latency on {args.threads} thread(s): median of per-repeat medians (± half the range "
                    f"over {args.repeats} repeats of {runs} calls)",
              notes=["the head of a cut runs the layers up to and including it; 'whole model' is the unsplit "
                     "model converted the same way (what 'everything on the device' costs)",
                     "ratios are of medians measured in the same run, interleaved call by call",
                     "float16 models store float16 weights and compute in float32 on this CPU"])

    from converter import cuts as cuts_mod
    from converter import zoo

    info = {c.name: c for c in cuts_mod.list_cuts(zoo.load_model(MODEL))}
    rows = []
    for c in cuts:
        b = bundles[(c, "int8")]
        spec = b.manifest.feature
        f = Frame.features(np.zeros(tuple(spec.shape), np.int8), request_id=2**40, device_id="pi-0001",
                           bundle_id=b.bundle_id, seq=123456, scale=spec.scale, zero_point=spec.zero_point)
        hdr = header_size(f)
        signed = header_size(f, signed=True)
        frame = len(encode_frame(f, compress="raw"))
        rows.append([c, "x".join(map(str, spec.shape)), f"{spec.nbytes:,}", f"{4 * spec.elements:,}", str(hdr),
                     str(signed), f"{100 * hdr / spec.nbytes:.2f}%", f"{frame:,}",
                     *(common.fmt_bytes(os.path.getsize(paths[(c, q)])) for q in common.QUANTS),
                     common.fmt_bytes(os.path.getsize(b.tail_path)), f"{info[c].head_macs:,}"])
        rep.data.setdefault("sizes", {})[c] = {"feature_int8": spec.nbytes, "feature_float32": 4 * spec.elements,
                                               "header": hdr, "header_signed": signed, "frame_raw": frame,
                                               "head_bytes": {q: os.path.getsize(paths[(c, q)]) for q in common.QUANTS},
                                               "tail_int8_bytes": os.path.getsize(b.tail_path),
                                               "head_macs": info[c].head_macs}
    full_sizes = [common.fmt_bytes(os.path.getsize(paths[("full", q)])) for q in common.QUANTS]
    rows.append(["whole model", "-", "-", "-", "-", "-", "-", "-", *full_sizes, "-",
                 f"{info[cuts[-1]].head_macs + info[cuts[-1]].tail_macs:,}"])
    rep.table("sizes", ["cut", "feature", "int8 B", "float32 B", "header B", "signed B", "header / int8",
                        "frame B", "head int8", "head f16", "head f32", "tail int8", "head MACs"], rows,
              title="What is stored and sent per cut",
              notes=["header: frame prefix + MessagePack header of an int8 features frame (64-bit request id, "
                     "7-character device id); signed: with the 16-byte MAC",
                     "frame B: header + int8 tensor, uncompressed (the agent compresses with zstd when it saves "
                     ">= 10 %)", "raw image for comparison: 784 B of uint8 pixels (28x28x1)"])
    hdrs = {c: rep.data["sizes"][c]["header"] for c in cuts}
    rep.target("frame header bytes (largest over the cuts)", max(hdrs.values()), 64, "<=")
    if "pool2" in hdrs:
        rep.target("frame header as % of an int8 pool2 frame", 100 * hdrs["pool2"] / rep.data["sizes"]["pool2"][
            "feature_int8"], 2.0, "<=")
    rep.note(f"shared machine: load average {rep.machine['load_avg_1_5_15']} on {rep.machine['cores']} cores at the "
             "start; medians move with the load, ratios measured call by call much less")
    rep.finish(args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
