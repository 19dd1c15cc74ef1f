"""The device as a long-running service: the agent in a loop, under systemd.

``edgesplit device serve --config /etc/edgesplit/device.toml`` is what the
``edgesplit-device.service`` unit runs (``python -m device.service --config FILE``
still works, for units installed before that).  It

* reads the configuration (:mod:`device.config`) and the credentials
  (:mod:`device.credentials`: systemd's ``$CREDENTIALS_DIRECTORY`` first);
* tells systemd how it is doing (:mod:`device.systemd`): ``READY=1`` once the head is
  loaded and the broker asked, ``WATCHDOG=1`` while the loop makes progress,
  ``STATUS=``, ``STOPPING=1``;
* runs the agent: watched folders are scanned for new images and sent in bursts
  (:class:`device.sources.FolderWatcher`: a processed image goes to
  ``<state_dir>/done/`` or is deleted, a failed one to ``<state_dir>/failed/``), a
  camera is read frame by frame, or a fixed list of inputs is sent once; every
  result is appended to ``<state_dir>/results.jsonl``;
* exits 0 on SIGTERM after a clean ``stopped``, 78 on a configuration it cannot run
  with (refused credentials, a bad bundle, a bad config: systemd's
  ``RestartPreventExitStatus=78`` then leaves it stopped), another code otherwise.

Never imports TensorFlow.
"""
from __future__ import annotations

import json
import logging
import os
import signal
import threading
import time
from pathlib import Path
from typing import Iterable

from device.config import DeviceConfig, dump_config, load_config
from device.credentials import resolve_credentials
from device.systemd import Notifier

# a fixed name: under `python -m device.service` __name__ is "__main__"
log = logging.getLogger("device.service")

__all__ = ["DeviceService", "serve", "check"]

RESULTS_MAX_BYTES = 16 << 20


class _ResultLog:
    """``results.jsonl``: one JSON line per result, rotated once to ``.1`` past 16 MiB."""

    def __init__(self, path: Path | None, device_id: str):
        self.path, self.device_id = path, device_id
        self._file = None

    def write(self, r) -> None:
        if self.path is None:
            return
        try:
            if self._file is None:
                self._file = open(self.path, "a", encoding="utf-8")
            d = {"time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "device_id": self.device_id, **r.to_dict()}
            self._file.write(json.dumps(d, ensure_ascii=False) + "\n")
            self._file.flush()
            if self._file.tell() > RESULTS_MAX_BYTES:
                self.close()
                os.replace(self.path, str(self.path) + ".1")
        except OSError as exc:
            # a full disk must not stop the device: the answers still arrive
            log.warning("cannot write the result log %s: %s", self.path, exc)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


class DeviceService:
    """Runs the agent for one configuration until stopped; ``run()`` returns the exit code."""

    def __init__(self, config: DeviceConfig, *, notifier: Notifier | None = None, env: dict | None = None):
        from device.sources import FolderWatcher

        self.config = config
        self.env = os.environ if env is None else env
        self.notifier = notifier or Notifier(self.env)
        self.agent = None
        self._stop = threading.Event()
        self._beats = 0                      # bumped by the main loop whenever it does something
        self._progress: tuple = ()
        self._last_change = time.monotonic()
        self._ready = False
        self.stall_limit = max(60.0, 3 * config.resend_after)
        self.results = _ResultLog(config.results_path, config.device_id)
        self.watcher = FolderWatcher([s for s in config.inputs if s not in config.cameras],
                                     done_dir=config.state_dir / "done", failed_dir=config.state_dir / "failed",
                                     settle=config.settle, after=config.after)

    # ------------------------------------------------------------- liveness
    def _beat(self) -> None:
        self._beats += 1

    def alive(self) -> bool:
        """Ping the watchdog?  True while the loop makes progress or waits on the network.

        The agent's loop blocks while answers are due; it is healthy as long as
        frames go out (resends every ``resend_after``), answers come in, or the
        broker is away (paho retries on its own thread).  Only a loop that stays
        connected and does nothing for ``stall_limit`` seconds is stuck.
        """
        now = time.monotonic()
        agent = self.agent
        if agent is None or not self._ready:
            return True
        st = agent.stats
        progress = (self._beats, st.frames_sent, st.answered, st.timeouts, st.failed_inputs, agent.client.connects)
        if progress != self._progress:
            self._progress = progress
            self._last_change = now
            return True
        if not agent.client.connected:
            return True
        return now - self._last_change < self.stall_limit

    def status_line(self) -> str:
        agent = self.agent
        if agent is None:
            return "starting"
        st = agent.stats
        net = "connected" if agent.client.connected else "waiting for the broker"
        p = st.percentiles()
        lat = f", p50 {p['p50']:.0f} ms" if p else ""
        return f"{net}; answered {st.answered}/{st.requests}{lat}; in flight {agent.in_flight}"

    def _watchdog_loop(self) -> None:
        interval = self.notifier.watchdog_seconds
        period = min(interval / 2, 10.0) if interval else 10.0
        last_status = ""
        while not self._stop.wait(period):
            if interval:
                if self.alive():
                    self.notifier.watchdog()
                else:
                    log.error("no progress for %.0f s while connected: not pinging the watchdog "
                              "(systemd restarts the service)", self.stall_limit)
            status = self.status_line()
            if status != last_status:
                self.notifier.status(status)
                last_status = status

    def request_stop(self, *_args) -> None:
        """Stop taking inputs, answer what is in flight briefly, exit cleanly (signal-safe)."""
        self._stop.set()
        if self.agent is not None:
            self.agent.request_stop()

    # ------------------------------------------------------------- set-up
    def _build_agent(self):
        from device.transport import open_agent

        cfg = self.config
        cfg.state_dir.mkdir(parents=True, exist_ok=True)
        for src in self.watcher.specs:
            if cfg.watch and not any(c in src for c in "*?["):
                p = Path(src)
                if not p.exists() and (p.parent == cfg.state_dir or cfg.state_dir in p.parents):
                    p.mkdir(parents=True, exist_ok=True)
        return open_agent(cfg, self.env, log_level=logging.INFO)

    # ------------------------------------------------------------- results
    def _consume(self, results: Iterable, files: bool = True) -> None:
        for r in results:
            self._beat()
            self.results.write(r)
            if r.ok:
                # every result is in results.jsonl; the journal gets one line per burst (see _watch)
                log.debug("%s -> %s (%.3f) in %.1f ms", r.input, r.label, r.probability or 0.0, r.latency_ms or 0.0)
            else:
                log.warning("%s: %s", r.input, r.error)
            if files:
                self.watcher.done(r.input, r.ok)

    # ------------------------------------------------------------- inputs
    def _watch(self) -> None:
        from device.sources import Sample

        agent = self.agent
        while not self._stop.is_set():
            self._beat()
            # a bundle update switches (or rolls back) between bursts too, while the folders are quiet
            self._consume(agent.maintain())
            if agent.in_flight:
                self._consume(agent.flush())
            burst = self.watcher.scan()
            if not burst:
                self._stop.wait(self.config.poll_interval)
                continue
            log.debug("%d new image(s)", len(burst))
            st = agent.stats
            before = (st.answered - st.worker_errors, st.worker_errors + st.failed_inputs + st.timeouts)
            t0 = time.monotonic()
            self._consume(agent.run_samples([Sample(str(p), p) for p in burst]))
            ok = st.answered - st.worker_errors - before[0]
            bad = st.worker_errors + st.failed_inputs + st.timeouts - before[1]
            log.info("%d new image(s): %d answered, %d failed in %.2f s; %s", len(burst), ok, bad,
                     time.monotonic() - t0, self.status_line())

    def _start(self) -> None:
        """Load the head and ask the broker; anything wrong here is final (exit 78)."""
        from protocol.errors import ConfigError, EdgesplitError

        try:
            self.agent = self._build_agent()
            if self._stop.is_set():          # SIGTERM while the head was loading
                self.agent.request_stop()
            self.agent.start()
        except EdgesplitError as exc:
            # a bad bundle, config or refused login does not get better by restarting
            self.notifier.failed(f"cannot start: {exc.message}", ConfigError.exit_code)
            if isinstance(exc, ConfigError):
                raise
            raise ConfigError(f"cannot start: {exc.message}", fix=exc.fix) from exc

    # ------------------------------------------------------------- run
    def run(self) -> int:
        """Run until SIGTERM; 0 after a clean stop.  Errors are raised for the command's one printer."""
        cfg = self.config
        watchdog = threading.Thread(target=self._watchdog_loop, name="edgesplit-watchdog", daemon=True)
        if self.notifier.enabled:
            watchdog.start()
        previous = {}
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                previous[sig] = signal.signal(sig, self.request_stop)
        try:
            self._start()
            agent = self.agent
            if agent.outbox is not None:
                self.watcher.hold(e.name for e in agent.outbox.pending())
            self._ready = True
            self.notifier.ready(self.status_line())
            log.info("ready: bundle %s on %s; inputs %s", agent.bundle.bundle_id, agent.stats.interpreter,
                     ", ".join(cfg.inputs))
            # answers for what the outbox re-sent after a restart come first
            self._consume(agent.run_samples([]))
            if not cfg.watch:
                from device.sources import open_inputs

                self._consume(agent.run_samples(open_inputs(cfg.inputs, camera_interval=cfg.camera_interval)),
                              files=False)
            elif cfg.cameras:
                from device.sources import camera_samples, parse_camera_spec

                count = parse_camera_spec(cfg.cameras[0])
                self._consume(agent.run_samples(camera_samples(count=count, interval=cfg.camera_interval),
                                                batch_size=1), files=False)
            else:
                self._watch()
            log.info("stopping: %s", self.status_line())
            return 0
        finally:
            self._stop.set()
            self.notifier.stopping("stopping")
            if self.agent is not None:
                try:
                    self.agent.stop()
                    log.info("%s", self.agent.stats.summary())
                except Exception:   # never hide the real exit reason behind a failing clean-up
                    log.exception("error while stopping the agent")
            self.results.close()
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            self.notifier.close()


# --------------------------------------------------------------------------- the verb

def _load(path: str | os.PathLike, notifier: Notifier) -> DeviceConfig:
    from protocol.errors import ConfigError

    try:
        return load_config(path)
    except ConfigError as exc:
        notifier.failed(f"bad configuration: {exc.message.splitlines()[0]}", exc.exit_code)
        raise


def check(path: str | os.PathLike, env: dict | None = None) -> str:
    """``edgesplit device serve --check``: the configuration as read, and where the credentials come from."""
    cfg = _load(path, Notifier(env))
    creds = resolve_credentials(cfg, env)
    ca = (creds.ca_path or "system trust store") if cfg.broker_url.startswith("mqtts") else "n/a"
    return (dump_config(cfg, header=f"{cfg.path}: valid")
            + f"# credentials: user {creds.username!r}, password {'yes' if creds.password else 'no'}, "
              f"CA {ca}, frame key {'yes' if creds.key else 'no'} (from {creds.source})")


def serve(path: str | os.PathLike, env: dict | None = None) -> int:
    """``edgesplit device serve --config FILE``: run the service until stopped; returns the exit code."""
    notifier = Notifier(env)
    return DeviceService(_load(path, notifier), notifier=notifier, env=env).run()


def main(argv: list[str] | None = None) -> None:
    """``python -m device.service [--config FILE] [--check] [-v]``: kept for units installed before
    ``edgesplit device serve``; it runs that command (same messages, same exit codes)."""
    import runpy
    import sys

    args = list(sys.argv[1:] if argv is None else argv)
    verbose = [a for a in args if a in ("-v", "--verbose")]
    # run the command rather than import it: the command sits above the roles, never below them
    sys.argv = [sys.argv[0], *verbose, "device", "serve", *[a for a in args if a not in verbose]]
    runpy.run_module("edgesplit", run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
