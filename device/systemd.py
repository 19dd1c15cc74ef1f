"""Talking to systemd: sd_notify(3) for ``Type=notify`` units, with its watchdog.

``READY=1`` once the head is loaded and the broker asked, ``WATCHDOG=1`` while the
service makes progress, ``STATUS=`` for ``systemctl status``, ``STOPPING=1`` and
``EXIT_STATUS=``.  The protocol is one datagram per message to ``$NOTIFY_SOCKET``:
a few lines of :mod:`socket`, so no dependency.  Outside systemd every call is a
no-op that returns False.
"""
from __future__ import annotations

import logging
import os
import socket
import threading

log = logging.getLogger(__name__)

__all__ = ["Notifier"]


class Notifier:
    """sd_notify(3) by hand: one datagram per message to ``$NOTIFY_SOCKET``; a no-op outside systemd."""

    def __init__(self, env: dict | None = None):
        env = os.environ if env is None else env
        addr = env.get("NOTIFY_SOCKET") or ""
        self.address: str | None = None
        if addr.startswith("@"):
            self.address = "\0" + addr[1:]      # abstract namespace
        elif addr.startswith("/"):
            self.address = addr
        usec = env.get("WATCHDOG_USEC")
        pid = env.get("WATCHDOG_PID")
        self.watchdog_seconds: float | None = None
        # the watchdog is meant for one process: a child that inherited the variables keeps quiet
        if usec and usec.isdigit() and int(usec) > 0 and (not pid or pid == str(os.getpid())):
            self.watchdog_seconds = int(usec) / 1e6
        self._sock: socket.socket | None = None
        self._lock = threading.Lock()

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def notify(self, *lines: str) -> bool:
        """Send ``KEY=value`` lines as one message; False if there is no socket or it failed."""
        if self.address is None:
            return False
        msg = "\n".join(lines).encode("utf-8")
        with self._lock:
            try:
                if self._sock is None:
                    self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
                    self._sock.setblocking(False)
                self._sock.sendto(msg, self.address)
                return True
            except OSError as exc:
                log.debug("sd_notify to %r failed: %s", self.address, exc)
                return False

    def ready(self, status: str = "") -> bool:
        return self.notify("READY=1", *([f"STATUS={status}"] if status else []))

    def status(self, status: str) -> bool:
        return self.notify(f"STATUS={status}")

    def watchdog(self) -> bool:
        return self.notify("WATCHDOG=1")

    def stopping(self, status: str = "") -> bool:
        return self.notify("STOPPING=1", *([f"STATUS={status}"] if status else []))

    def failed(self, status: str, exit_status: int) -> bool:
        """Why the service cannot run, before it exits with ``exit_status``."""
        return self.notify(f"STATUS={status}", f"EXIT_STATUS={exit_status}")

    def close(self) -> None:
        with self._lock:
            if self._sock is not None:
                self._sock.close()
                self._sock = None
