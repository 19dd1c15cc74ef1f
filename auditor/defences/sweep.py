"""``edgesplit harden --sweep``: the privacy-accuracy curve of every method, its Pareto front, a choice.

Each method is fine-tuned at each of its four strengths (``Defence.sweep``, or ``strengths``),
converted, checked and attacked (``auditor.defences.points.harden_point``); the unhardened
model is the reference.  A point's privacy is the PSNR of the strongest of the attacks on it
(and what that is beyond the label-only baseline), its cost the int8 split test accuracy.

The chosen point meets the budgets (``min_accuracy``: default the unhardened accuracy minus one
percentage point; ``max_psnr``: none by default) and leaks least: lowest strongest-attack PSNR,
ties within :data:`PSNR_TIE_DB` going to the higher accuracy.  It is always on the Pareto front.
``OUT/sweep.json`` (:class:`SweepResult`) is what the report draws.
"""
from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

from auditor.defences.points import (TABLE_HEADER, TABLE_NOTE, HardenSettings, Point, finish_points, prepare_out,
                                     promote, baseline_point, harden_point, make_context, slug)
from protocol.errors import UsageError
from protocol.tensors import json_default

log = logging.getLogger(__name__)

SCHEMA = "edgesplit.harden-sweep/1"
#: strongest-attack PSNRs closer than this are a tie (then the more accurate point wins)
PSNR_TIE_DB = 0.5
#: the default accuracy budget: at most this many percentage points below the unhardened model
DEFAULT_DROP_PP = 1.0


@dataclass
class SweepResult:
    """Every point of a sweep, the unhardened baseline, the Pareto front and the choice."""

    model: str
    cut: str
    dataset: str
    baseline: Point
    points: list
    budgets: dict
    pareto: list = field(default_factory=list)    # indices into points
    chosen: int | None = None
    reason: str = ""
    settings: dict = field(default_factory=dict)
    seconds: float = 0.0
    out: str | None = None

    def chosen_point(self) -> Point | None:
        return self.points[self.chosen] if self.chosen is not None else None

    def pareto_points(self) -> list:
        return [self.points[i] for i in self.pareto]

    def to_dict(self) -> dict:
        return {"schema": SCHEMA, "model": self.model, "cut": self.cut, "dataset": self.dataset,
                "budgets": self.budgets, "baseline": self.baseline.to_dict(),
                "baseline_accuracy": self.baseline.accuracy, "points": [p.to_dict() for p in self.points],
                "pareto": self.pareto, "chosen": self.chosen, "reason": self.reason, "settings": self.settings,
                "seconds": self.seconds, "out": self.out}

    @classmethod
    def from_dict(cls, d: dict) -> "SweepResult":
        if d.get("schema") != SCHEMA:
            raise UsageError(f"not a sweep result (schema {d.get('schema')!r}, expected {SCHEMA!r})",
                             fix="give the sweep.json that `edgesplit harden --sweep` wrote")
        return cls(model=d["model"], cut=d["cut"], dataset=d["dataset"], baseline=Point.from_dict(d["baseline"]),
                   points=[Point.from_dict(p) for p in d["points"]], budgets=d["budgets"], pareto=d["pareto"],
                   chosen=d["chosen"], reason=d["reason"], settings=d.get("settings", {}),
                   seconds=d.get("seconds", 0.0), out=d.get("out"))

    @classmethod
    def from_json(cls, path) -> "SweepResult":
        return cls.from_dict(json.loads(Path(path).read_text()))

    def table(self) -> str:
        lines = [TABLE_HEADER, "-" * len(TABLE_HEADER), self.baseline.row()]
        lines += [p.row() for p in self.points]
        return "\n".join(lines)

    def summary(self) -> str:
        b = self.budgets
        budgets = ", ".join(f"{k.replace('_', '-')} {v:g}" for k, v in b.items() if v is not None) or "none"
        lines = [f"sweep of {self.model} at {self.cut} ({self.dataset}): {len(self.points)} points in "
                 f"{self.seconds / 60:.1f} min; budgets: {budgets}", "", self.table(), "", TABLE_NOTE, "",
                 f"chosen: {self.chosen_point().label if self.chosen is not None else 'none'}", f"  {self.reason}"]
        if self.out:
            lines.append(f"files: {self.out}/sweep.json, {self.out}/sweep.md"
                         + (f", {self.out}/model.keras and {self.out}/bundle (the chosen point)"
                            if self.chosen is not None else ""))
        return "\n".join(lines)

    def markdown(self) -> str:
        head = "| point | acc % | Δ pp | white-box dB | decoder dB | UnSplit dB | query-free dB | strongest | " \
               "SSIM | label-only dB | beyond label dB | Pareto |"
        rows = [head, "|" + "---|" * 12]
        for p in [self.baseline] + list(self.points):
            per = {n: (p.attacks.get(n) or {}).get("metrics", {}).get("psnr_db")
                   for n in ("whitebox", "decoder", "architecture", "queryfree")}
            cells = [p.label + (" **(chosen)**" if p.chosen else ""),
                     _f(None if p.accuracy is None else 100 * p.accuracy, ".2f"), _f(p.accuracy_drop_pp, "+.2f"),
                     *(_f(per[n], ".1f") for n in per), p.strongest or "-", _f(p.ssim, ".2f"),
                     _f(p.beyond.get("label_psnr_db"), ".1f"), _f(p.beyond_label_db, "+.1f"),
                     "yes" if p.pareto else ""]
            rows.append("| " + " | ".join(cells) + " |")
        table = "\n".join(rows)
        return (f"# Hardening sweep: {self.model} at {self.cut}\n\n{table}\n\n{TABLE_NOTE}.\n\n"
                f"**Chosen:** {self.chosen_point().label if self.chosen is not None else 'none'}. {self.reason}\n\n"
                f"Sweep time: {self.seconds / 60:.1f} min.\n")


def _f(v, spec) -> str:
    return "-" if v is None else format(v, spec)


# ------------------------------------------------------------------ Pareto and choice

def pareto_front(points: list) -> list:
    """Indices of the points no other point beats on both accuracy (higher) and strongest PSNR (lower)."""
    ok = [i for i, p in enumerate(points) if p.ok and p.psnr_db is not None]
    front = []
    for i in ok:
        a, s = points[i].accuracy, points[i].psnr_db
        dominated = any(points[j].accuracy >= a and points[j].psnr_db <= s
                        and (points[j].accuracy > a or points[j].psnr_db < s) for j in ok if j != i)
        if not dominated:
            front.append(i)
    return front


def choose(points: list, baseline: Point, min_accuracy: float | None, max_psnr: float | None) -> tuple:
    """(index or None, reason): the least-leaking point within the budgets, and why, in words."""
    min_acc = min_accuracy
    if min_acc is None and baseline.accuracy is not None:
        min_acc = baseline.accuracy - DEFAULT_DROP_PP / 100.0
    ran = [i for i, p in enumerate(points) if p.ok and p.psnr_db is not None]
    fits = [i for i in ran if (min_acc is None or points[i].accuracy >= min_acc - 1e-12)
            and (max_psnr is None or points[i].psnr_db <= max_psnr)]
    acc_txt = (f"--min-accuracy {min_acc:.4f}" + (" (the unhardened int8 accuracy minus 1 percentage point)"
                                                  if min_accuracy is None else "")) if min_acc is not None else ""
    if not fits:
        return None, _nothing_fits(points, ran, min_acc, max_psnr, acc_txt)
    best = min(points[i].psnr_db for i in fits)
    near = [i for i in fits if points[i].psnr_db <= best + PSNR_TIE_DB]
    pick = max(near, key=lambda i: (points[i].accuracy, -points[i].psnr_db))
    p = points[pick]
    a = p.attacks.get(p.strongest, {})
    parts = [f"{p.label} leaks least among the {len(fits)} of {len(ran)} points within the budgets "
             f"({acc_txt}{', ' if acc_txt and max_psnr is not None else ''}"
             f"{f'--max-psnr {max_psnr:g} dB' if max_psnr is not None else ''}): its strongest attack, "
             f"{a.get('title', p.strongest)} ({a.get('threat_model', {}).get('name', '?')}), reconstructs the "
             f"input at {p.psnr_db:.1f} dB PSNR (SSIM {p.ssim:.2f}), {p.beyond_label_db:+.1f} dB beyond the "
             f"label-only baseline ({p.beyond.get('label_psnr_db'):.1f} dB)"]
    if baseline.psnr_db is not None:
        parts.append(f"unhardened, the strongest attack reaches {baseline.psnr_db:.1f} dB "
                     f"({baseline.beyond_label_db:+.1f} dB beyond the label)")
    parts.append(f"it costs {-p.accuracy_drop_pp:.2f} percentage points of int8 split accuracy "
                 f"({100 * p.accuracy:.2f} % against {100 * baseline.accuracy:.2f} %)"
                 if p.accuracy_drop_pp is not None else f"its int8 split accuracy is {100 * p.accuracy:.2f} %")
    if p.defence:
        from protocol.defence import parse_defence

        parts.append(f"on the device: {parse_defence(p.defence).describe()}")
    others = [points[i].label for i in near if i != pick]
    if others:
        parts.append(f"within {PSNR_TIE_DB} dB of it: {', '.join(others)} (the higher accuracy decided)")
    return pick, ". ".join(s[0].upper() + s[1:] for s in parts) + "."


def _nothing_fits(points, ran, min_acc, max_psnr, acc_txt) -> str:
    if not ran:
        return "no point of the sweep ran to the end (see each point's error)."
    bits = []
    by_acc = [i for i in ran if min_acc is None or points[i].accuracy >= min_acc - 1e-12]
    if by_acc:
        q = min(by_acc, key=lambda i: points[i].psnr_db)
        bits.append(f"within the accuracy budget the least leaking is {points[q].label} at "
                    f"{points[q].psnr_db:.1f} dB")
    by_psnr = [i for i in ran if max_psnr is None or points[i].psnr_db <= max_psnr]
    if by_psnr:
        q = max(by_psnr, key=lambda i: points[i].accuracy)
        bits.append(f"within the PSNR budget the most accurate is {points[q].label} at "
                    f"{100 * points[q].accuracy:.2f} %")
    return (f"no point meets {acc_txt}{' and ' if acc_txt and max_psnr is not None else ''}"
            f"{f'--max-psnr {max_psnr:g}' if max_psnr is not None else ''}: " + "; ".join(bits) + ".")


# ------------------------------------------------------------------ the run

def run_sweep(model, cut: str, method: str | None = None, *, strengths=None, data=None, out,
              min_accuracy: float | None = None, max_psnr: float | None = None, options: dict | None = None,
              settings: HardenSettings = HardenSettings(), name: str | None = None,
              progress: bool = True) -> SweepResult:
    """Sweep ``method`` (None: every method) over its strengths at ``cut``; write OUT/sweep.json and .md.

    Raises UsageError (after writing the files) when no point meets the budgets.
    """
    from auditor.defences.registry import get, methods

    t0 = time.perf_counter()
    classes = [get(method)] if method is not None else list(methods().values())
    plan = []
    for cls in classes:
        values = list(strengths) if strengths is not None else list(cls.sweep)
        if not values:
            raise UsageError("--strengths names no value", fix="e.g. --strengths 0.3,0.5,0.7")
        plan += [(cls.name, cls.strength.check(cls.name, v)) for v in values]
    if strengths is not None and method is None:
        raise UsageError("--strengths needs one --method (each method's strength means something else)",
                         fix="give --method, or drop --strengths to use every method's own four")
    out = prepare_out(out)
    ctx = make_context(model, cut, data=data, name=name, settings=settings, progress=progress)
    log.info("sweep of %s at %s: %d points", ctx.name, ctx.cut, len(plan))
    base = baseline_point(ctx, out / "points" / "unhardened")
    points = []
    for name_, value in plan:
        opts = options if name_ == "noise" else None
        label = f"{name_} {value:g}"
        try:
            p = harden_point(ctx, name_, value, out / "points" / slug(label), options=opts)
        except UsageError as exc:   # one point that cannot train (e.g. diverged) does not end the sweep
            p = Point(method=name_, strength=value, label=label, error=exc.message)
        points.append(p)
        log.info("%s", p.row())
        _write(out, _result(ctx, base, points, min_accuracy, max_psnr, settings, t0, out, partial=True))
    result = _result(ctx, base, points, min_accuracy, max_psnr, settings, t0, out)
    _write(out, result)
    if result.chosen is None:
        raise UsageError(f"the sweep ran, but {result.reason}",
                         fix=f"relax --min-accuracy or --max-psnr (every point is in {out / 'sweep.json'}), or "
                             f"sweep other --strengths")
    promote(result.chosen_point(), out)
    return result


def _result(ctx, base, points, min_accuracy, max_psnr, settings, t0, out, partial=False) -> SweepResult:
    finish_points(base, points)
    for p in [base] + points:
        p.pareto = p.chosen = False
        p.reason = None
    front = pareto_front(points)
    for i in front:
        points[i].pareto = True
    base.pareto = all(not (p.accuracy >= base.accuracy and p.psnr_db < base.psnr_db) for p in points
                      if p.ok and p.psnr_db is not None) if base.ok and base.psnr_db is not None else False
    chosen, reason = (None, "the sweep is still running") if partial else choose(points, base, min_accuracy,
                                                                                 max_psnr)
    if chosen is not None:
        points[chosen].chosen = True
        points[chosen].reason = reason
    budgets = {"min_accuracy": min_accuracy if min_accuracy is not None else (
        base.accuracy - DEFAULT_DROP_PP / 100.0 if base.accuracy is not None else None), "max_psnr": max_psnr}
    return SweepResult(model=ctx.name, cut=ctx.cut, dataset=ctx.data_name, baseline=base, points=points,
                       budgets=budgets, pareto=front, chosen=chosen, reason=reason, settings=settings.to_dict(),
                       seconds=time.perf_counter() - t0, out=str(out))


def _write(out: Path, result: SweepResult) -> None:
    (out / "sweep.json").write_text(json.dumps(result.to_dict(), indent=2, default=json_default) + "\n")
    (out / "sweep.md").write_text(result.markdown())
