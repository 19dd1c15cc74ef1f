"""The audit report's sigma^2 section: the KDE bands of every cut over sigma^2, with the ceilings.

Two panels, one line colour per cut: I(X;B) and I(Y;B), each a band from the lower to the upper
bound over the grid of ``auditor.sigma``, the ceilings log2 N and H(Y) dashed, the audit's
sigma^2 dotted, and a dot where each upper bound leaves its ceiling.
"""
from __future__ import annotations

import base64
import html

import numpy as np

from auditor.report.iplane import _png, _pyplot


def _sweeps(result):
    return [(r.name, r.kde["sigma_sweep"]) for r in result.cuts if r.kde.get("sigma_sweep")]


def bands(result) -> bytes:
    plt = _pyplot()
    sweeps = _sweeps(result)
    c = result.ceilings
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.0))
    colours = plt.get_cmap("viridis")(np.linspace(0, 0.9, len(sweeps)))
    for ax, key, ceiling, label in ((axes[0], "ixt", c["log2_n"], "I(X;B)"), (axes[1], "iyt", c["h_y"], "I(Y;B)")):
        for (name, sw), col in zip(sweeps, colours):
            up, lo = sw[key + "_upper"], sw[key + "_lower"]
            if up is None:
                continue
            ax.fill_between(sw["grid"], lo, up, color=col, alpha=0.22, lw=0)
            ax.plot(sw["grid"], up, color=col, lw=1.5, label=name)
            s = sw["leaves"].get(key + "_upper")
            if s is not None:
                ax.plot([s], [ceiling - c["saturation_bits"]], "o", color=col, ms=5)
        ax.axhline(ceiling, ls="--", color="#aa3377", lw=1)
        ax.axvline(result.spec.sigma2, ls=":", color="#555555", lw=1)
        ax.text(result.spec.sigma2, 0.02 * ceiling, f" σ² = {result.spec.sigma2:g} (audit)", fontsize=7,
                color="#555555", rotation=90, va="bottom")
        ax.text(sweeps[0][1]["grid"][0], ceiling, "log2 N" if key == "ixt" else "H(Y)", fontsize=7,
                color="#aa3377", va="bottom")
        ax.set_xscale("log")
        ax.set_ylim(0, ceiling * 1.07)
        ax.set_xlabel("noise variance σ²")
        ax.set_ylabel(f"{label}, bits (band: lower to upper bound)")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7, loc="lower left")
    fig.suptitle(f"KDE bounds of the float features against σ² (N = {c['n']}); a dot: where the upper bound "
                 "leaves its ceiling", fontsize=9)
    fig.tight_layout()
    return _png(fig)


def figures(result) -> dict:
    """{"sigma_bands": (title, png)} when the audit swept sigma^2, else {}."""
    if not _sweeps(result):
        return {}
    return {"sigma_bands": ("KDE bounds against the noise variance σ²", bands(result))}


def _rows(result):
    from auditor import sigma

    return sigma.leaves_text(result.sigma)


def section_html(result, figs: dict) -> str:
    if not result.sigma:
        return "<p class='note'>The σ² sweep was not run (<code>sigma_sweep=False</code>).</p>"
    parts = ["<p>Every KDE figure depends on the noise variance σ² the estimator adds (the paper and Saxe et al. "
             "use 0.1; ibsgd's notebook for the small IB network uses 0.001). Below σ² at which a layer leaves its "
             "ceiling, its row says only that every test image is distinguishable.</p>"]
    if "sigma_bands" in figs:
        title, png = figs["sigma_bands"]
        data = base64.b64encode(png).decode("ascii")
        parts.append(f'<figure><img alt="{html.escape(title)}" src="data:image/png;base64,{data}">'
                     f"<figcaption>{html.escape(title)}</figcaption></figure>")
    parts.append("<ul>" + "".join(f"<li>{html.escape(t)}</li>" for t in _rows(result)) + "</ul>")
    return "".join(parts)


def paper_note_html(result) -> str:
    rank = (result.sigma or {}).get("paper_ranking")
    return f"<p class='note'><b>At which σ² would the paper's ranking hold?</b> {html.escape(rank['statement'])}</p>" \
        if rank else ""


def section_markdown(result) -> list[str]:
    if not result.sigma:
        return []
    lines = ["## How much the KDE figures depend on sigma^2", "",
             "Float features, upper bounds; figure: figures/sigma_bands.png (bands: lower to upper bound).", ""]
    lines += [f"* {t}" for t in _rows(result)]
    rank = result.sigma.get("paper_ranking")
    if rank:
        lines += ["", f"At which sigma^2 the paper's ranking would hold: {rank['statement']}"]
    return lines + [""]
