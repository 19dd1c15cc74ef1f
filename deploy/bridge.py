"""An edge broker bridged to the cloud: ``edgesplit broker config --bridge URL`` (docs/broker.md, "At the edge").

For a gateway beside the devices, or the Raspberry Pi itself: devices publish to a Mosquitto near
them, and its bridge forwards every device's ``features`` and ``status`` of the fleet to the cloud
broker and brings their ``results`` back.  Writes::

    out_dir/edge/
      mosquitto.conf   (0600: it holds the bridge's password) a local listener, persistence, the bridge
      cloud-ca.crt     the CA the bridge checks the cloud broker with (mqtts://)
      data/            Mosquitto's persistence: the local queue survives a restart of the edge broker

Nothing is lost across a WAN cut: the bridge's session is persistent on both sides
(``cleansession false``): while the link is down the edge broker queues the features (QoS 1,
up to ``max_queued_messages``) and the cloud broker queues the results for the bridge; both are
delivered when the link returns (the bridge retries every 1-15 s).  The cloud broker's ACL must
let the bridge's user write the fleet's ``features``/``status`` and read its ``results``
(``edgesplit broker config --gateway NAME`` on the cloud side makes such a user).
"""
from __future__ import annotations

import dataclasses
import ipaddress
import logging
import shutil
from pathlib import Path

from protocol import topics
from protocol.errors import UsageError
from protocol.mqtt.url import parse_url, read_password_file

log = logging.getLogger(__name__)

CONF_NAME = "mosquitto.conf"
EDGE_DIR = "edge"
DEFAULT_QUEUE = 100_000       # frames the edge keeps for the cloud while the link is down (~150 MB of pool2)


def is_loopback(host: str) -> bool:
    # (deploy.broker has the same test; it imports this module, so this one cannot import it)
    try:
        return host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@dataclasses.dataclass(frozen=True)
class BridgeConfig:
    """What :func:`write_bridge_config` wrote; ``summary()`` says what to do next."""

    out_dir: Path
    conf_path: Path
    fleet: str
    cloud: str                # the cloud broker, password hidden
    listen: str               # where local devices connect
    gateway: str
    queue: int

    def summary(self) -> str:
        return "\n".join([
            f"edge broker configuration for fleet {self.fleet!r} written to {self.conf_path.parent}",
            f"  devices  : connect to {self.listen} (as they would to the cloud broker)",
            f"  bridge   : {self.gateway} -> {self.cloud}: features and status out, results in (QoS 1, "
            f"persistent session)",
            f"  WAN cut  : up to {self.queue:,} messages queued here, results queued in the cloud; nothing lost",
            f"  run      : edgesplit broker --mosquitto --config {self.conf_path.parent}"
            f"   (or mosquitto -c {self.conf_path})"])


def render_bridge_conf(installed: Path, *, fleet: str, gateway: str, cloud, listen_port: int, bind: str,
                       ca_file: str | None, broker_user: str | None, queue: int) -> str:
    """mosquitto.conf of the edge broker (Mosquitto 2.x)."""
    d = installed
    host = f"[{cloud.host}]" if ":" in cloud.host else cloud.host
    lines = [f"# Edge broker for edgesplit fleet {fleet!r}, bridged to {cloud}.",
             "# Written by `edgesplit broker config --bridge`; re-run it rather than editing this file.",
             "per_listener_settings false",
             f"listener {listen_port} {bind}",
             # a loopback listener serves the Pi itself; a gateway's LAN listener is the network's to guard
             f"allow_anonymous {'true' if is_loopback(bind) else 'false'}"]
    if broker_user:
        lines += [f"# started as root, Mosquitto drops to this user (it must be able to read {d})", f"user {broker_user}"]
    lines += ["# the local queue: what the bridge could not send yet survives a restart of this broker",
              "persistence true",
              f"persistence_location {d / 'data'}/",
              "autosave_interval 5",
              f"max_queued_messages {queue}",
              "max_inflight_messages 100",
              "set_tcp_nodelay true",
              "log_dest stderr",
              "log_type error", "log_type warning", "log_type notice", "log_type information",
              "connection_messages true",
              "",
              f"connection edgesplit-{gateway}",
              f"address {host}:{cloud.port}",
              "bridge_protocol_version mqttv311",
              f"remote_clientid edgesplit-bridge-{gateway}",
              f"local_clientid edgesplit-bridge-{gateway}-local",
              # persistent on both sides: features queue here, results queue in the cloud, while the link is down
              "cleansession false",
              "start_type automatic",
              "restart_timeout 1 15",
              "keepalive_interval 20",
              "try_private true",
              "notifications true",
              "notifications_local_only true",
              f"topic {topics.all_features(fleet)} out 1",
              f"topic {topics.PREFIX}/{fleet}/+/{topics.STATUS} out 1",
              f"topic {topics.PREFIX}/{fleet}/+/{topics.RESULTS} in 1",
              # bundle updates (docs/fleet.md): announcements and chunks in, reports out, dead letters in
              f"topic {topics.fleet_announce(fleet)} in 1",
              f"topic {topics.all_of(topics.ANNOUNCE, fleet)} in 1",
              f"topic {topics.PREFIX}/{fleet}/{topics.CHUNK}/# in 1",
              f"topic {topics.all_dead_letters(fleet)} in 1",
              f"topic {topics.all_of(topics.REPORT, fleet)} out 1"]
    if cloud.username is not None:
        lines.append(f"remote_username {cloud.username}")
        if cloud.password is not None:
            lines.append(f"remote_password {cloud.password}")
    if cloud.tls:
        if ca_file:
            lines.append(f"bridge_cafile {ca_file}")
        else:
            lines.append("bridge_capath /etc/ssl/certs")
        lines += ["bridge_insecure false", "bridge_tls_version tlsv1.2"]
    return "\n".join(lines) + "\n"


def write_bridge_config(out_dir, cloud_url: str, *, fleet: str = "default", gateway: str | None = None,
                        password_file=None, ca=None, listen_port: int = 1883, bind: str = "127.0.0.1",
                        broker_dir=None, broker_user: str | None = "mosquitto",
                        queue: int = DEFAULT_QUEUE) -> BridgeConfig:
    """Write the edge broker's configuration into ``out_dir/edge`` (see the module docstring).

    ``cloud_url``: the cloud broker (``mqtts://user@host:8883?ca=ca.pem``; the password from
    ``password_file`` or the URL).  ``gateway``: the bridge's name (client ids; default the URL's
    user, else ``gateway``).  ``bind``/``listen_port``: where the devices connect (default
    127.0.0.1:1883, the Pi itself).
    """
    from deploy.broker_config import _chown_for_broker, _write

    fleet = topics.check_id(fleet, "fleet id")
    password = read_password_file(password_file) if password_file else None
    cloud = parse_url(cloud_url, password=password, tls_ca=str(ca) if ca else None)
    gateway = topics.check_id(gateway or cloud.username or "gateway", "gateway name")
    if not isinstance(listen_port, int) or not 0 < listen_port < 65536:
        raise UsageError(f"port {listen_port!r} is not a TCP port", fix="use 1..65535, normally 1883 at the edge")
    if cloud.username is not None and cloud.password is None:
        raise UsageError(f"the bridge logs in to {cloud} as {cloud.username!r} but has no password",
                         fix="give --password-file FILE (or the cloud credentials directory's password file)")
    if not is_loopback(bind):
        log.warning("the edge broker listens on %s and refuses anonymous clients: add a password_file (and "
                    "TLS) for the devices on that network to %s", bind, CONF_NAME)
    out = Path(out_dir).absolute()
    edir = out / EDGE_DIR
    installed = Path(broker_dir).absolute() if broker_dir else edir
    ca_file = None
    if cloud.tls and cloud.ca:
        src = Path(cloud.ca)
        if not src.is_file():
            raise UsageError(f"the cloud broker's CA {src} does not exist",
                             fix="give the ca.crt from the cloud's `edgesplit broker config` (?ca=PATH or --ca)")
        edir.mkdir(parents=True, exist_ok=True)
        if src.resolve() != (edir / "cloud-ca.crt").resolve():
            shutil.copyfile(src, edir / "cloud-ca.crt")
        ca_file = str(installed / "cloud-ca.crt")
    (edir / "data").mkdir(parents=True, exist_ok=True)
    conf = render_bridge_conf(installed, fleet=fleet, gateway=gateway, cloud=cloud, listen_port=listen_port,
                              bind=bind, ca_file=ca_file, broker_user=broker_user, queue=queue)
    _write(edir / CONF_NAME, conf, 0o600)          # holds the bridge's password
    _chown_for_broker(edir, broker_user)
    host = f"[{bind}]" if ":" in bind else bind
    return BridgeConfig(out, edir / CONF_NAME, fleet, str(cloud), f"mqtt://{host}:{listen_port}", gateway, queue)
