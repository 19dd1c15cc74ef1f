"""Micro-batching: run the tail once for frames that arrive together.

Items are put from the MQTT network thread; one processing thread takes the
first waiting item, takes every item already queued behind it (up to
``max_batch``), optionally keeps collecting until ``max_wait_s`` has passed
since that first item, and hands the batch to ``process``.  The default wait is
0: an idle worker answers a lone frame at once, and under load the frames that
arrive while one batch runs make up the next, so batches grow with the load
without adding latency when there is none.
"""
from __future__ import annotations

import logging
import queue
import threading
import time
from typing import Any, Callable

log = logging.getLogger(__name__)

_STOP = object()


class MicroBatcher:
    """``put(item)`` from any thread; ``process(list_of_items)`` runs on the batcher's own thread."""

    def __init__(self, process: Callable[[list[Any]], None], *, max_batch: int = 32, max_wait_s: float = 0.0,
                 name: str = "batcher"):
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        if not 0 <= max_wait_s <= 1:
            raise ValueError(f"max_wait_s must be within [0, 1] s, got {max_wait_s}")
        self.max_batch = max_batch
        self.max_wait_s = max_wait_s
        self._process = process
        self._q: queue.SimpleQueue = queue.SimpleQueue()
        self._closed = False
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._thread.start()

    def put(self, item: Any) -> bool:
        """Queue an item; False (not queued) once the batcher is closed."""
        with self._lock:
            if self._closed:
                return False
            self._q.put(item)
            return True

    @property
    def pending(self) -> int:
        """Items queued and not yet taken into a batch (approximate)."""
        return self._q.qsize()

    def close(self, timeout: float | None = None) -> bool:
        """Stop taking items, process every queued one, stop the thread.  True if it finished in time."""
        with self._lock:
            if not self._closed:
                self._closed = True
                self._q.put(_STOP)
        self._thread.join(timeout)
        return not self._thread.is_alive()

    def _loop(self) -> None:
        stop = False
        while not stop:
            first = self._q.get()
            if first is _STOP:
                break
            batch = [first]
            deadline = time.monotonic() + self.max_wait_s
            while len(batch) < self.max_batch:
                try:
                    item = self._q.get_nowait()
                except queue.Empty:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        break
                    try:
                        item = self._q.get(timeout=left)
                    except queue.Empty:
                        break
                if item is _STOP:
                    stop = True
                    break
                batch.append(item)
            try:
                self._process(batch)
            except Exception:  # the processor is supposed to handle its own errors; never die here
                log.exception("batch of %d failed", len(batch))
