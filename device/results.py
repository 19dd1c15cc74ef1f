"""What the device reports: one :class:`DeviceResult` per input, and an agent's :class:`AgentStats`."""
from __future__ import annotations

import dataclasses
import json

import numpy as np

from protocol.stats import percentiles

__all__ = ["DeviceResult", "AgentStats"]


@dataclasses.dataclass
class DeviceResult:
    """What came back for one input (or why nothing did)."""

    input: str                       # file path, array id, camera frame name
    request_id: int
    label: str | None = None         # the manifest's label name of the top class
    index: int | None = None         # the top class index
    probability: float | None = None
    latency_ms: float | None = None  # head start -> result received, on the device's clock
    head_ms: float | None = None     # this input's share of the head's batch time
    cloud_ms: float | None = None    # the worker's receive -> done time (its clock)
    attempts: int = 1                # frames published for this request
    error: str | None = None         # "timeout", the worker's error, or why the input failed
    recovered: bool = False          # re-sent from the outbox after a restart
    bundle_id: str = ""              # the bundle whose head and tail answered
    probabilities: np.ndarray | None = dataclasses.field(default=None, repr=False)

    @property
    def ok(self) -> bool:
        return self.error is None

    def to_dict(self) -> dict:
        d = {"input": self.input, "request_id": self.request_id, "label": self.label, "index": self.index,
             "probability": None if self.probability is None else round(self.probability, 6),
             "latency_ms": None if self.latency_ms is None else round(self.latency_ms, 3),
             "head_ms": None if self.head_ms is None else round(self.head_ms, 3),
             "cloud_ms": None if self.cloud_ms is None else round(self.cloud_ms, 3),
             "attempts": self.attempts}
        if self.error is not None:
            d["error"] = self.error
        if self.recovered:
            d["recovered"] = True
        if self.bundle_id:
            d["bundle_id"] = self.bundle_id
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), ensure_ascii=False)

    @classmethod
    def of_frame(cls, frame, name: str, manifest, *, latency_ms: float, head_ms: float, attempts: int,
                 recovered: bool) -> "DeviceResult":
        """What a (decoded, matched) result frame says about input ``name``, in the manifest's words."""
        cloud_ms = (frame.t_done_us - frame.t_recv_us) / 1000 if frame.t_done_us and frame.t_recv_us else None
        common = dict(latency_ms=latency_ms, head_ms=head_ms, cloud_ms=cloud_ms, attempts=attempts,
                      recovered=recovered, bundle_id=frame.bundle_id)
        if not frame.ok:
            return cls(name, frame.request_id, error=f"worker: {frame.error}", **common)
        probs = np.asarray(frame.dequantized() if frame.scale is not None else frame.tensor,
                           dtype=np.float32).reshape(-1)
        index = int(frame.label)
        labels = manifest.labels
        label = labels[index] if index < len(labels) else str(index)
        prob = float(probs[index]) if index < probs.size else None
        if manifest.output.kind == "logits" and probs.size:
            e = np.exp(probs - probs.max())
            prob = float(e[index] / e.sum())
        return cls(name, frame.request_id, label=label, index=index, probability=prob, probabilities=probs,
                   **common)


@dataclasses.dataclass
class AgentStats:
    """Counters and latencies of one agent (``summary()`` for people, ``to_dict()`` for tools)."""

    device_id: str = ""
    bundle_id: str = ""
    interpreter: str = ""
    requests: int = 0          # inputs that became a request
    answered: int = 0          # results received and matched (errors from the worker included)
    worker_errors: int = 0     # results that carry an error
    timeouts: int = 0
    failed_inputs: int = 0     # unreadable images, outbox refusals
    frames_sent: int = 0       # frames published, resends included
    resends: int = 0
    duplicates: int = 0        # results for requests already answered (ignored)
    unmatched: int = 0         # results for request ids this agent never sent
    bad_frames: int = 0        # results that failed to decode
    unauthenticated: int = 0   # results without a valid MAC while this device holds a key (dropped)
    bytes_sent: int = 0        # feature frame payload bytes, resends included
    recovered: int = 0         # requests re-sent from the outbox at start
    abandoned: int = 0         # still unanswered when a stop was requested (kept in the outbox, if any)
    stopped_early: bool = False  # a stop (SIGTERM, request_stop) ended the run before all inputs were sent
    dropped: int = 0           # requests the outbox dropped when full
    connects: int = 0
    seconds: float = 0.0
    latencies_ms: list = dataclasses.field(default_factory=list, repr=False)
    head_ms: list = dataclasses.field(default_factory=list, repr=False)

    @property
    def ok(self) -> bool:
        """True when every request was answered without an error and every input could be read."""
        return (self.timeouts == 0 and self.worker_errors == 0 and self.failed_inputs == 0 and self.dropped == 0
                and self.abandoned == 0)

    def percentiles(self) -> dict:
        return percentiles(self.latencies_ms)

    def to_dict(self) -> dict:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
             if f.name not in ("latencies_ms", "head_ms")}
        d["latency_ms"] = self.percentiles()
        d["head_ms_mean"] = float(np.mean(self.head_ms)) if self.head_ms else None
        d["throughput_per_s"] = self.answered / self.seconds if self.seconds > 0 else None
        d["bytes_per_frame"] = self.bytes_sent / self.frames_sent if self.frames_sent else None
        d["ok"] = self.ok
        return d

    def summary(self) -> str:
        p = self.percentiles()
        lines = [f"device {self.device_id}: {self.answered}/{self.requests} answered in {self.seconds:.2f} s"
                 + (f" ({self.answered / self.seconds:.1f}/s)" if self.seconds > 0 else "")
                 + f", interpreter {self.interpreter}, bundle {self.bundle_id}"]
        if p:
            lines.append(f"  latency ms: p50 {p['p50']:.1f}  p95 {p['p95']:.1f}  p99 {p['p99']:.1f}  "
                         f"max {p['max']:.1f}; head {np.mean(self.head_ms):.2f} ms/input")
        if self.frames_sent:
            lines.append(f"  frames sent {self.frames_sent} ({self.bytes_sent / self.frames_sent:.0f} B each), "
                         f"resends {self.resends}")
        problems = {k: getattr(self, k) for k in ("timeouts", "worker_errors", "failed_inputs", "duplicates",
                                                  "unmatched", "bad_frames", "unauthenticated", "recovered", "dropped",
                                                  "abandoned")
                    if getattr(self, k)}
        if problems:
            lines.append("  " + ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in problems.items()))
        return "\n".join(lines)
