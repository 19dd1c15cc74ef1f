"""One hardened point at a cut: fine-tune, save, convert, verify, attack; and what it measured.

:func:`harden_point` fine-tunes one method at one strength (``auditor.defences.finetune``), saves
the hardened ``.keras``, converts it to an ordinary int8 bundle (``converter.bundle.convert``: the
clean head, the defence declared in the manifest and applied by ``runtime.split.Head`` on the
device, a tail calibrated on defended features, parity under the same draws), checks that the
deployed head applies the declared defence (``auditor.defences.check``) and attacks it with every
attack of ``auditor.attacks``, adaptively: they see the head only as deployed, defence inside.
:class:`Point` holds what it measured; :func:`baseline_point` does the same for the unhardened model.
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from auditor.defences.finetune import FinetuneSettings
from protocol.errors import CheckFailed, UsageError

log = logging.getLogger(__name__)

#: attack settings cheap enough for twenty points in a sweep (the audit's defaults are heavier)
QUICK_ATTACKS = {
    "whitebox": {"max_n": 32, "iters": 200},
    "decoder": {"budgets": (5000,), "epochs": 3},
    "architecture": {"max_n": 16, "rounds": 60},
    "queryfree": {"max_n": 16, "train_n": 5000, "epochs": 2, "iters": 200},
    "label_decoder": {"epochs": 2},
}


@dataclass(frozen=True)
class HardenSettings:
    """Everything but the method: fine-tuning, conversion, evaluation and the attacks."""

    finetune: FinetuneSettings = FinetuneSettings()
    calibration: int = 500            # training images calibrating int8
    test_n: int = 2000                # test images: int8 split accuracy (= the parity images)
    victims: int = 200                # test images the attacks reconstruct (white-box etc. take fewer)
    aux_n: int = 5000                 # the attacker's own images, held out of fine-tuning
    attacks: tuple | None = None      # registry names; None = the four attacks and both label baselines
    attack_settings: dict = field(default_factory=lambda: dict(QUICK_ATTACKS))
    run_attacks: bool = True
    seed: int = 0

    def __post_init__(self):
        for name in ("calibration", "test_n", "victims", "aux_n"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise UsageError(f"--{name.replace('_', '-')} must be a whole number >= 1, got {v!r}")

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["attacks"] = list(self.attacks) if self.attacks is not None else "all"
        return d


def settings_from(*, steps=None, lr=None, test_n=None, victims=None, attacks: bool = True, seed=None) -> HardenSettings:
    """HardenSettings from the command's options (None: the default)."""
    ft = {k: v for k, v in (("steps", steps), ("lr", lr), ("seed", seed)) if v is not None}
    rest = {k: v for k, v in (("test_n", test_n), ("victims", victims), ("seed", seed)) if v is not None}
    return HardenSettings(finetune=FinetuneSettings(**ft), run_attacks=bool(attacks), **rest)


def parse_strengths(text) -> list | None:
    """``"0.3,0.5"`` -> [0.3, 0.5]; UsageError for anything else."""
    if text is None or isinstance(text, (list, tuple)):
        return None if text is None else [float(v) for v in text]
    try:
        values = [float(v) for v in str(text).split(",") if v.strip()]
    except ValueError:
        values = []
    if not values:
        raise UsageError(f"--strengths {text!r} is not a comma-separated list of numbers",
                         fix="e.g. --strengths 0.3,0.5")
    return values


@dataclass
class Point:
    """One hardened (or the unhardened) model at one cut, with what it costs and what it leaks."""

    method: str                        # "none" for the unhardened baseline
    strength: float | None
    label: str                         # "vib 0.003", "unhardened"
    defence: dict | None = None        # the manifest's declaration
    accuracy: float | None = None      # int8 split test accuracy, defence active as on the device
    keras_accuracy: float | None = None
    parity_agreement: float | None = None
    accuracy_drop_pp: float | None = None
    attacks: dict = field(default_factory=dict)      # name -> AttackOutcome.to_dict()
    beyond: dict = field(default_factory=dict)       # AttackReport.beyond_label()
    verified: dict = field(default_factory=dict)     # auditor.defences.check.verify_bundle
    pareto: bool = False
    chosen: bool = False
    reason: str | None = None
    error: str | None = None
    paths: dict = field(default_factory=dict)
    seconds: dict = field(default_factory=dict)
    history: list = field(default_factory=list)

    baseline_accuracy: float | None = None   # the unhardened model's, same images

    @property
    def psnr_db(self) -> float | None:
        return self.beyond.get("psnr_db")

    @property
    def ssim(self) -> float | None:
        return self.beyond.get("ssim")

    @property
    def strongest(self) -> str | None:
        return self.beyond.get("attack")

    @property
    def beyond_label_db(self) -> float | None:
        return self.beyond.get("gap_db")

    @property
    def ok(self) -> bool:
        return self.error is None and self.accuracy is not None

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d.update(strongest=self.strongest, psnr_db=self.psnr_db, ssim=self.ssim,
                 label_only={"psnr_db": self.beyond.get("label_psnr_db"), "ssim": self.beyond.get("label_ssim"),
                             "baseline": self.beyond.get("baseline")},
                 beyond_label_db=self.beyond_label_db, bundle=self.paths.get("bundle"))
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "Point":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    def row(self) -> str:
        """One line of the table the command prints."""
        def f(v, spec):
            return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, spec)
        per = {name: a.get("metrics", {}).get("psnr_db") for name, a in self.attacks.items()
               if not a.get("baseline") and not a.get("skipped")}
        cells = " ".join(f"{f(per.get(n), '.1f'):>6}" for n in ("whitebox", "decoder", "architecture", "queryfree"))
        acc = f"{100 * self.accuracy:.2f}" if self.accuracy is not None else "-"
        drop = f(self.accuracy_drop_pp, "+.2f") if self.accuracy_drop_pp is not None else "-"
        mark = ("*" if self.chosen else "") + ("p" if self.pareto else "")
        return (f"{self.label:<22} {acc:>7} {drop:>6} {cells} {f(self.psnr_db, '.1f'):>6} {f(self.ssim, '.2f'):>5} "
                f"{f(self.beyond.get('label_psnr_db'), '.1f'):>6} {f(self.beyond_label_db, '+.1f'):>6} {mark:>3}"
                + (f"  FAILED: {self.error}" if self.error else ""))


TABLE_HEADER = (f"{'point':<22} {'acc %':>7} {'d pp':>6} {'wb dB':>6} {'dec dB':>6} {'arch dB':>6} {'qf dB':>6} "
                f"{'max dB':>6} {'SSIM':>5} {'label':>6} {'beyond':>6} {'':>3}")
TABLE_NOTE = ("acc = int8 split test accuracy with the defence on the device; d pp = change vs unhardened, "
              "percentage points; wb/dec/arch/qf = PSNR of the white-box, query-decoder, architecture-only "
              "(UnSplit) and query-free attacks; max/SSIM = the strongest; label = label-only baseline; "
              "beyond = max - label; * = chosen, p = on the Pareto front")


# ------------------------------------------------------------------ one point

@dataclass
class Context:
    """What every point of one run shares: the model, its data, the attacker's images."""

    model: object
    name: str
    cut: str
    data: object
    data_name: str
    x_fit: np.ndarray           # fine-tuning images (the attacker's are held out)
    y_fit: np.ndarray
    aux_x: np.ndarray
    aux_y: np.ndarray
    x_test: np.ndarray          # the first test_n test images: accuracy; the first `victims` are attacked
    y_test: np.ndarray
    depth: float
    settings: HardenSettings
    judge: object = None
    progress: bool = True


def make_context(model, cut: str, *, data=None, name: str | None = None, settings: HardenSettings,
                 progress: bool = True) -> Context:
    """Resolve the model and its data, check the cut, and hold out the attacker's images."""
    from converter import bundle as bundle_mod
    from converter import cuts as cuts_mod
    from converter.defended import defence_layers

    src = bundle_mod._resolve(model, data, None, name)
    keras_model = src.model
    if defence_layers(keras_model):
        raise UsageError(f"model {src.name!r} is already hardened ({defence_layers(keras_model)[0].name})",
                         fix="harden the plain model (the one you trained), not the output of `edgesplit harden`")
    all_cuts = cuts_mod.list_cuts(keras_model)
    chosen = cuts_mod.find_cut(keras_model, cut)
    if chosen.index == max(c.index for c in all_cuts) or keras_model.outputs[0] is keras_model.get_layer(
            chosen.name).output:
        raise UsageError(f"{chosen.name!r} is the model's output: a defence there has nothing after it to adapt to "
                         f"the noise, and the cloud needs no tail",
                         fix="harden an earlier cut (see `edgesplit cuts MODEL`)")
    first, last = min(c.index for c in all_cuts), max(c.index for c in all_cuts)
    depth = (chosen.index - first) / max(last - first, 1)
    d = src.data
    x_train, y_train = np.asarray(d.x_train, np.float32), np.asarray(d.y_train).reshape(-1).astype(np.int64)
    aux_n = min(settings.aux_n, len(x_train) // 2)
    if aux_n < 10:
        raise UsageError(f"only {len(x_train)} training images: too few to fine-tune and to attack",
                         fix="give more training images with --data")
    n_test = min(settings.test_n, len(d.x_test))
    from auditor import metrics

    judge = metrics.train_judge(x_train[:20_000], y_train[:20_000], seed=settings.seed) if settings.run_attacks \
        else None
    return Context(model=keras_model, name=src.name, cut=chosen.name, data=d, data_name=src.data_name,
                   x_fit=x_train[:-aux_n], y_fit=y_train[:-aux_n], aux_x=x_train[-aux_n:], aux_y=y_train[-aux_n:],
                   x_test=np.asarray(d.x_test[:n_test], np.float32),
                   y_test=np.asarray(d.y_test[:n_test]).reshape(-1).astype(np.int64), depth=depth,
                   settings=settings, judge=judge, progress=progress)


def slug(label: str) -> str:
    return label.replace(" ", "-")


def baseline_point(ctx: Context, out: Path) -> Point:
    """The unhardened model at the cut: converted and attacked like every hardened point."""
    point = Point(method="none", strength=None, label="unhardened")
    return _convert_and_attack(ctx, point, ctx.model, out)


def harden_point(ctx: Context, method: str, strength: float, out: Path, *, options: dict | None = None) -> Point:
    """Fine-tune ``method`` at ``strength``, save, convert, verify and attack; failures land in ``error``."""
    from auditor.defences.finetune import harden_model

    label = f"{method} {strength:g}" + ("" if not options else "".join(
        f" {v}" if not isinstance(v, bool) else (" learned" if v else "") for k, v in sorted(options.items())
        if not (k == "distribution" and v == "gaussian")))
    point = Point(method=method, strength=float(strength), label=label)
    out.mkdir(parents=True, exist_ok=True)
    t = time.perf_counter()
    hardened = harden_model(ctx.model, ctx.cut, method, strength, ctx.x_fit, ctx.y_fit,
                            settings=ctx.settings.finetune, options=options, progress=ctx.progress)
    point.seconds["finetune"] = time.perf_counter() - t
    point.history = hardened.history
    keras_path = out / "model.keras"
    hardened.model.save(keras_path)
    point.paths["model"] = str(keras_path)
    return _convert_and_attack(ctx, point, hardened.model, out)


def _convert_and_attack(ctx: Context, point: Point, model, out: Path) -> Point:
    from auditor.defences import check
    from converter import bundle as bundle_mod
    from protocol.manifest import load_bundle

    s = ctx.settings
    t = time.perf_counter()
    try:
        with _quiet("converter.bundle"):   # one conversion per point: its progress lines only with -v
            made = bundle_mod.convert(model, cut=ctx.cut, quant="int8", calibration=s.calibration,
                                      out=out / "bundle", parity_n=len(ctx.x_test), data=_Data(ctx), name=ctx.name,
                                      progress=False)
    except CheckFailed as exc:
        point.error = exc.message
        point.paths["bundle"] = str(out / "bundle")
        return point
    point.seconds["convert"] = time.perf_counter() - t
    point.paths["bundle"] = str(made.bundle_dir)
    point.accuracy, point.keras_accuracy = made.parity.accuracy, made.parity.keras_accuracy
    point.parity_agreement = made.parity.agreement
    bundle = load_bundle(made.bundle_dir)
    point.defence = bundle.manifest.defence.to_dict() if bundle.manifest.defence else None
    t = time.perf_counter()
    point.verified = check.verify_bundle(bundle, model, ctx.x_test[:64])
    point.seconds["verify"] = time.perf_counter() - t
    if s.run_attacks:
        t = time.perf_counter()
        _attack(ctx, point, bundle, model, out)
        point.seconds["attacks"] = time.perf_counter() - t
    return point


@contextlib.contextmanager
def _quiet(name: str):
    logger = logging.getLogger(name)
    level = logger.level
    if not logging.getLogger().isEnabledFor(logging.DEBUG):
        logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        logger.setLevel(level)


class _Data:
    """The context's data in the shape ``converter.bundle.convert`` takes (fine-tuning images calibrate)."""

    def __init__(self, ctx: Context):
        self.x_train, self.y_train = ctx.x_fit, ctx.y_fit
        self.x_test, self.y_test = ctx.x_test, ctx.y_test


def _attack(ctx: Context, point: Point, bundle, model, out: Path) -> None:
    from auditor.attacks import AuxData, run_attacks
    from auditor.defences.exposed import deployed_head

    s = ctx.settings
    head = deployed_head(bundle, model, depth=ctx.depth, name=point.label)
    victims = ctx.x_test[:s.victims]
    settings = {k: v for k, v in s.attack_settings.items() if s.attacks is None or k in s.attacks}
    report = run_attacks(head, victims, AuxData(ctx.aux_x, ctx.aux_y), attacks=s.attacks, settings=settings,
                         labels=ctx.y_test[:s.victims], model=model, judge=ctx.judge, seed=s.seed,
                         progress=ctx.progress)
    point.attacks = report.to_dict()["attacks"]
    point.beyond = report.beyond_label()
    grid = {"original": head.to_pixels(victims[:8]), "labels": ctx.y_test[:8]}
    for o in report.outcomes:
        if o.images is not None:
            grid[o.name] = o.images
    np.savez_compressed(out / "grid.npz", **grid)
    point.paths["grid"] = str(out / "grid.npz")


# ------------------------------------------------------------------ shared with the verbs

def finish_points(base: Point, points: list) -> None:
    for p in points:
        p.baseline_accuracy = base.accuracy
        if p.accuracy is not None and base.accuracy is not None:
            p.accuracy_drop_pp = 100.0 * (p.accuracy - base.accuracy)


def promote(point: Point, out: Path) -> None:
    """Put a point's hardened .keras and bundle at OUT/model.keras and OUT/bundle (+ .tar.gz)."""
    if not point.ok:
        return
    src = Path(point.paths["bundle"])
    for dst in (out / "bundle", out / "bundle.tar.gz"):
        if dst.is_dir():
            shutil.rmtree(dst)
        elif dst.exists():
            dst.unlink()
    shutil.copytree(src, out / "bundle")
    tar = src.parent / (src.name + ".tar.gz")
    if tar.exists():
        shutil.copy2(tar, out / "bundle.tar.gz")
    if "model" in point.paths:
        shutil.copy2(point.paths["model"], out / "model.keras")


def prepare_out(out) -> Path:
    out = Path(out).expanduser()
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} is a file", fix="give a directory for the hardened model and bundle")
    if out.is_dir() and any(out.iterdir()) and not any((out / n).exists() for n in ("harden.json", "sweep.json")):
        raise UsageError(f"--out {out} holds other files; refusing to write into it",
                         fix="give a new or empty directory (or one an earlier `edgesplit harden` wrote)")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UsageError(f"cannot create {out}: {exc.strerror}", fix="give another --out") from None
    return out
