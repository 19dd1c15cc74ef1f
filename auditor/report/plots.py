"""The report's figures, drawn with matplotlib's Agg backend and returned as PNG bytes."""
from __future__ import annotations

import io
import logging

import numpy as np

log = logging.getLogger(__name__)

ATTACK_NAMES = {"whitebox": "white-box", "decoder": "decoder"}


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    _pyplot().close(fig)
    return buf.getvalue()


def reconstruction_grid(result) -> bytes:
    """Fig. 3-like grid: the originals on top, then one row per (attack, cut)."""
    plt = _pyplot()
    imgs = result.images
    original = np.asarray(imgs["original"])
    k = len(original)
    rows = [("original", None, original)]
    for attack in ("whitebox", "decoder"):
        for cut in result.cuts:
            rec = imgs.get(attack, {}).get(cut.name)
            if rec is not None:
                m = cut.attacks[attack]["metrics"]
                rows.append((f"{ATTACK_NAMES[attack]} · {cut.name}", m, np.asarray(rec)))
    fig, axes = plt.subplots(len(rows), k, figsize=(1.0 * k + 2.6, 1.0 * len(rows) + 0.3), squeeze=False)
    for r, (label, m, images) in enumerate(rows):
        for c in range(k):
            ax = axes[r][c]
            ax.imshow(np.clip(images[c].squeeze(), 0, 1), cmap="gray", vmin=0, vmax=1, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            for s in ax.spines.values():
                s.set_color("#bbbbbb")
        text = label if m is None else f"{label}\n{m['psnr_db']:.1f} dB, SSIM {m['ssim']:.2f}"
        axes[r][0].set_ylabel(text, rotation=0, ha="right", va="center", fontsize=8, labelpad=6)
    fig.subplots_adjust(wspace=0.05, hspace=0.08)
    return _png(fig)


def information_plane(result) -> bytes:
    """I(X;B) against I(Y;B) for every cut (float and int8), ceilings as dashed lines."""
    plt = _pyplot()
    c = result.ceilings
    fig, ax = plt.subplots(figsize=(6.4, 4.6))
    for kind, marker, fill in (("float", "o", True), ("int8", "s", False)):
        xs = [r.kde[kind]["ixt_upper"] for r in result.cuts]
        ys = [r.kde[kind]["iyt_upper"] for r in result.cuts]
        ax.plot(xs, ys, "-", color="#4477aa" if fill else "#ee6677", alpha=0.5, lw=1)
        ax.scatter(xs, ys, marker=marker, s=46, label=f"ours, {kind} features",
                   facecolors=("#4477aa" if fill else "none"), edgecolors=("#4477aa" if fill else "#ee6677"),
                   zorder=3)
        if fill:
            _label_groups(ax, [r.name for r in result.cuts], xs, ys)
    inp = result.input_row["kde"]
    ax.scatter([inp["ixt_upper"]], [inp["iyt_upper"]], marker="*", s=120, color="#228833", label="raw input",
               zorder=4)
    if result.paper:
        ax.scatter([p["paper_ixt"] for p in result.paper], [p["paper_iyt"] for p in result.paper],
                   marker="x", color="#666666", s=40, label="Tuor et al. Table 1", zorder=2)
    ax.axvline(c["log2_n"], ls="--", color="#aa3377", lw=1)
    ax.axhline(c["h_y"], ls="--", color="#aa3377", lw=1)
    ax.text(c["log2_n"], ax.get_ylim()[1], f"log2 N = {c['log2_n']:.2f} ", rotation=90, va="top",
            ha="right", fontsize=8, color="#aa3377")
    ax.text(ax.get_xlim()[0], c["h_y"], f" H(Y) = {c['h_y']:.2f}", va="bottom", fontsize=8, color="#aa3377")
    ax.set_xlabel("I(X;B) upper bound, bits")
    ax.set_ylabel("I(Y;B) upper bound, bits")
    ax.set_title(f"Information plane (KDE, σ² = {result.spec.sigma2:g}, N = {c['n']})", fontsize=10)
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=2)
    ax.grid(alpha=0.3)
    return _png(fig)


def _label_groups(ax, names, xs, ys, *, log_x: bool = False, near: float = 0.04) -> list[str]:
    """One label per spot: cuts that land within ``near`` of each other (a share of the axis span,
    in log space on a log axis) are named together, e.g. "conv1, pool1" for two cuts with the same
    latency, instead of two labels printed over each other.  Labels point inwards, away from the
    nearer edge, so none runs off the axes.  Returns the label texts (for tests)."""
    px = [np.log10(x) if log_x and x > 0 else x for x in xs]
    span_x = (max(px) - min(px)) or 1.0
    span_y = (max(ys) - min(ys)) or 1.0
    groups: list[list] = []
    for name, x, y, gx in zip(names, xs, ys, px):
        for g in groups:
            if abs(g[3] - gx) < near * span_x and abs(g[2] - y) < near * span_y:
                g[0].append(name)
                break
        else:
            groups.append([[name], x, y, gx])
    texts = []
    for members, x, y, gx in groups:
        text = ", ".join(members)
        right = gx > min(px) + 0.5 * span_x
        below = y > min(ys) + 0.5 * span_y
        ax.annotate(text, (x, y), textcoords="offset points", xytext=(-8 if right else 8, -12 if below else 8),
                    ha="right" if right else "left", va="top" if below else "bottom", fontsize=8)
        texts.append(text)
    return texts


def leakage_vs_cost(result) -> bytes:
    """Strongest-attack PSNR and distance correlation against bytes sent and head latency."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    rec = result.recommendation.get("cut")
    for ax, key, label, log_x in ((axes[0], "bytes_int8", "bytes sent per input (int8)", True),
                                  (axes[1], "head_ms", "head latency on this machine, ms", False)):
        xs = [r.cost[key] for r in result.cuts]
        ys = [r.leakage_db for r in result.cuts]
        ax.scatter(xs, ys, color="#4477aa", zorder=3, label="strongest attack PSNR")
        _label_groups(ax, [r.name for r in result.cuts], xs, ys, log_x=log_x)
        for r, x, y in zip(result.cuts, xs, ys):
            if r.name == rec:
                ax.scatter([x], [y], s=260, facecolors="none", edgecolors="#228833", lw=2, zorder=4,
                           label="recommended")
        ax2 = ax.twinx()
        ax2.scatter(xs, [r.dcor["int8"] for r in result.cuts], marker="^", color="#ee6677", zorder=2,
                    label="distance correlation")
        ax2.set_ylim(0, 1.05)
        ax2.set_ylabel("distance correlation dCor(X, B)", color="#ee6677", fontsize=9)
        if log_x:
            ax.set_xscale("log")
        ax.set_xlabel(label)
        ax.set_ylabel("PSNR of the best reconstruction, dB", color="#4477aa", fontsize=9)
        ax.grid(alpha=0.3)
        h1, l1 = ax.get_legend_handles_labels()
        h2, l2 = ax2.get_legend_handles_labels()
        ax.legend(h1 + h2, l1 + l2, fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=3,
                  markerscale=0.6)
    fig.suptitle("Leakage against cost (higher PSNR / dCor = more of the input comes back)", fontsize=10)
    fig.tight_layout()
    return _png(fig)


def measures_by_cut(result) -> bytes:
    """The non-saturating measures cut by cut, next to the saturating KDE bound."""
    plt = _pyplot()
    names = [r.name for r in result.cuts]
    x = np.arange(len(names))
    fig, axes = plt.subplots(1, 3, figsize=(11, 3.3))
    wb = [r.attacks["whitebox"]["metrics"]["psnr_db"] for r in result.cuts]
    dec = [r.attacks["decoder"]["metrics"]["psnr_db"] for r in result.cuts]
    axes[0].plot(x, wb, "o-", label="white-box")
    axes[0].plot(x, dec, "s-", label="decoder")
    axes[0].set_ylabel("PSNR, dB")
    axes[0].set_title("reconstruction", fontsize=9)
    axes[0].legend(fontsize=7)
    uy = [(r.usable.get("int8") or {}).get("label_bits") for r in result.cuts]
    axes[1].plot(x, [np.nan if v is None else v for v in uy], "o-", color="#228833", label="usable I(Y;B), probe")
    axes[1].plot(x, [r.kde["int8"]["iyt_upper"] for r in result.cuts], "x--", color="#999999",
                 label="KDE I(Y;B) (saturates)")
    axes[1].axhline(result.ceilings["h_y"], ls=":", color="#aa3377", lw=1)
    axes[1].set_ylabel("bits")
    axes[1].set_title("information about the label", fontsize=9)
    axes[1].legend(fontsize=7)
    axes[2].plot(x, [r.dcor["int8"] for r in result.cuts], "^-", color="#ee6677", label="int8 sent")
    axes[2].plot(x, [r.dcor["float"] for r in result.cuts], "v:", color="#4477aa", label="float")
    axes[2].set_ylim(0, 1.05)
    axes[2].set_title("distance correlation with the input", fontsize=9)
    axes[2].legend(fontsize=7)
    for ax in axes:
        ax.set_xticks(x, names, fontsize=8, rotation=30)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    return _png(fig)


FIGURES = {
    "grid": ("Reconstructions from every cut (Fig. 3-like)", reconstruction_grid),
    "information_plane": ("Information plane", information_plane),
    "leakage_vs_cost": ("Leakage against bytes sent and head latency", leakage_vs_cost),
    "measures": ("Measures that rank cuts", measures_by_cut),
}


def draw_all(result) -> dict:
    """{key: (title, png bytes)} for every figure."""
    return {key: (title, fn(result)) for key, (title, fn) in FIGURES.items()}
