"""The audit: for every cut, how much of the input the receiver can get back, and at what cost.

Shaped like TensorFlow Privacy's membership-inference attacks: an input object that
validates itself (:class:`AuditSpec`), one function that runs (:func:`audit`), and a
result object with a human summary (:class:`AuditResult`).

Per cut the audit
1. makes (or reads) the int8 bundle and runs its head with the real LiteRT interpreter,
   each output through a real wire frame (``auditor.features``);
2. attacks what was sent: white-box inversion and a learned decoder (``auditor.invert``),
   scored with MSE / PSNR / SSIM and the model's accuracy on the reconstructions;
3. estimates mutual information with the paper's KDE bound (``auditor.mi``) on the float
   and the int8 features, and the measures that do not saturate (``auditor.usable``);
4. measures the cost: bytes sent, head MACs, head and tail latency, head size;
then recommends the least-leaking cut that meets the user's budgets.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import platform
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from auditor.paper import PAPER_TABLE1, PRESETS, is_paper_model, paper_comparison
from protocol.errors import UsageError
from protocol.tensors import json_default

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

log = logging.getLogger(__name__)

#: Among cuts whose strongest attack is within this many dB of the best, the lowest
#: distance correlation wins (PSNR differences below it are within run-to-run noise).
PSNR_TIE_DB = 0.5


@dataclass(frozen=True)
class AuditSpec:
    """What to audit and how; checks itself (UsageError with the fix)."""

    target: object                    # zoo name, .keras path, bundle dir/.tar.gz, or a keras.Model
    data: object = None               # --data SPEC (folder or .npz; see converter.userdata) or a loaded ImageData
    test_split: float | None = None   # with one set of --data images: the held-out (attacked) fraction
    data_seed: int = 0                # the seed of that split
    preprocess: object = None         # --preprocess text (a model's; a bundle brings its own)
    model_file: str | None = None     # --model FILE: the Keras model a bundle was made from
    cuts: tuple | None = None         # layer names; None = every valid cut
    n: int = 1000                     # test images for the information measures (and the decoder's score)
    attack_n: int = 32                # test images attacked by white-box inversion
    iters: int = 300                  # white-box iterations
    lr: float = 1e-2                  # white-box Adam step
    tv: float | None = None           # white-box TV weight; None = grows with depth (invert.tv_for_depth)
    start: str = "grey"
    decoder_n: int = 5000             # attacker's own (training-set) images for the decoder
    decoder_epochs: int = 5
    attacks: tuple | None = None      # registry names (auditor.attacks.ATTACKS); None = all four
    aux_budgets: tuple = (100, 1000, 10_000)  # the query decoder's auxiliary-data sweep (capped at decoder_n)
    hardened: tuple = ()              # `edgesplit harden` outputs (or hardened bundles) audited beside their cut
    sigma2: float = 0.1               # KDE noise variance
    kde_method: str = "fast"          # auditor.mi: "fast" (exact pruning) or "plain" (the O(N^2 d) reference)
    sigma_sweep: bool = True          # auditor.sigma: the KDE bounds of the float features over a grid of sigma^2
    preset: str | None = None
    seed: int = 0
    max_bytes: int | None = None      # budget: int8 bytes sent per input
    max_head_ms: float | None = None  # budget: head latency on this machine
    min_accuracy: float | None = None  # budget: int8 head+tail test accuracy
    calibration: int | None = None    # training images to calibrate int8 (bundles made here; default 500 or all)
    parity_n: int = 500
    latency_runs: int = 50
    grid_n: int = 8                   # images shown per row of the reconstruction grid
    out: str | None = None
    progress: bool = True

    def __post_init__(self):
        def bad(what, fix=None):
            raise UsageError(what, fix=fix)

        if self.preset is not None and self.preset not in PRESETS:
            bad(f"unknown preset {self.preset!r}", fix=f"use one of: {', '.join(PRESETS)}")
        for name in ("n", "attack_n", "iters", "decoder_n", "decoder_epochs", "calibration", "parity_n",
                     "latency_runs", "grid_n"):
            if name == "calibration" and self.calibration is None:
                continue
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                bad(f"{name} must be a whole number >= 1, got {getattr(self, name)!r}")
        if self.n < 20:
            bad(f"n = {self.n} test images is too few to estimate anything", fix="use --n 20 or more")
        if not (self.lr > 0 and self.sigma2 > 0):
            bad(f"lr and sigma2 must be > 0 (got {self.lr}, {self.sigma2})")
        if self.kde_method not in ("fast", "plain"):
            bad(f"kde_method must be 'fast' or 'plain', got {self.kde_method!r}")
        if self.tv is not None and self.tv < 0:
            bad(f"tv must be >= 0, got {self.tv}")
        if self.max_bytes is not None and self.max_bytes < 1:
            bad(f"--max-bytes must be >= 1, got {self.max_bytes}")
        if self.max_head_ms is not None and not self.max_head_ms > 0:
            bad(f"--max-head-ms must be > 0, got {self.max_head_ms}")
        if self.min_accuracy is not None and not 0.0 <= self.min_accuracy <= 1.0:
            bad(f"--min-accuracy is a fraction in [0, 1], got {self.min_accuracy}",
                fix="e.g. --min-accuracy 0.98 for 98 %")
        if self.cuts is not None and len(self.cuts) == 0:
            bad("--cuts names no layer", fix="omit --cuts to audit every valid cut")
        from auditor.attacks import ATTACKS

        unknown = [a for a in (self.attacks or ()) if a not in ATTACKS]
        if unknown or (self.attacks is not None and not self.attacks):
            bad(f"unknown attack(s) {', '.join(unknown) or '(none given)'}",
                fix=f"use any of: {', '.join(ATTACKS)} (omit --attacks to run all four)")
        if not self.aux_budgets or any(not isinstance(b, int) or b < 2 for b in self.aux_budgets):
            bad(f"--aux-budgets must be whole numbers >= 2, got {self.aux_budgets!r}", fix="e.g. --aux-budgets 100 1000")

    @classmethod
    def make(cls, target, **kwargs) -> "AuditSpec":
        """Apply a preset's values, then the caller's explicit ones (None means "not given")."""
        preset = kwargs.get("preset")
        given = {k: v for k, v in kwargs.items() if v is not None}
        values = dict(PRESETS.get(preset, {})) if preset else {}
        values = {k: v for k, v in values.items() if v is not None}
        values.update(given)
        if preset and values.get("attack_n", 0) > values.get("n", 0):
            values["attack_n"] = values["n"]
        for key in ("cuts", "attacks", "aux_budgets", "hardened"):
            if key in values and values[key] is not None and not isinstance(values[key], (str, os.PathLike)):
                values[key] = tuple(values[key])
        if isinstance(values.get("hardened"), (str, os.PathLike)):
            values["hardened"] = (values["hardened"],)
        if preset is not None and preset not in PRESETS:
            raise UsageError(f"unknown preset {preset!r}", fix=f"use one of: {', '.join(PRESETS)}")
        return cls(target=target, **values)

    def budgets(self) -> dict:
        return {"max_bytes": self.max_bytes, "max_head_ms": self.max_head_ms, "min_accuracy": self.min_accuracy}

    def to_dict(self) -> dict:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        d["target"] = self.target if isinstance(self.target, str) else getattr(self.target, "name", "model")
        for key in ("cuts", "attacks"):
            d[key] = list(d[key]) if d[key] is not None else None
        d["aux_budgets"] = list(self.aux_budgets)
        d["hardened"] = [os.fspath(h) for h in self.hardened]
        # after _resolve, data is the loaded images and preprocess the manifest's: say what they are
        split = getattr(self.data, "split", None)
        d["data"] = split.source if split is not None else (None if self.data is None else os.fspath(self.data))
        d["preprocess"] = self.preprocess.describe() if hasattr(self.preprocess, "describe") else self.preprocess
        return d


@dataclass
class CutAudit:
    """Everything measured at one cut."""

    name: str
    index: int
    shape: tuple
    depth: float                        # 0 = first layer, 1 = last
    cost: dict                          # bytes_int8, bytes_float32, frame_bytes, head_macs, head_params, ...
    accuracy: dict                      # int8 (LiteRT head+tail), float (Keras)
    kde: dict                           # {"float": KdeMI dict, "int8": KdeMI dict}
    usable: dict                        # {"float": {...}, "int8": {...}}
    dcor: dict                          # {"float": x, "int8": x}
    attacks: dict                       # {"whitebox": {...}, "decoder": {...}}
    bundle_id: str
    leakage_db: float = float("nan")    # PSNR of the strongest attack on what is sent
    beyond_label: dict = field(default_factory=dict)   # the strongest attack against the label-only baseline
    layer: str = ""                     # the cut layer (name adds the defence for a hardened row)
    variant: str = "unhardened"         # "unhardened" or the defence, e.g. "dropout 0.5"
    defence: dict | None = None         # the manifest's declaration of a hardened row
    budget_failures: list = field(default_factory=list)
    seconds: dict = field(default_factory=dict)   # wall time of each step

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["shape"] = list(self.shape)
        return d


@dataclass
class AuditResult:
    """The outcome of :func:`audit`; ``summary()`` for people, ``to_dict()`` for report.json."""

    spec: AuditSpec
    model_name: str
    dataset: str
    cuts: list
    input_row: dict
    recommendation: dict
    paper: list | None
    ceilings: dict
    versions: dict
    seconds: float
    judge: dict = field(default_factory=dict)
    sigma: dict = field(default_factory=dict)                 # auditor.sigma.sensitivity: the sigma^2 sweep's reading
    images: dict = field(default_factory=dict, repr=False)    # originals + reconstructions for the grid
    paths: dict = field(default_factory=dict)
    data: dict | None = None          # the user's images: source, split, classes, preprocessing
    hardened: list = field(default_factory=list)   # CutAudit rows of hardened cuts (defence declared)
    sweeps: list = field(default_factory=list)     # `edgesplit harden --sweep` results (sweep.json) read

    def cut(self, name: str) -> CutAudit:
        for c in list(self.cuts) + list(self.hardened):
            if c.name == name:
                return c
        raise KeyError(name)

    def to_dict(self) -> dict:
        return {
            "schema": "edgesplit.audit/1",
            "model": self.model_name,
            "dataset": self.dataset,
            "settings": self.spec.to_dict(),
            "ceilings": self.ceilings,
            "input": self.input_row,
            "cuts": [c.to_dict() for c in self.cuts],
            "hardened": [c.to_dict() for c in self.hardened],
            "sweeps": self.sweeps,
            "threat_models": _threat_models(),
            "recommendation": self.recommendation,
            "paper_comparison": self.paper,
            "sigma_sensitivity": self.sigma,
            "judge": self.judge,
            "versions": self.versions,
            "seconds": self.seconds,
            **({"data": self.data} if self.data is not None else {}),
        }

    def summary(self) -> str:
        c = self.ceilings
        lines = [f"audit of {self.model_name} on {self.dataset}: {len(self.cuts)} cut(s), N = {c['n']}, "
                 f"sigma^2 = {self.spec.sigma2:g}, {self.seconds:.0f} s",
                 "columns: bytes = int8 bytes sent; acc = head+tail accuracy; f/q = float/int8 features; "
                 "useY = usable label bits; useX = input bits from the decoder; wb/dec = white-box/decoder "
                 "attack; rd = share of reconstructions an independent reader classifies correctly; arch/qf = "
                 "architecture-only (UnSplit) / query-free (shadow head) attack; label = label-only baseline; "
                 "+label = strongest attack minus the label-only baseline (what leaks beyond the label)",
                 f"ceilings: I(X;B) <= log2 N = {c['log2_n']:.4f} bits, I(Y;B) <= H(Y) = {c['h_y']:.4f} bits"
                 "  (* = saturated: within 0.01 bit of its ceiling)",
                 ""]
        head = (f"{'cut':<10} {'bytes':>7} {'head ms':>8} {'acc':>6} {'I(X;B)f':>8} {'I(Y;B)f':>8} "
                f"{'I(X;B)q':>8} {'I(Y;B)q':>8} {'useY':>6} {'useX':>6} {'dCor':>5} {'wb dB':>6} {'wb rd':>5} "
                f"{'dec dB':>6} {'dec SSIM':>8} {'dec rd':>6} {'arch dB':>7} {'qf dB':>6} {'label':>6} {'+label':>6}")
        lines.append(head)
        lines.append("-" * len(head))
        for r in [self.input_row] + list(self.cuts) + list(self.hardened):
            lines.append(_summary_row(r))
        rec = self.recommendation
        lines.append("")
        hardened = f" hardened with {rec['variant']}" if rec.get("variant") not in (None, "unhardened") else ""
        lines.append(f"recommended cut: {rec['cut'] or 'none'}{hardened}")
        lines.append(f"  {rec['reason']}")
        if self.paper:
            lines.append("")
            lines.append("against Tuor et al. Table 1 (float features, upper bound):")
            for row in self.paper:
                lines.append(f"  {row['cut']:<7} paper {row['paper_ixt']:.2f}/{row['paper_iyt']:.2f}  ours "
                             f"{row['ours_ixt']:.2f}/{row['ours_iyt']:.2f}  {row['verdict']}")
        if self.sigma:
            from auditor import sigma

            lines.append("")
            lines.append("where each cut leaves its ceiling (float features, upper bounds, sigma^2 grid "
                         f"{self.sigma['grid'][0]:.2g} to {self.sigma['grid'][-1]:.4g}):")
            lines += ["  " + t for t in sigma.leaves_text(self.sigma)]
            if self.sigma.get("paper_ranking"):
                lines.append("  " + self.sigma["paper_ranking"]["statement"])
        if self.paths:
            lines.append("")
            lines.append("report: " + ", ".join(str(p) for p in self.paths.values()))
        return "\n".join(lines)


def _threat_models() -> dict:
    from auditor.attacks import threat_models

    return threat_models()


def _fmt(v, spec=".2f", star=False):
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    return format(v, spec) + ("*" if star else "")


def _summary_row(r) -> str:
    if isinstance(r, CutAudit):
        name, cost, acc = r.name, r.cost, r.accuracy.get("int8")
        kf, kq = r.kde.get("float") or {}, r.kde.get("int8") or {}
        uy = (r.usable.get("int8") or {}).get("label_bits")
        ux = (r.usable.get("int8") or {}).get("input_bits")
        dc = r.dcor.get("int8")
        wb = r.attacks.get("whitebox", {}).get("metrics", {})
        dec = r.attacks.get("decoder", {}).get("metrics", {})
        nbytes, head_ms = cost.get("bytes_int8"), cost.get("head_ms")
        arch = (r.attacks.get("architecture") or {}).get("metrics") or {}
        qf = (r.attacks.get("queryfree") or {}).get("metrics") or {}
        bl = r.beyond_label or {}
    else:  # the raw input row
        name, acc, nbytes, head_ms = "input", r.get("accuracy"), r.get("bytes"), None
        kf, kq = r["kde"], {}
        uy, ux, dc, wb, dec = r["usable"].get("label_bits"), None, 1.0, {}, {}
        arch, qf, bl = {}, {}, {}
    sat = kf.get("saturated", {})
    satq = kq.get("saturated", {})
    return (f"{name:<10} {_fmt(nbytes, 'd'):>7} {_fmt(head_ms, '.3f'):>8} {_fmt(acc, '.4f'):>6} "
            f"{_fmt(kf.get('ixt_upper'), '.3f', sat.get('ixt_upper')):>8} "
            f"{_fmt(kf.get('iyt_upper'), '.3f', sat.get('iyt_upper')):>8} "
            f"{_fmt(kq.get('ixt_upper'), '.3f', satq.get('ixt_upper')):>8} "
            f"{_fmt(kq.get('iyt_upper'), '.3f', satq.get('iyt_upper')):>8} "
            f"{_fmt(uy, '.2f'):>6} {_fmt(ux, '.0f'):>6} {_fmt(dc, '.2f'):>5} "
            f"{_fmt(wb.get('psnr_db'), '.1f'):>6} {_fmt(wb.get('judge_accuracy'), '.2f'):>5} "
            f"{_fmt(dec.get('psnr_db'), '.1f'):>6} {_fmt(dec.get('ssim'), '.3f'):>8} "
            f"{_fmt(dec.get('judge_accuracy'), '.2f'):>6} {_fmt(arch.get('psnr_db'), '.1f'):>7} "
            f"{_fmt(qf.get('psnr_db'), '.1f'):>6} {_fmt(bl.get('label_psnr_db'), '.1f'):>6} "
            f"{_fmt(bl.get('gap_db'), '+.1f'):>6}")


# ------------------------------------------------------------------------- run

def audit(model_or_bundle, cuts=None, n=None, preset=None, seed=None, *, out=None, progress=True,
          **options) -> AuditResult:
    """Audit every cut (or ``cuts``) of a model, or the one cut of a bundle; see :class:`AuditSpec`.

    Writes report.html / report.json / report.md into ``out`` when given.
    """
    spec = AuditSpec.make(model_or_bundle, cuts=cuts, n=n, preset=preset, seed=seed, out=out,
                          progress=progress, **options)
    return run(spec)


def run(spec: AuditSpec) -> AuditResult:
    """Run an audit described by a checked :class:`AuditSpec`."""
    import tensorflow as tf

    # Every cut's head is a new graph: Keras' predict and our tf.functions trace once per cut,
    # and TF would print a "retracing" warning for each.
    tf_log = tf.get_logger()
    level = tf_log.level
    tf_log.setLevel(logging.ERROR)
    try:
        return _run(spec)
    finally:
        tf_log.setLevel(level)


def _run(spec: AuditSpec) -> AuditResult:
    import keras

    t_start = time.perf_counter()
    keras.utils.set_random_seed(spec.seed)
    spec, model, model_name, bundle, data, dataset_name = _resolve(spec)
    from converter import cuts as cuts_mod

    all_cuts = cuts_mod.list_cuts(model)
    if bundle is not None:
        wanted = [bundle.manifest.cut]
        if spec.cuts and tuple(spec.cuts) != (bundle.manifest.cut,):
            raise UsageError(f"this bundle was cut at {bundle.manifest.cut!r}; it cannot be audited at "
                             f"{', '.join(spec.cuts)}",
                             fix=f"drop --cuts, or audit the model instead: edgesplit audit {model_name} "
                                 f"--cuts {' '.join(spec.cuts)}")
    else:
        wanted = list(spec.cuts) if spec.cuts else [c.name for c in all_cuts]
    chosen = [cuts_mod.find_cut(model, name) for name in wanted]
    last = max(c.index for c in all_cuts) or 1
    first = min(c.index for c in all_cuts)

    n = min(spec.n, len(data.x_test))
    x_test, y_test = data.x_test[:n], np.asarray(data.y_test[:n]).astype(np.int64)
    dn = min(spec.decoder_n, len(data.x_train))
    x_dec, y_dec = data.x_train[:dn], np.asarray(data.y_train[:dn]).astype(np.int64)
    attack_n = min(spec.attack_n, n)
    float_pred = np.asarray(model.predict(x_test, batch_size=500, verbose=0)).argmax(-1)
    float_accuracy = float((float_pred == y_test).mean())

    # Bundles made here go into OUT/bundles (kept: the report's numbers are about them), or a
    # temporary directory removed at the end when there is no OUT.
    with tempfile.TemporaryDirectory(prefix="edgesplit-audit-") as tmp:
        workdir = Path(spec.out) if spec.out else Path(tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        return _audit_all(spec, t_start, model, model_name, bundle, data, dataset_name, chosen, first, last,
                          n, x_test, y_test, x_dec, y_dec, attack_n, float_accuracy, workdir)


def _audit_all(spec, t_start, model, model_name, bundle, data, dataset_name, chosen, first, last, n, x_test,
               y_test, x_dec, y_dec, attack_n, float_accuracy, workdir) -> AuditResult:
    from tqdm.auto import tqdm

    from auditor import metrics, mi

    variants, sweeps = _load_hardened(spec, model)   # refused before anything runs if inconsistent
    judge = metrics.train_judge(data.x_train[:20_000], data.y_train[:20_000], seed=spec.seed)
    judge_info = {"architecture": f"MLP {int(np.prod(x_test.shape[1:]))}-256-{judge.output_shape[-1]} on pixels, "
                                  "Adam 1e-3, 3 epochs (independent of the audited model)",
                  "train_n": int(min(20_000, len(data.x_train))),
                  "accuracy_on_originals": float((metrics.predict_labels(judge, x_test) == y_test).mean())}
    input_row = _input_row(spec, x_test, y_test, x_dec, y_dec, float_accuracy)
    grid_k = min(spec.grid_n, attack_n)
    # the grid shows pixels (RGB in colour), whatever scaling the model's input has
    to_pixels = getattr(spec.preprocess, "to_pixels", lambda x: np.asarray(x, np.float32))
    images = {"original": to_pixels(x_test[:grid_k]), "labels": y_test[:grid_k], "whitebox": {}, "decoder": {}}
    rows = []
    bar = tqdm(chosen, desc="audit", unit="cut", disable=not spec.progress)
    for cut in bar:
        bar.set_postfix(cut=cut.name)
        depth = (cut.index - first) / max(last - first, 1)
        rows.append(_audit_cut(spec, model, model_name, cut, depth, bundle, workdir, x_test, y_test,
                               x_dec, y_dec, attack_n, float_accuracy, images, judge))
    bar.close()
    hardened = _audit_hardened(spec, model, model_name, variants, first, last, workdir, x_test, y_test, x_dec,
                               y_dec, attack_n, images, judge)

    ceilings = {"n": n, "log2_n": math.log2(n), "h_y": mi.label_entropy_bits(y_test),
                "saturation_bits": mi.SATURATION_BITS}
    recommendation = recommend(rows + hardened, spec.budgets())
    paper = paper_comparison(rows, ceilings) if is_paper_model(model_name) else None
    from auditor import sigma

    sigma_info = sigma.sensitivity(rows, spec.sigma2, PAPER_TABLE1 if paper else None)
    result = AuditResult(spec=spec, model_name=model_name, dataset=dataset_name, cuts=rows, input_row=input_row,
                         recommendation=recommendation, paper=paper, ceilings=ceilings, versions=_versions(),
                         seconds=time.perf_counter() - t_start, judge=judge_info, images=images, sigma=sigma_info,
                         data=_data_info(data), hardened=hardened, sweeps=sweeps)
    if spec.out:
        from auditor.report import write_report

        result.paths = write_report(result, spec.out)
    return result


def _load_hardened(spec, model) -> tuple[list, list]:
    """([(variant, its Keras model)], sweeps) of ``spec.hardened``, each checked before any attack runs:
    a model whose defence is not the one its bundle declares is refused here (BundleError)."""
    from auditor.attacks import suite

    variants, sweeps = [], []
    for path in spec.hardened:
        found, sweep = suite.load_hardened(path)
        if sweep is not None:
            sweeps.append(sweep)
        for v in found:
            hmodel = v.load_model()
            suite.deployed_head(v.bundle, hmodel, depth=0.0)  # the defence on both sides, or one clear error
            variants.append((v, hmodel))
    return variants, sweeps


def _audit_hardened(spec, model, model_name, variants, first, last, workdir, x_test, y_test, x_dec, y_dec,
                    attack_n, images, judge) -> list:
    """Audit every hardened cut with the same (adaptive) attacks, beside its cut."""
    from auditor import metrics
    from converter import cuts as cuts_mod

    out = []
    for v, hmodel in variants:
        try:
            cut = cuts_mod.find_cut(hmodel, v.layer)
        except UsageError:  # the defence layer may hide the cut from the analysis: the base model's
            cut = cuts_mod.find_cut(model, v.layer)
        base_cut = cuts_mod.find_cut(model, v.layer)
        depth = (base_cut.index - first) / max(last - first, 1)
        facc = float((metrics.predict_labels(hmodel, x_test) == y_test).mean())
        row = _audit_cut(spec, hmodel, model_name, cut, depth, v.bundle, workdir, x_test, y_test, x_dec, y_dec,
                         attack_n, facc, images, judge, row_name=f"{v.layer} + {v.label}")
        row.variant = v.label
        if (v.sweep or {}).get("baseline"):
            row.accuracy["unhardened_int8"] = v.sweep["baseline"].get("accuracy")
        out.append(row)
    return out


def _resolve(spec: AuditSpec):
    """(spec, model, model name, bundle or None, data, dataset name) for the audit's target.

    The spec comes back with ``data`` the loaded images (an ``ImageData``) and ``preprocess`` the
    input spec's, so that every bundle made for the audit is made from exactly these.
    """
    from converter import datasets, zoo
    from protocol.manifest import load_bundle

    target = spec.target
    bundle = None
    if not isinstance(target, (str, os.PathLike)):
        model, name = target, getattr(target, "name", "model")
    else:
        text = os.fspath(target)
        path = Path(text).expanduser()
        is_bundle = (path.is_dir() and (path / "manifest.json").is_file()) or text.endswith((".tar.gz", ".tgz"))
        if is_bundle:
            bundle = load_bundle(path)
            name = bundle.manifest.model
            model = _model_of_bundle(bundle, path, spec.model_file)
        else:
            model, name = zoo.load_model(text), text
    if spec.model_file is not None and bundle is None:
        raise UsageError("--model names the Keras model of a bundle; this audit's target is a model already",
                         fix=f"drop --model, or audit the bundle: edgesplit audit BUNDLE --model {spec.model_file}")
    if bundle is not None and spec.preprocess is not None:
        raise UsageError("--preprocess is for auditing a model: a bundle brings its own preprocessing",
                         fix="drop --preprocess (the manifest's input.preprocess is used)")
    images = _images_for(spec, bundle)
    if images is not None:
        from converter import bundle as bundle_mod
        from converter import inputspec

        bundle_mod.check_model(model, name)
        n_out = int(np.prod(model.outputs[0].shape[1:]))
        images.check_outputs(n_out, repr(name))
        if bundle is not None:
            input_spec = bundle.manifest.input
        else:
            input_spec = inputspec.resolve(model, preprocess=spec.preprocess, data=images, n_outputs=n_out,
                                           name=repr(name)).spec
        spec = dataclasses.replace(spec, data=images, preprocess=input_spec.preprocess)
        data = images.for_input(input_spec, progress=spec.progress)
        return spec, model, name, bundle, data, images.split.describe()
    if name in zoo.ZOO:
        data, dataset = zoo.load_dataset(zoo.ZOO[name]), zoo.ZOO[name].dataset
    elif tuple(model.input_shape[1:]) == datasets.IMAGE_SHAPE:
        data, dataset = datasets.load_mnist(), "mnist"
    else:
        raise UsageError(f"no images are known for model {name!r} (input {list(model.input_shape[1:])}); the "
                         "audit attacks the model's own kind of images",
                         fix="give your labelled images with --data: a folder of class folders, a folder with "
                             "labels.csv (file,label), or an .npz with x_train, y_train, x_test, y_test")
    return spec, model, name, bundle, data, dataset


def _data_info(data) -> dict | None:
    """The report's account of the user's images (None for the zoo's datasets)."""
    split = getattr(data, "split", None)
    if split is None:
        return None
    pre = data.input_spec.preprocess
    return {"source": split.source, "kind": split.kind, "n_train": split.n_train, "n_test": split.n_test,
            "test_split": split.test_split, "seed": split.seed, "classes": list(data.classes),
            "split": split.describe(), "preprocess": pre.describe(),
            "note": "the attacker's own images (decoder, shadow head) come from the train side; the attacked "
                    "images from the test side, never used to calibrate the bundle"}


def _images_for(spec: AuditSpec, bundle):
    """The user's images: --data, or (for a bundle) the images the bundle was made from, split the same way."""
    from converter import userdata

    if isinstance(spec.data, userdata.ImageData):
        return spec.data
    if spec.data is not None:
        return userdata.load_data(spec.data, test_split=spec.test_split, seed=spec.data_seed)
    if spec.test_split is not None:
        raise UsageError("--test-split only applies to --data images", fix="give --data, or drop --test-split")
    ds = bundle.manifest.dataset if bundle is not None else None
    if ds is None or ds.kind not in ("folders", "labels.csv", "npz"):
        return None
    if not Path(ds.source).exists():
        raise UsageError(f"bundle {bundle.source} was made from the images in {ds.source}, which are not on this "
                         "machine; the audit needs them (or images like them)",
                         fix="give them with --data SPEC (the same split is made when they are the same images)")
    images = userdata.load_data(ds.source, test_split=ds.test_split, seed=ds.seed)
    if (images.split.n_train, images.split.n_test) != (ds.n_train, ds.n_test):
        log.warning("%s holds %d train / %d test images now, %d / %d when bundle %s was made: the attacked images "
                    "may include some it was calibrated on", ds.source, images.split.n_train, images.split.n_test,
                    ds.n_train, ds.n_test, bundle.bundle_id)
    return images


def _model_of_bundle(bundle, path: Path, model_file):
    """The Keras model a bundle was made from: --model, the file its manifest names, or its zoo name."""
    from converter import zoo
    from protocol.manifest import sha256_file

    m = bundle.manifest
    made_from = m.source_model
    if model_file is not None:
        file = Path(model_file).expanduser()
        if not file.is_file():
            raise UsageError(f"--model {model_file}: no such file", fix="give the .keras file the bundle was made from")
        if made_from is not None and sha256_file(file) != made_from.sha256:
            log.warning("%s is not the file bundle %s was made from (sha256 %s...): the white-box attack uses its "
                        "weights, the device runs the bundle's", file, m.bundle_id, made_from.sha256[:12])
        return zoo.load_model(str(file))
    if made_from is not None:
        original = Path(made_from.file)
        for candidate in (original, path.parent / original.name, path / original.name):
            if candidate.is_file():
                if sha256_file(candidate) == made_from.sha256:
                    return zoo.load_model(str(candidate))
                log.warning("%s has changed since bundle %s was made from it", candidate, m.bundle_id)
        raise UsageError(f"bundle {path} was made from {made_from.file} (sha256 {made_from.sha256[:16]}...), which is "
                         "not on this machine (nor beside the bundle) as it was; the white-box attack needs the "
                         "Keras model", fix=f"pass that file with --model FILE, e.g. edgesplit audit {path} --model "
                                            f"{original.name}")
    try:
        return zoo.load_model(m.model)
    except UsageError as exc:
        raise UsageError(f"bundle {path} was made from model {m.model!r}, which cannot be loaded here "
                         f"({exc.message}); the white-box attack needs the Keras model",
                         fix="pass the .keras file it was made from with --model FILE") from exc


def _bundle_for(spec, model, model_name, cut, workdir, bundle):
    if bundle is not None:
        return bundle
    from converter import bundle as bundle_mod
    from protocol.manifest import load_bundle

    target = workdir / "bundles" / cut.name
    source = model_name if isinstance(spec.target, (str, os.PathLike)) else model
    from_data = {}
    if spec.data is not None:   # the user's images, resolved once (see _resolve): every cut uses the same
        from_data = dict(data=spec.data, preprocess=spec.preprocess,
                         name=None if isinstance(source, str) else model_name)
    made = bundle_mod.convert(source, cut=cut.name, quant="int8", calibration=spec.calibration, out=str(target),
                              min_agreement=0.0, parity_n=spec.parity_n, progress=spec.progress, **from_data)
    return load_bundle(made.bundle_dir)


def _input_row(spec, x_test, y_test, x_dec, y_dec, float_accuracy) -> dict:
    """The raw input as if it were sent: the ceiling every cut is compared with."""
    flat = x_test.reshape(len(x_test), -1).astype(np.float64)
    kde = _kde(spec, flat, y_test)
    return {"name": "input", "shape": list(x_test.shape[1:]), "bytes": int(np.prod(x_test.shape[1:])),
            "accuracy": float_accuracy, "kde": kde,
            "usable": _usable(x_dec, y_dec, x_test, y_test, spec.seed),
            "dcor": 1.0}


def _kde(spec, features, labels) -> dict:
    """The paper's KDE bounds (float64, bits) of one set of features."""
    from auditor import mi

    flat = np.asarray(features).reshape(len(features), -1).astype(np.float64)
    return mi.kde_mi(flat, labels, sigma2=spec.sigma2, method=spec.kde_method, progress=spec.progress).to_dict()


def _usable(train_f, train_y, test_f, test_y, seed) -> dict:
    """Usable information about the label (held-out probe), in bits."""
    from auditor import usable

    got = usable.label_information(train_f, train_y, test_f, test_y, seed=seed)
    return got.to_dict() if hasattr(got, "to_dict") else dict(got)


def _audit_cut(spec, model, model_name, cut, depth, bundle, workdir, x_test, y_test, x_dec, y_dec,
               attack_n, float_accuracy, images, judge, row_name=None) -> CutAudit:
    from auditor import features, usable
    from runtime.split import Head, Tail

    clock = _Clock()
    log.info("cut %s: bundle", cut.name)
    b = _bundle_for(spec, model, model_name, cut, workdir, bundle)
    clock.lap("bundle")
    head, tail = Head(b), Tail(b)
    sent = features.sent_features(b, x_test, head=head, progress=spec.progress)
    sent_train = features.sent_features(b, x_dec, head=head, progress=spec.progress)
    flo = features.float_features(model, cut.name, x_test)
    clock.lap("features")
    probs = tail.run(sent.raw)  # the tail takes the tensors as received, as a cloud worker feeds it
    acc_int8 = float((np.asarray(probs).argmax(-1) == y_test).mean())

    cost = {"bytes_int8": int(cut.bytes_int8), "bytes_float32": int(cut.bytes_float32),
            "frame_bytes": float(sent.frame_bytes), "head_macs": int(cut.head_macs),
            "tail_macs": int(cut.tail_macs), "head_params": int(cut.head_params),
            "head_size_bytes": features.file_size(b.head_path), "tail_size_bytes": features.file_size(b.tail_path),
            "head_ms": features.measure_latency_ms(head.model, x_test[:1], runs=spec.latency_runs),
            "tail_ms": features.measure_latency_ms(tail.model, tail.inputs(sent.raw[:1]),
                                                   runs=spec.latency_runs)}
    clock.lap("cost")

    log.info("cut %s: mutual information", cut.name)
    kde = {"float": _kde(spec, flo, y_test), "int8": _kde(spec, sent.values, y_test)}
    clock.lap("kde")
    if spec.sigma_sweep:
        from auditor import sigma

        log.info("cut %s: KDE bounds over sigma^2", cut.name)
        kde["sigma_sweep"] = sigma.sweep(np.asarray(flo).reshape(len(flo), -1), y_test,
                                         progress=spec.progress).to_dict()
        clock.lap("sigma")
    flo_train = features.float_features(model, cut.name, x_dec)
    use = {"float": _usable(flo_train, y_dec, flo, y_test, spec.seed),
           "int8": _usable(sent_train.values, y_dec, sent.values, y_test, spec.seed)}
    dc = {"float": float(usable.distance_correlation(x_test, flo, seed=spec.seed)),
          "int8": float(usable.distance_correlation(x_test, sent.values, seed=spec.seed))}
    clock.lap("usable")

    log.info("cut %s: attacks", cut.name)
    from auditor.attacks import AuxData, suite

    deployed = suite.deployed_head(b, model, depth=depth, head_runtime=head, tail_runtime=tail)
    attacks, rep = suite.attack_cut(spec, deployed, sent.values, x_test, y_test, AuxData(x_dec, y_dec), model=model,
                                    judge=judge, attack_n=attack_n, seed=spec.seed + int(cut.index),
                                    progress=spec.progress)
    for o in rep.outcomes:
        clock.laps[o.name] = o.seconds
    clock.t = time.perf_counter()
    # What the decoder's error says about the input (bits per image; see auditor.usable).
    if "decoder" in attacks and not attacks["decoder"]["skipped"]:
        use["int8"]["input_bits"] = float(usable.input_information(x_test, rep.get("decoder").raw))
        use["int8"]["input_bits_note"] = usable.INPUT_BITS_NOTE
    grid_k = len(images["original"])
    for o in rep.outcomes:
        if o.images is not None:
            images.setdefault(o.name, {})[row_name or cut.name] = o.images[:grid_k]

    row = CutAudit(name=row_name or cut.name, index=int(cut.index), shape=tuple(int(d) for d in cut.shape),
                   depth=depth, cost=cost, accuracy={"int8": acc_int8, "float": float_accuracy}, kde=kde, usable=use,
                   dcor=dc, attacks=attacks, bundle_id=b.bundle_id, seconds=clock.laps, layer=cut.name,
                   variant=deployed.name, defence=deployed.defence)
    log.info("cut %s done: %s", row.name, ", ".join(f"{k} {v:.1f} s" for k, v in clock.laps.items()))
    top = rep.strongest()
    row.leakage_db = top.metrics["psnr_db"] if top is not None else float("nan")
    row.beyond_label = rep.beyond_label()
    return row


class _Clock:
    def __init__(self):
        self.t = time.perf_counter()
        self.laps = {}

    def lap(self, name):
        now = time.perf_counter()
        self.laps[name] = self.laps.get(name, 0.0) + now - self.t
        self.t = now


# ---------------------------------------------------------------- recommendation

def budget_failures(row: CutAudit, budgets: dict) -> list[str]:
    """Why a cut does not meet the budgets (empty when it does)."""
    fails = []
    if budgets.get("max_bytes") is not None and row.cost["bytes_int8"] > budgets["max_bytes"]:
        fails.append(f"sends {row.cost['bytes_int8']} bytes > --max-bytes {budgets['max_bytes']}")
    if budgets.get("max_head_ms") is not None and row.cost["head_ms"] > budgets["max_head_ms"]:
        fails.append(f"head takes {row.cost['head_ms']:.3f} ms > --max-head-ms {budgets['max_head_ms']:g}")
    if budgets.get("min_accuracy") is not None and row.accuracy["int8"] < budgets["min_accuracy"]:
        fails.append(f"accuracy {row.accuracy['int8']:.4f} < --min-accuracy {budgets['min_accuracy']:g}")
    return fails


def beyond_label_db(row: CutAudit) -> float:
    """How far the strongest attack on ``row`` gets above the label-only baseline, in dB (PSNR if unknown)."""
    gap = (row.beyond_label or {}).get("gap_db")
    return float(gap) if gap is not None else row.leakage_db


def _unhardened_accuracy(row: CutAudit, rows: list) -> float | None:
    for r in rows:
        if r.defence is None and (r.layer or r.name) == (row.layer or row.name):
            return r.accuracy["int8"]
    return row.accuracy.get("unhardened_int8")


def _attack_words(row: CutAudit) -> str:
    parts = []
    for name, a in row.attacks.items():
        if a.get("baseline") or a.get("skipped") or not a.get("metrics"):
            continue
        parts.append(f"{a['threat_model']['name']} {a['metrics']['psnr_db']:.1f} dB")
    return ", ".join(parts)


def recommend(rows: list, budgets: dict) -> dict:
    """The cut (or hardened cut) that leaks least beyond the label and meets every budget, and why.

    Leakage beyond the label is the PSNR of the strongest of the graded attacks on what is sent
    minus the PSNR of the label-only baseline on the same images (the cloud learns the predicted
    class legitimately, and an image guessed from it alone is no leak of the cut).  Ties within
    PSNR_TIE_DB go to the lowest distance correlation.  The KDE figures are not used: on hidden
    layers they sit on their ceiling.
    """
    for r in rows:
        r.budget_failures = budget_failures(r, budgets)
    ok = [r for r in rows if not r.budget_failures]
    base = {"budgets": budgets,
            "measure": "leakage beyond the label: PSNR (dB) of the strongest of the graded attacks on the int8 "
                       "features sent, minus the PSNR of the label-only baseline (what the predicted class alone "
                       "gives) on the same images; ties within %.1f dB broken by distance correlation" % PSNR_TIE_DB}
    if not ok:
        why = "; ".join(f"{r.name}: {', '.join(r.budget_failures)}" for r in rows)
        return dict(base, cut=None, name=None, variant=None, reason=f"no cut meets the budgets ({why}). Relax a budget or "
                                                         "choose a smaller model.", ranking=[], leaks=[])
    best_gap = min(beyond_label_db(r) for r in ok)
    near = [r for r in ok if beyond_label_db(r) <= best_gap + PSNR_TIE_DB]
    pick = min(near, key=lambda r: (r.dcor["int8"], beyond_label_db(r)))
    ordered = sorted(ok, key=lambda r: (beyond_label_db(r), r.dcor["int8"]))
    ranking = [r.name for r in ordered]
    leaks = [{"name": r.name, "cut": r.layer or r.name, "variant": r.variant,
              "beyond_label_db": beyond_label_db(r), "psnr_db": r.leakage_db,
              "attack": (r.beyond_label or {}).get("attack"), "threat_model": (r.beyond_label or {}).get("threat_model"),
              "label_psnr_db": (r.beyond_label or {}).get("label_psnr_db"), "accuracy": r.accuracy["int8"]}
             for r in ordered]
    bl = pick.beyond_label or {}
    worst = max(rows, key=beyond_label_db)
    top = pick.attacks.get(bl.get("attack") or "", {})
    parts = [f"{pick.name} leaks least beyond the label among the cuts that meet the budgets: its strongest attack, "
             f"{top.get('title', 'the strongest attack')} ({bl.get('threat_model', '?')}), reconstructs the input at "
             f"{pick.leakage_db:.1f} dB PSNR (SSIM {_num(bl.get('ssim'), '.2f')}), {beyond_label_db(pick):+.1f} dB "
             f"against the {_num(bl.get('label_psnr_db'), '.1f')} dB that the predicted label alone gives"
             + (f"; {worst.name} leaks {beyond_label_db(worst):.1f} dB beyond the label" if worst is not pick else "")]
    parts.append(f"per attack at {pick.name}: {_attack_words(pick)}; distance correlation {pick.dcor['int8']:.2f}")
    dec, wb = pick.attacks.get("decoder", {}).get("metrics") or {}, pick.attacks.get("whitebox", {}).get("metrics") or {}
    if dec.get("judge_accuracy") is not None and wb.get("judge_accuracy") is not None:
        parts.append(f"an independent reader classifies {100 * dec['judge_accuracy']:.0f} % of the decoded images "
                     f"and {100 * wb['judge_accuracy']:.0f} % of the white-box ones correctly")
    parts.append(f"it sends {pick.cost['bytes_int8']} bytes, the head takes {pick.cost['head_ms']:.3f} ms here, "
                 f"and head+tail accuracy is {100 * pick.accuracy['int8']:.2f} %")
    if pick.defence is not None:
        plain = _unhardened_accuracy(pick, rows)
        if plain is not None:
            parts.append(f"the defence ({pick.variant}) costs {100 * (plain - pick.accuracy['int8']):.2f} points of "
                         f"int8 accuracy against the unhardened {pick.layer} ({100 * plain:.2f} %)")
    hardened = [r for r in rows if r.defence is not None]
    if hardened and pick.defence is None:
        parts.append("no hardened variant leaks less beyond the label within the budgets ("
                     + "; ".join(f"{r.name}: {beyond_label_db(r):.1f} dB at {100 * r.accuracy['int8']:.2f} %"
                                 for r in hardened) + ")")
    excluded = [r for r in rows if r.budget_failures]
    if excluded:
        parts.append("excluded by the budgets: " + "; ".join(f"{r.name} ({', '.join(r.budget_failures)})"
                                                             for r in excluded))
    if len(near) > 1:
        parts.append("within %.1f dB of it: %s (distance correlation decided)"
                     % (PSNR_TIE_DB, ", ".join(r.name for r in near if r is not pick)))
    reason = ". ".join(p if i == 0 else p[0].upper() + p[1:] for i, p in enumerate(parts)) + "."
    return dict(base, cut=pick.layer or pick.name, name=pick.name, variant=pick.variant, reason=reason,
                ranking=ranking, leaks=leaks)


def _num(v, spec) -> str:
    return "?" if v is None else format(v, spec)


def _versions() -> dict:
    from importlib import metadata

    out = {"python": platform.python_version(), "machine": platform.machine(), "cpus": os.cpu_count()}
    for dist in ("edgesplit", "tensorflow-cpu", "tensorflow", "keras", "ai-edge-litert", "numpy", "scipy",
                 "matplotlib", "msgspec"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    return out


def save_json(result: AuditResult, path) -> Path:
    path = Path(path)
    path.write_text(json.dumps(result.to_dict(), indent=2, default=json_default) + "\n")
    return path

