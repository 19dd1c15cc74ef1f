"""``edgesplit plan``: rank every cut, and the two ways of not splitting, by predicted end-to-end latency.

Options ranked:

* ``device`` — the whole model on the device; nothing is sent (no leakage, no network);
* ``raw`` — the raw input image (uint8 pixels in a frame) goes to the cloud, which runs the
  whole model (leaks the input itself);
* every cut ``C`` — the head up to ``C`` on the device, the int8 feature frame to the cloud,
  the tail there.

Predicted latency of one request on an idle system (the cost model, all terms explicit)::

    device:  t = full model on the device
    raw/cut: t = head on the device (0 for raw)
               + up   = max(0, wire(request) - burst) * 8 / uplink
               + RTT                        one round trip: the request's way up, the result's way down
               + cloud = batch wait + tail (or the whole model, for raw)
               + down = wire(result) * 8 / downlink
               + hops * hop_ms              MQTT client and broker work: device -> broker -> worker -> broker -> device

    wire(payload) = payload + MQTT PUBLISH header (fixed header, remaining length, topic, packet id)
                  + TCP/IP/link headers per segment (ceil(bytes / MSS) segments of SEGMENT_OVERHEAD bytes)

``burst`` is the bytes a token-bucket shaper (e.g. ``tc tbf``) lets through at line rate
when its bucket is full (0 for a plain link).  The QoS 1 acknowledgements travel beside
the next messages and are not on one request's path.

Where the numbers come from, in order of preference (``PlanResult.sources`` says which):
head time — the device profile (``edgesplit profile`` on the device), else the audit
report (measured on the audit machine), else an estimate from MACs; tail time — the
cloud profile, else the report, else MACs; bytes sent — the profile's mean frame on real
inputs, else the report's mean frame, else the frame without compression.  Leakage comes
from the audit report's measures that do not saturate: the PSNR of the strongest
reconstruction attack on what is sent (dB; higher leaks more) and the distance correlation.

No TensorFlow is needed when planning from an audit report (a model name or ``.keras``
file needs the cut analysis, which loads Keras).
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import re
from pathlib import Path

import numpy as np

from protocol.errors import UsageError
from protocol.profile import load_profile, validate_profile

log = logging.getLogger(__name__)

# --- the cost model's constants (see the module docstring)
MSS = 1448                     # TCP payload per segment on a 1500-byte MTU with timestamps
SEGMENT_OVERHEAD = 66          # Ethernet 14 + IPv4 20 + TCP 20 + TCP timestamps 12
TOPIC_CHARS = 40               # edgesplit/v1/<fleet>/<device>/features with short ids
HOPS = 4                       # device->broker, broker->worker, worker->broker, broker->device
HOP_MS = 0.5                   # client + broker work per hop on a server-class broker
CLOUD_WAIT_MS = 0.0            # the cloud worker's default micro-batch wait (edgesplit cloud --max-wait-ms)
TIE = 0.05                     # options within 5 % of each other are a tie; the other measure decides
# used only without any timing: MACs per second of one core
DEVICE_MACS_PER_S = 1e9        # a Raspberry Pi 4 core running int8 LiteRT, roughly
CLOUD_MACS_PER_S = 2e10
OBJECTIVES = ("latency", "leakage")

_RATE_UNITS = {"bit": 1.0, "kbit": 1e3, "mbit": 1e6, "gbit": 1e9,
               "bps": 1.0, "kbps": 1e3, "mbps": 1e6, "gbps": 1e9,
               "b/s": 1.0, "kb/s": 1e3, "mb/s": 1e6, "gb/s": 1e9,
               "bit/s": 1.0, "kbit/s": 1e3, "mbit/s": 1e6, "gbit/s": 1e9}
_BYTE_RATE_UNITS = {"B/s": 8.0, "kB/s": 8e3, "KB/s": 8e3, "MB/s": 8e6, "GB/s": 8e9}
_TIME_UNITS = {"us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "sec": 1.0, "min": 60.0}


# --------------------------------------------------------------------------- parsing

def parse_rate(text: str | int | float, what: str = "--uplink") -> float:
    """A link rate in bit/s from ``1mbit``, ``20Mbit``, ``500kbit``, ``1.5 Mbit/s``, ``10mbps`` (bits),
    ``2MB/s`` (bytes); UsageError saying what is wrong otherwise."""
    examples = "e.g. 1mbit, 20Mbit, 500kbit, 2.5mbit/s, 1MB/s"
    if isinstance(text, bool):
        raise UsageError(f"{what} {text!r} is not a rate", fix=f"give a rate with a unit, {examples}")
    if isinstance(text, (int, float)):
        value, unit = float(text), "bit"
    else:
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([A-Za-zµ/]*)\s*", str(text))
        if not m:
            raise UsageError(f"{what} {text!r} is not a rate", fix=f"give a number and a unit, {examples}")
        value, unit = float(m.group(1)), m.group(2)
        if not unit:
            raise UsageError(f"{what} {text!r} has no unit (bits or bytes per second?)",
                             fix=f"add a unit, {examples}")
        if unit in _BYTE_RATE_UNITS:
            value *= _BYTE_RATE_UNITS[unit]
        elif unit.lower() in _RATE_UNITS:
            value *= _RATE_UNITS[unit.lower()]
        else:
            raise UsageError(f"{what} {text!r}: unknown unit {unit!r}",
                             fix=f"use bit, kbit, mbit, gbit (or kbps, Mbit/s; MB/s for bytes), {examples}")
    if not (math.isfinite(value) and value > 0):
        raise UsageError(f"{what} {text!r} must be a rate above zero", fix=f"e.g. {examples}")
    return value


def parse_time(text: str | int | float, what: str = "--rtt") -> float:
    """A duration in seconds from ``40ms``, ``0.04s``, ``40 ms``, ``500us``; ``0`` alone is allowed."""
    examples = "e.g. 40ms, 0.04s, 250us"
    if isinstance(text, bool):
        raise UsageError(f"{what} {text!r} is not a duration", fix=f"give a time with a unit, {examples}")
    if isinstance(text, (int, float)):
        value = float(text)
    else:
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([A-Za-zµ]*)\s*", str(text))
        if not m:
            raise UsageError(f"{what} {text!r} is not a duration", fix=f"give a number and a unit, {examples}")
        value, unit = float(m.group(1)), m.group(2)
        if not unit:
            if value != 0:
                raise UsageError(f"{what} {text!r} has no unit (ms or s?)", fix=f"add a unit, {examples}")
        elif unit.lower() in _TIME_UNITS or unit in _TIME_UNITS:
            value *= _TIME_UNITS.get(unit, _TIME_UNITS.get(unit.lower(), 1.0))
        else:
            raise UsageError(f"{what} {text!r}: unknown unit {unit!r}", fix=f"use us, ms or s, {examples}")
    if not (math.isfinite(value) and value >= 0):
        raise UsageError(f"{what} {text!r} must be zero or more", fix=f"e.g. {examples}")
    return value


def parse_bytes(text: str | int, what: str = "--burst") -> int:
    """A byte count from ``3200``, ``3200b``, ``4kb``, ``1.5KiB``."""
    if isinstance(text, int) and not isinstance(text, bool):
        value = float(text)
    else:
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", str(text))
        units = {"": 1, "b": 1, "kb": 1e3, "k": 1e3, "kib": 1024, "mb": 1e6, "mib": 2**20}
        if not m or m.group(2).lower() not in units:
            raise UsageError(f"{what} {text!r} is not a size in bytes", fix="e.g. 3200, 4kb, 16KiB")
        value = float(m.group(1)) * units[m.group(2).lower()]
    if value < 0:
        raise UsageError(f"{what} must be >= 0 bytes", fix="e.g. 3200")
    return int(value)


def human_rate(bps: float) -> str:
    for unit, f in (("Gbit/s", 1e9), ("Mbit/s", 1e6), ("kbit/s", 1e3)):
        if bps >= f:
            return f"{bps / f:g} {unit}"
    return f"{bps:g} bit/s"


# --------------------------------------------------------------------------- the link

@dataclasses.dataclass(frozen=True)
class Link:
    """The device's network path to the broker, and the constants of the cost model."""

    uplink_bps: float
    downlink_bps: float
    rtt_s: float
    burst_bytes: int = 0
    hop_ms: float = HOP_MS
    hops: int = HOPS
    cloud_wait_ms: float = CLOUD_WAIT_MS
    topic_chars: int = TOPIC_CHARS
    mss: int = MSS
    segment_overhead: int = SEGMENT_OVERHEAD

    def wire_bytes(self, payload: float) -> float:
        """Bytes on the link for one MQTT PUBLISH (QoS 1) carrying ``payload`` bytes."""
        remaining = 2 + self.topic_chars + 2 + payload            # topic length + topic + packet id + payload
        length_bytes = 1 if remaining < 128 else 2 if remaining < 16384 else 3 if remaining < 2097152 else 4
        mqtt = 1 + length_bytes + remaining
        segments = max(1, math.ceil(mqtt / self.mss))
        return mqtt + segments * self.segment_overhead

    def up_ms(self, payload: float) -> float:
        return max(0.0, self.wire_bytes(payload) - self.burst_bytes) * 8 / self.uplink_bps * 1e3

    def down_ms(self, payload: float) -> float:
        return max(0.0, self.wire_bytes(payload) - self.burst_bytes) * 8 / self.downlink_bps * 1e3

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# --------------------------------------------------------------------------- options

@dataclasses.dataclass
class Option:
    """One way to serve a request, with its predicted latency and its leakage."""

    name: str                        # "device", "raw" or the cut's layer name
    kind: str                        # "device" | "raw" | "split"
    bytes_up: float | None           # payload bytes sent per request (None: nothing sent)
    device_ms: float
    cloud_ms: float                  # tail (or whole model) + batch wait; 0 for device
    up_ms: float = 0.0
    rtt_ms: float = 0.0
    down_ms: float = 0.0
    mqtt_ms: float = 0.0
    leakage_db: float | None = None  # PSNR of the strongest attack; inf for raw; None unknown
    dcor: float | None = None
    label_bits: float | None = None
    accuracy: float | None = None
    sources: dict = dataclasses.field(default_factory=dict)
    excluded: list = dataclasses.field(default_factory=list)   # why it fails the user's limits
    rank: int = 0

    @property
    def latency_ms(self) -> float:
        return self.device_ms + self.up_ms + self.rtt_ms + self.cloud_ms + self.down_ms + self.mqtt_ms

    @property
    def ok(self) -> bool:
        return not self.excluded

    def leakage_text(self) -> str:
        if self.kind == "device":
            return "none (nothing sent)"
        if self.kind == "raw":
            return "the input itself"
        if self.leakage_db is None:
            return "unknown (no report)"
        return f"{self.leakage_db:.1f} dB" + (f", dCor {self.dcor:.2f}" if self.dcor is not None else "")

    def breakdown(self) -> str:
        if self.kind == "device":
            return f"{self.device_ms:.2f} ms on the device, nothing sent"
        parts = []
        if self.kind == "split":
            parts.append(f"head {self.device_ms:.2f}")
        parts += [f"up {self.up_ms:.1f}", f"RTT {self.rtt_ms:.1f}", f"cloud {self.cloud_ms:.2f}",
                  f"down {self.down_ms:.1f}", f"MQTT {self.mqtt_ms:.1f}"]
        return " + ".join(parts) + " ms"

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["latency_ms"] = self.latency_ms
        d["ok"] = self.ok
        if d["leakage_db"] is not None and math.isinf(d["leakage_db"]):
            d["leakage_db"] = "inf"
        return d


@dataclasses.dataclass
class PlanResult:
    """The ranking, the pick and why; ``summary()`` for people, ``to_dict()`` for tools."""

    model: str
    source: str
    link: Link
    options: list[Option]
    pick: Option | None
    reason: str
    limits: dict
    objective: str
    notes: list[str] = dataclasses.field(default_factory=list)

    def option(self, name: str) -> Option:
        for o in self.options:
            if o.name == name:
                return o
        raise KeyError(name)

    def to_dict(self) -> dict:
        return {"schema": "edgesplit.plan/1", "model": self.model, "source": self.source, "link": self.link.to_dict(),
                "limits": self.limits, "objective": self.objective, "pick": self.pick.name if self.pick else None,
                "reason": self.reason, "notes": self.notes, "options": [o.to_dict() for o in self.options]}

    def summary(self) -> str:
        ln = self.link
        lines = [f"plan for {self.model} ({self.source}): uplink {human_rate(ln.uplink_bps)}, downlink "
                 f"{human_rate(ln.downlink_bps)}, RTT {ln.rtt_s * 1e3:g} ms"
                 + (f", burst {ln.burst_bytes} B" if ln.burst_bytes else ""),
                 "",
                 f"{'#':>2} {'option':<10} {'sent B':>9} {'latency ms':>11}  {'leakage':<24} {'limits':<7} breakdown"]
        for o in self.options:
            sent = "-" if o.bytes_up is None else f"{o.bytes_up:,.0f}"
            mark = "PICK" if o is self.pick else ("ok" if o.ok else "no")
            lines.append(f"{o.rank:>2} {o.name[:10]:<10} {sent:>9} {o.latency_ms:>11.1f}  {o.leakage_text()[:24]:<24} "
                         f"{mark:<7} {o.breakdown()}")
        lines += ["", f"pick: {self.pick.name if self.pick else 'none'}", f"  {self.reason}"]
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)


# --------------------------------------------------------------------------- inputs

def _load_json(path: Path, what: str) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise UsageError(f"cannot read {what} {path}: {exc}", fix="give the report.json written by `edgesplit audit`")


def _profile_dict(p) -> dict | None:
    if p is None:
        return None
    if isinstance(p, dict):
        return validate_profile(p, "the profile given")
    return load_profile(p)


def _profile_cuts(prof: dict | None, model: str | None, role: str) -> tuple[dict, list[str]]:
    """{cut name: entry} of a profile (int8 bundles preferred), and notes about mismatches."""
    if prof is None:
        return {}, []
    notes, by_cut = [], {}
    for entry in prof.get("cuts", []):
        if model and entry.get("model") and entry["model"] != model:
            notes.append(f"the {role} profile's bundle {entry.get('bundle_id')} is of model {entry['model']!r}, "
                         f"not {model!r}: not used")
            continue
        prev = by_cut.get(entry["cut"])
        if prev is None or (prev.get("quant") != "int8" and entry.get("quant") == "int8"):
            by_cut[entry["cut"]] = entry
    return by_cut, notes


def _median(d: dict | None) -> float | None:
    if not d:
        return None
    v = d.get("median")
    return None if v is None else float(v)


def _full_ms(prof: dict | None, by_cut: dict) -> float | None:
    both = [_median(e.get("head_ms")) + _median(e.get("tail_ms")) for e in by_cut.values()
            if _median(e.get("head_ms")) is not None and _median(e.get("tail_ms")) is not None]
    if both:
        return min(both)
    return None if prof is None or prof.get("full_ms") is None else float(prof["full_ms"])


@dataclasses.dataclass
class _CutFacts:
    name: str
    bytes_int8: int | None
    frame_bytes: float | None
    head_ms: float | None
    tail_ms: float | None
    head_macs: int | None
    tail_macs: int | None
    leakage_db: float | None = None
    dcor: float | None = None
    label_bits: float | None = None
    accuracy: float | None = None


def _from_report(d: dict) -> tuple[str, list[_CutFacts], dict]:
    if d.get("schema", "").split("/")[0] != "edgesplit.audit" or not isinstance(d.get("cuts"), list):
        raise UsageError("this JSON file is not an audit report (report.json of `edgesplit audit`)",
                         fix="give report.json from `edgesplit audit MODEL --out DIR`, or a model name")
    facts = []
    for c in d["cuts"]:
        cost = c.get("cost", {})
        facts.append(_CutFacts(
            name=c["name"], bytes_int8=cost.get("bytes_int8"), frame_bytes=cost.get("frame_bytes"),
            head_ms=cost.get("head_ms"), tail_ms=cost.get("tail_ms"), head_macs=cost.get("head_macs"),
            tail_macs=cost.get("tail_macs"), leakage_db=_finite(c.get("leakage_db")),
            dcor=(c.get("dcor") or {}).get("int8"), label_bits=((c.get("usable") or {}).get("int8") or {}).get(
                "label_bits"), accuracy=(c.get("accuracy") or {}).get("int8")))
    inp = d.get("input") or {}
    return d.get("model", "model"), facts, {"bytes": inp.get("bytes"), "shape": inp.get("shape"),
                                            "label_bits": (inp.get("usable") or {}).get("label_bits")}


def _finite(v) -> float | None:
    try:
        v = float(v)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def _from_model(target: str) -> tuple[str, list[_CutFacts], dict]:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    from converter import cuts as cuts_mod
    from converter import zoo

    model = zoo.load_model(target)
    name = target if target in zoo.ZOO else Path(target).stem
    facts = [_CutFacts(name=c.name, bytes_int8=c.bytes_int8, frame_bytes=None, head_ms=None, tail_ms=None,
                       head_macs=c.head_macs, tail_macs=c.tail_macs) for c in cuts_mod.list_cuts(model)]
    shape = [int(d) for d in model.inputs[0].shape[1:]]
    return name, facts, {"bytes": int(math.prod(shape)), "shape": shape, "label_bits": None}


def _file_bytes(data, test_split, seed) -> tuple[float, str] | None:
    """Mean size of the user's test image files (what a camera's JPEGs cost to send); None for an .npz."""
    from converter.userdata import load_data

    images = load_data(data, test_split=test_split, seed=seed)
    if not images.files:
        return None
    files = images.test.items[:500]
    mean = float(np.mean([f.stat().st_size for f in files]))
    return mean, f"mean size of {len(files)} of your image files ({images.split.source}) in a frame"


# rough frame header when nothing measured it: prefix + msgpack header of an int8 tensor
_HEADER_GUESS = 60


# --------------------------------------------------------------------------- planning

def plan(source, *, uplink, rtt, downlink=None, device_profile=None, cloud_profile=None,
         max_leakage_db: float | None = None, max_latency_ms: float | None = None, burst=0,
         objective: str = "latency", exclude=(), hop_ms: float = HOP_MS,
         cloud_wait_ms: float = CLOUD_WAIT_MS, data=None, test_split: float | None = None,
         data_seed: int = 0) -> PlanResult:
    """Rank the options for ``source`` (an audit report.json, a zoo model name or a ``.keras`` file).

    ``uplink``/``downlink``: rates (``"1mbit"`` or bit/s); ``rtt``: ``"40ms"`` or seconds;
    profiles: paths or dicts from ``edgesplit profile``.  ``data`` (a ``--data`` folder): sending the
    raw image costs what the user's image files weigh, not their uint8 pixels.  See the module
    docstring for the model.
    """
    up = parse_rate(uplink, "--uplink")
    down = parse_rate(downlink, "--downlink") if downlink is not None else up
    link = Link(uplink_bps=up, downlink_bps=down, rtt_s=parse_time(rtt, "--rtt"),
                burst_bytes=parse_bytes(burst), hop_ms=float(hop_ms), cloud_wait_ms=float(cloud_wait_ms))
    if objective not in OBJECTIVES:
        raise UsageError(f"--objective {objective!r} is unknown", fix=f"use one of {', '.join(OBJECTIVES)}")
    if max_leakage_db is not None and not (math.isfinite(max_leakage_db) and max_leakage_db >= 0):
        raise UsageError(f"--max-leakage must be a PSNR in dB >= 0, got {max_leakage_db}", fix="e.g. --max-leakage 15")
    if max_latency_ms is not None and not max_latency_ms > 0:
        raise UsageError(f"--max-latency-ms must be > 0, got {max_latency_ms}", fix="e.g. --max-latency-ms 100")
    if hop_ms < 0 or cloud_wait_ms < 0:
        raise UsageError("hop and batch-wait times must be >= 0 ms")

    text = os.fspath(source) if isinstance(source, (str, os.PathLike)) else None
    if isinstance(source, dict):
        model, facts, inp = _from_report(source)
        src_desc = "audit report"
    elif text is not None and text.endswith(".json"):
        path = Path(text).expanduser()
        if not path.is_file():
            raise UsageError(f"audit report {path} does not exist",
                             fix="write one with `edgesplit audit MODEL --out DIR` (DIR/report.json)")
        model, facts, inp = _from_report(_load_json(path, "audit report"))
        src_desc = str(path)
    elif text is not None and Path(text).expanduser().is_dir() and (Path(text).expanduser() / "report.json").is_file():
        path = Path(text).expanduser() / "report.json"
        model, facts, inp = _from_report(_load_json(path, "audit report"))
        src_desc = str(path)
    elif text is not None:
        model, facts, inp = _from_model(text)
        src_desc = f"cut analysis of {text} (no leakage figures: plan from an audit report to see them)"
    else:
        raise UsageError(f"cannot plan for {source!r}", fix="give an audit report.json, a zoo name or a .keras file")

    dprof, cprof = _profile_dict(device_profile), _profile_dict(cloud_profile)
    dcuts, notes = _profile_cuts(dprof, model, "device")
    ccuts, n2 = _profile_cuts(cprof, model, "cloud")
    notes += n2
    known = {f.name for f in facts}
    unmatched = sorted(set(dcuts) - known)
    if unmatched:
        notes.append(f"device profile cuts {', '.join(unmatched)} are not cuts of {model}: ignored")

    # the whole model on each side
    dev_full, dev_full_src = _full_ms(dprof, dcuts), "device profile (head + tail)"
    cloud_full, cloud_full_src = _full_ms(cprof, ccuts), "cloud profile (head + tail)"
    rep_full = [f.head_ms + f.tail_ms for f in facts if f.head_ms is not None and f.tail_ms is not None]
    total_macs = next((f.head_macs + f.tail_macs for f in facts if f.head_macs is not None and f.tail_macs is not None),
                      None)
    if dev_full is None:
        if rep_full:
            dev_full, dev_full_src = min(rep_full), "audit report (head + tail, measured on the audit machine)"
        elif total_macs is not None:
            dev_full, dev_full_src = total_macs / DEVICE_MACS_PER_S * 1e3, "estimated from MACs"
    if cloud_full is None:
        if rep_full:
            cloud_full, cloud_full_src = min(rep_full), "audit report (head + tail)"
        elif total_macs is not None:
            cloud_full, cloud_full_src = total_macs / CLOUD_MACS_PER_S * 1e3, "estimated from MACs"

    options: list[Option] = []
    mqtt_ms = link.hops * link.hop_ms
    if dev_full is not None:
        options.append(Option("device", "device", None, device_ms=dev_full, cloud_ms=0.0, leakage_db=0.0, dcor=0.0,
                              sources={"device_ms": dev_full_src}))
    if cloud_full is not None and inp.get("bytes"):
        prof_in = (dprof or {}).get("input") or {}
        raw_bytes = float(prof_in.get("frame_bytes") or (inp["bytes"] + _HEADER_GUESS))
        raw_src = "device profile (the image in a frame)" if prof_in.get("frame_bytes") else "uint8 image in a frame"
        files = _file_bytes(data, test_split, data_seed) if data is not None else None
        if files is not None and not prof_in.get("frame_bytes"):
            raw_bytes, raw_src = files[0] + _HEADER_GUESS, files[1]
        res_bytes = _result_bytes(dcuts, ccuts)
        options.append(Option("raw", "raw", raw_bytes, device_ms=0.0, cloud_ms=cloud_full + link.cloud_wait_ms,
                              up_ms=link.up_ms(raw_bytes), rtt_ms=link.rtt_s * 1e3, down_ms=link.down_ms(res_bytes),
                              mqtt_ms=mqtt_ms, leakage_db=math.inf, dcor=1.0, label_bits=inp.get("label_bits"),
                              sources={"cloud_ms": cloud_full_src, "bytes_up": raw_src}))
    for f in facts:
        d, c = dcuts.get(f.name), ccuts.get(f.name)
        src = {}
        head = _median((d or {}).get("head_ms"))
        if head is not None:
            src["device_ms"] = "device profile"
        elif f.head_ms is not None:
            head, src["device_ms"] = float(f.head_ms), "audit report (the audit machine, not the device)"
        elif f.head_macs is not None:
            head, src["device_ms"] = f.head_macs / DEVICE_MACS_PER_S * 1e3, "estimated from MACs"
        else:
            continue
        tail = _median((c or {}).get("tail_ms"))
        if tail is not None:
            src["cloud_ms"] = "cloud profile"
        elif f.tail_ms is not None:
            tail, src["cloud_ms"] = float(f.tail_ms), "audit report"
        else:
            tail, src["cloud_ms"] = (f.tail_macs or 0) / CLOUD_MACS_PER_S * 1e3, "estimated from MACs"
        if d is not None and d.get("frame_bytes_wire") is not None:
            sent, src["bytes_up"] = float(d["frame_bytes_wire"]), "device profile (mean frame on real inputs)"
        elif f.frame_bytes is not None:
            sent, src["bytes_up"] = float(f.frame_bytes), "audit report (mean frame on test images)"
        elif d is not None and d.get("frame_bytes_raw") is not None:
            sent, src["bytes_up"] = float(d["frame_bytes_raw"]), "device profile (frame without compression)"
        elif f.bytes_int8 is not None:
            sent, src["bytes_up"] = float(f.bytes_int8 + _HEADER_GUESS), "int8 tensor + estimated header"
        else:
            continue
        res_bytes = float((d or c or {}).get("result_bytes") or _result_bytes(dcuts, ccuts))
        options.append(Option(f.name, "split", sent, device_ms=head, cloud_ms=tail + link.cloud_wait_ms,
                              up_ms=link.up_ms(sent), rtt_ms=link.rtt_s * 1e3, down_ms=link.down_ms(res_bytes),
                              mqtt_ms=mqtt_ms, leakage_db=f.leakage_db, dcor=f.dcor, label_bits=f.label_bits,
                              accuracy=f.accuracy, sources=src))
    if not options:
        raise UsageError(f"nothing to plan for {model}: no timings and no MACs",
                         fix="give --device-profile (from `edgesplit profile` on the device) or an audit report")
    unknown_ex = sorted(set(exclude) - {o.name for o in options})
    if unknown_ex:
        raise UsageError(f"--exclude {', '.join(unknown_ex)}: no such option",
                         fix=f"options are: {', '.join(o.name for o in options)}")

    for o in options:
        if o.name in exclude:
            o.excluded.append("excluded by --exclude")
        if max_latency_ms is not None and o.latency_ms > max_latency_ms:
            o.excluded.append(f"{o.latency_ms:.1f} ms > --max-latency-ms {max_latency_ms:g}")
        if max_leakage_db is not None and o.kind != "device":
            if o.kind == "raw":
                o.excluded.append("sends the input itself (leakage unbounded) > --max-leakage")
            elif o.leakage_db is None:
                o.excluded.append("leakage unknown (plan from an audit report)")
            elif o.leakage_db > max_leakage_db:
                o.excluded.append(f"leaks {o.leakage_db:.1f} dB > --max-leakage {max_leakage_db:g} dB")
    options.sort(key=lambda o: o.latency_ms)
    for i, o in enumerate(options, 1):
        o.rank = i
    pick, reason = _choose(options, objective, max_leakage_db, max_latency_ms)
    if dprof is None:
        notes.append("no --device-profile: head times are not the device's (run `edgesplit profile --bundle B` "
                      "on the device and pass its file)")
    if any("estimated from MACs" in v for o in options for v in o.sources.values()):
        notes.append(f"some times are estimated from MACs ({DEVICE_MACS_PER_S / 1e9:g} GMAC/s on the device, "
                     f"{CLOUD_MACS_PER_S / 1e9:g} on the cloud): give --device-profile and --cloud-profile for "
                     "measured ones")
    limits = {"max_leakage_db": max_leakage_db, "max_latency_ms": max_latency_ms, "exclude": list(exclude)}
    return PlanResult(model=model, source=src_desc, link=link, options=options, pick=pick, reason=reason,
                      limits=limits, objective=objective, notes=notes)


def _result_bytes(dcuts: dict, ccuts: dict) -> float:
    for e in list(dcuts.values()) + list(ccuts.values()):
        if e.get("result_bytes"):
            return float(e["result_bytes"])
    return 100.0     # a result frame of 10 float32 probabilities is about 100 bytes


def _leak_key(o: Option) -> float:
    if o.kind == "device":
        return -1.0
    return math.inf if o.leakage_db is None else o.leakage_db


def _choose(options: list[Option], objective: str, max_leak, max_lat) -> tuple[Option | None, str]:
    ok = [o for o in options if o.ok]
    if not ok:
        why = "; ".join(f"{o.name}: {', '.join(o.excluded)}" for o in options)
        return None, f"no option meets the limits ({why}). Relax --max-latency-ms or --max-leakage."
    if objective == "latency":
        best = ok[0].latency_ms
        near = [o for o in ok if o.latency_ms <= best * (1 + TIE)]
        pick = min(near, key=lambda o: (_leak_key(o), o.latency_ms))
        how = "the fastest option within your limits"
        if len(near) > 1:
            how += (f" (within {100 * TIE:.0f} % of it: {', '.join(o.name for o in near if o is not pick)}; "
                    "the one that leaks less was taken)")
    else:
        least = min(_leak_key(o) for o in ok)
        near = [o for o in ok if _leak_key(o) <= least + 0.5]
        pick = min(near, key=lambda o: o.latency_ms)
        how = "the option that leaks least within your limits (ties within 0.5 dB: the faster)"
    parts = [f"{pick.name} is {how}: predicted {pick.latency_ms:.1f} ms ({pick.breakdown()})"]
    if pick.kind == "device":
        parts.append("running the whole model on the device sends nothing, so nothing can leak")
    elif pick.kind == "raw":
        parts.append(f"it sends the raw input ({pick.bytes_up:,.0f} B): the cloud sees the image itself")
    else:
        parts.append(f"it sends {pick.bytes_up:,.0f} B per request; leakage {pick.leakage_text()}")
    faster = [o for o in options if o.latency_ms < pick.latency_ms and o is not pick]
    if faster:
        parts.append("faster but not chosen: " + "; ".join(
            f"{o.name} ({o.latency_ms:.1f} ms: {', '.join(o.excluded) if o.excluded else 'leaks more'})"
            for o in faster))
    limits = []
    if max_lat is not None:
        limits.append(f"--max-latency-ms {max_lat:g}")
    if max_leak is not None:
        limits.append(f"--max-leakage {max_leak:g} dB")
    if limits:
        parts.append("limits: " + ", ".join(limits))
    # the first part starts with the option's own name (a layer name keeps its case)
    return pick, ". ".join([parts[0]] + [p[0].upper() + p[1:] for p in parts[1:]]) + "."
