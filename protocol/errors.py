"""The error types every role raises.

Each error says what happened and what to do about it.  The command maps the
class to an exit code: 2 for a user mistake, 78 for a configuration the
service cannot run with (so systemd does not restart-loop), 1 for a failed
check.

A refused frame carries one :class:`Reason` from a closed list (the dead letters' and
counters' ``reason``); docs/frame-format.md has the same list, checked by a test.
"""
from __future__ import annotations

import enum


class EdgesplitError(Exception):
    """Base of every error edgesplit raises on purpose."""

    exit_code = 1

    def __init__(self, message: str, fix: str | None = None):
        self.message = message
        self.fix = fix
        super().__init__(message if not fix else f"{message}\n  fix: {fix}")


class UsageError(EdgesplitError):
    """The user asked for something that cannot work (bad path, unknown cut...)."""

    exit_code = 2


class BundleError(UsageError):
    """A bundle is missing, tampered with, truncated or of an unknown schema."""


class ConfigError(EdgesplitError):
    """A service cannot run with its configuration (credentials, refused connection)."""

    exit_code = 78


class CheckFailed(EdgesplitError):
    """A check the user relies on failed (e.g. head+tail disagree with Keras)."""

    exit_code = 1


class Reason(str, enum.Enum):
    """Why a frame was refused: a short stable code for dead letters, counters and logs.

    The list is closed: a new way to refuse a frame gets a member here and a row in the table of
    docs/frame-format.md.  ``where`` names who gives it: the frame ``codec`` (``protocol.frame``,
    ``protocol.fields``), ``signing``, the cloud ``registry`` or the ``worker``.  A member is
    its code as a string (``Reason.BAD_MAC == "bad-mac"``).
    """

    where: tuple[str, ...]

    def __new__(cls, code: str, *where: str):
        member = str.__new__(cls, code)
        member._value_ = code
        member.where = where
        return member

    # the frame codec: the payload as bytes, then the header, then the tensor
    BAD_PAYLOAD = "bad-payload", "codec"
    TOO_LARGE = "too-large", "codec"
    TRUNCATED = "truncated", "codec"
    BAD_MAGIC = "bad-magic", "codec"
    BAD_VERSION = "bad-version", "codec"
    BAD_HEADER = "bad-header", "codec"
    HEADER_TOO_LARGE = "header-too-large", "codec"
    BAD_KIND = "bad-kind", "codec"
    BAD_DEVICE_ID = "bad-device-id", "codec"
    BAD_BUNDLE_ID = "bad-bundle-id", "codec"
    BAD_FIELD = "bad-field", "codec"
    BAD_LABEL = "bad-label", "codec"
    BAD_TENSOR = "bad-tensor", "codec"
    BAD_DTYPE = "bad-dtype", "codec", "registry"
    BAD_ENCODING = "bad-encoding", "codec"
    BAD_SHAPE = "bad-shape", "codec", "registry"
    BAD_QUANTIZATION = "bad-quantization", "codec", "registry"
    BAD_SIZE = "bad-size", "codec"
    BAD_ZSTD = "bad-zstd", "codec"
    BAD_MAC = "bad-mac", "codec"
    # signing: keys and the replay window
    UNKNOWN_DEVICE = "unknown-device", "signing"
    STALE = "stale", "signing"
    REPLAY = "replay", "signing"
    # the cloud registry: does the frame fit a bundle served here (and bad-dtype, -shape, -quantization)
    WRONG_KIND = "wrong-kind", "registry"
    UNKNOWN_BUNDLE = "unknown-bundle", "registry", "worker"
    # the worker: where the frame arrived, and its own failures
    BAD_TOPIC = "bad-topic", "worker"
    DEVICE_MISMATCH = "device-mismatch", "worker"
    INTERNAL_ERROR = "internal-error", "worker"

    def __str__(self) -> str:
        return self.value

    def __format__(self, spec: str) -> str:
        return format(self.value, spec)


class FrameError(EdgesplitError):
    """A wire frame is malformed, oversized, or does not match what was expected.

    ``reason`` is the :class:`Reason` (``bad-mac``, ``replay``, ``bad-shape``...) that dead
    letters and counters use; the message is for people.  The one way to refuse a frame::

        raise FrameError(Reason.BAD_MAC, "bad MAC: ...", fix="...")
    """

    exit_code = 1

    def __init__(self, reason: Reason, message: str, fix: str | None = None):
        if not isinstance(reason, Reason):   # the list is closed: a typo fails where it is written
            raise TypeError(f"FrameError needs a protocol.errors.Reason, got {reason!r}")
        super().__init__(message, fix)
        self.reason = reason

    def __reduce__(self):
        return type(self), (self.reason, self.message, self.fix)


class TopicError(UsageError):
    """A topic or an id that goes into one is not valid."""


class UpdateReason(str, enum.Enum):
    """Why a device or a worker refused a bundle update, or rolled one back: a short stable code.

    Closed like :class:`Reason`; the table of docs/fleet.md has the same list (checked by a test).
    A device reports it on its ``report`` topic (``refused <code>: ...``, ``rolled-back <code>: ...``).
    """

    BAD_ANNOUNCEMENT = "bad-announcement"   # not an announcement this edgesplit reads
    BAD_SIGNATURE = "bad-signature"         # no valid Ed25519 signature by the trusted fleet key
    NOT_ADDRESSED = "not-addressed"         # signed for another fleet or other devices
    TOO_LARGE = "too-large"                 # more bytes or chunks than a bundle may have
    BAD_CHUNK = "bad-chunk"                 # a chunk does not match its sha256
    TRUNCATED = "truncated"                 # chunks stopped coming (an incomplete chunk stream)
    BAD_SHA256 = "bad-sha256"               # the whole archive or a file in it does not match its sha256
    BAD_BUNDLE = "bad-bundle"               # the archive is not a bundle this edgesplit can load
    INPUT_MISMATCH = "input-mismatch"       # made for another model input than the running bundle
    NO_PROBE = "no-probe"                   # no self-test probe in the manifest
    SELF_TEST = "self-test"                 # the head (or tail) does not give the probe's expected outputs
    ANSWERS_FAILED = "answers-failed"       # after the switch, its answers came back as errors
    NOT_HELD = "not-held"                   # a rollback to a bundle this device does not hold
    FLEET_ROLLBACK = "fleet-rollback"       # the operator returned the fleet to the previous bundle
    IO_ERROR = "io-error"                   # the disk refused (full, read-only)

    def __str__(self) -> str:
        return self.value


class UpdateError(EdgesplitError):
    """A bundle update was refused (or rolled back); ``reason`` is its :class:`UpdateReason`."""

    exit_code = 1

    def __init__(self, reason: UpdateReason, message: str, fix: str | None = None):
        if not isinstance(reason, UpdateReason):
            raise TypeError(f"UpdateError needs a protocol.errors.UpdateReason, got {reason!r}")
        super().__init__(message, fix)
        self.reason = reason

    def __reduce__(self):
        return type(self), (self.reason, self.message, self.fix)
