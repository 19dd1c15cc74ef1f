"""Per-device keys, frame MACs and the replay window.

A device may hold a secret key shared with the cloud.  It then adds a MAC to
every frame: HMAC-SHA256 over the whole payload with the 16 MAC bytes zeroed,
truncated to 16 bytes (see docs/frame-format.md).  The worker checks the MAC
with the device's key and then asks a ``ReplayWindow`` whether it has seen that
frame before or whether its timestamp is too far from now.

Key files hold one key as 64 hex characters (or base64), optionally after
``#`` comment lines; ``load_keys(dir)`` reads ``<device-id>.key`` files.
"""
from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import logging
import os
import secrets
import threading
import time
from collections import OrderedDict
from pathlib import Path
from typing import Callable, Mapping, Union

from protocol.errors import FrameError, Reason, UsageError

log = logging.getLogger(__name__)

MAC_BYTES = 16          # HMAC-SHA256 truncated: 128 bits is plenty against forgery
KEY_BYTES = 32          # what generate_key() makes
MIN_KEY_BYTES = 16      # shorter keys are refused
KEY_SUFFIX = ".key"

KeySource = Union[bytes, Mapping[str, bytes], Callable[[str], "bytes | None"]]


# --------------------------------------------------------------------------- keys

def generate_key() -> bytes:
    """A fresh random 32-byte key."""
    return secrets.token_bytes(KEY_BYTES)


def check_key(key: object) -> bytes:
    """Return ``key`` as bytes if it is usable (bytes, at least 16 of them), else UsageError."""
    if isinstance(key, (bytearray, memoryview)):
        key = bytes(key)
    if not isinstance(key, bytes):
        raise UsageError(f"a key must be bytes, got {type(key).__name__}",
                         fix="load it with protocol.signing.load_key(path) or parse_key(text)")
    if len(key) < MIN_KEY_BYTES:
        raise UsageError(f"key is {len(key)} bytes, at least {MIN_KEY_BYTES} are needed",
                         fix="make one with protocol.signing.generate_key()")
    return key


def format_key(key: bytes, fmt: str = "hex") -> str:
    """Key as text: ``hex`` (default) or ``base64``."""
    key = check_key(key)
    if fmt == "hex":
        return key.hex()
    if fmt == "base64":
        return base64.b64encode(key).decode("ascii")
    raise UsageError(f"unknown key format {fmt!r}", fix="use 'hex' or 'base64'")


def parse_key(text: str) -> bytes:
    """Parse a key file's text: hex or base64, ``#`` comments and blank lines ignored."""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.strip().startswith("#")]
    if len(lines) != 1:
        raise UsageError(f"a key file must hold exactly one key line, found {len(lines)}",
                         fix="write one line of hex (or base64), e.g. with protocol.signing.write_key()")
    line = lines[0]
    key: bytes | None = None
    if len(line) % 2 == 0 and all(c in "0123456789abcdefABCDEF" for c in line):
        key = bytes.fromhex(line)
    else:
        try:
            key = base64.b64decode(line, validate=True)
        except (binascii.Error, ValueError):
            raise UsageError("the key line is neither hex nor base64",
                             fix="write the key as 64 hex characters") from None
    return check_key(key)


def load_key(path: str | os.PathLike) -> bytes:
    """Read one key file; UsageError naming the file when it is missing or malformed."""
    p = Path(path)
    try:
        text = p.read_text(encoding="ascii")
    except FileNotFoundError:
        raise UsageError(f"key file {p} does not exist", fix="create it with protocol.signing.write_key()") from None
    except (OSError, UnicodeDecodeError) as e:
        raise UsageError(f"cannot read key file {p}: {e}", fix="check the file and its permissions") from None
    try:
        return parse_key(text)
    except UsageError as e:
        raise UsageError(f"key file {p}: {e.message}", fix=e.fix) from None


def write_key(path: str | os.PathLike, key: bytes | None = None, *, fmt: str = "hex") -> bytes:
    """Write ``key`` (a new one if None) to ``path`` readable by its owner only; return the key."""
    key = generate_key() if key is None else check_key(key)
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="ascii") as f:
        f.write("# edgesplit frame-signing key (HMAC-SHA256); keep it secret\n")
        f.write(format_key(key, fmt) + "\n")
    os.chmod(p, 0o600)  # O_CREAT's mode does not apply to an existing file
    return key


def load_keys(directory: str | os.PathLike) -> dict[str, bytes]:
    """Keys of every device in ``directory``: ``<device-id>.key`` -> {device_id: key}."""
    from protocol.topics import check_id  # the file name is the device id, validated like one

    d = Path(directory)
    if not d.is_dir():
        raise UsageError(f"key directory {d} does not exist", fix="point to the folder holding <device-id>.key files")
    keys = {}
    for p in sorted(d.glob("*" + KEY_SUFFIX)):
        keys[check_id(p.name[:-len(KEY_SUFFIX)])] = load_key(p)
    return keys


def key_for(source: KeySource | None, device_id: str) -> bytes | None:
    """The key for ``device_id`` from a key, a {device: key} mapping, or a callable; None if no source.

    A mapping or callable that has no key for the device raises FrameError
    (reason ``unknown-device``): a signed deployment does not serve strangers.
    """
    if source is None:
        return None
    if isinstance(source, (bytes, bytearray, memoryview)):
        return check_key(source)
    key = source.get(device_id) if isinstance(source, Mapping) else source(device_id)
    if key is None:
        raise FrameError(Reason.UNKNOWN_DEVICE, f"unknown device {device_id!r}: no signing key for it",
                         fix="add the device's key (<device-id>.key) to the worker's key directory")
    return check_key(key)


# HMAC objects already keyed, one per key: copying one skips the key set-up (two
# SHA-256 blocks and an object) that hmac.new repeats on every frame.  Bounded;
# the keys are the ones the process holds anyway.
_KEYED_MAX = 1024
_keyed: dict[bytes, "hmac.HMAC"] = {}


def compute_mac(key: bytes, *chunks: bytes | memoryview) -> bytes:
    """HMAC-SHA256 over the concatenated chunks, truncated to 16 bytes."""
    if type(key) is not bytes:
        key = bytes(key)
    base = _keyed.get(key)
    if base is None:
        base = hmac.new(key, digestmod=hashlib.sha256)
        if len(_keyed) >= _KEYED_MAX:
            _keyed.clear()
        _keyed[key] = base
    h = base.copy()  # the cached object is never updated itself, so threads can share it
    for c in chunks:
        h.update(c)
    return h.digest()[:MAC_BYTES]


def verify_mac(key: bytes, tag: bytes, *chunks: bytes | memoryview) -> bool:
    """True when ``tag`` is the MAC of the chunks (constant-time compare)."""
    return hmac.compare_digest(compute_mac(key, *chunks), bytes(tag))


# --------------------------------------------------------------------------- replay window

class _DeviceWindow:
    __slots__ = ("seen", "evicted_max_t")

    def __init__(self) -> None:
        self.seen: OrderedDict[tuple[int, int], None] = OrderedDict()  # (seq, t_send_us), arrival order
        self.evicted_max_t = -1  # newest t_send among entries we no longer remember


class ReplayWindow:
    """Rejects replayed frames, per device.

    A frame is accepted when its send time is within ``window_s`` of now and
    its (sequence number, send time) has not been seen from that device.  Per
    device the last ``per_device`` accepted frames are remembered (a sliding
    window); a frame older than everything forgotten is refused as possibly
    replayed.  Because the MAC covers seq and send time, a replay is an exact
    copy: it is either remembered, older than what was forgotten, or outside
    the time window.  A device that restarts its counter is still accepted
    (its new frames carry new times).  A resend of the same request must be a
    new frame (new seq and send time, same request id).

    Thread-safe.  ``clock`` returns seconds since the epoch (for tests).
    """

    def __init__(self, window_s: float = 120.0, per_device: int = 4096, max_devices: int = 100_000,
                 clock: Callable[[], float] = time.time):
        if not window_s > 0 or per_device < 1 or max_devices < 1:
            raise UsageError("ReplayWindow needs window_s > 0, per_device >= 1 and max_devices >= 1",
                             fix="use the defaults: ReplayWindow()")
        self.window_us = int(window_s * 1_000_000)
        self.per_device = int(per_device)
        self.max_devices = int(max_devices)
        self._clock = clock
        self._devices: OrderedDict[str, _DeviceWindow] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._devices)

    def check(self, device_id: str, seq: int, t_send_us: int, *, now_us: int | None = None) -> None:
        """Record the frame or raise FrameError (reason ``replay`` or ``stale``)."""
        now = int(self._clock() * 1_000_000) if now_us is None else int(now_us)
        skew = t_send_us - now
        if abs(skew) > self.window_us:
            where = "in the future" if skew > 0 else "old"
            raise FrameError(Reason.STALE,
                             f"frame from {device_id!r} seq {seq} was sent {abs(skew) / 1e6:.1f} s {where}, "
                             f"outside the replay window of ±{self.window_us / 1e6:g} s",
                             fix="synchronise the device's clock (NTP) with the worker's; "
                                 "a genuine old frame must be re-sent as a new frame")
        key = (int(seq), int(t_send_us))
        with self._lock:
            st = self._devices.get(device_id)
            if st is None:
                st = self._devices[device_id] = _DeviceWindow()
                if len(self._devices) > self.max_devices:
                    gone, _ = self._devices.popitem(last=False)
                    log.warning("replay window forgets device %r (more than %d devices)", gone, self.max_devices)
            else:
                self._devices.move_to_end(device_id)
            if key in st.seen:
                raise FrameError(Reason.REPLAY, f"replayed frame: device {device_id!r} already sent seq {seq} "
                                                f"at t_send_us={t_send_us}",
                                 fix="a device must give every transmission a new sequence number and send time")
            if t_send_us <= st.evicted_max_t:
                raise FrameError(Reason.REPLAY, f"frame from {device_id!r} seq {seq} is older than the replay window "
                                                f"remembers (the last {self.per_device} frames); it may be a replay",
                                 fix="re-send it as a new frame (new seq and send time)")
            st.seen[key] = None
            oldest_ok = now - self.window_us
            while st.seen:
                (old_seq, old_t), _ = next(iter(st.seen.items()))
                if len(st.seen) <= self.per_device and old_t >= oldest_ok:
                    break
                st.seen.popitem(last=False)
                st.evicted_max_t = max(st.evicted_max_t, old_t)

    def check_frame(self, frame, *, now_us: int | None = None) -> None:
        """``check`` with a decoded Frame's device id, seq and send time."""
        self.check(frame.device_id, frame.seq, frame.t_send_us, now_us=now_us)
