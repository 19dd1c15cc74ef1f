"""The paper the auditor reproduces: Tuor et al. (SPIE 2018), its Table 1 and its setting.

One home for the figures, so the audit, its report and ``bench/bench_mi.py`` compare against the
same numbers.  Imports nothing heavy: the benchmark reads it without TensorFlow.
"""
from __future__ import annotations

from pathlib import Path

#: Table 1: (I(X;B), I(Y;B)) in bits per layer of the MNIST CNN.
PAPER_TABLE1 = {"conv1": (13.40, 3.41), "pool1": (13.35, 3.38), "conv2": (13.32, 3.35),
                "pool2": (13.31, 3.34), "dense1": (13.29, 3.32), "dense2": (3.35, 3.20)}
#: A row of ours "agrees" with the paper when within this many bits.
PAPER_TOLERANCE_BITS = 0.3

PRESETS = {
    # Tuor et al.'s setting for the information figures: 10,000 test images, sigma^2 = 0.1, every
    # layer.  The attacks are ours, sized for a 2-core machine (about an hour when it is busy);
    # --iters / --attack-n / --decoder-epochs raise them towards He et al.'s 5,000 / 50.
    "paper": dict(n=10_000, sigma2=0.1, cuts=None, attack_n=32, iters=500, decoder_n=5000,
                  decoder_epochs=5),
}


def is_paper_model(model_name) -> bool:
    """True for the zoo's ``paper-cnn`` or a ``paper-cnn.keras`` file."""
    return model_name == "paper-cnn" or Path(str(model_name)).stem == "paper-cnn"


def paper_comparison(rows: list, ceilings: dict) -> list:
    """Row by row against Table 1 (our float features, upper bound), with the why.

    ``rows`` are the audit's per-cut results (anything with ``.name`` and ``.kde``).
    """
    out = []
    log2_n, h_y = ceilings["log2_n"], ceilings["h_y"]
    for r in rows:
        if r.name not in PAPER_TABLE1:
            continue
        px, py = PAPER_TABLE1[r.name]
        k = r.kde["float"]
        ox, oy = k["ixt_upper"], k["iyt_upper"]
        agree = abs(ox - px) <= PAPER_TOLERANCE_BITS and abs(oy - py) <= PAPER_TOLERANCE_BITS
        why = []
        # The paper prints two decimals: a figure within 0.005 of a ceiling is that ceiling, rounded.
        if px > log2_n + 0.005:
            why.append(f"the paper's I(X;B) {px:.2f} exceeds log2 N = {log2_n:.4f}, impossible in exact arithmetic "
                       f"(float32 rounding in the paper)")
        elif px > log2_n - 0.005:
            why.append(f"the paper's I(X;B) {px:.2f} is the ceiling log2 N = {log2_n:.4f}, rounded")
        if py > h_y + 0.005:
            why.append(f"its I(Y;B) {py:.2f} exceeds H(Y) = {h_y:.4f} (same cause)")
        elif py > h_y - 0.005:
            why.append(f"its I(Y;B) {py:.2f} is the ceiling H(Y) = {h_y:.4f}, rounded")
        if k["saturated"].get("ixt_upper"):
            why.append("ours sits on the ceiling (saturated: every image is distinguishable at this sigma, "
                       "so the row cannot rank cuts)")
        if not agree:
            why.append(f"differs by {ox - px:+.2f}/{oy - py:+.2f} bits")
        if not why:
            why.append("the only row below the ceilings; both estimates carry information")
        verdict = ("agrees" if agree else "differs") + f" (within {PAPER_TOLERANCE_BITS} bit)" * agree
        out.append({"cut": r.name, "paper_ixt": px, "paper_iyt": py, "ours_ixt": ox, "ours_iyt": oy,
                    "ours_ixt_lower": k["ixt_lower"], "ours_iyt_lower": k["iyt_lower"],
                    "ours_int8_ixt": r.kde["int8"]["ixt_upper"], "ours_int8_iyt": r.kde["int8"]["iyt_upper"],
                    "agree": bool(agree), "verdict": verdict + ": " + "; ".join(why)})
    return out
