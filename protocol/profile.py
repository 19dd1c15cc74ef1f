"""The device profile, ``edgesplit.profile/1``: a machine's measured cost of running bundles.

``edgesplit profile`` (``device/profile.py``) measures it on a device or a cloud machine and
writes it; the planner (``converter/planner.py``, ``edgesplit plan --device-profile FILE``)
reads it on a workstation.  A contract between roles, so it lives here with the others: the
document (:class:`DeviceProfile`, one :class:`CutProfile` per bundle), its latency entries
(:func:`latency_stats`), and :func:`load_profile` / :func:`validate_profile`, which check what
the planner relies on.  numpy and the standard library only.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
from pathlib import Path
from typing import Sequence

from protocol.errors import UsageError
from protocol.stats import percentiles

SCHEMA = "edgesplit.profile/1"
_REWRITE = "write it again with `edgesplit profile --bundle B --out FILE` on that machine"


def latency_stats(ms: Sequence[float]) -> dict:
    """median, p95, mean, min, max and n of a list of latencies in ms."""
    return percentiles(ms, (95,))


@dataclasses.dataclass
class CutProfile:
    """The measured cost of one bundle (one cut) on this machine."""

    model: str
    cut: str
    quant: str
    bundle_id: str
    source: str
    feature_shape: list
    feature_dtype: str
    feature_bytes: int               # the tensor, uncompressed
    frame_bytes_raw: int             # header + tensor, uncompressed
    frame_bytes_wire: float | None   # mean frame bytes as the agent sends them (compress="auto"), real inputs only
    frame_header_bytes: int
    result_bytes: int                # one result frame
    head_size_bytes: int
    tail_size_bytes: int
    head_ms: dict | None = None
    tail_ms: dict | None = None

    @property
    def frame_bytes(self) -> float:
        """What the planner should take as the bytes sent: measured on real inputs when possible."""
        return self.frame_bytes_wire if self.frame_bytes_wire is not None else float(self.frame_bytes_raw)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclasses.dataclass
class DeviceProfile:
    """What ``edgesplit profile`` writes: machine, interpreter, settings and one entry per bundle."""

    machine: dict
    interpreter: dict
    threads: int | None
    runs: int
    warmup: int
    part: str
    inputs: str
    cuts: list[CutProfile]
    input: dict                      # shape, uint8 bytes, frame bytes of the raw image
    created: str = ""
    seconds: float = 0.0
    path: Path | None = None

    def full_ms(self) -> float | None:
        """Median time of the whole model here: the smallest head + tail over the profiled bundles."""
        both = [c.head_ms["median"] + c.tail_ms["median"] for c in self.cuts if c.head_ms and c.tail_ms]
        return min(both) if both else None

    def to_dict(self) -> dict:
        return {"schema": SCHEMA, "created": self.created, "machine": self.machine, "interpreter": self.interpreter,
                "threads": self.threads, "runs": self.runs, "warmup": self.warmup, "part": self.part,
                "inputs": self.inputs, "input": self.input, "full_ms": self.full_ms(), "seconds": self.seconds,
                "cuts": [c.to_dict() for c in self.cuts]}

    def write(self, path: str | os.PathLike) -> Path:
        path = Path(path)
        if path.parent and not path.parent.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        self.path = path
        return path

    def summary(self) -> str:
        m = self.machine
        where = m.get("board") or m.get("cpu") or m.get("machine")
        lines = [f"profile of {len(self.cuts)} bundle(s) on {m.get('hostname')} ({where}, {m.get('cores')} cores, "
                 f"load {m.get('load_avg_1_5_15')}), {self.interpreter.get('name')} "
                 f"{self.interpreter.get('version')}, {self.threads or 'default'} thread(s), {self.runs} runs each",
                 f"{'model':<12} {'cut':<10} {'quant':<8} {'head ms':>9} {'p95':>8} {'tail ms':>9} {'p95':>8} "
                 f"{'frame B':>9} {'wire B':>9}"]
        for c in self.cuts:
            h, t = c.head_ms or {}, c.tail_ms or {}
            lines.append(f"{c.model[:12]:<12} {c.cut[:10]:<10} {c.quant:<8} {_f(h.get('median')):>9} "
                         f"{_f(h.get('p95')):>8} {_f(t.get('median')):>9} {_f(t.get('p95')):>8} "
                         f"{c.frame_bytes_raw:>9,} "
                         f"{'-' if c.frame_bytes_wire is None else format(c.frame_bytes_wire, ',.0f'):>9}")
        full = self.full_ms()
        if full is not None:
            lines.append(f"whole model here (head + tail): {full:.3f} ms")
        lines.append(f"raw input: {self.input.get('bytes')} B as uint8, {self.input.get('frame_bytes')} B in a frame; "
                     f"inputs: {self.inputs}")
        if self.path is not None:
            lines.append(f"wrote {self.path}")
        return "\n".join(lines)


def _f(v) -> str:
    return "-" if v is None else f"{v:.3f}"


def load_profile(path: str | os.PathLike) -> dict:
    """A profile file as a dict (checked: schema and the fields the planner needs)."""
    p = Path(path)
    try:
        d = json.loads(p.read_text())
    except FileNotFoundError:
        raise UsageError(f"profile {p} does not exist",
                         fix="write one with `edgesplit profile --bundle B --out FILE` on that machine") from None
    except (OSError, ValueError) as exc:
        raise UsageError(f"cannot read profile {p}: {exc}", fix=_REWRITE) from None
    return validate_profile(d, str(p))


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def validate_profile(d, where: str = "the profile") -> dict:
    """``d`` if it is an ``edgesplit.profile/1`` document with every field the planner reads
    well-typed, else one UsageError naming the first field that is not."""
    if not isinstance(d, dict) or d.get("schema") != SCHEMA or not isinstance(d.get("cuts"), list):
        schema = d.get("schema") if isinstance(d, dict) else "?"
        raise UsageError(f"{where} is not an edgesplit profile (schema {schema}, expected {SCHEMA})",
                         fix="write it with `edgesplit profile --bundle B --out FILE`")

    def bad(field: str, want: str):
        raise UsageError(f"{where}: {field} must be {want}", fix=_REWRITE)

    if d.get("full_ms") is not None and not _number(d["full_ms"]):
        bad("full_ms", "a number or null")
    if not isinstance(d.get("input", {}), dict):
        bad("input", "an object")
    for i, c in enumerate(d["cuts"]):
        if not isinstance(c, dict):
            bad(f"cuts[{i}]", "an object")
        if not isinstance(c.get("cut"), str) or not c["cut"]:
            bad(f"cuts[{i}].cut", "the cut's layer name")
        for key in ("model", "quant", "bundle_id"):
            if c.get(key) is not None and not isinstance(c[key], str):
                bad(f"cuts[{i}].{key}", "a string")
        for key in ("head_ms", "tail_ms"):
            t = c.get(key)
            if t is not None and not (isinstance(t, dict) and (t.get("median") is None or _number(t["median"]))):
                bad(f"cuts[{i}].{key}", "null or an object whose median is a number")
        for key in ("frame_bytes_wire", "frame_bytes_raw", "result_bytes"):
            if c.get(key) is not None and not (_number(c[key]) and c[key] >= 0):
                bad(f"cuts[{i}].{key}", "a number of bytes or null")
    return d
