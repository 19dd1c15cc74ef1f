"""The device agent's Prometheus metrics, read from the agent when Prometheus scrapes (nothing on its hot path).

==========================================  =========  ==============================================
``edgesplit_device_requests_total``          counter    inputs that became a request
``edgesplit_device_results_total``           counter    ``outcome``: answered, error, timeout
``edgesplit_device_latency_seconds``         histogram  head start to answer, answered requests
``edgesplit_device_frames_sent_total``       counter    feature frames published (resends too)
``edgesplit_device_sent_bytes_total``        counter    their payload bytes
``edgesplit_device_resends_total``           counter
``edgesplit_device_reconnects_total``        counter    connections to the broker after the first
``edgesplit_device_dead_letters_total``      counter    its own frames the cloud refused
``edgesplit_device_outbox_depth``            gauge      inputs kept in the outbox for a resend
``edgesplit_device_in_flight``               gauge      requests sent, not yet answered
``edgesplit_device_bundle_info``             gauge      1, ``bundle``: the active bundle id
``edgesplit_device_update_state``            gauge      1 for the ``state`` of the last update
==========================================  =========  ==============================================

Every series carries ``device`` (the device id).  ``serve(agent, host, port)`` starts the page.
"""
from __future__ import annotations

import bisect

from protocol.metrics import LATENCY_BUCKETS, MetricsServer, new_registry
from protocol.report import STATES

__all__ = ["DeviceMetrics", "serve"]


class DeviceMetrics:
    """A prometheus-client collector over one :class:`~device.agent.DeviceAgent`."""

    def __init__(self, agent):
        self.agent = agent
        self._seen = 0                                   # latencies already put in buckets
        self._buckets = [0] * (len(LATENCY_BUCKETS) + 1)
        self._sum = 0.0

    def _latency(self):
        lat = self.agent.stats.latencies_ms
        new = lat[self._seen:]
        self._seen += len(new)
        for ms in new:
            s = ms / 1000.0
            self._buckets[bisect.bisect_left(LATENCY_BUCKETS, s)] += 1
            self._sum += s
        cum, out = 0, []
        for bound, n in zip((*LATENCY_BUCKETS, float("inf")), self._buckets):
            cum += n
            out.append(("+Inf" if bound == float("inf") else repr(bound), cum))
        return out, self._sum

    def collect(self):
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

        a = self.agent
        st = a.stats
        dev = [a.device_id]

        def counter(name, doc, value):
            m = CounterMetricFamily(f"edgesplit_device_{name}", doc, labels=["device"])
            m.add_metric(dev, value)
            return m

        def gauge(name, doc, value, **labels):
            m = GaugeMetricFamily(f"edgesplit_device_{name}", doc, labels=["device", *labels])
            m.add_metric(dev + list(labels.values()), value)
            return m

        yield counter("requests", "Inputs that became a request.", st.requests)
        results = CounterMetricFamily("edgesplit_device_results", "Requests settled, by outcome.",
                                      labels=["device", "outcome"])
        results.add_metric(dev + ["answered"], st.answered - st.worker_errors)
        results.add_metric(dev + ["error"], st.worker_errors)
        results.add_metric(dev + ["timeout"], st.timeouts)
        yield results
        buckets, total = self._latency()
        h = HistogramMetricFamily("edgesplit_device_latency_seconds", "Head start to answer of answered requests.",
                                  labels=["device"])
        h.add_metric(dev, buckets, total)
        yield h
        yield counter("frames_sent", "Feature frames published, resends included.", st.frames_sent)
        yield counter("sent_bytes", "Payload bytes of the feature frames published.", st.bytes_sent)
        yield counter("resends", "Feature frames published again for an unanswered request.", st.resends)
        yield counter("reconnects", "Connections to the broker after the first.", max(0, a.client.connects - 1))
        yield counter("dead_letters", "This device's frames the cloud refused.", a.updater.dead_letters)
        yield gauge("outbox_depth", "Inputs kept in the outbox for a resend.",
                    len(a.outbox) if a.outbox is not None else 0)
        yield gauge("in_flight", "Requests sent and not yet answered.", a.in_flight)
        yield gauge("bundle_info", "The bundle the device runs (always 1).", 1, bundle=a.bundle.bundle_id)
        state = a.updater.state
        m = GaugeMetricFamily("edgesplit_device_update_state", "The state of the last update (1 for the one "
                              "that holds).", labels=["device", "state"])
        for s in STATES:
            m.add_metric(dev + [s], 1 if s == state else 0)
        yield m


def serve(agent, host: str = "127.0.0.1", port: int = 0) -> MetricsServer:
    """Serve ``agent``'s metrics on ``host:port`` (port 0: nothing); ``.close()`` stops it."""
    if not port:
        return MetricsServer(None, host, 0)
    registry = new_registry()
    registry.register(DeviceMetrics(agent))
    return MetricsServer(registry, host, port)
