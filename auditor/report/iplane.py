"""The information-plane report: iplane.json / iplane.md / iplane.html and two figures.

``figures/iplane.png`` is drawn as ibsgd draws Saxe et al.'s plots (and Tuor et al. their
Fig. 5): every layer's KDE upper bounds at every recorded epoch, coloured by epoch
(``gnuplot`` colour map), the layers of one epoch joined by a faint line, each layer's path
over training as one curve; the ceilings dashed.  ibsgd's colour scale is linear in epochs,
which paints the first tenth of training (where the records are dense) black; ours is
logarithmic, so the fitting phase and the late phase both show.
``figures/iplane_epochs.png``: I(X;T) and I(Y;T) against epoch, the band between the lower
and the upper bound for every layer.
"""
from __future__ import annotations

import base64
import html
import json
import math
from pathlib import Path

import numpy as np



def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _png(fig) -> bytes:
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    _pyplot().close(fig)
    return buf.getvalue()


def _epochs(result):
    return np.array([r["epoch_equiv"] for r in result.records], dtype=float)


def _epoch_label(result, short: bool = False) -> str:
    s = result.spec
    if s.model == "saxe-mlp" and s.lr != 0.001:
        return ("ibsgd-equivalent epoch" if short else
                f"epoch, ibsgd-equivalent (epoch x lr / 0.001; this run: lr {s.lr:g}, {s.epochs} epochs)")
    return "epoch"


def information_plane(result) -> bytes:
    """Fig. 5-like: I(X;T) against I(Y;T), every layer, coloured by epoch."""
    plt = _pyplot()
    from matplotlib.collections import LineCollection

    c = result.ceilings
    epochs = _epochs(result)
    names = [layer["name"] for layer in result.layers]
    xs = np.array([[r["layers"][nm]["ixt_upper"] for nm in names] for r in result.records])
    ys = np.array([[r["layers"][nm]["iyt_upper"] for nm in names] for r in result.records])
    fig, ax = plt.subplots(figsize=(6.6, 4.8))
    cmap = plt.get_cmap("gnuplot")
    positive = epochs[epochs > 0]
    low = float(positive.min()) / 2 if len(positive) else 0.5
    epochs = np.maximum(epochs, low)  # the untrained record gets the darkest colour
    norm = matplotlib_colors().LogNorm(vmin=low, vmax=max(float(epochs.max()), low * 2))
    for i in range(len(epochs)):  # the layers of one epoch, as ibsgd joins them
        ax.plot(xs[i], ys[i], color=cmap(norm(epochs[i])), alpha=0.12, lw=0.8, zorder=1)
    for j, nm in enumerate(names):  # one curve per layer, coloured by epoch along it
        pts = np.c_[xs[:, j], ys[:, j]]
        if len(pts) > 1:
            seg = LineCollection(np.stack([pts[:-1], pts[1:]], axis=1), cmap=cmap, norm=norm, lw=1.6, zorder=2)
            seg.set_array(0.5 * (epochs[:-1] + epochs[1:]))
            ax.add_collection(seg)
        ax.scatter(xs[:, j], ys[:, j], c=epochs, cmap=cmap, norm=norm, s=14, edgecolors="none", zorder=3)
    for text, (x, y) in _final_labels(names, xs[-1], ys[-1], c["log2_n"], c["h_y"]):
        ax.annotate(text, (x, y), textcoords="offset points", xytext=(-4, -10), ha="right", fontsize=8)
    ax.axvline(c["log2_n"], ls="--", color="#777777", lw=1)
    ax.axhline(c["h_y"], ls="--", color="#777777", lw=1)
    ax.set_xlim(0, math.ceil(c["log2_n"] + 0.5))
    ax.set_ylim(0, c["h_y"] * 1.06)
    ax.text(c["log2_n"], 0.02, " log2 N", rotation=90, va="bottom", ha="right", fontsize=8, color="#555555")
    ax.text(0.2, c["h_y"], "H(Y)", va="bottom", fontsize=8, color="#555555")
    sm = plt.cm.ScalarMappable(cmap=cmap, norm=norm)
    fig.colorbar(sm, ax=ax, label=_epoch_label(result, short=True) + " (log scale)")
    ax.set_xlabel("I(X;T), KDE upper bound, bits")
    ax.set_ylabel("I(Y;T), KDE upper bound, bits")
    s = result.spec
    ax.set_title(f"{s.target}: information plane over training (N = {c['n']}, σ² = {s.sigma2:g})", fontsize=10)
    ax.grid(alpha=0.3)
    return _png(fig)


def matplotlib_colors():
    import matplotlib.colors

    return matplotlib.colors


def _final_labels(names, xs, ys, span_x, span_y, near=0.03):
    """One label per spot where layers end: layers ending within ``near`` of the axes' spans share it."""
    groups = []
    for nm, x, y in zip(names, xs, ys):
        for g in groups:
            if abs(g[1] - x) < near * span_x and abs(g[2] - y) < near * span_y:
                g[0].append(nm)
                break
        else:
            groups.append([[nm], x, y])
    return [(", ".join(g[0]), (g[1], g[2])) for g in groups]


def over_epochs(result) -> bytes:
    """I(X;T) and I(Y;T) against epoch (log axis); the band is lower to upper bound."""
    plt = _pyplot()
    epochs = _epochs(result)
    x = np.where(epochs > 0, epochs, np.nan)
    first_pos = np.nanmin(x) if np.isfinite(x).any() else 1.0
    x = np.where(np.isnan(x), first_pos / 2, x)  # the record before training sits left of the first
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    colours = plt.get_cmap("viridis")(np.linspace(0, 0.9, len(result.layers)))
    for ax, key, ceiling, label in ((axes[0], "ixt", result.ceilings["log2_n"], "I(X;T)"),
                                    (axes[1], "iyt", result.ceilings["h_y"], "I(Y;T)")):
        for layer, col in zip(result.layers, colours):
            nm = layer["name"]
            up = [r["layers"][nm][key + "_upper"] for r in result.records]
            lo = [r["layers"][nm][key + "_lower"] for r in result.records]
            ax.fill_between(x, lo, up, color=col, alpha=0.25, lw=0)
            ax.plot(x, up, color=col, lw=1.4, label=f"{nm} ({layer['units']})")
        ax.axhline(ceiling, ls="--", color="#777777", lw=1)
        ax.set_xscale("log")
        ax.set_xlabel(_epoch_label(result), fontsize=8)
        ax.set_ylabel(f"{label}, bits (band: lower to upper bound)")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    return _png(fig)


def write(result, out) -> dict:
    """Write iplane.json, iplane.md, iplane.html and figures/ into ``out``; return their paths."""
    out = Path(out)
    (out / "figures").mkdir(parents=True, exist_ok=True)
    figs = {"iplane": (f"Information plane over training (Fig. 5-like); colour: {_epoch_label(result)}",
                       information_plane(result)),
            "iplane_epochs": ("I(X;T) and I(Y;T) over training, lower to upper bound", over_epochs(result))}
    for key, (_, png) in figs.items():
        (out / "figures" / f"{key}.png").write_bytes(png)
    from auditor.report.jsonable import to_json

    paths = {"json": out / "iplane.json", "md": out / "iplane.md", "html": out / "iplane.html"}
    paths["json"].write_text(json.dumps(to_json(result), indent=1, allow_nan=False) + "\n")
    paths["md"].write_text(markdown(result))
    paths["html"].write_text(render_html(result, figs))
    return {k: str(v) for k, v in paths.items()}


def _settings_lines(result) -> list[str]:
    s, sec = result.spec, result.seconds
    return [f"network {s.model}" + (f" ({s.activation})" if s.activation else "") + f", {s.epochs} epochs of "
            f"{result.steps_per_epoch} steps, {s.optimizer} lr {s.lr:g}, batch {s.batch_size}, seed {s.seed}",
            f"information on the first {result.ceilings['n']} test images, sigma^2 = {s.sigma2:g}, KDE bounds of "
            f"Kolchinsky & Tracey in float64 (auditor.mi, exact fast path), grid {s.grid} ({len(result.records)} records)",
            f"time: training {sec['train']:.0f} s, KDE {sec['mi']:.0f} s, total {sec['total']:.0f} s"]


HEADER = ["layer", "units", "first", "peak (epoch)", "final", "fall from peak", "fall in last decade", "verdict"]


def _layer_rows(result) -> list[list[str]]:
    rows = []
    for layer in result.layers:
        t = result.analysis["layers"][layer["name"]]
        rows.append([layer["name"], str(layer["units"]), f"{t['first']:.3f}", f"{t['peak']:.3f} ({t['peak_epoch']:.3g})",
                     f"{t['final']:.3f}", f"{t['drop']:.3f}", f"{t['late_drop']:.3f}", t["verdict"]])
    return rows


def markdown(result) -> str:
    lines = [f"# Information plane over training: {result.spec.target}", ""]
    lines += [f"* {x}" for x in _settings_lines(result)] + [""]
    lines += ["## What it shows", ""] + [f"* {w}" for w in result.analysis.get("words", [])] + [""]
    lines += ["## Per layer (I(X;T) upper bound, bits)", "", "| " + " | ".join(HEADER) + " |",
              "|---|" + "---:|" * (len(HEADER) - 2) + "---|"]
    lines += ["| " + " | ".join(row) + " |" for row in _layer_rows(result)]
    lines += ["", "Epochs: " + _epoch_label(result) + ". Figures: figures/iplane.png, figures/iplane_epochs.png; "
              "every record in iplane.json.", ""]
    return "\n".join(lines)


def render_html(result, figs) -> str:
    def img(png, caption):
        data = base64.b64encode(png).decode("ascii")
        return (f'<figure><img alt="{html.escape(caption)}" src="data:image/png;base64,{data}">'
                f"<figcaption>{html.escape(caption)}</figcaption></figure>")

    def row(cells, tag="td"):
        return "<tr>" + "".join(f"<{tag}>{html.escape(c)}</{tag}>" for c in cells) + "</tr>"

    body = [f"<h1>Information plane over training: {html.escape(result.spec.target)}</h1>",
            "<ul>" + "".join(f"<li>{html.escape(x)}</li>" for x in _settings_lines(result)) + "</ul>",
            "<h2>What it shows</h2>",
            "<ul>" + "".join(f"<li>{html.escape(w)}</li>" for w in result.analysis.get("words", [])) + "</ul>"]
    body += [img(png, title) for title, png in figs.values()]
    body.append("<h2>Per layer (I(X;T) upper bound, bits)</h2><table>" + row(HEADER, "th")
                + "".join(row(r) for r in _layer_rows(result)) + "</table>")
    style = ("body{font-family:sans-serif;max-width:1100px;margin:24px auto;padding:0 16px;color:#222}"
             "table{border-collapse:collapse;font-size:.85em}td,th{border:1px solid #ccc;padding:3px 7px}"
             "img{max-width:100%}figcaption{color:#555;font-size:.85em}")
    return (f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>edgesplit iplane</title>"
            f"<style>{style}</style></head><body>{''.join(body)}</body></html>\n")
