"""Run an MQTT broker: the embedded one (rumqttd through ``iotcore``) or a real Mosquitto.

``edgesplit broker`` calls :func:`serve`, ``edgesplit broker config`` calls :func:`configure`
(a production configuration, see :mod:`deploy.broker_config`); the demo and the tests call
:func:`start_embedded` / :func:`start_mosquitto`, which return a
:class:`RunningBroker` (``.url``, ``.stop()``, ``.kill()``, ``.restart()``).

Both run in a child process: rumqttd has no shutdown API (a blocking
``run_forever`` that ignores Ctrl+C), and a child can be SIGKILLed by the fault
tests exactly like a real broker.  Both bind to 127.0.0.1 unless told otherwise,
because an anonymous broker open on every interface lets anyone read the
feature tensors.
"""
from __future__ import annotations

import dataclasses
import ipaddress
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from protocol.errors import ConfigError, UsageError

log = logging.getLogger(__name__)

# A feature tensor of an early cut in float32 is ~100 KB; rumqttd's default
# limit (20 KB) would silently drop it.  Mosquitto has no limit by default.
EMBEDDED_MAX_PAYLOAD = 16 * 1024 * 1024
MOSQUITTO_PATHS = ("/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto", "/opt/homebrew/sbin/mosquitto")

# The embedded broker's child: exits when our end of its stdin closes, so a
# crashed parent never leaves a broker holding the port.
_EMBEDDED_CHILD = (
    "import logging, os, sys, threading\n"
    "lvl = os.environ.get('EDGESPLIT_BROKER_LOG', 'WARNING')\n"
    "logging.basicConfig(level=lvl, format='%(asctime)s %(levelname)s %(name)s: %(message)s')\n"
    # rumqttd reports every routed packet as an ERROR span; keep it for debugging only
    "logging.getLogger('rumqttd').setLevel(logging.DEBUG if lvl == 'DEBUG' else logging.CRITICAL)\n"
    "def _watch():\n"
    "    try:\n"
    "        sys.stdin.buffer.read()\n"
    "    finally:\n"
    "        os._exit(0)\n"
    "threading.Thread(target=_watch, daemon=True).start()\n"
    "from iotcore import Broker\n"
    "Broker(config_path=sys.argv[1]).run_forever()\n"
)


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def port_accepts(host: str, port: int, timeout: float = 0.2) -> bool:
    target = "127.0.0.1" if host in ("0.0.0.0", "", "::") else host
    try:
        with socket.create_connection((target, port), timeout=timeout):
            return True
    except OSError:
        return False


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def mosquitto_binary() -> str | None:
    """Path of the mosquitto binary, or None (Debian puts it in /usr/sbin, often not on PATH)."""
    found = shutil.which("mosquitto")
    if found:
        return found
    return next((p for p in MOSQUITTO_PATHS if os.access(p, os.X_OK)), None)


def _url_host(host: str) -> str:
    if host in ("0.0.0.0", "", "::"):
        return "127.0.0.1"
    return f"[{host}]" if ":" in host else host


@dataclasses.dataclass
class RunningBroker:
    """A broker child process on ``host:port``; ``restart()`` reuses the port and the config."""

    kind: str                      # "embedded" or "mosquitto"
    host: str
    port: int
    argv: list[str]
    config_path: Path
    log_path: Path
    workdir: Path
    env: dict | None = None
    tls: bool = False              # the listener speaks TLS (a production config): clients dial mqtts://
    process: subprocess.Popen | None = None
    _tmp: tempfile.TemporaryDirectory | None = dataclasses.field(default=None, repr=False)
    _log_file: object = dataclasses.field(default=None, repr=False)

    @property
    def url(self) -> str:
        return f"{'mqtts' if self.tls else 'mqtt'}://{_url_host(self.host)}:{self.port}"

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process else None

    @property
    def is_running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def start(self, timeout: float = 15.0) -> "RunningBroker":
        if self.is_running:
            return self
        self._log_file = open(self.log_path, "ab")
        stdin = subprocess.PIPE if self.kind == "embedded" else subprocess.DEVNULL
        self.process = subprocess.Popen(self.argv, stdin=stdin, stdout=self._log_file, stderr=subprocess.STDOUT,
                                        cwd=self.workdir, env=self.env, start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                code = self.process.returncode
                self._close()
                raise ConfigError(f"the {self.kind} broker exited with code {code} while starting on "
                                  f"{self.host}:{self.port}: {self.log_tail() or '(no output)'}",
                                  fix=f"read {self.log_path} and {self.config_path}")
            if port_accepts(self.host, self.port):
                log.debug("%s broker pid %s listening on %s", self.kind, self.pid, self.url)
                return self
            time.sleep(0.03)
        self.kill()
        raise ConfigError(f"the {self.kind} broker did not accept connections on {self.host}:{self.port} "
                          f"within {timeout:.0f} s", fix=f"read {self.log_path}")

    def stop(self, timeout: float = 5.0) -> None:
        """SIGTERM and wait (Mosquitto saves its persistence file); SIGKILL if it hangs."""
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout)
        self._close()

    def kill(self) -> None:
        """SIGKILL, like a crash or a power cut: no clean shutdown, wills fire on reconnect elsewhere."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(10)
        self._close()

    def restart(self, timeout: float = 15.0) -> "RunningBroker":
        """Stop if running, then start again on the same port with the same config."""
        self.stop()
        return self.start(timeout)

    def wait(self) -> int:
        """Block until the broker process exits; its exit code."""
        assert self.process is not None
        return self.process.wait()

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def _close(self) -> None:
        if self.process is not None and self.process.stdin is not None:
            try:
                self.process.stdin.close()
            except OSError:
                pass
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None

    def cleanup(self) -> None:
        """Stop and remove the temporary work directory, if we made one."""
        self.stop()
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    def __enter__(self) -> "RunningBroker":
        return self

    def __exit__(self, *exc) -> None:
        self.cleanup()


def _workdir(workdir, prefix) -> tuple[Path, tempfile.TemporaryDirectory | None]:
    if workdir is not None:
        Path(workdir).mkdir(parents=True, exist_ok=True)
        return Path(workdir), None
    tmp = tempfile.TemporaryDirectory(prefix=prefix)
    return Path(tmp.name), tmp


def _check_port_free(host: str, port: int) -> None:
    if port_accepts(host, port):
        raise UsageError(f"something already listens on {_url_host(host)}:{port}",
                         fix=f"pick another port (--port {port + 1}), or use that broker: "
                             f"--broker mqtt://{_url_host(host)}:{port}")


def embedded_config(host: str, port: int, *, v5_port: int | None = None,
                    max_payload: int = EMBEDDED_MAX_PAYLOAD, max_connections: int = 1000) -> str:
    """rumqttd TOML: an MQTT 3.1.1 listener (and optionally an MQTT 5 one), round-robin shared subscriptions."""
    def listener(kind: str, p: int) -> str:
        return (f'[{kind}.1]\nname = "{kind}-1"\nlisten = "{host}:{p}"\nnext_connection_delay_ms = 1\n'
                f"    [{kind}.1.connections]\n    connection_timeout_ms = 60000\n"
                f"    max_payload_size = {max_payload}\n    max_inflight_count = 500\n"
                f"    dynamic_filters = true\n")
    text = ("# written by edgesplit: the embedded broker (rumqttd via iotcore)\nid = 0\n\n[router]\nid = 0\n"
            f"max_connections = {max_connections}\nmax_outgoing_packet_count = 500\n"
            f"max_segment_size = {max(104857600, 4 * max_payload)}\nmax_segment_count = 10\n"
            # spread a shared subscription's messages evenly over the workers
            'shared_subscriptions_strategy = "roundrobin"\n\n' + listener("v4", port))
    if v5_port is not None:
        text += "\n" + listener("v5", v5_port)
    return text


def start_embedded(host: str = "127.0.0.1", port: int | None = None, *, v5_port: int | None = None,
                   workdir: str | os.PathLike | None = None, max_payload: int = EMBEDDED_MAX_PAYLOAD,
                   timeout: float = 15.0) -> RunningBroker:
    """Start the embedded rumqttd broker in a child process and wait until it accepts connections."""
    try:
        import iotcore  # noqa: F401  (checked here so the error names the fix)
    except ImportError:
        raise ConfigError("the embedded broker needs the iotcore package, which is not installed",
                          fix="pip install 'iotcore>=0.4,<0.5' (or run a real broker: edgesplit broker --mosquitto)"
                          ) from None
    port = free_port(host if is_loopback(host) else "127.0.0.1") if port is None else port
    _check_port_free(host, port)
    wd, tmp = _workdir(workdir, "edgesplit-rumqttd-")
    conf = wd / "rumqttd.toml"
    conf.write_text(embedded_config(host, port, v5_port=v5_port, max_payload=max_payload))
    env = dict(os.environ)
    env.setdefault("EDGESPLIT_BROKER_LOG", "WARNING")
    b = RunningBroker("embedded", host, port, [sys.executable, "-I", "-c", _EMBEDDED_CHILD, str(conf)],
                      conf, wd / "rumqttd.log", wd, env=env, _tmp=tmp)
    try:
        return b.start(timeout)
    except BaseException:
        b.cleanup()
        raise


def mosquitto_config(host: str, port: int, *, log_path: Path, persistence_dir: Path | None = None,
                     extra_lines: tuple[str, ...] | list[str] = (), anonymous: bool = True) -> str:
    listener = f"listener {port}" + ("" if host in ("0.0.0.0", "", "::") else f" {host}")
    lines = ["# written by edgesplit", listener, f"allow_anonymous {'true' if anonymous else 'false'}",
             f"log_dest file {log_path}", "log_type error", "log_type warning", "log_type notice",
             "log_type information", "connection_messages true",
             # the default (1000) silently drops QoS 1 messages queued for a slow subscriber,
             # e.g. a burst of results for a device on a weak link
             "max_queued_messages 100000",
             # one small frame must leave at once (Nagle + delayed ACK cost ~80 ms per answer)
             "set_tcp_nodelay true"]
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        # started as root, mosquitto drops to the 'mosquitto' user, which cannot read our
        # (private) work directory; stay the user who started it
        lines.append("user root")
    if persistence_dir is not None:
        # autosave every second so a SIGKILL loses at most a second of broker state
        lines += ["persistence true", f"persistence_location {persistence_dir}/", "autosave_interval 1"]
    else:
        lines.append("persistence false")
    return "\n".join([*lines, *extra_lines]) + "\n"


def _config_listener(config, host: str | None, port: int | None) -> tuple[Path, tuple[int, str, bool]]:
    """The conf file in ``config`` and (port, address to reach it on, TLS?) of its first listener;
    a ``host``/``port`` the caller asked for must agree with it."""
    from deploy.broker_config import conf_listener, find_conf

    conf = find_conf(config)
    c_port, c_bind, tls = conf_listener(conf)
    if port is not None and port != c_port:
        raise UsageError(f"--port {port} does not match {conf}, which listens on port {c_port}",
                         fix=f"drop --port (the configuration decides), or write the configuration again with "
                             f"`edgesplit broker config --port {port}`")
    anywhere = c_bind is None or c_bind in ("0.0.0.0", "::")
    if host is not None and not anywhere and host != c_bind and not (is_loopback(host) and is_loopback(c_bind)):
        raise UsageError(f"--host {host} does not match {conf}, which listens on {c_bind}",
                         fix="drop --host (the configuration decides), or write the configuration again with "
                             f"`edgesplit broker config --bind {host}`")
    # a listener on every interface is reached on loopback from here
    return conf, (c_port, "127.0.0.1" if anywhere else c_bind, tls)


def start_mosquitto(host: str | None = None, port: int | None = None, *, extra_lines=(),
                    persistence: bool = False, anonymous: bool = True, config_path: str | os.PathLike | None = None,
                    workdir: str | os.PathLike | None = None, timeout: float = 15.0) -> RunningBroker:
    """Start ``mosquitto -c <generated conf>`` (or the given config) and wait until it accepts connections.

    With ``config_path`` (a mosquitto.conf, or a directory written by ``edgesplit broker config``)
    that configuration is used as is; its first listener gives the port, the address and whether
    it speaks TLS (``host``/``port`` must then agree with it or be left out).
    """
    binary = mosquitto_binary()
    if binary is None:
        raise ConfigError("the mosquitto binary is not installed",
                          fix="sudo apt-get install mosquitto (Debian/Raspberry Pi OS), or use the embedded "
                              "broker: edgesplit broker")
    wd, tmp = _workdir(workdir, "edgesplit-mosquitto-")
    log_path = wd / "mosquitto.log"
    tls = False
    if config_path is not None:
        conf, (port, host, tls) = _config_listener(config_path, host, port)
    else:
        host = host or "127.0.0.1"
        port = free_port(host if is_loopback(host) else "127.0.0.1") if port is None else port
        conf = wd / "mosquitto.conf"
        pdir = wd / "persistence" if persistence else None
        if pdir is not None:
            pdir.mkdir(exist_ok=True)
        conf.write_text(mosquitto_config(host, port, log_path=log_path, persistence_dir=pdir,
                                         extra_lines=tuple(extra_lines), anonymous=anonymous))
    _check_port_free(host, port)
    b = RunningBroker("mosquitto", host, port, [binary, "-c", str(conf)], conf, log_path, wd, tls=tls, _tmp=tmp)
    try:
        return b.start(timeout)
    except BaseException:
        b.cleanup()
        raise


# ----------------------------------------------------------------- the verb

@dataclasses.dataclass
class BrokerRun:
    kind: str
    url: str
    seconds: float
    exit_code: int | None

    def summary(self) -> str:
        how = "stopped" if self.exit_code in (0, None, -signal.SIGTERM) else f"exited with code {self.exit_code}"
        return f"{self.kind} broker on {self.url} {how} after {self.seconds:.0f} s"


def serve(host: str | None = None, port: int | None = None, *, mosquitto: bool = False,
          config: str | os.PathLike | None = None, workdir: str | os.PathLike | None = None,
          ready=None) -> BrokerRun:
    """Run a broker in the foreground until SIGINT/SIGTERM (the ``edgesplit broker`` verb).

    Default: the embedded broker on 127.0.0.1:1883.  ``mosquitto``: a real Mosquitto with a
    generated (anonymous, loopback) config, or with ``config`` — a mosquitto.conf or a
    directory written by ``edgesplit broker config`` — whose listener gives port, address and TLS.
    """
    if config is not None and not mosquitto:
        raise UsageError("--config is a Mosquitto configuration", fix="add --mosquitto")
    if config is None:
        host = host or "127.0.0.1"
        port = 1883 if port is None else port
        if not is_loopback(host):
            log.warning("WARNING: the broker listens on %s, reachable from the network, and accepts anonymous "
                        "clients: anyone who can reach it can read every feature tensor and forge results. "
                        "Use it only on a trusted network; in production run Mosquitto with TLS, passwords and "
                        "an ACL (`edgesplit broker config --out DIR ...`, then "
                        "`edgesplit broker --mosquitto --config DIR`).", host)
    stop = threading.Event()
    started = time.monotonic()

    def _on_signal(signum, frame):
        stop.set()

    # handlers first: a Ctrl+C while the broker starts must still stop it cleanly
    old = {s: signal.signal(s, _on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        if mosquitto:
            broker = start_mosquitto(host, port, config_path=config, workdir=workdir)
        else:
            broker = start_embedded(host, port, workdir=workdir)
    except BaseException:
        for s, h in old.items():
            signal.signal(s, h)
        raise
    try:
        what = "Mosquitto" if mosquitto else "embedded broker (rumqttd via iotcore)"
        if config is not None:
            what += f" ({broker.config_path}{', TLS' if broker.tls else ''})"
        log.info("%s listening on %s — log %s; Ctrl+C to stop", what, broker.url, broker.log_path)
        if ready is not None:
            ready(broker)
        while not stop.is_set() and broker.is_running:
            stop.wait(0.5)
        code = broker.process.poll() if broker.process else None
        if code is not None and not stop.is_set():
            log.error("the broker exited by itself (code %s): %s", code, broker.log_tail())
    finally:
        for s, h in old.items():
            signal.signal(s, h)
        broker.cleanup()
    return BrokerRun(broker.kind, broker.url, time.monotonic() - started,
                     None if stop.is_set() else code)


def configure(out, *, devices: int | None = None, device_ids=None, fleet: str = "default",
              cloud_users=None, hostnames=None, port: int | None = None, bind: str | None = None,
              tls_cert=None, tls_key=None, ca=None, broker_dir=None, rotate: bool = False,
              gateways=None, bridge: str | None = None, password_file=None, operators=None):
    """``edgesplit broker config``: a production Mosquitto configuration for ``devices`` (a count:
    pi-001 …) or ``device_ids``; returns :class:`deploy.broker_config.BrokerConfig` (``summary()``).

    With ``bridge`` (the cloud broker's URL): an edge broker bridged to it instead
    (:mod:`deploy.bridge`; ``gateways``: its one name, ``password_file``/``ca``: its login to the cloud).
    """
    from deploy import broker_config

    if bridge is not None:
        from deploy import bridge as edge

        if devices is not None or device_ids or cloud_users or tls_cert or tls_key or hostnames or rotate:
            raise UsageError("the edge broker bridges the whole fleet: --devices, --device, --cloud-user, "
                             "--hostname, --tls-cert/--tls-key and --rotate are for the cloud broker",
                             fix="edgesplit broker config --bridge URL --out DIR [--fleet F] [--gateway NAME] "
                                 "[--password-file FILE] [--ca CLOUD_CA] [--port 1883] [--bind 127.0.0.1]")
        if gateways and len(gateways) > 1:
            raise UsageError("one edge broker has one bridge: give one --gateway name")
        return edge.write_bridge_config(out, bridge, fleet=fleet, gateway=(gateways or [None])[0],
                                        password_file=password_file, ca=ca, listen_port=port or 1883,
                                        bind=bind or "127.0.0.1", broker_dir=broker_dir)
    if password_file:
        raise UsageError("--password-file is the bridge's login to the cloud broker", fix="use it with --bridge")
    port = 8883 if port is None else port

    if (devices is None) == (not device_ids):
        raise UsageError("say which devices the broker serves, one way",
                         fix="give --devices N (pi-001 … pi-N) or --device ID [ID ...], not both")
    if bool(tls_cert) != bool(tls_key):
        raise UsageError("your own server certificate needs both --tls-cert and --tls-key",
                         fix="give both PEM files, or neither to have edgesplit make a CA and certificate")
    ids = broker_config.device_ids(devices) if devices is not None else list(device_ids)
    return broker_config.write_broker_config(
        out, ids, fleet=fleet, cloud_users=tuple(cloud_users or ("cloud",)), tls_cert=tls_cert, tls_key=tls_key,
        ca=ca, hostnames=tuple(hostnames or ("localhost",)), port=port, bind=bind, broker_dir=broker_dir,
        rotate=rotate, gateways=tuple(gateways or ()), operators=tuple(operators or ("operator",)))
