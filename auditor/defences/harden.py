"""``edgesplit harden``: one method at one strength beside the unhardened model, or a sweep.

:func:`harden` is the verb: with a strength (or the method's default) it hardens one point
(``auditor.defences.points``) and writes ``OUT/model.keras``, ``OUT/bundle`` (+ ``.tar.gz``) and
``OUT/harden.json``; with ``sweep=True`` it hands over to ``auditor.defences.sweep``.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

from auditor.defences.points import (TABLE_HEADER, TABLE_NOTE, HardenSettings, Point, finish_points, prepare_out,
                                     baseline_point, harden_point, make_context, parse_strengths)
from protocol.errors import CheckFailed, UsageError
from protocol.tensors import json_default


@dataclass
class HardenResult:
    """``edgesplit harden`` at one strength: the hardened point beside the unhardened model."""

    model: str
    cut: str
    baseline: Point
    point: Point
    out: Path
    seconds: float
    settings: dict

    def to_dict(self) -> dict:
        return {"schema": "edgesplit.harden/1", "model": self.model, "cut": self.cut,
                "baseline": self.baseline.to_dict(), "point": self.point.to_dict(), "settings": self.settings,
                "seconds": self.seconds}

    def summary(self) -> str:
        p = self.point
        lines = [f"hardened {self.model} at {self.cut}: {p.label} in {self.seconds:.0f} s", "",
                 TABLE_HEADER, "-" * len(TABLE_HEADER), self.baseline.row(), p.row(), "", TABLE_NOTE, ""]
        if p.defence:
            lines.append(f"on the device: {_describe(p.defence)}")
        lines.append(f"files: {self.out / 'model.keras'} (hardened Keras model), {self.out / 'bundle'} "
                     f"(+ .tar.gz: the int8 bundle), {self.out / 'harden.json'}")
        return "\n".join(lines)


def _describe(defence: dict) -> str:
    from protocol.defence import parse_defence

    return parse_defence(defence).describe()


def check_budgets(min_accuracy, max_psnr) -> None:
    if min_accuracy is not None and not (isinstance(min_accuracy, (int, float)) and 0.0 <= min_accuracy <= 1.0):
        raise UsageError(f"--min-accuracy is a fraction in [0, 1], got {min_accuracy}",
                         fix="e.g. --min-accuracy 0.98 for 98 %")
    if max_psnr is not None and not (isinstance(max_psnr, (int, float)) and max_psnr > 0):
        raise UsageError(f"--max-psnr must be a number of dB > 0, got {max_psnr}", fix="e.g. --max-psnr 15")


def harden(model, cut: str, method: str | None = None, strength: float | None = None, *, sweep: bool = False,
           strengths=None, data=None, out=None, min_accuracy: float | None = None, max_psnr: float | None = None,
           noise: str = "gaussian", learned: bool = False, settings: HardenSettings = HardenSettings(),
           name: str | None = None, progress: bool = True):
    """Harden ``model`` at ``cut`` with ``method`` at ``strength`` (HardenResult), or ``sweep`` every
    method (or ``method``) over its four strengths (``auditor.defences.sweep.SweepResult``)."""
    from auditor.defences.registry import get

    t0 = time.perf_counter()
    if out is None:
        raise UsageError("no output directory given", fix="pass --out DIR")
    check_budgets(min_accuracy, max_psnr)
    strengths = parse_strengths(strengths)
    options = _options(method, noise, learned)
    if sweep:
        from auditor.defences import sweep as sweep_mod

        if strength is not None:
            raise UsageError("--strength and --sweep exclude each other", fix="give one of them")
        return sweep_mod.run_sweep(model, cut, method, strengths=strengths, data=data, out=out,
                                   min_accuracy=min_accuracy, max_psnr=max_psnr, options=options, settings=settings,
                                   name=name, progress=progress)
    if method is None:
        raise UsageError("no --method given", fix="give --method noise|dropout|nopeek|vib|adversarial, or --sweep")
    cls = get(method)
    strength = cls.default if strength is None else cls.strength.check(method, strength)
    if strengths is not None:
        raise UsageError("--strengths goes with --sweep", fix="give --sweep, or one --strength")
    out = prepare_out(out)
    ctx = make_context(model, cut, data=data, name=name, settings=settings, progress=progress)
    base = baseline_point(ctx, out / "unhardened")
    point = harden_point(ctx, method, strength, out, options=options)
    finish_points(base, [point])
    result = HardenResult(model=ctx.name, cut=ctx.cut, baseline=base, point=point, out=out,
                          seconds=time.perf_counter() - t0, settings=settings.to_dict())
    (out / "harden.json").write_text(json.dumps(result.to_dict(), indent=2, default=json_default) + "\n")
    if point.error:
        raise CheckFailed(f"{point.label} at {ctx.cut}: {point.error}",
                          fix="try another --strength, more --steps, or another --method")
    return result


def _options(method, noise: str, learned: bool) -> dict:
    from protocol.defence import DISTRIBUTIONS

    if noise not in DISTRIBUTIONS:
        raise UsageError(f"unknown noise {noise!r}", fix=f"use --noise {' or '.join(DISTRIBUTIONS)}")
    if (noise != "gaussian" or learned) and method not in (None, "noise"):
        raise UsageError(f"--noise and --learned belong to --method noise, not {method}",
                         fix="drop them, or use --method noise")
    return {"distribution": noise, "learned": True} if learned else (
        {"distribution": noise} if noise != "gaussian" else {})


