"""Hardening paper-cnn at pool2: the sweep's time, and the hardened point's leakage and accuracy.

    python bench/bench_harden.py                  # the full sweep (5 methods x 4 strengths, attacks), then the target
    python bench/bench_harden.py --quick          # one strength per method, fewer steps: a smoke run
    python bench/bench_harden.py --sweep-dir D    # keep (or reuse, with --reuse) the sweep in D
    python bench/bench_harden.py --method vib --strength 0.003 --steps 2000   # only the target point

Two measurements, both with ``auditor.defences`` exactly as ``edgesplit harden`` runs them:

1. **the sweep** (``edgesplit harden paper-cnn --cut pool2 --sweep``): every method at its four
   strengths, each fine-tuned, converted to int8, checked and attacked by the four attacks (quick
   settings, ``auditor.defences.points.QUICK_ATTACKS``) beside the label-only baselines; the table
   and the point chosen under ``--max-psnr 15`` and the default accuracy budget; wall time against
   the 30-minute target (with the load average: the machine is shared);
2. **the target point** (the sweep's choice, or ``--method``/``--strength``), fine-tuned for
   ``--steps`` and attacked with every attack at its full default settings (the query decoder at
   100, 1,000 and 10,000 auxiliary images): the strongest attack's PSNR against 15 dB, its gap
   over the label-only baseline against 2 dB, the int8 accuracy lost against 1 percentage point.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as `python bench/bench_harden.py` from anywhere
    sys.path.insert(0, str(ROOT))

from bench.common import Report, parse_args  # noqa: E402

MODEL, CUT = "paper-cnn", "pool2"
TARGET_PSNR_DB, TARGET_GAP_DB, TARGET_DROP_PP, TARGET_SWEEP_MIN = 15.0, 2.0, 1.0, 30.0
ATTACKS = ("whitebox", "decoder", "architecture", "queryfree")


def _add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--sweep-dir", default=None, help="where the sweep is written (default: under the cache)")
    p.add_argument("--reuse", action="store_true", help="read the sweep in --sweep-dir instead of running it")
    p.add_argument("--no-sweep", action="store_true", help="only the target point (needs --method/--strength)")
    p.add_argument("--no-target", action="store_true", help="only the sweep")
    p.add_argument("--method", default=None, help="the target point's method (default: the sweep's choice)")
    p.add_argument("--strength", type=float, default=None, help="the target point's strength")
    p.add_argument("--steps", type=int, default=2000, help="fine-tuning steps of the target point (default 2000)")
    p.add_argument("--sweep-steps", type=int, default=None, help="fine-tuning steps per sweep point (default 400)")
    p.add_argument("--victims", type=int, default=1000, help="test images the target point's attacks reconstruct")


def _cell(v, spec=".1f"):
    return "-" if v is None else format(v, spec)


def _rows(points) -> list:
    rows = []
    for p in points:
        per = {n: ((p.attacks.get(n) or {}).get("metrics") or {}).get("psnr_db") for n in ATTACKS}
        rows.append([p.label, _cell(None if p.accuracy is None else 100 * p.accuracy, ".2f"),
                     _cell(p.accuracy_drop_pp, "+.2f"), *(_cell(per[n]) for n in ATTACKS), p.strongest or "-",
                     _cell(p.psnr_db), _cell(p.ssim, ".2f"), _cell(p.beyond.get("label_psnr_db")),
                     _cell(p.beyond_label_db, "+.1f"), ("chosen " if p.chosen else "") + ("Pareto" if p.pareto else "")
                     + (f" FAILED: {p.error}" if p.error else "")])
    return rows


COLUMNS = ["point", "acc %", "d pp", "white-box dB", "decoder dB", "UnSplit dB", "query-free dB", "strongest",
           "max dB", "SSIM", "label-only dB", "beyond dB", ""]


def run_sweep(args, rep: Report, sweep_dir: Path):
    from auditor.defences import sweep as sweep_mod
    from auditor.defences.finetune import FinetuneSettings
    from auditor.defences.points import HardenSettings
    from protocol.errors import UsageError

    settings = HardenSettings(finetune=FinetuneSettings(steps=args.sweep_steps or (100 if args.quick else 400)),
                              test_n=1000 if args.quick else 2000, victims=100 if args.quick else 200)
    if args.reuse and (sweep_dir / "sweep.json").is_file():
        result = sweep_mod.SweepResult.from_json(sweep_dir / "sweep.json")
        rep.note(f"sweep read from {sweep_dir / 'sweep.json'} (--reuse), not run now")
        load = (None, None)
    else:
        load0 = os.getloadavg()[0]
        t0 = time.perf_counter()
        if args.quick:
            from auditor.defences.registry import methods

            points, result = [], None
            for name, cls in methods().items():   # one strength each, the second of its four
                try:
                    result = sweep_mod.run_sweep(MODEL, CUT, name, strengths=[cls.sweep[1]], out=sweep_dir / name,
                                                 max_psnr=TARGET_PSNR_DB, settings=settings, progress=False)
                except UsageError as exc:
                    result = sweep_mod.SweepResult.from_json(sweep_dir / name / "sweep.json")
                    rep.note(f"{name}: {exc.message}")
                points += result.points
            result.points = points
            result.pareto = sweep_mod.pareto_front(points)
            result.chosen, result.reason = sweep_mod.choose(points, result.baseline, None, TARGET_PSNR_DB)
            result.seconds = time.perf_counter() - t0
        else:
            try:
                result = sweep_mod.run_sweep(MODEL, CUT, None, out=sweep_dir, max_psnr=TARGET_PSNR_DB,
                                             settings=settings, progress=False)
            except UsageError as exc:
                rep.note(f"sweep: {exc.message}")
                result = sweep_mod.SweepResult.from_json(sweep_dir / "sweep.json")
        load = (load0, os.getloadavg()[0])
    rep.table("sweep", COLUMNS, _rows([result.baseline] + list(result.points)),
              title=f"{MODEL} at {CUT}: {len(result.points)} points, quick attacks, "
                    f"{settings.finetune.steps} fine-tuning steps each",
              notes=["acc = int8 split test accuracy with the defence drawn on the device (parity images); "
                     "d pp = against the unhardened model", "dB = PSNR of each attack's reconstructions in "
                     "pixel space; label-only = the stronger label-only baseline; beyond = strongest - label-only",
                     f"chosen under --max-psnr {TARGET_PSNR_DB:g} and --min-accuracy = unhardened - 1 pp: "
                     f"{result.reason}"])
    minutes = result.seconds / 60.0
    full = len(result.points) == 20 and not args.quick
    rep.target("full sweep of one cut (5 methods x 4 strengths, attacks included), minutes", minutes,
               TARGET_SWEEP_MIN, "<=", ("" if full else "not the full sweep; ")
               + (f"load average {load[0]:.1f} -> {load[1]:.1f} on {os.cpu_count()} cores (shared machine)"
                  if load[0] is not None else "read from an earlier run"))
    rep.data["sweep"] = result.to_dict()
    return result


def run_target(args, rep: Report, sweep, out: Path):
    from auditor.defences.finetune import FinetuneSettings
    from auditor.defences.harden import harden
    from auditor.defences.points import HardenSettings

    if args.method is not None:
        method, strength = args.method, args.strength
    elif sweep is not None and sweep.chosen_point() is not None:
        method, strength = sweep.chosen_point().method, sweep.chosen_point().strength
    else:
        best = min((p for p in (sweep.points if sweep else []) if p.ok and p.psnr_db is not None
                    and p.accuracy_drop_pp is not None and p.accuracy_drop_pp >= -TARGET_DROP_PP),
                   key=lambda p: p.psnr_db, default=None)
        if best is None:
            rep.note("no target point: the sweep chose none and no --method/--strength was given")
            return None
        method, strength = best.method, best.strength
    full = {} if args.quick else {"attack_settings": {}, "aux_n": 10_000}   # {}: every attack's own defaults
    settings = HardenSettings(finetune=FinetuneSettings(steps=100 if args.quick else args.steps),
                              test_n=2000 if args.quick else 10_000, victims=200 if args.quick else args.victims,
                              **full)
    t0 = time.perf_counter()
    result = harden(MODEL, CUT, method, strength, out=out, settings=settings, progress=False)
    p, base = result.point, result.baseline
    rep.table("target", COLUMNS, _rows([base, p]),
              title=f"the target point: {p.label}, {settings.finetune.steps} fine-tuning steps, every attack at "
                    f"its default settings, {settings.victims} victims, accuracy on {settings.test_n} test images",
              notes=[f"on the device: {result.summary().splitlines()[-2].removeprefix('on the device: ')}",
                     f"{time.perf_counter() - t0:.0f} s"])
    rep.target(f"{p.label}: strongest of the four attacks, PSNR dB", p.psnr_db, TARGET_PSNR_DB, "<=",
               f"{p.strongest} ({(p.attacks.get(p.strongest) or {}).get('threat_model', {}).get('name', '?')})")
    rep.target(f"{p.label}: strongest attack beyond the label-only baseline, dB", p.beyond_label_db, TARGET_GAP_DB,
               "<=", f"label-only {p.beyond.get('label_psnr_db')}")
    rep.target(f"{p.label}: end-to-end int8 test accuracy lost vs unhardened, percentage points",
               None if p.accuracy_drop_pp is None else -p.accuracy_drop_pp, TARGET_DROP_PP, "<=",
               f"{100 * p.accuracy:.2f} % against {100 * base.accuracy:.2f} %")
    rep.data["target"] = result.to_dict()
    return result


def main(argv=None) -> int:
    args = parse_args("hardening paper-cnn at pool2: sweep time and the hardened point's leakage", _add_args, argv)
    from converter.datasets import cache_dir

    work = Path(args.sweep_dir) if args.sweep_dir else cache_dir() / "bench" / ("harden-quick" if args.quick
                                                                                else "harden")
    rep = Report("harden", f"Hardening {MODEL} at {CUT}: the sweep and the target point",
                 settings={"model": MODEL, "cut": CUT, "target_steps": args.steps, "work": str(work),
                           "method": args.method, "strength": args.strength},
                 quick=args.quick,
                 measures="int8 split accuracy with the defence drawn on the device; PSNR/SSIM of the four "
                          "attacks (adaptive: the deployed head with its defence) and of the label-only "
                          "baselines; wall time of the sweep")
    sweep = None
    if not args.no_sweep:
        sweep = run_sweep(args, rep, work / "sweep")
    if not args.no_target:
        run_target(args, rep, sweep, work / "target")
    rep.finish(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
