"""The report's figures, drawn with matplotlib's Agg backend and returned as PNG bytes."""
from __future__ import annotations

import io
import logging

import numpy as np

log = logging.getLogger(__name__)

#: Short names of the attacks in figures, in the report's order; label_mean is the label-only baseline.
ATTACK_NAMES = {"whitebox": "white-box", "decoder": "query access", "architecture": "architecture only",
                "queryfree": "query-free", "label_mean": "label only", "label_decoder": "label decoder"}
#: Attacks shown in the grid (the label decoder looks like the class mean: one baseline is enough)
GRID_ATTACKS = ("whitebox", "decoder", "architecture", "queryfree", "label_mean")


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


def grid_rows(result) -> list:
    """The rows of the grid: every cut, each hardened cut right after its unhardened one (before/after)."""
    rows, hardened = [], list(getattr(result, "hardened", []) or [])
    for r in result.cuts:
        rows.append(r)
        rows += [h for h in hardened if (h.layer or h.name) == r.name]
    rows += [h for h in hardened if h not in rows]
    return rows


def _show(ax, image):
    image = np.clip(np.asarray(image, np.float32), 0, 1)
    if image.shape[-1] == 1:
        ax.imshow(image[..., 0], cmap="gray", vmin=0, vmax=1, interpolation="nearest")
    else:
        ax.imshow(image, interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([])
    for s in ax.spines.values():
        s.set_color("#bbbbbb")


def reconstruction_grid(result, k_max: int = 4) -> bytes:
    """Fig. 3-like: a column group per attack (originals on top), a row per cut and hardened cut, each
    group's first image captioned with its PSNR / SSIM."""
    plt = _pyplot()
    imgs = result.images
    original = np.asarray(imgs["original"])
    k = max(1, min(len(original), k_max))
    rows = grid_rows(result)
    groups = [a for a in GRID_ATTACKS if any(r.name in (imgs.get(a) or {}) for r in rows)]
    ncols = len(groups) * k + max(len(groups) - 1, 0)
    ratios = []
    for g in range(len(groups)):
        ratios += [1.0] * k + ([0.25] if g < len(groups) - 1 else [])
    fig, axes = plt.subplots(1 + len(rows), max(ncols, 1), squeeze=False,
                             figsize=(0.62 * ncols + 1.6, 0.78 * (1 + len(rows)) + 0.5),
                             gridspec_kw={"width_ratios": ratios or [1.0]})
    for ax in axes.ravel():
        ax.axis("off")
    for g, attack in enumerate(groups):
        c0 = g * (k + 1)
        axes[0][c0].set_title(ATTACK_NAMES.get(attack, attack), fontsize=8, loc="left")
        for c in range(k):
            axes[0][c0 + c].axis("on")
            _show(axes[0][c0 + c], original[c])
        for ri, r in enumerate(rows, start=1):
            rec = (imgs.get(attack) or {}).get(r.name)
            if rec is None:
                continue
            for c in range(min(k, len(rec))):
                axes[ri][c0 + c].axis("on")
                _show(axes[ri][c0 + c], rec[c])
            m = (r.attacks.get(attack) or {}).get("metrics") or {}
            if m:
                axes[ri][c0].set_title(f"{m['psnr_db']:.1f} dB, SSIM {m['ssim']:.2f}", fontsize=6, loc="left",
                                       pad=2)
    axes[0][0].set_ylabel("original", rotation=0, ha="right", va="center", fontsize=8, labelpad=6)
    for ri, r in enumerate(rows, start=1):
        axes[ri][0].axis("on")
        axes[ri][0].set_xticks([])
        axes[ri][0].set_yticks([])
        axes[ri][0].set_ylabel(r.name, rotation=0, ha="right", va="center", fontsize=8, labelpad=6)
    fig.subplots_adjust(wspace=0.05, hspace=0.35)
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
    for attack, marker in zip(GRID_ATTACKS, "osD^x"):
        ys = [((r.attacks.get(attack) or {}).get("metrics") or {}).get("psnr_db", np.nan) for r in result.cuts]
        if not all(np.isnan(ys)):
            axes[0].plot(x, ys, marker + ("--" if attack == "label_mean" else "-"), label=ATTACK_NAMES[attack])
    axes[0].set_ylabel("PSNR, dB")
    axes[0].set_title("reconstruction, by threat model", fontsize=9)
    axes[0].legend(fontsize=6)
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


def pareto_front(points: list, x_key: str = "psnr_db", y_key: str = "accuracy") -> list:
    """Indices of the points no other point beats on both (lower ``x_key``, higher ``y_key``), by ``x_key``."""
    ok = [i for i, p in enumerate(points) if p.get(x_key) is not None and p.get(y_key) is not None]
    front = [i for i in ok if not any(points[j][x_key] <= points[i][x_key] and points[j][y_key] >= points[i][y_key]
                                      and (points[j][x_key], points[j][y_key]) != (points[i][x_key], points[i][y_key])
                                      for j in ok)]
    return sorted(front, key=lambda i: points[i][x_key])


def privacy_accuracy(result) -> bytes:
    """Per swept cut: int8 accuracy against the strongest attack's PSNR and against the leakage beyond
    the label, one series per defence, the Pareto front, the unhardened model and the chosen point."""
    plt = _pyplot()
    sweeps = list(result.sweeps)
    fig, axes = plt.subplots(len(sweeps), 2, figsize=(10.5, 3.9 * len(sweeps)), squeeze=False)
    colours = ["#4477aa", "#ee6677", "#228833", "#ccbb44", "#aa3377", "#66ccee"]
    for row, sw in zip(axes, sweeps):
        points = sw.get("points") or []
        methods = list(dict.fromkeys(p.get("method") for p in points))
        base = sw.get("baseline") or {}
        budgets = sw.get("budgets") or {}
        for ax, key, label in ((row[0], "psnr_db", "strongest attack PSNR, dB"),
                               (row[1], "beyond_label_db", "leakage beyond the label, dB")):
            for mi_, method in enumerate(methods):
                mine = sorted((p for p in points if p.get("method") == method and p.get(key) is not None),
                              key=lambda p: p.get("strength") or 0)
                ax.plot([p[key] for p in mine], [100 * p["accuracy"] for p in mine], "o-", ms=5, lw=1,
                        color=colours[mi_ % len(colours)], label=str(method))
            front = pareto_front(points, key)
            if front:
                ax.step([points[i][key] for i in front], [100 * points[i]["accuracy"] for i in front], where="post",
                        color="#333333", lw=1.2, ls="--", label="Pareto front")
            if base.get(key) is not None and base.get("accuracy") is not None:
                ax.scatter([base[key]], [100 * base["accuracy"]], marker="*", s=150, color="black", zorder=5,
                           label="unhardened")
            chosen = sw.get("chosen")
            if chosen is not None and points[chosen].get(key) is not None:
                ax.scatter([points[chosen][key]], [100 * points[chosen]["accuracy"]], s=240, facecolors="none",
                           edgecolors="#228833", lw=2, zorder=6, label="chosen")
            if budgets.get("min_accuracy") is not None:
                ax.axhline(100 * budgets["min_accuracy"], color="#aa3377", ls=":", lw=1, label="--min-accuracy")
            if key == "psnr_db" and budgets.get("max_psnr") is not None:
                ax.axvline(budgets["max_psnr"], color="#aa3377", ls="-.", lw=1, label="--max-psnr")
            ax.set_xlabel(label + " (lower = safer)")
            ax.set_ylabel("int8 split test accuracy, %")
            ax.set_title(f"{sw.get('model', '')} at {sw.get('cut', '?')}", fontsize=9)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=6, loc="lower right")
    fig.suptitle("Privacy against accuracy (each defence over its strengths)", fontsize=10)
    fig.tight_layout()
    return _png(fig)


FIGURES = {
    "grid": ("Reconstructions by every attack at every cut (Fig. 3-like); hardened cuts under their cut", reconstruction_grid),
    "information_plane": ("Information plane", information_plane),
    "leakage_vs_cost": ("Leakage against bytes sent and head latency", leakage_vs_cost),
    "measures": ("Measures that rank cuts", measures_by_cut),
    "privacy_accuracy": ("Privacy against accuracy, Pareto front (edgesplit harden --sweep)", privacy_accuracy),
}


def draw_all(result) -> dict:
    """{key: (title, png bytes)} for every figure (the privacy-accuracy curve only when there are sweeps)."""
    return {key: (title, fn(result)) for key, (title, fn) in FIGURES.items()
            if key != "privacy_accuracy" or getattr(result, "sweeps", None)}
