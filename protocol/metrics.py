"""Prometheus metrics over HTTP: the one server the device agent and the cloud worker use.

Opt-in (a port of 0 serves nothing) and bound to loopback unless an address is given: a
metrics page says how busy a device is and which bundle it runs, which is nobody's business
on the network by default.  The metrics themselves (``device.metrics``, ``cloud.metrics``) follow
Prometheus' naming: ``edgesplit_<role>_..._total`` counters, ``_seconds`` histograms, few labels,
each with a bounded set of values (an outcome, a rejection reason, a bundle id; never a
request id).  The ``prometheus-client`` library is imported only when a port is asked for.
"""
from __future__ import annotations

import logging

from protocol.errors import UsageError

log = logging.getLogger(__name__)

__all__ = ["MetricsServer", "LATENCY_BUCKETS"]

#: seconds, from a loopback round trip to a slow mobile link
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


def _client():
    try:
        import prometheus_client
    except ImportError:
        raise UsageError("serving metrics needs the 'prometheus-client' package",
                         fix="pip install prometheus-client (or leave the metrics port at 0)") from None
    return prometheus_client


class MetricsServer:
    """``/metrics`` of ``registry`` on ``host:port`` (port 0 given: nothing is served)."""

    def __init__(self, registry, host: str = "127.0.0.1", port: int = 0):
        self.host, self.port = host, int(port)
        self._httpd = None
        if self.port:
            prometheus_client = _client()
            try:
                self._httpd, _ = prometheus_client.start_http_server(self.port, addr=host, registry=registry)
            except OSError as exc:
                raise UsageError(f"cannot serve metrics on {host}:{self.port}: {exc.strerror or exc}",
                                 fix="pick a free port (or 0 for none)") from None
            log.info("metrics on http://%s:%d/metrics", host, self.port)

    @property
    def url(self) -> str | None:
        return f"http://{self.host}:{self.port}/metrics" if self._httpd is not None else None

    def close(self) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None


def new_registry():
    """A registry of our own (not the library's global one, which holds the process' own metrics)."""
    return _client().CollectorRegistry(auto_describe=True)
