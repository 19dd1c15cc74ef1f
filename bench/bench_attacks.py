"""The four graded attacks and the label-only baseline at every cut of paper-cnn (issue: "Make a cut safe").

    python -m bench.bench_attacks                          # six cuts, N = 1,000 victims, 32 per optimisation attack
    python -m bench.bench_attacks --quick                  # three cuts, small settings (a smoke run)
    python -m bench.bench_attacks --cuts pool2 --hardened OUT   # and `edgesplit harden --out OUT`'s cut beside it

Each cut's int8 bundle (cached) is attacked on what it really sends (LiteRT head, wire frame,
dequantized) by ``auditor.attacks.run_attacks``: white-box (the head's weights), query access
(a decoder on the attacker's own images sent through the head, over a budget sweep),
architecture only (UnSplit) and query-free (a shadow head trained through the tail); the
label-only baselines (the attacker's mean image of the predicted class, a decoder given only
the label) are scored on the same images, and every attack beyond them.  The attacker's
images are MNIST training images, the victims test images.  Targets (reported, not asserted):
white-box PSNR >= 20 dB at conv1 and pool1 on the unhardened model.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as `python bench/bench_attacks.py` from anywhere
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

from bench.common import PAPER_CUTS, Report, bundle_for, parse_args  # noqa: E402

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

MODEL = "paper-cnn"
TARGET_WB_DB = 20.0
ORDER = ("whitebox", "decoder", "architecture", "queryfree")


def _add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--cuts", default=None, help="comma-separated cuts (default the six; --quick conv1,pool2,dense2)")
    p.add_argument("--n", type=int, default=None, help="victim test images (default 1,000; quick 200)")
    p.add_argument("--attack-n", type=int, default=None, help="victims per optimisation attack (default 32; quick 8)")
    p.add_argument("--iters", type=int, default=None, help="white-box / query-free iterations (default 300; quick 100)")
    p.add_argument("--aux", type=int, default=None, help="attacker's own images (default 10,000; quick 1,000)")
    p.add_argument("--epochs", type=int, default=None, help="decoder / shadow epochs (default 5; quick 2)")
    p.add_argument("--hardened", nargs="*", default=(), metavar="DIR",
                   help="`edgesplit harden --out` directories or hardened bundles, attacked beside their cut")


def _settings(iters: int, attack_n: int, epochs: int, aux_n: int) -> dict:
    budgets = tuple(b for b in (100, 1000, 10_000) if b < aux_n) + (aux_n,)
    return {"whitebox": {"max_n": attack_n, "iters": iters},
            "decoder": {"budgets": budgets, "epochs": epochs},
            "architecture": {"max_n": attack_n, "rounds": max(1, iters // 3)},
            "queryfree": {"max_n": attack_n, "iters": iters, "epochs": epochs, "train_n": aux_n}}


def _attack(head, x, y, aux, settings, model):
    from auditor.attacks import run_attacks

    return run_attacks(head, x, aux, settings=settings, labels=y, model=model, seed=0)


def main(argv: list[str] | None = None) -> int:
    args = parse_args("the four graded attacks at every cut of paper-cnn", _add_args, argv)
    from auditor.attacks import AuxData, suite
    from converter import zoo
    from converter.cuts import list_cuts
    from converter.datasets import load_mnist
    from protocol.manifest import load_bundle

    q = args.quick
    cuts = [c.strip() for c in (args.cuts or ("conv1,pool2,dense2" if q else ",".join(PAPER_CUTS))).split(",")]
    n, attack_n = args.n or (200 if q else 1000), args.attack_n or (8 if q else 32)
    iters, aux_n, epochs = args.iters or (100 if q else 300), args.aux or (1000 if q else 10_000), args.epochs or (2 if q else 5)
    settings = _settings(iters, attack_n, epochs, aux_n)
    rep = Report("attacks", "Attacks graded by threat model, every cut of paper-cnn, beside the label-only baseline",
                 settings={"model": MODEL, "cuts": cuts, "victims": n, "attack_n": attack_n, "iters": iters,
                           "aux_images": aux_n, "epochs": epochs, "hardened": list(args.hardened)},
                 quick=q, measures="PSNR (dB) / SSIM in pixel space of each attack on the int8 tensor sent, the "
                                   "label-only baseline on the same images, and the gap; wall seconds per attack")
    model = zoo.load_model(MODEL)
    data = load_mnist()
    x, y = np.asarray(data.x_test[:n], np.float32), np.asarray(data.y_test[:n])
    aux = AuxData(data.x_train[:aux_n], data.y_train[:aux_n])
    all_cuts = list_cuts(model)
    first, last = min(c.index for c in all_cuts), max(c.index for c in all_cuts)
    depth = {c.name: (c.index - first) / max(last - first, 1) for c in all_cuts}

    heads = []
    for cut in cuts:
        b = load_bundle(bundle_for(MODEL, cut))
        heads.append((cut, suite.deployed_head(b, model, depth=depth[cut]), model))
    for path in args.hardened:
        for v in suite.load_hardened(path)[0]:
            hm = v.load_model()
            heads.append((f"{v.layer} + {v.label}", suite.deployed_head(v.bundle, hm, depth=depth[v.layer]), hm))

    rows, times, sweep_rows, data_out = [], [], [], {}
    for name, head, m in heads:
        t0 = time.perf_counter()
        got = _attack(head, x, y, aux, settings, m)
        wall = time.perf_counter() - t0
        bl = got.beyond_label()
        cells = [name]
        for a in ORDER:
            o = got.get(a)
            cells.append("-" if o.skipped else f"{o.metrics['psnr_db']:.1f} / {o.metrics['ssim']:.3f}")
        for b in ("label_mean", "label_decoder"):
            o = got.get(b)
            cells.append(f"{o.metrics['psnr_db']:.1f} / {o.metrics['ssim']:.3f}")
        cells += [bl["threat_model"], f"{bl['gap_db']:+.1f} / {bl['gap_ssim']:+.3f}"]
        rows.append(cells)
        times.append([name] + [f"{got.get(a).seconds:.0f}" for a in ORDER + ("label_mean", "label_decoder")]
                     + [f"{wall:.0f}"])
        dec = got.get("decoder")
        sweep_rows.append([name] + [f"{v['psnr_db']:.1f} / {v['ssim']:.2f}" for _, v in sorted(
            dec.sweep.items(), key=lambda kv: int(kv[0]))])
        data_out[name] = got.to_dict()
        print(f"  {name}: strongest {bl['attack']} {bl['psnr_db']:.1f} dB, {bl['gap_db']:+.1f} dB beyond the label, "
              f"{wall:.0f} s", flush=True)
        if name in ("conv1", "pool1"):
            wb = got.get("whitebox").metrics["psnr_db"]
            rep.target(f"white-box PSNR at {name}, unhardened (dB)", wb, TARGET_WB_DB, ">=",
                       f"{attack_n} victims, {iters} iterations")
    tms = {a: got.get(a).threat_model["name"] for a in ORDER}
    rep.table("attacks", ["cut"] + [f"{tms[a]} dB / SSIM" for a in ORDER]
              + ["label: class mean", "label: decoder", "strongest", "beyond label dB / SSIM"], rows,
              title=f"PSNR / SSIM per attack, {MODEL}, int8 features as sent",
              notes=[f"white-box, architecture only, query-free: the first {attack_n} of {n} test images; query "
                     f"access and the label-only baselines: all {n}",
                     f"the attacker's own images: the first {aux_n:,} MNIST training images",
                     "beyond label = the strongest attack minus the stronger label-only baseline on the same images"])
    budgets = settings["decoder"]["budgets"]
    rep.table("budgets", ["cut"] + [f"{b:,} images" for b in budgets], sweep_rows,
              title="query access: decoder PSNR / SSIM by the attacker's auxiliary-data budget")
    rep.table("seconds", ["cut"] + list(ORDER) + ["label mean", "label decoder", "all"], times,
              title="wall seconds per attack (shared machine)")
    rep.data = data_out
    rep.finish(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
