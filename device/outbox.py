"""The device's durable outbox: accepted inputs survive a crash, a reboot, a dead broker.

Every feature tensor the agent accepts is written here (SQLite, WAL) *before*
it is published and removed only when its result arrives.  On start the agent
re-sends what is still pending, as new frames (new sequence number and send
time, same request id: the cloud answers a request id once).

Bounded: at most ``max_entries`` tensors and ``max_bytes`` of tensor data.
When full, the policy decides:

* ``drop-oldest`` (default): the oldest pending inputs are dropped, with a
  warning, to make room: a device in the field values fresh inputs most;
* ``reject``: the new input is refused (:class:`OutboxFull`) and reported as
  failed; nothing already accepted is ever lost.

Durability: ``synchronous=NORMAL`` (default) survives a killed process and a
clean reboot; ``durability="full"`` also survives a power cut, at one fsync per
batch.  Writes are batched (one transaction per head batch / per drain) so the
cost is per batch, not per frame.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import sqlite3
import threading
import time
from pathlib import Path
from typing import Iterable

import numpy as np

from protocol.errors import EdgesplitError, UsageError

log = logging.getLogger(__name__)

POLICIES = ("drop-oldest", "reject")
SCHEMA = 1
_U63 = 1 << 63


class OutboxFull(EdgesplitError):
    """The outbox is full and its policy is ``reject``."""

    exit_code = 1


@dataclasses.dataclass(frozen=True)
class OutboxEntry:
    """One accepted input: what is needed to publish its frame again."""

    request_id: int
    name: str
    bundle_id: str
    tensor: np.ndarray
    scale: float | None
    zero_point: int | None
    created_us: int


def _to_sql_id(rid: int) -> int:
    # SQLite integers are signed 64-bit; request ids are uint64.
    return rid - (1 << 64) if rid >= _U63 else rid


def _from_sql_id(v: int) -> int:
    return v + (1 << 64) if v < 0 else v


class SqliteOutbox:
    """A bounded SQLite outbox for one device (see the module docstring)."""

    durable = True

    def __init__(self, path: str | os.PathLike, *, device_id: str, max_entries: int = 10_000,
                 max_bytes: int = 64 << 20, policy: str = "drop-oldest", durability: str = "normal"):
        if policy not in POLICIES:
            raise UsageError(f"unknown outbox policy {policy!r}", fix=f"use one of {', '.join(POLICIES)}")
        if durability not in ("normal", "full"):
            raise UsageError(f"unknown outbox durability {durability!r}", fix="use 'normal' or 'full'")
        if max_entries < 1 or max_bytes < 1:
            raise UsageError("the outbox needs max_entries >= 1 and max_bytes >= 1")
        self.path = Path(path)
        self.device_id = device_id
        self.max_entries, self.max_bytes, self.policy = int(max_entries), int(max_bytes), policy
        self.dropped = 0            # inputs dropped because the outbox was full
        self._full_warned = False
        self._lock = threading.Lock()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(str(self.path), check_same_thread=False, isolation_level=None)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute(f"PRAGMA synchronous={'FULL' if durability == 'full' else 'NORMAL'}")
            self._db.execute("PRAGMA busy_timeout=5000")
            self._init_schema()
        except sqlite3.DatabaseError as exc:
            raise UsageError(f"cannot open the outbox {self.path}: {exc}",
                             fix="check the path is writable; delete the file if it is corrupt "
                                 "(pending inputs in it are then lost)") from None
        self._count, self._bytes = self._db.execute(
            "SELECT COUNT(*), COALESCE(SUM(LENGTH(tensor)), 0) FROM outbox").fetchone()
        log.info("outbox %s: %d pending input(s) (%s, max %d entries / %d MiB)", self.path, self._count,
                 policy, self.max_entries, self.max_bytes >> 20)

    def _init_schema(self) -> None:
        db = self._db
        db.execute("CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
        db.execute("""CREATE TABLE IF NOT EXISTS outbox (
                          pos INTEGER PRIMARY KEY AUTOINCREMENT,
                          request_id INTEGER NOT NULL UNIQUE,
                          name TEXT NOT NULL,
                          bundle_id TEXT NOT NULL,
                          dtype TEXT NOT NULL,
                          shape TEXT NOT NULL,
                          scale REAL,
                          zero_point INTEGER,
                          created_us INTEGER NOT NULL,
                          tensor BLOB NOT NULL)""")
        row = dict(db.execute("SELECT key, value FROM meta").fetchall())
        if not row:
            db.executemany("INSERT INTO meta VALUES (?, ?)", [("schema", str(SCHEMA)), ("device_id", self.device_id)])
            return
        if row.get("schema") != str(SCHEMA):
            raise UsageError(f"outbox {self.path} has schema {row.get('schema')}, this edgesplit writes {SCHEMA}",
                             fix="move the file away (its pending inputs are then not re-sent)")
        if row.get("device_id") != self.device_id:
            raise UsageError(f"outbox {self.path} belongs to device {row.get('device_id')!r}, "
                             f"not {self.device_id!r}",
                             fix="give every device id its own --outbox file")

    # ------------------------------------------------------------- state
    def __len__(self) -> int:
        return self._count

    @property
    def nbytes(self) -> int:
        return self._bytes

    def pending(self) -> list[OutboxEntry]:
        """Every pending entry, oldest first."""
        with self._lock:
            rows = self._db.execute("SELECT request_id, name, bundle_id, dtype, shape, scale, zero_point, "
                                    "created_us, tensor FROM outbox ORDER BY pos").fetchall()
        out = []
        for rid, name, bid, dtype, shape, scale, zp, created, blob in rows:
            tensor = np.frombuffer(blob, dtype=np.dtype(dtype)).reshape(json.loads(shape))
            out.append(OutboxEntry(_from_sql_id(rid), name, bid, tensor, scale, zp, created))
        return out

    # ------------------------------------------------------------- changes
    def add(self, entries: Iterable[OutboxEntry]) -> list[int]:
        """Store entries (one transaction).  Returns the request ids dropped to make room.

        Raises :class:`OutboxFull` (storing none of them) when full under the ``reject`` policy.
        """
        entries = list(entries)
        if not entries:
            return []
        rows = [(_to_sql_id(e.request_id), e.name, e.bundle_id, e.tensor.dtype.name, json.dumps(list(e.tensor.shape)),
                 e.scale, e.zero_point, e.created_us, np.ascontiguousarray(e.tensor).tobytes()) for e in entries]
        new_bytes = sum(len(r[-1]) for r in rows)
        dropped: list[int] = []
        with self._lock:
            over_n = self._count + len(rows) - self.max_entries
            over_b = self._bytes + new_bytes - self.max_bytes
            if over_n > 0 or over_b > 0:
                if self.policy == "reject" or len(rows) > self.max_entries or new_bytes > self.max_bytes:
                    self._warn_full()
                    raise OutboxFull(f"the outbox {self.path} is full ({self._count} inputs, "
                                     f"{self._bytes} bytes); refusing {len(rows)} new input(s)",
                                     fix="start the cloud worker / check the broker so pending inputs get "
                                         "answered, or raise --outbox-max")
                dropped = self._evict(max(over_n, 0), max(over_b, 0))
            self._db.execute("BEGIN")
            try:
                self._db.executemany("INSERT INTO outbox (request_id, name, bundle_id, dtype, shape, "
                                     "scale, zero_point, created_us, tensor) VALUES (?,?,?,?,?,?,?,?,?)", rows)
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._count += len(rows)
            self._bytes += new_bytes
        return dropped

    def _evict(self, n: int, nbytes: int) -> list[int]:
        # oldest first until both bounds hold again
        self._warn_full()
        ids: list[int] = []
        freed_n = freed_b = 0
        for rid, size in self._db.execute("SELECT request_id, LENGTH(tensor) FROM outbox ORDER BY pos"):
            if freed_n >= n and freed_b >= nbytes:
                break
            ids.append(rid)
            freed_n += 1
            freed_b += size
        self._db.execute("BEGIN")
        self._db.executemany("DELETE FROM outbox WHERE request_id = ?", [(i,) for i in ids])
        self._db.execute("COMMIT")
        self._count -= freed_n
        self._bytes -= freed_b
        self.dropped += len(ids)
        return [_from_sql_id(i) for i in ids]

    def _warn_full(self) -> None:
        if not self._full_warned:
            self._full_warned = True
            log.warning("outbox %s is full (%d inputs, %.1f MiB): policy %s — %s", self.path, self._count,
                        self._bytes / 2**20, self.policy,
                        "dropping the oldest pending inputs" if self.policy == "drop-oldest"
                        else "refusing new inputs")

    def remove(self, request_ids: Iterable[int]) -> int:
        """Forget answered requests (one transaction); returns how many were pending."""
        ids = [(_to_sql_id(int(r)),) for r in request_ids]
        if not ids:
            return 0
        with self._lock:
            before = self._db.total_changes
            self._db.execute("BEGIN")
            try:
                # sizes first, so the byte count stays exact
                freed = 0
                for (i,) in ids:
                    row = self._db.execute("SELECT LENGTH(tensor) FROM outbox WHERE request_id = ?", (i,)).fetchone()
                    if row is not None:
                        freed += row[0]
                self._db.executemany("DELETE FROM outbox WHERE request_id = ?", ids)
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            n = self._db.total_changes - before
            self._count -= n
            self._bytes -= freed
            if self._count < self.max_entries and self._full_warned:
                self._full_warned = False
            return n

    def close(self) -> None:
        with self._lock:
            try:
                self._db.close()
            except sqlite3.Error:
                pass

    def __enter__(self) -> "SqliteOutbox":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def now_us() -> int:
    return time.time_ns() // 1000
