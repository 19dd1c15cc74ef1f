"""The error types every role raises.

Each error says what happened and what to do about it.  The command maps the
class to an exit code: 2 for a user mistake, 78 for a configuration the
service cannot run with (so systemd does not restart-loop), 1 for a failed
check.
"""
from __future__ import annotations


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


class FrameError(EdgesplitError):
    """A wire frame is malformed, oversized, or does not match what was expected.

    ``reason`` is a short stable code (``bad-mac``, ``replay``, ``bad-shape``...)
    that dead letters and counters use; the message is for people.
    """

    exit_code = 1
    reason: str | None = None

    def __init__(self, message: str, fix: str | None = None, reason: str | None = None):
        super().__init__(message, fix)
        if reason is not None:
            self.reason = reason


class TopicError(UsageError):
    """A topic or an id that goes into one is not valid."""
