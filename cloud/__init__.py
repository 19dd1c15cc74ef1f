"""The cloud role: receive feature frames, batch them, run the tail, answer, dead-letter bad input.

Public names (each imported on first use; everything else is private to its module)::

    Registry, Served          cloud.registry  bundles by id, each with its tail
    MicroBatcher              cloud.batcher   run the tail once for frames that arrive together
    DedupeWindow, Verdict     cloud.dedupe    recognise re-sent requests: answer each request once
    Worker, WorkerStats       cloud.worker    one worker (frames from cloud.sources: MQTT shared
                                              subscription or NATS JetStream) and its counters
    run_worker, serve, CloudRun               one worker until SIGTERM / N worker processes (`edgesplit cloud`)
    load_keys                 cloud.worker    per-device frame keys for --keys
"""
from __future__ import annotations

from protocol.public import public_names

__all__, __getattr__, __dir__ = public_names(__name__, {
    "Registry": "cloud.registry",
    "Served": "cloud.registry",
    "MicroBatcher": "cloud.batcher",
    "DedupeWindow": "cloud.dedupe",
    "Verdict": "cloud.dedupe",
    "Worker": "cloud.worker",
    "WorkerStats": "cloud.worker",
    "CloudRun": "cloud.worker",
    "run_worker": "cloud.worker",
    "serve": "cloud.worker",
    "load_keys": "cloud.worker",
})
