"""The information plane over training: train a model and record I(X;T), I(Y;T) of every layer.

Saxe et al. (ICLR 2018, code ``artemyk/ibsgd``) train a 784-1024-20-20-20-10 network on
MNIST with tanh and with ReLU and plot, on a grid of epochs, the KDE bounds of every layer
in the information plane; Tuor et al. (SPIE 2018) rerun that code for their Fig. 5 (5a ReLU,
5b tanh) and read it as: compression for tanh, for ReLU only at the output layer.  This module
does the same with the auditor's estimator (``auditor.mi``: float64, the exact fast path,
upper and lower bounds) and adds what a long run on a shared machine needs: progress, a
snapshot after every recorded epoch (and every few minutes), stop with Ctrl+C or SIGTERM,
resume from the last snapshot.

The ibsgd settings of the ``saxe-*`` presets, as its published code has them:

* data: ``utils.get_mnist()``: Keras' MNIST split, 60,000 training and 10,000 test images,
  flattened to 784 and scaled to [0, 1] (an earlier commit rescaled to [-1, 1]), one-hot labels;
* network: ``MNIST_SaveActivations.ipynb``: ``cfg['LAYER_DIMS'] = [1024, 20, 20, 20]``, Dense layers
  with ``cfg['ACTIVATION']`` ('tanh' or 'relu'), a 10-way softmax, Keras' default
  initialisation (Glorot uniform, zero biases), categorical cross-entropy;
* optimiser: ``keras.optimizers.SGD(lr=cfg['SGD_LEARNINGRATE'])`` with 0.001, plain SGD, no momentum;
  ``cfg['SGD_BATCHSIZE'] = 128``; ``cfg['NUM_EPOCHS'] = 10000``;
* recorded epochs: ``do_report``: every epoch below 20, every 5th below 100, every 10th below
  200, every 100th after (144 epochs of 10,000; we add the untrained start and the last epoch);
* measure: ``MNIST_ComputeMI.ipynb``: activity of every Dense layer (softmax output included) on
  the 10,000 test images, ``noise_variance = 1e-1``, ``kde.entropy_estimator_kl`` (upper) and
  ``entropy_estimator_bd`` (lower), ``kde_condentropy`` for H(T|X), bits.

10,000 epochs of 469 SGD steps take about 11 hours of training alone on two cores (4 s an
epoch); the ``-short`` presets run the same network, data, batch size and estimator for 100
epochs at lr 0.1: the same learning-rate x steps (0.1 x 100 = 0.001 x 10,000), i.e. the same
time of the gradient flow SGD follows, with 100 times SGD's noise scale lr/batch.  Saxe et al.
find tanh compression with full-batch gradient descent too, so the noise is not what makes it.
They record 30 log-spaced steps instead of ibsgd's 144 epochs (one record of the five layers
at N = 10,000 costs 15-80 s of KDE here), and the report colours them by ibsgd-equivalent
epoch (epoch x lr / 0.001).  Any zoo model can be recorded too (its own recipe; every cut).
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from protocol.errors import UsageError

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

log = logging.getLogger(__name__)

SAXE_LAYERS = (1024, 20, 20, 20)
SAXE_LR = 1e-3               # ibsgd's SGD_LEARNINGRATE, against which short runs are scaled
_SAXE = dict(model="saxe-mlp", optimizer="sgd", batch_size=128, n=10_000, sigma2=0.1, grid="ibsgd")
PRESETS = {
    "saxe-tanh": dict(_SAXE, activation="tanh", epochs=10_000, lr=SAXE_LR),
    "saxe-relu": dict(_SAXE, activation="relu", epochs=10_000, lr=SAXE_LR),
    # 30 records instead of 144: at N = 10,000 one record of the five layers costs 15-80 s here
    "saxe-tanh-short": dict(_SAXE, activation="tanh", epochs=100, lr=0.1, grid="log:30"),
    "saxe-relu-short": dict(_SAXE, activation="relu", epochs=100, lr=0.1, grid="log:30"),
}
SNAPSHOT_FORMAT = "edgesplit.iplane-snapshot/1"
SNAPSHOT_EVERY_S = 300.0


@dataclass(frozen=True)
class DynamicsSpec:
    """What to train and record; checks itself (UsageError with the fix)."""

    target: str                      # a preset name or a zoo model name
    model: str = "saxe-mlp"          # "saxe-mlp" or a zoo name
    activation: str | None = None    # saxe-mlp only: "tanh" or "relu"
    epochs: int = 100
    optimizer: str = "sgd"           # "sgd" (ibsgd) or "adam-cosine" (the zoo's recipes)
    lr: float = 0.1
    batch_size: int = 128
    n: int = 10_000                  # test images the information is measured on
    sigma2: float = 0.1
    grid: str = "ibsgd"              # "ibsgd" (its do_report, scaled by lr) or "log:K"
    seed: int = 0
    out: str | None = None
    resume: bool = False
    progress: bool = True
    snapshot_every_s: float = SNAPSHOT_EVERY_S

    def __post_init__(self):
        if self.model != "saxe-mlp":
            from converter import zoo
            zoo.get_entry(self.model)  # UsageError naming the zoo's models
        elif self.activation not in ("tanh", "relu"):
            raise UsageError(f"the Saxe network needs activation 'tanh' or 'relu', got {self.activation!r}",
                             fix="use the preset saxe-tanh or saxe-relu")
        for name in ("epochs", "batch_size", "n"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise UsageError(f"{name} must be a whole number >= 1, got {getattr(self, name)!r}")
        if self.n < 20:
            raise UsageError(f"n = {self.n} test images is too few to estimate anything", fix="use --n 20 or more")
        if not (self.lr > 0 and self.sigma2 > 0):
            raise UsageError(f"lr and sigma2 must be > 0 (got {self.lr}, {self.sigma2})")
        if self.optimizer not in ("sgd", "adam-cosine"):
            raise UsageError(f"optimizer must be 'sgd' or 'adam-cosine', got {self.optimizer!r}")
        grid_points(self.grid, 10, 1, self.lr)  # checks the grid's spelling

    @classmethod
    def make(cls, target: str, **given) -> "DynamicsSpec":
        """A preset's values (or a zoo model's recipe), then the caller's explicit ones (None = not given)."""
        given = {k: v for k, v in given.items() if v is not None}
        if target in PRESETS:
            values = dict(PRESETS[target])
        else:
            from converter import zoo

            try:
                entry = zoo.get_entry(target)
            except UsageError as exc:
                raise UsageError(f"{exc.message}; or a preset: {', '.join(PRESETS)}", fix=exc.fix) from exc
            values = dict(model=entry.name, epochs=entry.epochs, optimizer="adam-cosine", lr=entry.learning_rate,
                          batch_size=entry.batch_size, n=1000, sigma2=0.1, grid="log:24", seed=entry.seed)
        values.update(given)
        return cls(target=target, **values)

    def training_settings(self) -> dict:
        """The settings a snapshot must share with the run that resumes it."""
        skip = {"out", "resume", "progress", "snapshot_every_s"}
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in skip}

    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}


def ibsgd_epochs(total: int) -> list[int]:
    """ibsgd's ``do_report(epoch)`` over Keras' 0-based epoch indices: every epoch below 20, every 5th
    below 100, every 10th below 200, every 100th after (144 of 10,000).  ibsgd saves at the end of
    epoch index e, i.e. after e + 1 epochs of training."""
    return [e for e in range(total)
            if e < 20 or (e < 100 and e % 5 == 0) or (e < 200 and e % 10 == 0) or e % 100 == 0]


def grid_points(grid: str, total_steps: int, steps_per_epoch: int, lr: float) -> list[int]:
    """The optimiser steps after which to record; the untrained start (0) and the last step always.

    ``ibsgd``: after ibsgd's recorded epochs (at its lr 0.001), moved to the same lr x steps at
    ``lr``; ``log:K``: K steps log-spaced from 1 to the last.
    """
    if grid == "ibsgd":
        scale = SAXE_LR / lr
        total_equiv = int(round(total_steps / steps_per_epoch / scale))
        steps = {int(round((e + 1) * steps_per_epoch * scale)) for e in ibsgd_epochs(total_equiv)}
    elif grid.startswith("log:") and grid[4:].isdigit() and int(grid[4:]) >= 2:
        steps = {int(round(s)) for s in np.geomspace(1, max(total_steps, 1), int(grid[4:]))}
    else:
        raise UsageError(f"unknown recording grid {grid!r}", fix="use 'ibsgd' or 'log:K' (K log-spaced points)")
    return sorted({0, total_steps} | {s for s in steps if 0 <= s <= total_steps})


def build_saxe_mlp(activation: str):
    """Saxe et al.'s MNIST network: 784-1024-20-20-20-10, ``activation`` in the hidden layers, softmax out."""
    import keras

    L = keras.layers
    inp = keras.Input(shape=(28, 28, 1), name="image")
    x = L.Flatten(name="flatten")(inp)  # ibsgd feeds flattened 784-vectors: the same numbers
    for i, units in enumerate(SAXE_LAYERS, start=1):
        x = L.Dense(units, activation=activation, name=f"fc{i}")(x)
    out = L.Dense(10, activation="softmax", name="softmax")(x)
    return keras.Model(inp, out, name=f"saxe_mlp_{activation}")


@dataclass
class DynamicsResult:
    """A recorded run: one record per recorded step, and what the report says about it."""

    spec: DynamicsSpec
    layers: list                     # [{"name", "units"}] in depth order
    records: list                    # [{"step", "epoch", "epoch_equiv", "train_loss", "test_accuracy", "layers": {...}}]
    ceilings: dict                   # n, log2_n, h_y
    steps_per_epoch: int
    total_steps: int
    seconds: dict                    # train, mi, total (summed over every session of a resumed run)
    complete: bool
    analysis: dict = field(default_factory=dict)
    paths: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"schema": "edgesplit.iplane/1", "settings": self.spec.to_dict(), "layers": self.layers,
                "ceilings": self.ceilings, "steps_per_epoch": self.steps_per_epoch, "total_steps": self.total_steps,
                "complete": self.complete, "seconds": self.seconds, "analysis": self.analysis,
                "records": self.records}

    def summary(self) -> str:
        from auditor import compression

        return compression.summary(self)


class Stopped(Exception):
    """The run was asked to stop (Ctrl+C, SIGTERM); a snapshot was saved."""

    exit_code = 130

    def __init__(self, result: DynamicsResult, why: str):
        self.result, self.why = result, why
        super().__init__(why)


# ---------------------------------------------------------------------- run

def run(spec: DynamicsSpec, *, stop_after_step: int | None = None) -> DynamicsResult:
    """Train and record as ``spec`` says; resumes from ``spec.out``'s snapshot when ``spec.resume``.

    ``stop_after_step`` stops (with a snapshot) once that many steps are done, as Ctrl+C would.
    Raises :class:`Stopped` when stopped; writes the report into ``spec.out`` when complete.
    """
    import keras
    import tensorflow as tf

    out = Path(spec.out) if spec.out else None
    snap = _Snapshots(out / "snapshot") if out else None
    state = snap.load(spec) if snap else None
    keras.utils.set_random_seed(spec.seed)
    model, data, layer_names = _model_and_data(spec)
    x_train = np.asarray(data.x_train, np.float32)
    y_train = np.asarray(data.y_train, np.int64)
    n = min(spec.n, len(data.x_test))
    x_mi, y_mi = np.asarray(data.x_test[:n], np.float32), np.asarray(data.y_test[:n], np.int64)
    steps_per_epoch = math.ceil(len(x_train) / spec.batch_size)
    total = steps_per_epoch * spec.epochs
    record_at = grid_points(spec.grid, total, steps_per_epoch, spec.lr)
    optimizer = _optimizer(spec, total)
    probe = keras.Model(model.inputs, [model.get_layer(nm).output for nm in layer_names])
    loss_fn = keras.losses.SparseCategoricalCrossentropy()

    @tf.function
    def train_step(xb, yb):
        with tf.GradientTape() as tape:
            loss = loss_fn(yb, model(xb, training=True))
        grads = tape.gradient(loss, model.trainable_variables)
        optimizer.apply(grads, model.trainable_variables)
        return loss

    optimizer.build(model.trainable_variables)
    from auditor import mi

    ceilings = {"n": n, "log2_n": math.log2(n), "h_y": mi.label_entropy_bits(y_mi),
                "saturation_bits": mi.SATURATION_BITS}
    layers = [{"name": nm, "units": int(np.prod(model.get_layer(nm).output.shape[1:]))} for nm in layer_names]
    step, records, seconds = 0, [], {"train": 0.0, "mi": 0.0}
    running = _Mean()  # the training loss since the last record
    if state is not None:
        step, records, seconds = state["step"], state["records"], dict(state["seconds"])
        running.total, running.count = state["running_loss"]
        snap.restore(state, model, optimizer)
        log.info("resuming %s at step %d of %d (epoch %.2f), %d epochs recorded", spec.target, step, total,
                 step / steps_per_epoch, len(records))

    def result(complete):
        return DynamicsResult(spec=spec, layers=layers, records=records, ceilings=ceilings,
                              steps_per_epoch=steps_per_epoch, total_steps=total,
                              seconds=dict(seconds, total=seconds["train"] + seconds["mi"]), complete=complete)

    def record():
        t0 = time.perf_counter()
        feats = probe.predict(x_mi, batch_size=500, verbose=0)
        feats = feats if isinstance(feats, list) else [feats]
        row = {}
        for nm, f in zip(layer_names, feats):
            k = mi.kde_mi(np.asarray(f, np.float64).reshape(n, -1), y_mi, sigma2=spec.sigma2, method="fast")
            row[nm] = {"ixt_upper": k.ixt_upper, "ixt_lower": k.ixt_lower, "iyt_upper": k.iyt_upper,
                       "iyt_lower": k.iyt_lower}
        accuracy = float((np.asarray(feats[-1]).reshape(n, -1).argmax(-1) == y_mi).mean())
        dt = time.perf_counter() - t0
        seconds["mi"] += dt
        epoch = step / steps_per_epoch
        records.append({"step": step, "epoch": epoch, "epoch_equiv": epoch * spec.lr / SAXE_LR
                        if spec.model == "saxe-mlp" else epoch, "train_loss": running.mean(),
                        "test_accuracy": accuracy, "layers": row, "kde_seconds": dt})
        log.info("epoch %s (step %d/%d): test accuracy %.4f; I(X;T) %s bits (%.1f s)", _fmt_epoch(epoch), step, total,
                 accuracy, " ".join(f"{nm} {row[nm]['ixt_upper']:.2f}" for nm in layer_names), dt)

    stop = _StopFlag()
    bar = _progress(spec, total, step)
    last_snap = time.monotonic()
    pending = [s for s in record_at if s >= step and not any(r["step"] == s for r in records)]
    with stop:
        try:
            if pending and pending[0] == step:
                record()
                pending.pop(0)
                snap and snap.save(spec, step, records, seconds, model, optimizer, running)
                last_snap = time.monotonic()
            while step < total:
                epoch, start = divmod(step, steps_per_epoch)
                order = np.random.default_rng([spec.seed, epoch]).permutation(len(x_train))
                t0 = time.perf_counter()
                for b in range(start, steps_per_epoch):
                    idx = order[b * spec.batch_size:(b + 1) * spec.batch_size]
                    running.add(float(train_step(x_train[idx], y_train[idx])))
                    step += 1
                    bar.update(1)
                    if (pending and pending[0] == step) or stop.asked or step == stop_after_step:
                        break
                seconds["train"] += time.perf_counter() - t0
                if pending and pending[0] == step and not stop.asked:  # when stopping, the resumed run records it
                    record()
                    pending.pop(0)
                    running = _Mean()
                    bar.set_postfix(epoch=_fmt_epoch(step / steps_per_epoch),
                                    acc=f"{records[-1]['test_accuracy']:.3f}")
                due = time.monotonic() - last_snap >= spec.snapshot_every_s
                if snap and (records[-1]["step"] == step or due or stop.asked or step == stop_after_step):
                    snap.save(spec, step, records, seconds, model, optimizer, running)
                    last_snap = time.monotonic()
                if stop.asked or step == stop_after_step:
                    why = stop.why or f"stopped after step {step}"
                    raise Stopped(result(False), f"{why}: step {step} of {total} (epoch "
                                                 f"{_fmt_epoch(step / steps_per_epoch)}), snapshot in "
                                                 f"{snap.dir if snap else 'nowhere (no --out)'}")
        finally:
            bar.close()
    res = result(True)
    from auditor import compression

    res.analysis = compression.analyse(res)
    if out:
        from auditor.report import iplane

        res.paths = iplane.write(res, out)
    return res


def _fmt_epoch(epoch: float) -> str:
    return f"{epoch:.0f}" if abs(epoch - round(epoch)) < 1e-9 else f"{epoch:.3g}"


def _model_and_data(spec):
    """(model, data, names of the recorded layers in depth order)."""
    if spec.model == "saxe-mlp":
        from converter import datasets

        model = build_saxe_mlp(spec.activation)
        return model, datasets.load_mnist(), [f"fc{i}" for i in range(1, len(SAXE_LAYERS) + 1)] + ["softmax"]
    from converter import cuts, zoo

    entry = zoo.get_entry(spec.model)
    model = entry.build()
    return model, zoo.load_dataset(entry), [c.name for c in cuts.list_cuts(model)]


def _optimizer(spec, total_steps):
    import keras

    if spec.optimizer == "sgd":
        return keras.optimizers.SGD(spec.lr)
    schedule = keras.optimizers.schedules.CosineDecay(spec.lr, decay_steps=total_steps)
    return keras.optimizers.Adam(schedule)


class _Mean:
    def __init__(self):
        self.total, self.count = 0.0, 0

    def add(self, v):
        self.total += v
        self.count += 1

    def mean(self):
        return self.total / self.count if self.count else None


def _progress(spec, total, done):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=done, desc=f"iplane {spec.target}", unit="step", disable=None if spec.progress
                else True, smoothing=0.05, leave=False)


class _StopFlag:
    """Within ``with``: the first Ctrl+C (or SIGTERM) asks the loop to stop at the next step and save;
    a second Ctrl+C interrupts at once (no snapshot beyond the last one)."""

    def __init__(self):
        self.asked, self.why, self._old = False, None, {}

    def __enter__(self):
        import threading

        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.asked and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.asked = True
        self.why = "interrupted" if signum == signal.SIGINT else "terminated"
        log.warning("%s: stopping after this step and saving a snapshot (Ctrl+C again to abort)", self.why)

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)
        return False


# ---------------------------------------------------------------- snapshots

class _Snapshots:
    """``DIR/state.json`` + ``DIR/weights-<step>.npz``; each written whole, then renamed into place."""

    def __init__(self, directory: Path):
        self.dir = Path(directory)

    def load(self, spec: DynamicsSpec) -> dict | None:
        path = self.dir / "state.json"
        if not path.is_file():
            if spec.resume:
                raise UsageError(f"--resume: no snapshot in {self.dir}", fix="start the run without --resume")
            return None
        try:
            state = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise UsageError(f"the snapshot {path} cannot be read ({exc})",
                             fix="choose another --out, or delete the snapshot directory to start again") from exc
        if not spec.resume:
            raise UsageError(f"{self.dir.parent} already holds a run ({state.get('step')} of its steps done)",
                             fix="add --resume to continue it, or choose another --out")
        if state.get("format") != SNAPSHOT_FORMAT:
            raise UsageError(f"{path} is not an edgesplit iplane snapshot ({state.get('format')!r})")
        theirs, ours = state["settings"], spec.training_settings()
        differ = [f"{k} {theirs.get(k)!r} (snapshot) vs {v!r}" for k, v in ours.items() if theirs.get(k) != v]
        if differ:
            raise UsageError(f"the snapshot in {self.dir} was made with other settings: {'; '.join(differ)}",
                             fix="resume with the same preset and options, or choose another --out")
        return state

    def save(self, spec, step, records, seconds, model, optimizer, running):
        self.dir.mkdir(parents=True, exist_ok=True)
        name = f"weights-{step:09d}.npz"
        arrays = {f"model_{i}": np.asarray(v) for i, v in enumerate(model.get_weights())}
        arrays.update({f"opt_{i}": np.asarray(v) for i, v in enumerate(optimizer.variables)})
        tmp = self.dir / (name + ".tmp")
        with open(tmp, "wb") as fh:
            np.savez(fh, **arrays)
        os.replace(tmp, self.dir / name)
        state = {"format": SNAPSHOT_FORMAT, "settings": spec.training_settings(), "step": step, "weights": name,
                 "records": records, "seconds": seconds, "running_loss": [running.total, running.count], "saved_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        tmp = self.dir / "state.json.tmp"
        tmp.write_text(json.dumps(state))
        os.replace(tmp, self.dir / "state.json")
        for old in self.dir.glob("weights-*.npz"):  # only the one state.json names is kept
            if old.name != name:
                old.unlink()
        log.debug("snapshot at step %d in %s", step, self.dir)

    def restore(self, state, model, optimizer):
        with np.load(self.dir / state["weights"]) as z:
            weights = [z[f"model_{i}"] for i in range(len(model.get_weights()))]
            opt = [z[f"opt_{i}"] for i in range(len(optimizer.variables))]
        model.set_weights(weights)
        for var, value in zip(optimizer.variables, opt):
            var.assign(value)
