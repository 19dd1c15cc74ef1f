"""Which source a worker takes its frames from: by the URL's scheme (see the package's docstring)."""
from __future__ import annotations


def is_nats_url(url: str | None) -> bool:
    return isinstance(url, str) and url.split("://", 1)[0].lower() in ("nats", "tls")


def open_source(url: str | None, *, client, group: str, fleet: str, max_batch: int = 32, name: str = "worker",
                on_fatal=None):
    """The source for ``url`` (None: the shared subscription on ``client``'s broker)."""
    if is_nats_url(url):
        from cloud.sources.nats import NatsSource      # nats-py loads only when a NATS source is used

        return NatsSource(url, group=group, fleet=fleet, max_batch=max_batch, name=name, on_fatal=on_fatal)
    from cloud.sources.mqtt import MqttSource

    return MqttSource(client, group=group, fleet=fleet)
