"""Where a recorded run compresses: the words of the information-plane report.

Compression, in Shwartz-Ziv & Tishby's sense that Saxe et al. test, is a late fall of I(X;T)
after an early rise (the fitting phase).  We call a layer compressing when its I(X;T) upper
bound ends at least ``COMPRESSION_BITS`` below its peak over training (the last
``FINAL_RECORDS`` records all of them), and say whether the
fall is still going on in the last decade of epochs (epochs >= last / 10).  A layer on the
ceiling log2 N all along is "saturated": at this sigma^2 the estimator cannot see anything
happen there (the 1024-unit layer of Saxe et al.'s network, at sigma^2 = 0.1 and N = 10,000).
"""
from __future__ import annotations

#: what the seed and Saxe et al. read from this network, per activation (for the report's words)
EXPECTED = {"tanh": "compression in the hidden layers (Saxe et al.); Tuor et al.'s Fig. 5b: compression",
            "relu": "no compression in the hidden layers (Saxe et al.); Tuor et al.'s Fig. 5a: compression "
                    "only at the output layer"}

#: a fall from the peak smaller than this (bits) is not called compression
COMPRESSION_BITS = 0.1
#: compression needs this many last records all that far below the peak (one record can be a blip of SGD)
FINAL_RECORDS = 3


def layer_trend(records, name, ceiling, saturation_bits) -> dict:
    """Peak, final value, fall from the peak and in the last decade, and the verdict, of one layer."""
    epochs = [r["epoch_equiv"] for r in records]
    xs = [r["layers"][name]["ixt_upper"] for r in records]
    ys = [r["layers"][name]["iyt_upper"] for r in records]
    k = max(range(len(xs)), key=lambda i: xs[i])
    tail = xs[-min(FINAL_RECORDS, len(xs)):]
    final = xs[-1]
    late = [x for e, x in zip(epochs, xs) if e >= epochs[-1] / 10] or xs[-1:]
    out = {"peak": xs[k], "peak_epoch": epochs[k], "first": xs[0], "final": final, "drop": xs[k] - final,
           "late_drop": max(late) - final, "iyt_first": ys[0], "iyt_final": ys[-1], "iyt_peak": max(ys),
           "saturated": all(x >= ceiling - saturation_bits for x in xs)}
    if out["saturated"]:
        out["verdict"] = "saturated"
    elif xs[k] - max(tail) >= COMPRESSION_BITS and k < len(xs) - len(tail):
        out["verdict"] = "compression"
    else:
        out["verdict"] = "no compression"
    return out


def analyse(result) -> dict:
    """Per layer :func:`layer_trend`, and the run's reading against Saxe et al. and Tuor et al."""
    c = result.ceilings
    names = [layer["name"] for layer in result.layers]
    trends = {nm: layer_trend(result.records, nm, c["log2_n"], c["saturation_bits"]) for nm in names}
    hidden, output = names[:-1], names[-1]
    compressing = [nm for nm in hidden if trends[nm]["verdict"] == "compression"]
    late = [nm for nm in compressing if trends[nm]["late_drop"] >= COMPRESSION_BITS]
    out = {"layers": trends, "hidden_compressing": compressing, "hidden_late_compressing": late,
           "output_compressing": trends[output]["verdict"] == "compression", "compression_bits": COMPRESSION_BITS}
    act = result.spec.activation
    if act == "tanh":
        out["expected"] = "compression in at least one hidden layer, late in training"
        out["agrees"] = bool(late)
    elif act == "relu":
        out["expected"] = "no compression in any hidden layer; the output layer may compress"
        out["agrees"] = not compressing
    out["words"] = words(result, trends, out)
    return out


def _e(epoch) -> str:
    return f"{epoch:.0f}" if epoch >= 10 else f"{epoch:.2g}"


def words(result, trends, out) -> list[str]:
    """The report's paragraphs: what each layer does, then the comparison with the two papers."""
    c = result.ceilings
    equiv = result.spec.model == "saxe-mlp" and result.spec.lr != 0.001
    unit = "ibsgd-equivalent epoch" if equiv else "epoch"
    lines = []
    for layer in result.layers:
        nm, t = layer["name"], trends[layer["name"]]
        head = f"{nm} ({layer['units']} units): "
        if t["verdict"] == "saturated":
            lines.append(head + f"on the ceiling log2 N = {c['log2_n']:.2f} bits at every record (saturated: at "
                                f"sigma^2 = {result.spec.sigma2:g} every test image stays distinguishable, so "
                                "this estimator cannot show compression or its absence here).")
            continue
        text = (head + f"I(X;T) goes from {t['first']:.2f} to a peak of {t['peak']:.2f} bits at {unit} "
                       f"{_e(t['peak_epoch'])} and ends at {t['final']:.2f}")
        if t["verdict"] == "compression":
            text += f": compression, {t['drop']:.2f} bit below the peak"
            text += (f", still falling in the last decade of training ({t['late_drop']:.2f} bit)"
                     if t["late_drop"] >= COMPRESSION_BITS else ", the fall over before the last decade")
        else:
            text += f": no compression (within {max(t['drop'], 0):.2f} bit of its peak at the end)"
        text += f"; I(Y;T) ends at {t['iyt_final']:.2f} of H(Y) = {c['h_y']:.2f} bits."
        lines.append(text)
    act = result.spec.activation
    if act in ("tanh", "relu"):

        seen = ("hidden layers compressing: " + ", ".join(out["hidden_compressing"])
                if out["hidden_compressing"] else "no hidden layer compresses")
        seen += "; the output layer " + ("compresses" if out["output_compressing"] else "does not compress")
        verdict = "agrees with" if out["agrees"] else "differs from"
        lines.append(f"Against the papers ({act}): expected {EXPECTED[act]}. This run: {seen}. It {verdict} that "
                     "reading" + ("." if out["agrees"] else
                                  " (see the numbers above; a single run varies, and ibsgd's authors average 50 "
                                  "runs for their paper's figures)."))
        if trends[result.layers[0]["name"]]["verdict"] == "saturated":
            lines.append(f"As in Saxe et al.'s and Tuor et al.'s plots, the 1024-unit layer sits at log2 N "
                         f"throughout: what compression there is shows in the narrow layers.")
    return lines


def summary(result) -> str:
    """Text for the terminal: the run, a table of the last record, and the words."""
    s, c = result.spec, result.ceilings
    done = result.records[-1]["step"] if result.records else 0
    lines = [f"information plane of {s.target}: {len(result.records)} records, step {done} of {result.total_steps} "
             f"({'complete' if result.complete else 'stopped'}), N = {c['n']}, sigma^2 = {s.sigma2:g}, "
             f"train {result.seconds['train']:.0f} s + KDE {result.seconds['mi']:.0f} s",
             f"ceilings: I(X;T) <= log2 N = {c['log2_n']:.4f}, I(Y;T) <= H(Y) = {c['h_y']:.4f} bits", ""]
    if result.records:
        last = result.records[-1]
        lines.append(f"{'layer':<10} {'units':>6} {'I(X;T) up':>10} {'low':>7} {'I(Y;T) up':>10} {'low':>7}  verdict")
        for layer in result.layers:
            v = last["layers"][layer["name"]]
            verdict = result.analysis.get("layers", {}).get(layer["name"], {}).get("verdict", "")
            lines.append(f"{layer['name']:<10} {layer['units']:>6} {v['ixt_upper']:>10.3f} {v['ixt_lower']:>7.3f} "
                         f"{v['iyt_upper']:>10.3f} {v['iyt_lower']:>7.3f}  {verdict}")
    if result.analysis.get("words"):
        lines += [""] + result.analysis["words"]
    if result.paths:
        lines += ["", "report: " + ", ".join(str(p) for p in result.paths.values())]
    return "\n".join(lines)
