"""What every benchmark shares: the machine/versions/settings header, repeats, tables, JSON, cached bundles.

A benchmark builds a :class:`Report`::

    args = parse_args("head latency per cut")             # --quick, --repeats, --out
    rep = Report("head", "Head latency per cut", settings={...}, quick=args.quick)
    rep.table("latency", ["cut", "int8 ms", ...], rows, notes=[...])
    rep.target("header <= 64 B", value=58, limit=64, op="<=")
    rep.finish(args.out)          # prints everything, writes results/head.json and results/head.md

Numbers are summarised with :func:`summarize` (median and spread over repeats).
Alternatives are always measured in the same run and compared as ratios; the
absolute times are this machine's.

Bundles and whole-model ``.tflite`` files are built once and cached under
``$EDGESPLIT_CACHE/bench`` (``~/.cache/edgesplit/bench``), keyed by the model file's
hash, so a second run (and ``--quick``) does not convert anything.
"""
from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import importlib.metadata
import json
import logging
import math
import os
import platform
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:           # run as `python bench/x.py` from anywhere
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

from protocol.stats import percentiles  # noqa: E402
from protocol.tensors import json_default  # noqa: E402

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
log = logging.getLogger(__name__)

RESULTS_DIR = ROOT / "bench" / "results"
PYTHON = sys.executable
PAPER_CUTS = ("conv1", "pool1", "conv2", "pool2", "dense1", "dense2")
QUANTS = ("int8", "float16", "none")          # "none" = float32
QUANT_LABEL = {"int8": "int8", "float16": "float16", "none": "float32", "dynamic": "dynamic"}


# --------------------------------------------------------------------------- machine and versions

def machine() -> dict:
    """The machine a result was measured on: ``device.profile.machine_info()`` (CPU, cores, memory,
    load, board) plus the cores this process may use and the kernel."""
    from device.profile import machine_info

    m = machine_info()
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count()
    m.update(usable_cores=usable, kernel=platform.release())
    return m


def versions() -> dict:
    """Versions of what the numbers depend on (distributions, mosquitto)."""
    out = {}
    for dist in ("edgesplit", "numpy", "ai-edge-litert", "tensorflow-cpu", "tensorflow", "keras", "paho-mqtt",
                 "msgspec", "zstandard", "pillow"):
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            pass
    binary = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
    try:
        first = subprocess.run([binary, "-h"], capture_output=True, text=True, timeout=5).stdout.splitlines()[0]
        out["mosquitto"] = first.replace("mosquitto version", "").strip()
    except (OSError, IndexError, subprocess.SubprocessError):
        pass
    return out


# --------------------------------------------------------------------------- statistics

def summarize(values: Iterable[float]) -> dict:
    """median, p5/p95/p99, mean, min, max, n, and the relative spread (p95-p5)/median."""
    out = percentiles(values, (5, 50, 95, 99))
    if not out:
        return {"n": 0}
    med = out["median"]
    out["spread"] = (out["p95"] - out["p5"]) / med if med else float("nan")
    return out


def repeats_summary(per_repeat: Sequence[float]) -> dict:
    """Summary of one figure measured once per repeat: median and (max-min)/median as the spread."""
    a = np.asarray([v for v in per_repeat if v is not None and math.isfinite(v)], dtype=np.float64)
    if a.size == 0:
        return {"n": 0, "median": float("nan"), "spread": float("nan"), "values": []}
    med = float(np.median(a))
    return {"n": int(a.size), "median": med, "min": float(a.min()), "max": float(a.max()),
            "spread": float((a.max() - a.min()) / med) if med else float("nan"), "values": [float(v) for v in a]}


def time_calls(fn: Callable[[], Any], runs: int, warmup: int = 5) -> list[float]:
    """Wall time of each of ``runs`` calls of ``fn`` (after ``warmup`` calls), in ms."""
    for _ in range(warmup):
        fn()
    out = []
    clock = time.perf_counter
    for _ in range(runs):
        t0 = clock()
        fn()
        out.append((clock() - t0) * 1e3)
    return out


def fmt(v, spec: str = ".2f", unit: str = "") -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "-"
    return format(v, spec) + unit


def fmt_spread(s: dict, spec: str = ".3f") -> str:
    """``median (±x %)`` where x is half the relative spread."""
    if not s or not s.get("n"):
        return "-"
    sp = s.get("spread")
    tail = f" (±{50 * sp:.0f}%)" if sp is not None and math.isfinite(sp) and s["n"] > 1 else ""
    return format(s["median"], spec) + tail


def fmt_bytes(n) -> str:
    if n is None:
        return "-"
    n = float(n)
    if n < 10_000:
        return f"{n:,.0f}"
    if n < 10 * 2**20:
        return f"{n / 1024:,.1f} KiB"
    return f"{n / 2**20:,.1f} MiB"


def ratio(a, b, spec: str = ".2f") -> str:
    if a is None or b is None or not b or not math.isfinite(a) or not math.isfinite(b):
        return "-"
    return format(a / b, spec) + "x"


# --------------------------------------------------------------------------- tables and reports

@dataclass
class Table:
    name: str
    columns: list[str]
    rows: list[list]
    title: str = ""
    notes: list[str] = field(default_factory=list)

    def _cells(self) -> list[list[str]]:
        return [[("" if c is None else str(c)) for c in r] for r in self.rows]

    def markdown(self) -> str:
        lines = []
        if self.title:
            lines += [f"**{self.title}**", ""]
        lines.append("| " + " | ".join(self.columns) + " |")
        lines.append("|" + "|".join("---" if i == 0 else "---:" for i in range(len(self.columns))) + "|")
        lines += ["| " + " | ".join(c.replace("|", "\\|") for c in r) + " |" for r in self._cells()]
        if self.notes:
            lines.append("")
            lines += [f"* {n}" for n in self.notes]
        return "\n".join(lines)

    def text(self) -> str:
        cells = self._cells()
        widths = [max(len(x) for x in col) for col in zip(self.columns, *cells)] if cells else \
            [len(c) for c in self.columns]
        def line(row):
            return "  ".join(v.ljust(w) if i == 0 else v.rjust(w) for i, (v, w) in enumerate(zip(row, widths)))
        out = [self.title] if self.title else []
        out += [line(self.columns), line(["-" * w for w in widths])] + [line(r) for r in cells]
        out += [f"  * {n}" for n in self.notes]
        return "\n".join(out)

    def to_dict(self) -> dict:
        return {"name": self.name, "title": self.title, "columns": self.columns, "rows": self._cells(),
                "notes": self.notes}


@dataclass
class Target:
    """A figure the issue sets a target for; reported, never asserted."""

    name: str
    value: float | None
    limit: float
    op: str = "<="            # "<=" or ">="
    detail: str = ""

    @property
    def met(self) -> bool | None:
        if self.value is None or not math.isfinite(self.value):
            return None
        return self.value <= self.limit if self.op == "<=" else self.value >= self.limit

    def line(self) -> str:
        verdict = {True: "MET", False: "NOT MET", None: "not measured"}[self.met]
        v = "-" if self.value is None else f"{self.value:.4g}"
        detail = f" - {self.detail}" if self.detail else ""
        return f"{verdict:<12} {self.name}: {v} (target {self.op} {self.limit:g}){detail}"

    def to_dict(self) -> dict:
        return {"name": self.name, "value": self.value, "limit": self.limit, "op": self.op, "met": self.met,
                "detail": self.detail}


class Report:
    """One benchmark's output: header, tables, targets, raw data; printed and written as JSON + markdown."""

    def __init__(self, name: str, title: str, *, settings: dict, quick: bool, measures: str = ""):
        self.name, self.title, self.quick = name, title, quick
        self.settings = dict(settings, quick=quick)
        self.measures = measures
        self.machine = machine()
        self.versions = versions()
        self.tables: list[Table] = []
        self.targets: list[Target] = []
        self.data: dict = {}
        self.notes: list[str] = []
        self.t0 = time.perf_counter()
        self.started = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        print(self.header(), flush=True)

    def header(self) -> str:
        m, v = self.machine, self.versions
        lines = [f"== {self.title} ({'quick' if self.quick else 'full'} run, {self.started})",
                 f"machine: {m['cpu']} ({m['machine']}), {m['cores']} cores ({m['usable_cores']} usable), "
                 f"{m['memory_gib']} GiB, load average {m['load_avg_1_5_15']}, Linux {m['kernel']}, "
                 f"Python {m['python']}",
                 "versions: " + ", ".join(f"{k} {val}" for k, val in v.items()),
                 "settings: " + ", ".join(f"{k}={val}" for k, val in self.settings.items())]
        if self.measures:
            lines.append(f"measures: {self.measures}")
        return "\n".join(lines)

    def table(self, name: str, columns: list[str], rows: list[list], *, title: str = "",
              notes: Iterable[str] = ()) -> Table:
        t = Table(name, list(columns), [list(r) for r in rows], title, list(notes))
        self.tables.append(t)
        print("\n" + t.text(), flush=True)
        return t

    def target(self, name: str, value, limit: float, op: str = "<=", detail: str = "") -> Target:
        t = Target(name, None if value is None else float(value), float(limit), op, detail)
        self.targets.append(t)
        return t

    def note(self, text: str) -> None:
        self.notes.append(text)

    def to_dict(self) -> dict:
        return {"schema": "edgesplit.bench/1", "name": self.name, "title": self.title, "started": self.started,
                "seconds": time.perf_counter() - self.t0, "quick": self.quick, "machine": self.machine,
                "load_avg_at_end": list(os.getloadavg()), "versions": self.versions, "settings": self.settings,
                "measures": self.measures, "tables": [t.to_dict() for t in self.tables],
                "targets": [t.to_dict() for t in self.targets], "notes": self.notes, "data": self.data}

    def markdown(self) -> str:
        m = self.machine
        lines = [f"### {self.title}", "",
                 f"{'Quick' if self.quick else 'Full'} run of {self.started}, {time.perf_counter() - self.t0:.0f} s. "
                 f"Machine: {m['cpu']}, {m['cores']} cores, {m['memory_gib']} GiB, load average "
                 f"{m['load_avg_1_5_15']} at the start (shared machine). Absolute times are this machine's.", ""]
        if self.measures:
            lines += [f"Measures: {self.measures}", ""]
        lines += ["Settings: " + ", ".join(f"`{k}={v}`" for k, v in self.settings.items()), ""]
        lines += ["Versions: " + ", ".join(f"{k} {v}" for k, v in self.versions.items()), ""]
        for t in self.tables:
            lines += [t.markdown(), ""]
        if self.targets:
            lines += ["Targets:", ""] + [f"* {t.line()}" for t in self.targets] + [""]
        if self.notes:
            lines += [f"* {n}" for n in self.notes] + [""]
        return "\n".join(lines)

    def finish(self, out: str | os.PathLike | None = None) -> Path:
        out = Path(out) if out else RESULTS_DIR
        out.mkdir(parents=True, exist_ok=True)
        if self.targets:
            print("\ntargets:")
            for t in self.targets:
                print("  " + t.line())
        for n in self.notes:
            print(f"note: {n}")
        path = out / f"{self.name}.json"
        path.write_text(json.dumps(self.to_dict(), indent=1, default=json_default) + "\n")
        (out / f"{self.name}.md").write_text(self.markdown())
        print(f"\nwrote {path} and {path.with_suffix('.md')} ({time.perf_counter() - self.t0:.0f} s)", flush=True)
        return path


def parse_args(description: str, add: Callable[[argparse.ArgumentParser], None] | None = None,
               argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--quick", action="store_true", help="small N and few repeats (a smoke run of minutes)")
    p.add_argument("--repeats", type=int, default=None, help="repeats of each measurement (default 5, quick 3)")
    p.add_argument("--out", default=None, help=f"directory for the JSON and markdown (default {RESULTS_DIR})")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    if add is not None:
        add(p)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from runtime.quiet import quiet_libraries

    quiet_libraries(verbose=args.verbose)  # the tables, not TensorFlow's notices
    if args.repeats is None:
        args.repeats = 3 if args.quick else 5
    return args


# --------------------------------------------------------------------------- data and cached artefacts

def cache_root() -> Path:
    base = Path(os.environ.get("EDGESPLIT_CACHE") or Path.home() / ".cache" / "edgesplit")
    path = base / "bench"
    path.mkdir(parents=True, exist_ok=True)
    return path


@contextlib.contextmanager
def _lock(path: Path):
    with open(path, "a+") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _model_key(model_name: str) -> str:
    """A short hash of the trained zoo model's file (bundles of a retrained model are not reused)."""
    from converter import zoo

    zoo.train(model_name)                       # trains once if not cached
    path, _ = zoo.cached_paths(model_name)
    h = hashlib.sha256(path.read_bytes()).hexdigest()
    return h[:10]


def mnist_test(n: int) -> tuple[np.ndarray, np.ndarray]:
    """The first ``n`` MNIST test images (float32 in [0, 1]) and labels."""
    from converter.datasets import load_mnist

    m = load_mnist()
    return np.asarray(m.x_test[:n], np.float32), np.asarray(m.y_test[:n])


def bundle_for(model_name: str, cut: str, quant: str = "int8") -> Path:
    """A bundle of ``model_name`` cut at ``cut`` (cached; built with converter.bundle.convert)."""
    key = _model_key(model_name)
    out = cache_root() / "bundles" / f"{model_name}-{key}" / f"{cut}-{quant}"
    with _lock(cache_root() / ".bundles.lock"):
        if (out / "manifest.json").is_file():
            try:
                from protocol.manifest import load_bundle

                if load_bundle(out).manifest.probe is None:
                    raise ValueError("made before bundles carried their self-test probe")
                return out
            except Exception as exc:  # damaged or from an older converter: build again
                log.warning("rebuilding %s: %s", out, exc)
                shutil.rmtree(out, ignore_errors=True)
        from converter import bundle as bundle_mod

        t0 = time.perf_counter()
        print(f"  building bundle {model_name} cut {cut} {quant} (cached afterwards) ...", flush=True)
        out.parent.mkdir(parents=True, exist_ok=True)
        bundle_mod.convert(model_name, cut=cut, quant=quant, calibration=300, out=str(out), min_agreement=0.0,
                           parity_n=300, progress=False)
        print(f"  built {out} in {time.perf_counter() - t0:.0f} s", flush=True)
    return out


def full_model_tflite(model_name: str, quant: str = "int8") -> Path:
    """The whole model (no split) as one ``.tflite`` with float input and output (cached)."""
    key = _model_key(model_name)
    out = cache_root() / "full" / f"{model_name}-{key}-{quant}.tflite"
    with _lock(cache_root() / ".full.lock"):
        if out.is_file():
            return out
        from converter import zoo
        from converter.quantize import to_tflite

        model = zoo.load_model(model_name)
        calib = None
        if quant == "int8":
            data = zoo.load_dataset(zoo.ZOO[model_name])
            rng = np.random.default_rng(0)
            calib = np.asarray(data.x_train[np.sort(rng.choice(len(data.x_train), 300, replace=False))], np.float32)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_suffix(".tmp")
        tmp.write_bytes(to_tflite(model, quant, calib))
        os.replace(tmp, out)
    return out


# --------------------------------------------------------------------------- helper processes

class Role:
    """A helper process (cloud worker, bench server, device) that prints READY when it is ready.

    ``stop()`` sends SIGTERM and returns the last JSON line it printed (its results), or None.
    """

    def __init__(self, argv: Sequence[str], *, name: str, popen: Callable[..., subprocess.Popen] | None = None,
                 env: dict | None = None, stderr_to_log: bool = True):
        self.name = name
        self.lines: list[str] = []
        self.log_path = Path(os.environ.get("TMPDIR", "/tmp")) / f"edgesplit-bench-{name}-{os.getpid()}.log"
        self._log = open(self.log_path, "w")
        full_env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
                        PYTHONUNBUFFERED="1", **(env or {}))
        starter = popen or (lambda a, **kw: subprocess.Popen(a, **kw))
        # stderr to a log file (read on failure), or through to the terminal (progress lines)
        self.proc = starter(list(map(str, argv)), stdout=subprocess.PIPE, stderr=self._log if stderr_to_log else None,
                            text=True, env=full_env, cwd=str(ROOT))

    def wait_ready(self, timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            line = self.proc.stdout.readline()
            if not line:
                if self.proc.poll() is not None:
                    break
                continue
            line = line.rstrip("\n")
            self.lines.append(line)
            if line == "READY":
                return
        raise RuntimeError(f"{self.name} did not become ready (exit {self.proc.poll()}); log {self.log_path}:\n"
                           + self.log_tail())

    def log_tail(self, n: int = 30) -> str:
        self._log.flush()
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def result(self, timeout: float = 3600.0) -> dict | None:
        """Wait for the process to end on its own; its last JSON line."""
        try:
            out, _ = self.proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            out, _ = self.proc.communicate()
        self.lines += (out or "").splitlines()
        return self._last_json()

    def stop(self, timeout: float = 60.0) -> dict | None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.result(timeout)

    def _last_json(self) -> dict | None:
        self._log.close()
        for line in reversed(self.lines):
            if line.startswith("{"):
                try:
                    return json.loads(line)
                except ValueError:
                    continue
        if self.proc.returncode not in (0, None):
            raise RuntimeError(f"{self.name} failed (exit {self.proc.returncode}); log {self.log_path}:\n"
                               + self.log_tail())
        return None


def ready() -> None:
    """Called by a helper process when it is ready (see :class:`Role`)."""
    print("READY", flush=True)
