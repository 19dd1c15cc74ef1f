"""The audit report: report.html (self-contained), report.json (every number) and report.md."""
from __future__ import annotations

import base64
import html
import json
import logging
import math
import time
from pathlib import Path
from string import Template

from auditor.report.jsonable import _clean, to_json  # noqa: F401 - to_json is public here

log = logging.getLogger(__name__)

TEMPLATE = Path(__file__).with_name("template.html")
SCHEMA = Path(__file__).resolve().parent.parent / "report_schema.json"


def write_report(result, out) -> dict:
    """Write report.html, report.json, report.md (and figures/*.png) into ``out``; return their paths."""
    from auditor.report import plots, sigma_bands

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    figs = plots.draw_all(result)
    figs.update(sigma_bands.figures(result))
    fig_dir = out / "figures"
    fig_dir.mkdir(exist_ok=True)
    for key, (_, png) in figs.items():
        (fig_dir / f"{key}.png").write_bytes(png)
    paths = {"html": out / "report.html", "json": out / "report.json", "md": out / "report.md"}
    data = to_json(result)
    paths["json"].write_text(json.dumps(data, indent=2, allow_nan=False) + "\n")
    paths["html"].write_text(render_html(result, figs))
    paths["md"].write_text(render_markdown(result))
    log.info("report written to %s", out)
    return {k: str(v) for k, v in paths.items()}


# ------------------------------------------------------------------------ html

def _e(text) -> str:
    return html.escape(str(text))


def _n(v, spec=".2f") -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "–"
    return format(v, spec)


def _img(png: bytes, caption: str) -> str:
    data = base64.b64encode(png).decode("ascii")
    return (f'<figure><img alt="{_e(caption)}" src="data:image/png;base64,{data}">'
            f"<figcaption>{_e(caption)}</figcaption></figure>")


def _kde_cells(k: dict, sat_mark: bool = True) -> str:
    s = k.get("saturated", {})
    cells = []
    for key in ("ixt_upper", "ixt_lower", "iyt_upper"):
        flag = sat_mark and s.get(key)
        cells.append(f'<td class="kde{" sat" if flag else ""}">{_n(k.get(key), ".3f")}{"*" if flag else ""}</td>')
    return "".join(cells)


def _paper_section(result) -> str:
    c = result.ceilings
    if not result.paper:
        return ('<p class="note">Table 1 of Tuor et al. is for their MNIST CNN: the comparison is made when '
                "auditing <code>paper-cnn</code> (try <code>edgesplit audit paper-cnn --preset paper</code>).</p>")
    rows = []
    for p in result.paper:
        cls = "agree" if p["agree"] else "differ"
        sat = next(r for r in result.cuts if r.name == p["cut"]).kde["float"]["saturated"]
        rows.append(
            f'<tr class="{"saturated" if sat.get("ixt_upper") else ""}"><td class="l">{_e(p["cut"])}</td>'
            f'<td>{p["paper_ixt"]:.2f}</td><td class="kde{" sat" if sat.get("ixt_upper") else ""}">'
            f'{p["ours_ixt"]:.3f}{"*" if sat.get("ixt_upper") else ""}</td><td>{_n(p["ours_ixt_lower"], ".3f")}</td>'
            f'<td>{_n(p["ours_int8_ixt"], ".3f")}</td>'
            f'<td>{p["paper_iyt"]:.2f}</td><td class="kde{" sat" if sat.get("iyt_upper") else ""}">'
            f'{_n(p["ours_iyt"], ".3f")}{"*" if sat.get("iyt_upper") else ""}</td><td>{_n(p["ours_iyt_lower"], ".3f")}</td>'
            f'<td>{_n(p["ours_int8_iyt"], ".3f")}</td>'
            f'<td class="l {cls}">{_e(p["verdict"])}</td></tr>')
    head = ("<tr><th class='l' rowspan=2>layer</th><th colspan=4>I(X;B), bits</th><th colspan=4>I(Y;B), bits</th>"
            "<th class='l' rowspan=2>row by row</th></tr>"
            "<tr><th>paper</th><th>ours float, upper</th><th>lower</th><th>ours int8 sent</th>"
            "<th>paper</th><th>ours float, upper</th><th>lower</th><th>ours int8 sent</th></tr>")
    note = (f"Ceilings: I(X;B) ≤ log<sub>2</sub> N = {c['log2_n']:.4f} bits and I(Y;B) ≤ H(Y) = {c['h_y']:.4f} "
            f"bits (N = {c['n']} test images, σ² = {result.spec.sigma2:g}; pairwise-distance Gaussian KDE of "
            "Kolchinsky &amp; Tracey, computed in float64). A starred cell is <b>saturated</b>: within "
            f"{c['saturation_bits']} bit of its ceiling, it says only that every image is distinguishable at this σ, "
            "not how much the layer leaks. The paper's hidden-layer figures lie above the ceilings, which exact "
            "arithmetic cannot give: they are the ceiling plus float32 rounding. Only the last layer carries "
            "information in this estimator; the measures below rank the cuts.")
    return f"<table>{head}{''.join(rows)}</table><p class='note'>{note}</p>"


def _rows(result) -> list:
    """Every cut, each hardened cut right after its own."""
    from auditor.report.plots import grid_rows

    return grid_rows(result)


_NO_METRICS = {"psnr_db": None, "ssim": None, "accuracy": None, "judge_accuracy": None}


def _metrics(row, attack: str) -> dict:
    """An attack's metrics at ``row``, or blanks when it did not run."""
    return ((row.attacks.get(attack) or {}).get("metrics")) or _NO_METRICS


def _row_class(result, r) -> str:
    rec = result.recommendation.get("name") or result.recommendation.get("cut")
    sat = r.kde["float"]["saturated"].get("ixt_upper")
    return " ".join(c for c in ("recommended" if r.name == rec else "", "saturated" if sat else "") if c)


def _cut_name(result, r) -> str:
    rec = result.recommendation.get("name") or result.recommendation.get("cut")
    return _e(r.name) + (" ★" if r.name == rec else "")


def _information_table(result) -> str:
    head = ("<tr><th class='l' rowspan=2>cut</th><th class='l' rowspan=2>shape</th>"
            "<th colspan=3>KDE, float features (bits)</th><th colspan=3>KDE, int8 sent (bits)</th>"
            "<th colspan=2>usable I(Y;B), bits</th><th rowspan=2>input bits<br>(decoder)</th>"
            "<th colspan=2>dCor(X, B)</th></tr>"
            "<tr><th>I(X;B)</th><th>lower</th><th>I(Y;B)</th><th>I(X;B)</th><th>lower</th><th>I(Y;B)</th>"
            "<th>float</th><th>int8</th><th>float</th><th>int8</th></tr>")
    inp = result.input_row
    rows = [f"<tr><td class='l'>input (raw)</td><td class='l'>{'×'.join(map(str, inp['shape']))}</td>"
            f"{_kde_cells(inp['kde'])}<td>–</td><td>–</td><td>–</td>"
            f"<td>{_n(inp['usable'].get('label_bits'), '.3f')}</td><td>–</td><td>–</td><td>1.000</td><td>–</td></tr>"]
    for r in _rows(result):
        uf, uq = r.usable.get("float") or {}, r.usable.get("int8") or {}
        rows.append(
            f"<tr class='{_row_class(result, r)}'><td class='l'>{_cut_name(result, r)}</td>"
            f"<td class='l'>{'×'.join(map(str, r.shape))}</td>"
            f"{_kde_cells(r.kde['float'])}{_kde_cells(r.kde['int8'])}"
            f"<td>{_n(uf.get('label_bits'), '.3f')}</td><td>{_n(uq.get('label_bits'), '.3f')}</td>"
            f"<td>{_n(uq.get('input_bits'), '.0f')}</td>"
            f"<td>{_n(r.dcor['float'], '.3f')}</td><td>{_n(r.dcor['int8'], '.3f')}</td></tr>")
    return f"<table>{head}{''.join(rows)}</table>"


def _attack_table(result) -> str:
    head = ("<tr><th class='l' rowspan=2>cut</th><th colspan=4>white-box inversion</th>"
            "<th colspan=4>learned decoder</th><th colspan=6>cost</th><th rowspan=2>head+tail<br>accuracy</th>"
            "<th class='l' rowspan=2>budgets</th></tr>"
            "<tr><th>PSNR dB</th><th>SSIM</th><th>model</th><th>reader</th>"
            "<th>PSNR dB</th><th>SSIM</th><th>model</th><th>reader</th>"
            "<th>int8 B</th><th>frame B</th><th>head MACs</th><th>head KB</th><th>head ms</th><th>tail ms</th></tr>")
    inp = result.input_row
    rows = [f"<tr><td class='l'>input (raw)</td><td colspan=8 class='l'>the input itself (reader: "
            f"{_n(result.judge.get('accuracy_on_originals'), '.3f')} on the originals)</td>"
            f"<td>{inp['bytes']}</td><td>–</td><td>0</td><td>–</td><td>–</td><td>–</td>"
            f"<td>{_n(inp['accuracy'], '.4f')}</td><td class='l'>(Keras, float)</td></tr>"]
    for r in _rows(result):
        wb, dec = _metrics(r, "whitebox"), _metrics(r, "decoder")
        budget = "meets" if not r.budget_failures else "; ".join(r.budget_failures)
        rows.append(
            f"<tr class='{_row_class(result, r)}'><td class='l'>{_cut_name(result, r)}</td>"
            f"<td>{_n(wb['psnr_db'], '.1f')}</td><td>{_n(wb['ssim'], '.3f')}</td><td>{_n(wb['accuracy'], '.2f')}</td>"
            f"<td>{_n(wb.get('judge_accuracy'), '.2f')}</td>"
            f"<td>{_n(dec['psnr_db'], '.1f')}</td><td>{_n(dec['ssim'], '.3f')}</td><td>{_n(dec['accuracy'], '.2f')}</td>"
            f"<td>{_n(dec.get('judge_accuracy'), '.2f')}</td>"
            f"<td>{r.cost['bytes_int8']}</td><td>{_n(r.cost['frame_bytes'], '.0f')}</td>"
            f"<td>{r.cost['head_macs']:,}</td><td>{r.cost['head_size_bytes'] / 1024:.1f}</td>"
            f"<td>{_n(r.cost['head_ms'], '.3f')}</td><td>{_n(r.cost['tail_ms'], '.3f')}</td>"
            f"<td>{_n(r.accuracy['int8'], '.4f')}</td><td class='l'>{_e(budget)}</td></tr>")
    return f"<table>{head}{''.join(rows)}</table>"


def _main_table(result) -> str:
    return ("<h3>Information</h3>" + _information_table(result)
            + "<h3>Attacks and cost</h3>" + _attack_table(result))


def _table_note(result) -> str:
    first = result.cuts[0] if result.cuts else None
    wb = first.attacks.get("whitebox") or {} if first else {}
    dec = first.attacks.get("decoder") or {} if first else {}
    note = usable_note(result)
    return _e(
        "Attacks work on the int8 tensor really sent (LiteRT head, wire frame, dequantized with the manifest). "
        f"White-box: eq. 1 by Adam, {wb.get('iters')} iterations at lr {wb.get('lr')}, from a {wb.get('start')} "
        f"start, x clipped to [0,1], TV weight growing with depth, on {wb.get('n')} test images. "
        f"Decoder: trained on {dec.get('train_n')} training images (disjoint from the attacked test images), "
        f"{dec.get('epochs')} epochs, Adam lr 1e-3, batch 32, scored on {dec.get('n')} test images. "
        "model / reader = share of reconstructions classified as the true class by the audited model / by an "
        f"independent reader ({result.judge.get('architecture', 'an MLP')}); the model is a biased judge of "
        "white-box reconstructions, which are optimised to give its own features. Usable I(Y;B) = H(Y) minus a held-out probe's "
        "cross-entropy. " + note + " ★ = recommended; * = saturated KDE figure.")


def usable_note(result) -> str:
    for r in result.cuts:
        note = (r.usable.get("int8") or {}).get("input_bits_note")
        if note:
            return "Input bits: " + str(note)
    return ""


_DEFAULTED = {"tv": "grows with depth", "max_bytes": "no budget", "max_head_ms": "no budget",
              "min_accuracy": "no budget"}


def _setting_text(key: str, value, result) -> str:
    """A setting as a reader wants it: what a defaulted (None) option actually meant in this run."""
    if value is not None:
        return str(value)
    if key == "cuts":
        return "every valid cut: " + ", ".join(c.name for c in result.cuts)
    return _DEFAULTED.get(key, "default")


def _settings_table(result) -> str:
    s = result.spec.to_dict()
    rows = "".join(f"<tr><td class='l'>{_e(k)}</td><td class='l'>{_e(_setting_text(k, v, result))}</td></tr>"
                   for k, v in s.items())
    rows += "".join(f"<tr><td class='l'>{_e(k)}</td><td class='l'>{_e(v)}</td></tr>"
                    for k, v in result.versions.items())
    rows += f"<tr><td class='l'>run time</td><td class='l'>{result.seconds:.0f} s</td></tr>"
    return f"<table>{rows}</table>"


def _recommendation_html(result) -> str:
    rec = result.recommendation
    if rec.get("cut"):
        hardened = f" hardened with {_e(rec['variant'])}" if rec.get("variant") not in (None, "unhardened") else ""
        return (f"<div>Recommended cut: <b class='cut'>{_e(rec['cut'])}</b>{hardened}</div><p>{_e(rec['reason'])}</p>"
                f"<p class='note'>Measure: {_e(rec['measure'])}. Budgets: {_e(_budget_text(rec['budgets']))}.</p>")
    return f"<div><b class='cut'>No cut recommended</b></div><p>{_e(rec['reason'])}</p>"


def _budget_text(b: dict) -> str:
    given = [f"{k.replace('_', '-')} {v}" for k, v in b.items() if v is not None]
    return ", ".join(given) if given else "none given"


def _data_line(result, html_: bool = False) -> str:
    """The user's images: classes and preprocessing (the split is in the dataset text already)."""
    d = getattr(result, "data", None)
    if not d:
        return ""
    classes = ", ".join(d["classes"][:8]) + (", ..." if len(d["classes"]) > 8 else "")
    text = (f"classes {classes}; input {d['preprocess']}; the attacker's own images are train images, the "
            "attacked ones test images")
    return ("<br>" + _e(text)) if html_ else ("\n\n" + text)


def render_html(result, figs: dict) -> str:
    from auditor.report import sigma_bands
    from auditor.report import leakage

    c = result.ceilings
    sub = (f"{_e(result.dataset)} · {len(result.cuts)} cut(s) · N = {c['n']} test images · σ² = "
           f"{result.spec.sigma2:g} · seed {result.spec.seed}"
           + (f" · preset {_e(result.spec.preset)}" if result.spec.preset else "")
           + _data_line(result, html_=True))
    fields = {
        "model": _e(result.model_name),
        "subtitle": sub,
        "rec_class": "rec" if result.recommendation.get("cut") else "rec none",
        "recommendation": _recommendation_html(result),
        "paper_section": _paper_section(result) + sigma_bands.paper_note_html(result),
        "sigma_section": sigma_bands.section_html(result, figs),
        "main_table": _main_table(result),
        "table_note": _table_note(result),
        "settings_table": _settings_table(result),
        "attacks_section": leakage.attacks_html(result),
        "hardened_section": leakage.hardened_html(result, figs, _img),
        "generated": time.strftime("%Y-%m-%d %H:%M"),
    }
    for key, (title, png) in figs.items():
        if key != "privacy_accuracy":  # drawn inside the hardened section
            fields[f"fig_{key}"] = _img(png, title)
    return Template(TEMPLATE.read_text()).substitute(fields)


# -------------------------------------------------------------------- markdown

def render_markdown(result) -> str:
    from auditor.report import sigma_bands

    c = result.ceilings
    lines = [f"# Leakage audit: {result.model_name}", "",
             f"{result.dataset}, {len(result.cuts)} cut(s), N = {c['n']}, sigma^2 = {result.spec.sigma2:g}, "
             f"seed {result.spec.seed}" + (f", preset {result.spec.preset}" if result.spec.preset else "")
             + _data_line(result), "",
             f"**Recommended cut: {result.recommendation.get('name') or result.recommendation.get('cut') or 'none'}** — "
             f"{result.recommendation['reason']}",
             "", f"Ceilings: I(X;B) <= log2 N = {c['log2_n']:.4f} bits, I(Y;B) <= H(Y) = {c['h_y']:.4f} bits; "
             "`*` marks a saturated figure (within 0.01 bit of its ceiling).", ""]
    if result.paper:
        lines += ["## Against Tuor et al., Table 1 (float features, upper bound)", "",
                  "| layer | paper I(X;B) | ours | ours int8 | paper I(Y;B) | ours | ours int8 | row by row |",
                  "|---|---:|---:|---:|---:|---:|---:|---|"]
        for p in result.paper:
            lines.append(f"| {p['cut']} | {p['paper_ixt']:.2f} | {p['ours_ixt']:.3f} | {_n(p['ours_int8_ixt'], '.3f')} "
                         f"| {p['paper_iyt']:.2f} | {_n(p['ours_iyt'], '.3f')} | {_n(p['ours_int8_iyt'], '.3f')} "
                         f"| {p['verdict']} |")
        lines.append("")
    lines += sigma_bands.section_markdown(result)
    lines += ["## Every cut", "",
              "| cut | int8 B | head ms | tail ms | acc | KDE I(X;B) f | I(Y;B) f | I(X;B) q | I(Y;B) q "
              "| usable I(Y;B) q | input bits | dCor q | white-box dB / SSIM / model / reader | decoder dB / SSIM / model / reader | budgets |",
              "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---|---|"]

    def k(d, key):
        return _n(d.get(key), ".3f") + ("*" if d.get("saturated", {}).get(key) else "")

    inp = result.input_row
    lines.append(f"| input | {inp['bytes']} | – | – | {_n(inp['accuracy'], '.4f')} | {k(inp['kde'], 'ixt_upper')} "
                 f"| {k(inp['kde'], 'iyt_upper')} | – | – | {_n(inp['usable'].get('label_bits'), '.3f')} | – | 1.000 "
                 "| – | – | – |")
    for r in _rows(result):
        wb, dec = _metrics(r, "whitebox"), _metrics(r, "decoder")
        uq = r.usable.get("int8") or {}
        lines.append(
            f"| {r.name}{' ★' if r.name == (result.recommendation.get('name') or result.recommendation.get('cut')) else ''} "
            f"| {r.cost['bytes_int8']} "
            f"| {r.cost['head_ms']:.3f} | {r.cost['tail_ms']:.3f} | {r.accuracy['int8']:.4f} "
            f"| {k(r.kde['float'], 'ixt_upper')} | {k(r.kde['float'], 'iyt_upper')} | {k(r.kde['int8'], 'ixt_upper')} "
            f"| {k(r.kde['int8'], 'iyt_upper')} | {_n(uq.get('label_bits'), '.3f')} | {_n(uq.get('input_bits'), '.0f')} "
            f"| {r.dcor['int8']:.3f} | {_n(wb['psnr_db'], '.1f')} / {_n(wb['ssim'], '.3f')} / {_n(wb['accuracy'], '.2f')} / "
            f"{_n(wb.get('judge_accuracy'), '.2f')} "
            f"| {_n(dec['psnr_db'], '.1f')} / {_n(dec['ssim'], '.3f')} / {_n(dec['accuracy'], '.2f')} / "
            f"{_n(dec.get('judge_accuracy'), '.2f')} "
            f"| {'meets' if not r.budget_failures else '; '.join(r.budget_failures)} |")
    from auditor.report import leakage

    lines += [""] + leakage.attacks_markdown(result)
    lines += ["", html.unescape(_table_note(result)), "",
              "Figures: figures/grid.png, figures/information_plane.png, figures/leakage_vs_cost.png, "
              "figures/measures.png; every number in report.json.", ""]
    return "\n".join(lines)
