"""The report's attack sections: each attack under its threat model, leakage beyond the label, and
hardened cuts before and after (with the privacy-accuracy sweep when ``edgesplit harden`` made one)."""
from __future__ import annotations

import html
import math

ORDER = ("whitebox", "decoder", "architecture", "queryfree")
BASELINE_ORDER = ("label_mean", "label_decoder")


def _e(text) -> str:
    return html.escape(str(text))


def _n(v, spec=".1f") -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "–"
    return format(v, spec)


def _m(row, name) -> dict:
    return ((row.attacks.get(name) or {}).get("metrics")) or {}


def _present(rows, names) -> list:
    return [a for a in names if any(a in r.attacks and not r.attacks[a].get("skipped") for r in rows)]


def threat_models(rows) -> list:
    """[(name, title, threat model dict)] of every attack and baseline that ran, in the report's order."""
    seen = {}
    for r in rows:
        for name, a in r.attacks.items():
            if "threat_model" in a and name not in seen:
                seen[name] = (name, a.get("title", name), a["threat_model"])
    return [seen[n] for n in list(ORDER) + list(BASELINE_ORDER) if n in seen]


def all_rows(result) -> list:
    from auditor.report.plots import grid_rows

    return grid_rows(result)


def ranking_words(result) -> str:
    """The cuts (and hardened cuts) ranked by what leaks beyond the label, in one paragraph."""
    leaks = result.recommendation.get("leaks") or []
    if not leaks:
        return ""
    parts = [f"{d['name']} {d['beyond_label_db']:+.1f} dB ({_e(d.get('threat_model') or '?')}, "
             f"{_n(d['psnr_db'])} dB against {_n(d.get('label_psnr_db'))} dB from the label alone)" for d in leaks]
    least, most = leaks[0], leaks[-1]
    text = ("Ranked by what leaks beyond the label, least first: " + "; ".join(parts) + ". "
            "The cloud learns the predicted class legitimately, so an image guessed from the class alone is no leak "
            "of the cut: the label-only baseline (the attacker's mean image of the predicted class, or a decoder "
            "given only the label, whichever scores higher on the same images) is what every attack is measured "
            f"against. {least['name']} gives an attacker {least['beyond_label_db']:.1f} dB beyond the label")
    if most is not least:
        text += f"; {most['name']} {most['beyond_label_db']:.1f} dB"
    return text + "."


# ------------------------------------------------------------------------ html

def threat_model_table(result) -> str:
    rows = all_rows(result)
    body = []
    for name, title, tm in threat_models(rows):
        role = "baseline" if name in BASELINE_ORDER else "attack"
        body.append(f"<tr><td class='l'><b>{_e(tm['name'])}</b></td><td class='l'>{_e(title)} ({role})</td>"
                    f"<td class='l'>{_e(tm['knows'])}</td><td class='l'>{_e(tm.get('reference', ''))}</td></tr>")
    return ("<table><tr><th class='l'>threat model</th><th class='l'>attack</th><th class='l'>the attacker has</th>"
            "<th class='l'>from</th></tr>" + "".join(body) + "</table>")


def beyond_label_table(result) -> str:
    rows = all_rows(result)
    attacks = _present(rows, ORDER)
    bases = _present(rows, BASELINE_ORDER)
    tms = {n: tm["name"] for n, _, tm in threat_models(rows)}
    head = ("<tr><th class='l' rowspan=2>cut</th>"
            + "".join(f"<th colspan=2>{_e(tms.get(a, a))}</th>" for a in attacks)
            + "".join(f"<th colspan=2>{_e('label only: ' + ('class mean' if b == 'label_mean' else 'label decoder'))}"
                      "</th>" for b in bases)
            + "<th class='l' rowspan=2>strongest</th><th colspan=2>beyond the label</th>"
              "<th rowspan=2>int8<br>accuracy</th></tr><tr>"
            + "<th>PSNR dB</th><th>SSIM</th>" * (len(attacks) + len(bases)) + "<th>dB</th><th>SSIM</th></tr>")
    rec = result.recommendation.get("name") or result.recommendation.get("cut")
    body = []
    for r in rows:
        cells = []
        for a in attacks + bases:
            m = _m(r, a)
            skipped = (r.attacks.get(a) or {}).get("skipped")
            if skipped:
                cells.append(f"<td colspan=2 class='l' title='{_e(skipped)}'>not run</td>")
            else:
                cells.append(f"<td>{_n(m.get('psnr_db'))}</td><td>{_n(m.get('ssim'), '.3f')}</td>")
        bl = r.beyond_label or {}
        cls = " class='recommended'" if r.name == rec else ""
        body.append(f"<tr{cls}><td class='l'>{_e(r.name)}{' ★' if r.name == rec else ''}</td>{''.join(cells)}"
                    f"<td class='l'>{_e(bl.get('threat_model') or '–')}</td><td><b>{_n(bl.get('gap_db'), '+.1f')}</b></td>"
                    f"<td>{_n(bl.get('gap_ssim'), '+.3f')}</td><td>{_n(r.accuracy.get('int8'), '.4f')}</td></tr>")
    return f"<table>{head}{''.join(body)}</table>"


def budget_table(result) -> str:
    """The query decoder's auxiliary-data sweep: PSNR per budget and cut."""
    rows = [r for r in all_rows(result) if (r.attacks.get("decoder") or {}).get("sweep")]
    if not rows:
        return ""
    budgets = sorted({int(b) for r in rows for b in r.attacks["decoder"]["sweep"]})
    head = ("<tr><th class='l'>cut</th>" + "".join(f"<th>{b:,} images</th>" for b in budgets) + "</tr>")
    body = []
    for r in rows:
        sw = r.attacks["decoder"]["sweep"]
        body.append(f"<tr><td class='l'>{_e(r.name)}</td>" + "".join(
            f"<td>{_n((sw.get(str(b)) or {}).get('psnr_db'))} dB / {_n((sw.get(str(b)) or {}).get('ssim'), '.2f')}</td>"
            for b in budgets) + "</tr>")
    return ("<h3>Query access: the attacker's auxiliary-data budget</h3><table>" + head + "".join(body)
            + "</table><p class='note'>PSNR / SSIM of the decoder trained on that many of the attacker's own images "
              "sent through the deployed head; the largest budget is the one in the table above.</p>")


def attacks_html(result) -> str:
    words = ranking_words(result)
    return (threat_model_table(result) + "<h3>Every attack, and what leaks beyond the label</h3>"
            + beyond_label_table(result) + (f"<p>{words}</p>" if words else "") + budget_table(result))


def _before(result, row):
    for r in result.cuts:
        if r.name == (row.layer or row.name):
            return r
    return None


def before_after_table(result) -> str:
    if not result.hardened:
        return ""
    attacks = _present(list(result.cuts) + list(result.hardened), ORDER)
    head = ("<tr><th class='l'>hardened cut</th><th class='l'>defence</th>"
            + "".join(f"<th>{_e(a)} dB<br>before → after</th>" for a in attacks)
            + "<th>beyond label dB<br>before → after</th><th>int8 accuracy<br>before → after</th>"
              "<th>accuracy cost<br>points</th></tr>")
    body = []
    for h in result.hardened:
        b = _before(result, h)
        plain_acc = b.accuracy["int8"] if b is not None else h.accuracy.get("unhardened_int8")
        cells = "".join(f"<td>{_n(_m(b, a).get('psnr_db')) if b else '–'} → {_n(_m(h, a).get('psnr_db'))}</td>"
                        for a in attacks)
        gap_b = (b.beyond_label or {}).get("gap_db") if b else None
        cost = None if plain_acc is None else 100 * (plain_acc - h.accuracy["int8"])
        body.append(f"<tr><td class='l'>{_e(h.name)}</td><td class='l'>{_e(h.variant)}</td>{cells}"
                    f"<td>{_n(gap_b, '+.1f')} → {_n((h.beyond_label or {}).get('gap_db'), '+.1f')}</td>"
                    f"<td>{_n(plain_acc, '.4f')} → {_n(h.accuracy['int8'], '.4f')}</td><td>{_n(cost, '.2f')}</td></tr>")
    return ("<table>" + head + "".join(body) + "</table><p class='note'>Every attack on a hardened cut is adaptive: "
            "it queries, differentiates and trains through the deployed head with its noise or dropout drawn "
            "afresh, and the decoders learn from hardened features. The grid above shows each hardened cut "
            "under its unhardened one.</p>")


def sweep_table(sweep: dict) -> str:
    points = sweep.get("points") or []
    chosen = sweep.get("chosen")
    pareto = set(sweep.get("pareto") or [])
    body = []
    base = sweep.get("baseline")
    for i, p in [(-1, base)] * bool(base) + list(enumerate(points)):
        mark = " ★" if i == chosen else ""
        cls = " class='recommended'" if i == chosen else ""
        body.append(f"<tr{cls}><td class='l'>{_e(p.get('label') or 'unhardened')}{mark}</td>"
                    f"<td>{_n(p.get('accuracy'), '.4f')}</td><td>{_n(p.get('accuracy_drop_pp'), '.2f')}</td>"
                    f"<td class='l'>{_e(p.get('strongest') or '–')}</td><td>{_n(p.get('psnr_db'))}</td>"
                    f"<td>{_n(p.get('ssim'), '.3f')}</td><td>{_n((p.get('label_only') or {}).get('psnr_db'))}</td>"
                    f"<td>{_n(p.get('beyond_label_db'), '+.1f')}</td><td>{'yes' if i in pareto else ''}</td></tr>")
    head = ("<tr><th class='l'>defence</th><th>int8 accuracy</th><th>cost, points</th><th class='l'>strongest attack</th>"
            "<th>PSNR dB</th><th>SSIM</th><th>label only dB</th><th>beyond label dB</th><th>Pareto</th></tr>")
    reason = sweep.get("reason")
    return (f"<h3>{_e(sweep.get('model', ''))} at {_e(sweep.get('cut', '?'))}: the sweep</h3><table>{head}"
            + "".join(body) + "</table>" + (f"<p>{_e(reason)}</p>" if reason else ""))


def hardened_html(result, figs: dict, img) -> str:
    """The hardened cuts beside their own, and each sweep; ``img(png, caption)`` embeds a figure."""
    if not result.hardened and not result.sweeps:
        return ("<p class='note'>No hardened cut was audited. <code>edgesplit harden MODEL --cut C --sweep --out DIR"
                "</code> fine-tunes defences at a cut; <code>edgesplit audit MODEL --hardened DIR</code> then attacks "
                "them here, beside the unhardened cut.</p>")
    parts = [before_after_table(result)]
    if "privacy_accuracy" in figs:
        title, png = figs["privacy_accuracy"]
        parts.append(img(png, title))
    parts += [sweep_table(s) for s in result.sweeps]
    return "".join(parts)


# -------------------------------------------------------------------- markdown

def attacks_markdown(result) -> list:
    rows = all_rows(result)
    attacks = _present(rows, ORDER)
    bases = _present(rows, BASELINE_ORDER)
    tms = threat_models(rows)
    lines = ["## Attacks by threat model", "", "| threat model | attack | the attacker has |", "|---|---|---|"]
    lines += [f"| {tm['name']} | {title} | {tm['knows']} |" for _, title, tm in tms]
    names = {n: tm["name"] for n, _, tm in tms}
    lines += ["", "| cut | " + " | ".join(f"{names.get(a, a)} dB / SSIM" for a in attacks + bases)
              + " | strongest | beyond label dB / SSIM | int8 acc |",
              "|---|" + "---:|" * (len(attacks) + len(bases)) + "---|---:|---:|"]
    for r in rows:
        cells = []
        for a in attacks + bases:
            m = _m(r, a)
            cells.append("not run" if (r.attacks.get(a) or {}).get("skipped")
                         else f"{_n(m.get('psnr_db'))} / {_n(m.get('ssim'), '.3f')}")
        bl = r.beyond_label or {}
        lines.append(f"| {r.name} | " + " | ".join(cells) + f" | {bl.get('threat_model') or '–'} | "
                     f"{_n(bl.get('gap_db'), '+.1f')} / {_n(bl.get('gap_ssim'), '+.3f')} | "
                     f"{_n(r.accuracy.get('int8'), '.4f')} |")
    words = ranking_words(result)
    if words:
        lines += ["", words]
    if result.hardened:
        lines += ["", "## Hardened cuts, before and after", "",
                  "| hardened cut | strongest before → after dB | beyond label before → after dB | int8 acc before → after |",
                  "|---|---:|---:|---:|"]
        for h in result.hardened:
            b = _before(result, h)
            plain = b.accuracy["int8"] if b is not None else h.accuracy.get("unhardened_int8")
            lines.append(f"| {h.name} | {_n(b.leakage_db) if b else '–'} → {_n(h.leakage_db)} | "
                         f"{_n((b.beyond_label or {}).get('gap_db') if b else None, '+.1f')} → "
                         f"{_n((h.beyond_label or {}).get('gap_db'), '+.1f')} | {_n(plain, '.4f')} → "
                         f"{_n(h.accuracy['int8'], '.4f')} |")
    for sw in result.sweeps:
        lines += ["", f"## Sweep: {sw.get('model', '')} at {sw.get('cut', '?')}", "",
                  "| defence | int8 acc | cost pp | strongest | PSNR dB | beyond label dB | Pareto |",
                  "|---|---:|---:|---|---:|---:|---|"]
        pareto = set(sw.get("pareto") or [])
        for i, p in enumerate(sw.get("points") or []):
            lines.append(f"| {p.get('label')}{' ★' if i == sw.get('chosen') else ''} | {_n(p.get('accuracy'), '.4f')} "
                         f"| {_n(p.get('accuracy_drop_pp'), '.2f')} | {p.get('strongest') or '–'} | "
                         f"{_n(p.get('psnr_db'))} | {_n(p.get('beyond_label_db'), '+.1f')} | "
                         f"{'yes' if i in pareto else ''} |")
        if sw.get("reason"):
            lines += ["", sw["reason"]]
    return lines + [""]
