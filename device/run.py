"""``edgesplit device run``: send a set of inputs once and hand back each result.

The command line builds the :class:`~device.config.DeviceConfig`
(:func:`device.flags.from_flags`); this reads the inputs, opens the agent
(:func:`device.transport.open_agent`) and runs it.  SIGTERM (systemd stopping a
unit that runs this) stops taking inputs, waits briefly for the answers in flight
and ends cleanly with ``stopped``.
"""
from __future__ import annotations

import dataclasses
import os
import signal
import threading
from typing import Callable

from device import sources
from device.config import DeviceConfig
from device.results import AgentStats, DeviceResult

__all__ = ["RunSummary", "run"]


@dataclasses.dataclass
class RunSummary:
    """What ``edgesplit device run`` returns to the command line."""

    stats: AgentStats

    @property
    def ok(self) -> bool:
        return self.stats.ok

    @property
    def exit_code(self) -> int:
        # a stop asked for (SIGTERM from systemd) is a clean exit even with answers outstanding
        return 0 if self.ok or self.stats.stopped_early else 1

    def summary(self) -> str:
        return self.stats.summary()

    def to_dict(self) -> dict:
        return self.stats.to_dict()


def run(config: DeviceConfig, *, on_result: Callable[[DeviceResult], None] | None = None,
        env: dict | None = None) -> RunSummary:
    """Send ``config.sources`` (files, folders, globs, ``camera[:N]``) and hand each result to ``on_result``.

    With no sources but an outbox, only what the outbox holds is sent again.
    """
    from protocol.errors import UsageError
    from device.transport import open_agent

    specs = [str(s) for s in config.sources]
    if not specs and not config.outbox:
        raise UsageError("no inputs given", fix="give image files, folders, globs, or 'camera' "
                                                "(or only --outbox FILE to re-send what it holds)")
    # expand and check the inputs before connecting anywhere: a typo (or a missing
    # picamera2) should not need a broker to be reported
    samples = sources.open_inputs(specs, camera_interval=config.camera_interval) if specs else iter(())
    live = any(sources.parse_camera_spec(s) is not False for s in specs if not os.path.exists(s))
    agent = open_agent(config, env, error=UsageError)
    previous = None
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGTERM, lambda *_: agent.request_stop())
    try:
        with agent:
            for r in agent.run_samples(samples, batch_size=1 if live else None):
                if on_result is not None:
                    on_result(r)
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    return RunSummary(agent.stats)
