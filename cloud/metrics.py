"""A cloud worker's Prometheus metrics: its counters read when Prometheus scrapes, two histograms observed per batch.

==============================================  =========  ==========================================
``edgesplit_worker_frames_received_total``      counter    frames taken from the source
``edgesplit_worker_frames_total``               counter    ``outcome``: answered, error, dead-lettered,
                                                           duplicate, refused (each frame lands in one)
``edgesplit_worker_rejected_total``             counter    ``reason``: the dead letters by rejection
                                                           reason (``protocol.errors.Reason``, closed)
``edgesplit_worker_batch_size``                 histogram  frames per tail run
``edgesplit_worker_tail_seconds``               histogram  seconds per tail run
``edgesplit_worker_in_flight``                  gauge      frames received, not yet settled
``edgesplit_worker_bundles_loaded``             gauge      tails in memory
``edgesplit_worker_bundle_loaded``              gauge      1 per ``bundle`` served
==============================================  =========  ==========================================

Every series carries ``worker`` (the worker's name).  With ``edgesplit cloud --workers N
--metrics-port P`` worker ``i`` serves on port ``P + i``.
"""
from __future__ import annotations

import threading

from protocol.errors import Reason
from protocol.metrics import MetricsServer, new_registry

__all__ = ["WorkerMetrics", "serve"]

BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
TAIL_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0)


class _Histogram:
    """Cumulative buckets, a sum and a count (the batch thread observes, a scrape reads)."""

    def __init__(self, bounds):
        self.bounds = tuple(bounds)
        self.counts = [0] * (len(self.bounds) + 1)
        self.sum = 0.0
        self._lock = threading.Lock()

    def observe(self, v: float) -> None:
        i = next((k for k, b in enumerate(self.bounds) if v <= b), len(self.bounds))
        with self._lock:
            self.counts[i] += 1
            self.sum += v

    def buckets(self):
        with self._lock:
            counts, total = list(self.counts), self.sum
        out, cum = [], 0
        for b, n in zip((*self.bounds, None), counts):
            cum += n
            out.append(("+Inf" if b is None else repr(float(b)), cum))
        return out, total


class WorkerMetrics:
    """A prometheus-client collector over one :class:`~cloud.worker.Worker`, and its HTTP page."""

    def __init__(self, worker):
        self.worker = worker
        self.batch_size = _Histogram(BATCH_BUCKETS)
        self.tail_seconds = _Histogram(TAIL_BUCKETS)
        self.server: MetricsServer | None = None

    def batch(self, frames: int, seconds: float) -> None:
        self.batch_size.observe(frames)
        self.tail_seconds.observe(seconds)

    def close(self) -> None:
        if self.server is not None:
            self.server.close()

    def collect(self):
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

        w = self.worker
        st = w.stats
        me = [w.name]
        m = CounterMetricFamily("edgesplit_worker_frames_received", "Frames taken from the source.",
                                labels=["worker"])
        m.add_metric(me, st.received)
        yield m
        m = CounterMetricFamily("edgesplit_worker_frames", "Frames settled, by outcome (each frame lands in one).",
                                labels=["worker", "outcome"])
        for outcome, v in (("answered", st.answered), ("error", st.errors), ("dead-lettered", st.dead_lettered),
                           ("duplicate", st.duplicates), ("refused", st.refused)):
            m.add_metric(me + [outcome], v)
        yield m
        m = CounterMetricFamily("edgesplit_worker_rejected", "Dead-lettered frames by rejection reason.",
                                labels=["worker", "reason"])
        for r in Reason:
            m.add_metric(me + [r.value], st.reasons.get(r.value, 0))
        yield m
        for name, doc, h in (("edgesplit_worker_batch_size", "Frames per tail run.", self.batch_size),
                             ("edgesplit_worker_tail_seconds", "Seconds per tail run.", self.tail_seconds)):
            buckets, total = h.buckets()
            m = HistogramMetricFamily(name, doc, labels=["worker"])
            m.add_metric(me, buckets, total)
            yield m
        g = GaugeMetricFamily("edgesplit_worker_in_flight", "Frames received and not yet settled.", labels=["worker"])
        g.add_metric(me, max(0, st.received - st.settled))
        yield g
        ids = w.registry.ids
        g = GaugeMetricFamily("edgesplit_worker_bundles_loaded", "Tails in memory.", labels=["worker"])
        g.add_metric(me, len(ids))
        yield g
        g = GaugeMetricFamily("edgesplit_worker_bundle_loaded", "1 for each bundle served.",
                              labels=["worker", "bundle"])
        for bid in ids:
            g.add_metric(me + [bid], 1)
        yield g


def serve(worker, host: str = "127.0.0.1", port: int = 0) -> WorkerMetrics:
    """The worker's metrics, served on ``host:port`` (port 0: only collected)."""
    metrics = WorkerMetrics(worker)
    if port:
        registry = new_registry()
        registry.register(metrics)
        metrics.server = MetricsServer(registry, host, port)
    return metrics
