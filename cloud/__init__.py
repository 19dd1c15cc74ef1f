"""The cloud role: receive feature frames, batch them, run the tail, answer, dead-letter bad input.

Public names (everything else is private to its module)::

    Registry, Served          cloud.registry  bundles by id, each with its tail
    MicroBatcher              cloud.batcher   run the tail once for frames that arrive together
    DedupeWindow, Verdict     cloud.dedupe    recognise re-sent requests: answer each request once
    Worker, WorkerStats       cloud.worker    one shared-subscription worker and its counters
    run_worker, serve, CloudRun               one worker until SIGTERM / N worker processes (`edgesplit cloud`)
    load_keys                 cloud.worker    per-device frame keys for --keys
"""
from cloud.batcher import MicroBatcher
from cloud.dedupe import DedupeWindow, Verdict
from cloud.registry import Registry, Served
from cloud.worker import CloudRun, Worker, WorkerStats, load_keys, run_worker, serve

__all__ = ["Registry", "Served", "MicroBatcher", "DedupeWindow", "Verdict", "Worker", "WorkerStats", "CloudRun",
           "run_worker", "serve", "load_keys"]
