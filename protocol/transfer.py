"""A bundle's ``.tar.gz`` in transit: published as retained chunks, fetched resumably, checked chunk by chunk.

The operator publishes chunk ``n`` of a bundle retained (QoS 1) on
``edgesplit/v1/<fleet>/bundle/<bundle-id>/<n>`` (``protocol.topics.chunk``); the payload is
the chunk's bytes, its sha256 is in the signed announcement (``protocol.announce.BundleRef``).
A receiver subscribes to the topics of a few chunks it still lacks at a time (the broker hands
it their retained messages), writes each into ``<id>.part`` at its offset, and subscribes to the
next ones.  Nothing else is kept: after a restart or a reconnect, :class:`PartFile` re-hashes
what the ``.part`` holds and only the missing chunks are asked for again.  A chunk that does
not match its sha256 refuses the bundle (``bad-chunk``); chunks that stop coming for
``stall_s`` seconds while connected refuse it as ``truncated``.  With a URL in the
announcement the same file is filled over HTTP(S) (a Range request resumes it) or ``file://``.
"""
from __future__ import annotations

import hashlib
import logging
import os
import queue
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Callable

from protocol import topics
from protocol.announce import BundleRef
from protocol.errors import UpdateError, UpdateReason

log = logging.getLogger(__name__)

__all__ = ["PartFile", "publish_chunks", "clear_chunks", "fetch", "fetch_mqtt", "fetch_url"]

DEFAULT_WINDOW = 8           # chunk topics subscribed at a time
DEFAULT_STALL_S = 120.0


class PartFile:
    """``<dest>/<bundle-id>.part``: the archive being filled, chunk by chunk, at the chunks' offsets."""

    def __init__(self, ref: BundleRef, directory: str | os.PathLike):
        self.ref = ref
        self.dir = Path(directory)
        self.path = self.dir / f"{ref.bundle_id}.part"
        self.done_path = self.dir / f"{ref.bundle_id}.tar.gz"
        self.have: set[int] = set()
        self.dir.mkdir(parents=True, exist_ok=True)
        if self.done_path.is_file():
            return
        if self.path.is_file():
            # re-hash what an earlier run wrote: no separate record that a crash could leave wrong
            with open(self.path, "rb") as f:
                for i, digest in enumerate(ref.chunks):
                    f.seek(i * ref.chunk_size)
                    block = f.read(ref.chunk_length(i))
                    if len(block) == ref.chunk_length(i) and hashlib.sha256(block).hexdigest() == digest:
                        self.have.add(i)

    @property
    def complete(self) -> bool:
        return self.done_path.is_file() or len(self.have) == len(self.ref.chunks)

    def missing(self) -> list[int]:
        return [] if self.done_path.is_file() else [i for i in range(len(self.ref.chunks)) if i not in self.have]

    @property
    def progress(self) -> float:
        return 1.0 if self.done_path.is_file() else len(self.have) / len(self.ref.chunks)

    def write(self, index: int, data: bytes) -> bool:
        """Store chunk ``index`` (False if already held); UpdateError ``bad-chunk`` if it is not the announced one."""
        if index in self.have or self.done_path.is_file():
            return False
        if not 0 <= index < len(self.ref.chunks):
            raise UpdateError(UpdateReason.BAD_CHUNK, f"chunk {index} of bundle {self.ref.bundle_id}, which has "
                              f"{len(self.ref.chunks)}", fix="publish the bundle again with `edgesplit fleet publish`")
        if len(data) != self.ref.chunk_length(index) or hashlib.sha256(data).hexdigest() != self.ref.chunks[index]:
            raise UpdateError(UpdateReason.BAD_CHUNK, f"chunk {index} of bundle {self.ref.bundle_id} ({len(data)} B) "
                              f"does not match its sha256 in the announcement",
                              fix="publish the bundle again with `edgesplit fleet publish`")
        mode = "r+b" if self.path.exists() else "wb"
        with open(self.path, mode) as f:
            f.seek(index * self.ref.chunk_size)
            f.write(data)
        self.have.add(index)
        return True

    def finish(self) -> Path:
        """Flush, check the whole archive's size and sha256, and rename it ``<id>.tar.gz``; its path."""
        if self.done_path.is_file():
            return self.done_path
        h, size = hashlib.sha256(), 0
        with open(self.path, "r+b") as f:
            f.truncate(self.ref.size)
            os.fsync(f.fileno())
            f.seek(0)
            while block := f.read(1 << 20):
                h.update(block)
                size += len(block)
        if size != self.ref.size or h.hexdigest() != self.ref.sha256:
            self.path.unlink(missing_ok=True)
            raise UpdateError(UpdateReason.BAD_SHA256, f"bundle {self.ref.bundle_id}'s archive ({size} B) does not "
                              f"match the sha256 of the announcement", fix="publish the bundle again")
        os.replace(self.path, self.done_path)
        return self.done_path

    def discard(self) -> None:
        self.path.unlink(missing_ok=True)
        self.done_path.unlink(missing_ok=True)


# --------------------------------------------------------------------------- the operator's side

def publish_chunks(client, fleet: str, ref: BundleRef, tarball: str | os.PathLike, *, window: int = 32,
                   timeout: float = 600.0, progress: Callable[[int, int], None] | None = None) -> None:
    """Publish every chunk of ``tarball`` retained (QoS 1), at most ``window`` unacknowledged at a time."""
    d = topics.delivery(topics.CHUNK)
    deadline = time.monotonic() + timeout
    pending = []
    with open(tarball, "rb") as f:
        for i in range(len(ref.chunks)):
            data = f.read(ref.chunk_size)
            pending.append(client.publish(topics.chunk(fleet, ref.bundle_id, i), data, qos=d.qos, retain=d.retain))
            while len(pending) >= window or (i == len(ref.chunks) - 1 and pending):
                if not pending[0].wait(max(0.0, deadline - time.monotonic())):
                    raise UpdateError(UpdateReason.TRUNCATED, f"the broker did not acknowledge chunk {i} of "
                                      f"{ref.bundle_id} within {timeout:g} s", fix="check the broker and retry")
                pending.pop(0)
            if progress is not None:
                progress(i + 1, len(ref.chunks))


def clear_chunks(client, fleet: str, ref: BundleRef) -> None:
    """Remove a bundle's retained chunks from the broker (an empty retained message clears one)."""
    d = topics.delivery(topics.CHUNK)
    last = None
    for i in range(len(ref.chunks)):
        last = client.publish(topics.chunk(fleet, ref.bundle_id, i), b"", qos=d.qos, retain=True)
    if last is not None:
        last.wait(30)


# --------------------------------------------------------------------------- the receiver's side

def fetch_mqtt(client, fleet: str, part: PartFile, *, window: int = DEFAULT_WINDOW,
               stall_s: float = DEFAULT_STALL_S, stop: threading.Event | None = None,
               on_progress: Callable[[PartFile], None] | None = None) -> Path | None:
    """Fill ``part`` from the retained chunk topics; the finished archive, or None when ``stop`` was set."""
    got: queue.Queue = queue.Queue()
    prefix = topics.chunks_filter(fleet, part.ref.bundle_id)[:-1]
    subscribed: set[int] = set()
    last_progress = time.monotonic()
    try:
        while not part.complete:
            if stop is not None and stop.is_set():
                return None
            want = [i for i in part.missing() if i not in subscribed][:max(0, window - len(subscribed))]
            for i in want:
                client.subscribe(prefix + str(i), lambda t, p: got.put((t, p)), qos=1)
                subscribed.add(i)
            try:
                topic, payload = got.get(timeout=0.5)
            except queue.Empty:
                if not client.connected:
                    last_progress = time.monotonic()     # a broker away is not a stream cut short
                elif time.monotonic() - last_progress > stall_s:
                    raise UpdateError(UpdateReason.TRUNCATED,
                                      f"{len(part.have)} of {len(part.ref.chunks)} chunks of bundle "
                                      f"{part.ref.bundle_id} arrived, then none for {stall_s:g} s: the chunk "
                                      f"stream is incomplete", fix="publish the bundle again with "
                                                                   "`edgesplit fleet publish`")
                continue
            index = int(topic.rsplit("/", 1)[1])
            if not payload:          # a cleared chunk: the operator withdrew the bundle
                continue
            if part.write(index, payload):
                last_progress = time.monotonic()
                if on_progress is not None:
                    on_progress(part)
            if index in subscribed:
                subscribed.discard(index)
                client.unsubscribe(prefix + str(index), timeout=2.0)
        return part.finish()
    finally:
        for i in subscribed:
            client.unsubscribe(prefix + str(i), timeout=1.0)


def fetch_url(url: str, part: PartFile, *, stop: threading.Event | None = None, timeout: float = 30.0,
              on_progress: Callable[[PartFile], None] | None = None) -> Path | None:
    """Fill ``part`` from ``url`` (http(s):// with a Range request from the first missing chunk, or file://)."""
    missing = part.missing()
    if not missing:
        return part.finish()
    start = missing[0]
    req = urllib.request.Request(url)
    if start and url.startswith("http"):
        req.add_header("Range", f"bytes={start * part.ref.chunk_size}-")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            status = getattr(resp, "status", 200)
            index = start if status == 206 or url.startswith("file:") and _seek(resp, start, part) else 0
            while index < len(part.ref.chunks):
                if stop is not None and stop.is_set():
                    return None
                data = _read_exactly(resp, part.ref.chunk_length(index))
                if len(data) < part.ref.chunk_length(index):
                    raise UpdateError(UpdateReason.TRUNCATED, f"{url} ended after chunk {index - 1} of "
                                      f"{len(part.ref.chunks)}", fix="check the file behind the URL")
                if part.write(index, data) and on_progress is not None:
                    on_progress(part)
                index += 1
    except (urllib.error.URLError, OSError, ValueError) as exc:
        raise UpdateError(UpdateReason.TRUNCATED, f"cannot fetch {url}: {exc}",
                          fix="check that the device can reach the URL (or publish without --url)") from None
    return part.finish()


def _seek(resp, start: int, part: PartFile) -> bool:
    try:
        resp.seek(start * part.ref.chunk_size)       # a file:// response is a file
        return True
    except (AttributeError, OSError):
        return False


def _read_exactly(resp, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        block = resp.read(n - len(buf))
        if not block:
            break
        buf += block
    return bytes(buf)


def fetch(client, fleet: str, part: PartFile, **kw) -> Path | None:
    """From the URL when the announcement has one, else from the chunk topics."""
    if part.ref.url:
        return fetch_url(part.ref.url, part, stop=kw.get("stop"), on_progress=kw.get("on_progress"))
    return fetch_mqtt(client, fleet, part, **kw)
