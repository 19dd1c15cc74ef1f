"""Where a worker's feature frames come from: the MQTT shared subscription, or a NATS JetStream queue.

``open_source(url, client=..., group=..., fleet=...)`` (``cloud.sources.pick``) picks by the URL's scheme:

* ``mqtt://`` / ``mqtts://`` (or none: the worker's own broker) — :class:`MqttSource`, the shared
  subscription ``$share/<group>/edgesplit/v1/<fleet>/+/features``: the broker spreads the frames
  over the workers; a frame is the worker's once paho has it (MQTT acknowledges on receipt).
* ``nats://host:port[,host:port...]`` / ``tls://...`` — :class:`NatsSource`, a JetStream
  work-queue stream over the features subjects, replicated over the cluster, and one durable pull
  consumer per group shared by every worker: a frame is acknowledged only once its answer (or
  dead letter) is published and the MQTT broker has acknowledged that, so a worker that dies
  holding frames has them redelivered to another after the ack wait (at-least-once; the worker's
  ``cloud.dedupe`` and the device's answered ids make the answer exactly-once at the device).

Answers always go back over MQTT QoS 1 (the worker's ``--broker``): a NATS-native publish reaches
MQTT subscribers at QoS 0 only.

Every source has the same small surface, called by :class:`cloud.worker.Worker`::

    source.start(deliver, wait)       # deliver(topic, payload, token) -> False when the worker is draining
    source.settle(tokens, deliveries) # a batch is answered: acknowledge its frames once deliveries are acked
    source.refuse(token)              # a frame arrived while draining: give it back
    source.stop_intake(timeout)       # no new frames (unsubscribe / stop pulling)
    source.close(timeout)             # final acknowledgements, disconnect
    source.counters()                 # {"redelivered": ..., ...} for WorkerStats
    source.state_line()               # a line for the stats log (the stream's fill), or ""
    source.ready                      # frames can come (subscribed / joined the consumer)
"""
from __future__ import annotations

from protocol.public import public_names

__all__, __getattr__, __dir__ = public_names(__name__, {
    "MqttSource": "cloud.sources.mqtt",
    "NatsSource": "cloud.sources.nats",
    "open_source": "cloud.sources.pick",
    "is_nats_url": "cloud.sources.pick",
})
