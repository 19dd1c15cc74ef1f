"""The MQTT shared subscription as a worker's source (the single-broker way)."""
from __future__ import annotations

import logging

from protocol import topics

log = logging.getLogger(__name__)


class MqttSource:
    """``$share/<group>/edgesplit/v1/<fleet>/+/features`` on the worker's own MQTT client.

    paho acknowledges a QoS 1 frame when it arrives, so there is nothing to settle: a frame a
    worker took and lost (killed) is re-sent by its device after ``resend_after``.
    """

    kind = "mqtt"

    def __init__(self, client, *, group: str, fleet: str):
        self.client = client
        self.filter = topics.shared_features(group, fleet)
        self._deliver = None
        # subscribed now, so the client's first CONNACK subscribes (and every reconnect again)
        self.client.subscribe(self.filter, self._on_message, qos=1)

    @property
    def name(self) -> str:
        return self.filter

    def _on_message(self, topic: str, payload: bytes) -> None:
        if self._deliver is not None:
            self._deliver(topic, payload, None)

    def start(self, deliver, wait: float | None = None) -> bool:
        self._deliver = deliver
        return True                      # the worker's client.start() connects and subscribes

    def settle(self, tokens, deliveries) -> None:
        pass

    def refuse(self, token) -> None:
        pass

    def stop_intake(self, timeout: float = 5.0) -> None:
        if self.client.connected:
            self.client.unsubscribe(self.filter, timeout=timeout)

    def close(self, timeout: float = 5.0) -> None:
        pass

    def counters(self) -> dict:
        return {}

    def state_line(self) -> str:
        return ""

    @property
    def ready(self) -> bool:
        return self.client.connected
