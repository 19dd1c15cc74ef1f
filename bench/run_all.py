"""``make bench``: run every benchmark, each in its own process, and collect their results.

Each benchmark prints its machine/versions/settings header and tables, and writes
``bench/results/<name>.json`` and ``<name>.md``; this script then writes
``bench/results/summary.md`` (every table, and every target with its verdict) and
``bench/results/summary.json``.  ``--quick`` passes a small N to every benchmark (a smoke
run of a few minutes once the bundles are cached); a failing benchmark is reported and
the others still run.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from bench import common  # noqa: E402

# (name, script, what it measures); the scripts of other roles are run when present
BENCHES = [
    ("head", "bench_head.py", "head latency per cut and quantization, model sizes, frame header"),
    ("echo", "bench_echo.py", "the broker ceiling: bare MQTT echo over loopback"),
    ("e2e", "bench_e2e.py", "end to end through Mosquitto, loopback and shaped links, planner check"),
    ("cloud", "bench_cloud.py", "cloud worker frames/s, micro-batching, one and two workers"),
    ("scale", "bench_scale.py", "pipeline and worker efficiency, a gRPC peer, 1/2/4 workers on Mosquitto and NATS, Nagle"),
    ("outbox", "bench_outbox.py", "the device outbox's cost"),
    ("mobilenet", "bench_mobilenet.py", "MobileNetV2 0.35 96x96, random weights: cost per cut"),
    ("mi", "bench_mi.py", "the auditor's mutual-information benchmark (paper setting)"),
    ("attacks", "bench_attacks.py", "the four graded attacks and the label-only baseline at every paper-cnn cut"),
    ("frame", "bench_frame.py", "frame encode/decode"),
]


def _supports(script: Path, flag: str) -> bool:
    try:
        out = subprocess.run([sys.executable, str(script), "--help"], capture_output=True, text=True, timeout=300,
                             cwd=str(HERE.parent)).stdout
    except (OSError, subprocess.SubprocessError):
        return False
    return flag in out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="run every benchmark (make bench)")
    p.add_argument("--quick", action="store_true", help="small N everywhere: a smoke run of a few minutes")
    p.add_argument("--only", default=None, help="comma-separated names: " + ", ".join(b[0] for b in BENCHES))
    p.add_argument("--skip", default="", help="comma-separated names to leave out")
    p.add_argument("--out", default=str(common.RESULTS_DIR), help="results directory (default bench/results)")
    args = p.parse_args(argv)
    only = set(args.only.split(",")) if args.only else None
    skip = set(filter(None, args.skip.split(",")))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    ran, failed, missing = [], [], []
    t_all = time.perf_counter()
    for name, script, what in BENCHES:
        if (only is not None and name not in only) or name in skip:
            continue
        path = HERE / script
        if not path.is_file():
            missing.append(name)
            print(f"\n##### {name}: {script} is not there (yet); skipped", flush=True)
            continue
        argv_b = [sys.executable, str(path)]
        if args.quick and _supports(path, "--quick"):
            argv_b.append("--quick")
        if _supports(path, "--out"):
            argv_b += ["--out", str(out)]
        print(f"\n##### {name}: {what}\n$ {' '.join(argv_b)}", flush=True)
        t0 = time.perf_counter()
        code = subprocess.call(argv_b, cwd=str(HERE.parent), timeout=None)
        secs = time.perf_counter() - t0
        (ran if code == 0 else failed).append((name, code, secs))
        print(f"##### {name}: exit {code} after {secs:.0f} s", flush=True)
    _summary(out, ran, failed, missing, args.quick, time.perf_counter() - t_all)
    return 1 if failed else 0


def _summary(out: Path, ran, failed, missing, quick: bool, seconds: float) -> None:
    m = common.machine()
    lines = [f"# Benchmark results ({'quick' if quick else 'full'} run, {time.strftime('%Y-%m-%d %H:%M')})", "",
             f"Machine: {m['cpu']}, {m['cores']} cores, {m['memory_gib']} GiB, load average {m['load_avg_1_5_15']} at "
             f"the end (a shared machine). Absolute times are this machine's; compare the ratios. "
             f"{seconds / 60:.0f} min in all.", ""]
    targets = []
    sections = []
    this_run = {r[0] for r in ran + failed}
    earlier = []
    # every benchmark's latest results: this run's, and those left by an earlier run (--only/--skip)
    for name, _, _ in BENCHES:
        js = out / f"{name}.json"
        md = out / f"{name}.md"
        if name not in this_run:
            if not js.is_file():
                continue
            earlier.append(name)
        label = name if name in this_run else f"{name} (earlier run)"
        if js.is_file():
            try:
                d = json.loads(js.read_text())
                targets += [(label, t) for t in d.get("targets", [])]
            except ValueError:
                pass
        if md.is_file():
            sections.append(md.read_text())
    if targets:
        lines += ["## Targets", "", "| benchmark | target | value | limit | verdict |", "|---|---|---:|---:|---|"]
        for name, t in targets:
            lines.append("| " + " | ".join([name, *_target_cells(t)]) + " |")
        lines.append("")
    if failed:
        lines += ["## Failed", ""] + [f"* {n}: exit {c} after {s:.0f} s" for n, c, s in failed] + [""]
    if missing:
        lines += [f"Not run (script missing): {', '.join(missing)}", ""]
    if earlier:
        lines += [f"Not run this time, results of an earlier run (their own headers give its date): "
                  f"{', '.join(earlier)}", ""]
    lines += sections
    (out / "summary.md").write_text("\n".join(lines) + "\n")
    summary = {"quick": quick, "machine": m, "seconds": seconds, "ran": [r[0] for r in ran],
               "failed": [f[0] for f in failed], "missing": missing, "earlier": earlier,
               "targets": [dict(t, benchmark=n) for n, t in targets]}
    (out / "summary.json").write_text(json.dumps(summary, indent=1, default=str))
    print(f"\nwrote {out / 'summary.md'}; ran {len(ran)}, failed {len(failed)}, missing {len(missing)}")


def _target_cells(t: dict) -> list[str]:
    """(target, value, limit, verdict) of a target in this suite's format or another benchmark's own."""
    met = t.get("met", t.get("ok"))
    verdict = {True: "MET", False: "NOT MET"}.get(met, "not measured")
    v = t.get("value", t.get("measured"))
    value = "-" if v is None else format(v, ".4g") if isinstance(v, (int, float)) else str(v)
    limit = f"{t['op']} {t['limit']:g}" if "op" in t and isinstance(t.get("limit"), (int, float)) else "-"
    what = str(t.get("name") or t.get("what") or "?")
    return [what.replace("|", "/"), value, limit, verdict]


if __name__ == "__main__":
    raise SystemExit(main())
