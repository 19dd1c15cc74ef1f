"""A production Mosquitto configuration for one fleet: TLS only, passwords, ACL.

``write_broker_config(out_dir, devices)`` writes::

    out_dir/
      broker/                 copy this to the broker host (or point --broker-dir at it)
        mosquitto.conf        one TLS listener, no plain TCP, allow_anonymous false
        ca.crt  server.crt  server.key (0600)
        passwd (0600)         Mosquitto's own PBKDF2-SHA512 ``$7$`` hashes
        acl                   one block per user; everything not listed is denied
        data/                 Mosquitto's persistence (persistent sessions survive a restart)
      ca/ca.key (0600)        signs server certificates; never needed on the broker
      devices/<id>/           what to flash on one device: broker.json, password (0600), ca.crt
      cloud/<user>/           the same for a cloud worker's user
      gateways/<name>/        the same for an edge broker's bridge (``gateways``: see deploy.bridge)
      operator/<user>/        the same for the fleet's operator (``edgesplit fleet``: publish, rollback, status)
      fleet/fleet.key (0600)  signs bundle announcements; every user's directory gets fleet.pub
                              (deploy.fleet_config: the key and the ACL lines for bundle updates)

The ACL names every device explicitly (no ``%u`` patterns): a reader sees
exactly who may do what, and a user name that is not in the file gets nothing.
Mosquitto checks a ``$share/<group>/<filter>`` subscription against ``<filter>``
and every delivered message against the receiver's read rights, so the cloud
users' ``read`` rule on ``.../+/features`` covers the shared subscription too.

Re-running keeps the CA, the server certificate (unless the host names changed
or it is about to expire) and every password; ``rotate=True`` makes them anew.
"""
from __future__ import annotations

import base64
import dataclasses
import datetime
import hashlib
import hmac
import ipaddress
import json
import logging
import os
import pwd
import secrets
import stat
import tempfile
from pathlib import Path
from typing import Iterable, Sequence

from deploy import fleet_config
from protocol import topics
from protocol.errors import ConfigError, UsageError

log = logging.getLogger(__name__)

__all__ = ["BrokerConfig", "write_broker_config", "device_ids", "hash_password", "verify_password",
           "find_conf", "conf_listener"]

CONF_NAME = "mosquitto.conf"
# mosquitto_passwd (2.x) writes PBKDF2-HMAC-SHA512 with 101 rounds and a 12-byte
# salt.  The broker reads the round count from the hash; we match the tool so the
# file is indistinguishable from one it wrote.  With 192-bit random passwords the
# round count is not what keeps them safe.
PBKDF2_ITERATIONS = 101
SALT_BYTES = 12
HASH_BYTES = 64
CA_DAYS = 3650
SERVER_DAYS = 825
RENEW_BEFORE_DAYS = 30
DEFAULT_MAX_PACKET = 16 * 1024 * 1024  # as the embedded broker (deploy.broker): a big early-cut tensor fits


@dataclasses.dataclass(frozen=True)
class BrokerConfig:
    """What ``write_broker_config`` wrote; ``summary()`` tells the user what to do next."""

    out_dir: Path
    broker_dir: Path          # where the generated files are
    installed_dir: Path       # the directory mosquitto.conf refers to (broker_dir unless told otherwise)
    conf_path: Path
    fleet: str
    port: int
    hostnames: tuple[str, ...]
    broker_url: str
    devices: tuple[str, ...]
    cloud_users: tuple[str, ...]
    ca_path: Path | None      # CA the clients trust (None: a public CA, the system's trust store)
    own_certificate: bool     # the user supplied the server certificate
    created: tuple[str, ...]  # what this run made anew (CA, server certificate, passwords)
    stale: tuple[str, ...]    # credential directories of users no longer in the config
    gateways: tuple[str, ...] = ()   # edge brokers' bridges: write the fleet's features/status, read its results
    operators: tuple[str, ...] = ()  # who publishes bundle announcements and reads the fleet's reports
    fleet_key: Path | None = None    # the announcements' signing key (fleet.pub beside it)

    def credentials_dir(self, user: str) -> Path:
        """Directory holding ``user``'s broker.json, password and ca.crt."""
        if user in self.devices:
            return self.out_dir / "devices" / user
        if user in self.cloud_users:
            return self.out_dir / "cloud" / user
        if user in self.gateways:
            return self.out_dir / "gateways" / user
        if user in self.operators:
            return self.out_dir / "operator" / user
        raise UsageError(f"{user!r} is not a user of this broker configuration",
                         fix=f"devices: {', '.join(self.devices)}; cloud users: {', '.join(self.cloud_users)}")

    def password(self, user: str) -> str:
        """The (plain) password of a device or cloud user, read from its credential file."""
        return (self.credentials_dir(user) / "password").read_text().strip()

    def summary(self) -> str:
        lines = [f"Mosquitto configuration for fleet {self.fleet!r} written to {self.broker_dir}",
                 f"  listener : TLS only, port {self.port} ({self.broker_url}); no plain TCP; anonymous refused",
                 f"  users    : {len(self.devices)} device(s), cloud: {', '.join(self.cloud_users)}",
                 "  ACL      : each device writes only its own features/status and reads only its own results;"
                 " cloud users read all features, write results and dead letters; nothing else"]
        if self.created:
            lines.append(f"  new      : {', '.join(self.created)}")
        else:
            lines.append("  new      : nothing (CA, certificate and passwords kept; --rotate makes new ones)")
        if self.stale:
            lines.append(f"  stale    : credentials of {', '.join(self.stale)} are no longer accepted "
                         f"(delete their directories when those devices are gone)")
        if self.gateways:
            lines.append(f"  gateways : {', '.join(self.gateways)}: give {self.out_dir / 'gateways'}/<name>/ to "
                         f"`edgesplit broker config --bridge` on the edge (docs/broker.md, 'At the edge')")
        if self.operators:
            lines.append(f"  operator : {', '.join(self.operators)}: {self.out_dir / 'operator'}/<user>/ with the "
                         f"signing key {self.fleet_key} publishes bundles (edgesplit fleet publish --config "
                         f"{self.out_dir})")
        lines += [f"  devices  : flash {self.out_dir / 'devices'}/<id>/ onto each device",
                  f"  cloud    : give {self.out_dir / 'cloud'}/<user>/ to the cloud workers",
                  f"  run      : edgesplit broker --mosquitto --config {self.broker_dir}"
                  f"   (or mosquitto -c {self.installed_dir / CONF_NAME})"]
        if self.installed_dir != self.broker_dir:
            lines.append(f"  install  : copy {self.broker_dir}/ to {self.installed_dir}/ on the broker host "
                         f"and chown -R mosquitto: {self.installed_dir}")
        return "\n".join(lines)


# ----------------------------------------------------------------- passwords

def hash_password(password: str, *, salt: bytes | None = None, iterations: int = PBKDF2_ITERATIONS) -> str:
    """Mosquitto 2.x password hash: ``$7$<rounds>$<b64 salt>$<b64 PBKDF2-HMAC-SHA512>``."""
    salt = secrets.token_bytes(SALT_BYTES) if salt is None else salt
    digest = hashlib.pbkdf2_hmac("sha512", password.encode("utf-8"), salt, iterations, HASH_BYTES)
    return f"$7${iterations}${base64.b64encode(salt).decode()}${base64.b64encode(digest).decode()}"


def verify_password(password: str, hashed: str) -> bool:
    """True if ``hashed`` (a ``$7$`` line part as Mosquitto stores it) is ``password``'s hash."""
    try:
        _, kind, rounds, salt_b64, digest_b64 = hashed.split("$")
        if kind != "7":
            return False
        salt, digest = base64.b64decode(salt_b64, validate=True), base64.b64decode(digest_b64, validate=True)
        mine = hashlib.pbkdf2_hmac("sha512", password.encode("utf-8"), salt, int(rounds), len(digest))
    except (ValueError, TypeError):
        return False
    return hmac.compare_digest(mine, digest)


def _new_password() -> str:
    # 32 URL-safe characters (192 bits): no ':' and nothing a shell or URL must escape.
    return secrets.token_urlsafe(24)


# ----------------------------------------------------------------- ids

def device_ids(n: int, prefix: str = "pi") -> list[str]:
    """``pi-001`` … ``pi-<n>`` (three digits at least)."""
    if not isinstance(n, int) or n < 1:
        raise UsageError(f"--devices needs a positive number of devices, got {n!r}",
                         fix="e.g. --devices 3 (makes pi-001, pi-002, pi-003) or --device ID ...")
    width = max(3, len(str(n)))
    return [topics.check_id(f"{prefix}-{i:0{width}d}") for i in range(1, n + 1)]


def _check_users(devices: Sequence[str], cloud_users: Sequence[str]) -> tuple[tuple[str, ...], tuple[str, ...]]:
    if isinstance(devices, str) or isinstance(cloud_users, str):
        raise UsageError("devices and cloud users are lists of ids, not one string",
                         fix="pass e.g. devices=['pi-001'], cloud_users=('cloud',)")
    devs = tuple(topics.check_id(d, "device id") for d in devices)
    cloud = tuple(topics.check_id(c, "cloud user name") for c in cloud_users)
    if not devs:
        raise UsageError("no devices given", fix="use --devices N or --device ID [ID ...]")
    if not cloud:
        raise UsageError("no cloud user given", fix="keep the default cloud user 'cloud' or name one")
    for kind, ids in (("device id", devs), ("cloud user name", cloud)):
        dup = sorted({i for i in ids if ids.count(i) > 1})
        if dup:
            raise UsageError(f"{kind} given twice: {', '.join(dup)}", fix="give every id once")
    both = sorted(set(devs) & set(cloud))
    if both:
        raise UsageError(f"{', '.join(both)} is both a device and a cloud user",
                         fix="device ids and cloud user names are broker user names and must differ")
    return devs, cloud


# ----------------------------------------------------------------- files

def _write(path: Path, data: str | bytes, mode: int = 0o644) -> None:
    """Write atomically; the file has ``mode`` from its first byte (no world-readable window)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    raw = data.encode() if isinstance(data, str) else data
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as f:
            f.write(raw)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _read_pem(path: Path | str, what: str, flag: str) -> bytes:
    p = Path(path)
    if not p.is_file():
        raise UsageError(f"the {what} {p} does not exist", fix=f"point {flag} at a PEM file")
    return p.read_bytes()


# ----------------------------------------------------------------- certificates

def _x509():
    # cryptography is a workstation dependency; import it only when certificates are made.
    try:
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
    except ImportError:  # pragma: no cover - cryptography is in the workstation extra
        raise UsageError("making certificates needs the 'cryptography' package",
                         fix="pip install 'edgesplit[workstation]' (or pip install cryptography)") from None
    return x509, hashes, serialization, ec, ExtendedKeyUsageOID, NameOID


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.timezone.utc)


def _key_pem(key) -> bytes:
    _, _, serialization, *_ = _x509()
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _make_ca(fleet: str):
    x509, hashes, serialization, ec, _, NameOID = _x509()
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "edgesplit"),
                      x509.NameAttribute(NameOID.COMMON_NAME, f"edgesplit {fleet} broker CA")])
    now = _now()
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (x509.CertificateBuilder()
            .subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=CA_DAYS))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False, key_encipherment=False,
                                         data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                         crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(ski, critical=False)
            .sign(key, hashes.SHA256()))
    return key, cert


def _san_entries(hostnames: Sequence[str]):
    x509, *_ = _x509()
    names, seen = [], set()

    def add(entry):
        if entry not in seen:
            seen.add(entry)
            names.append(entry)

    for h in hostnames:
        try:
            add(x509.IPAddress(ipaddress.ip_address(h)))
        except ValueError:
            add(x509.DNSName(h))
            if h == "localhost":  # clients often dial the loopback address instead
                add(x509.IPAddress(ipaddress.ip_address("127.0.0.1")))
                add(x509.IPAddress(ipaddress.ip_address("::1")))
    return names


def _make_server_cert(ca_key, ca_cert, hostnames: Sequence[str]):
    x509, hashes, serialization, ec, ExtendedKeyUsageOID, NameOID = _x509()
    key = ec.generate_private_key(ec.SECP256R1())
    now = _now()
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "edgesplit"),
                                     x509.NameAttribute(NameOID.COMMON_NAME, hostnames[0])]))
            .issuer_name(ca_cert.subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=SERVER_DAYS))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                                         data_encipherment=False, key_agreement=False, key_cert_sign=False,
                                         crl_sign=False, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(x509.SubjectAlternativeName(_san_entries(hostnames)), critical=False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
            .sign(ca_key, hashes.SHA256()))
    return key, cert


def _server_cert_still_good(cert_path: Path, ca_cert, hostnames: Sequence[str]) -> bool:
    """Keep the server certificate if the same CA signed it, it names the same hosts, and is not expiring."""
    x509, *_ = _x509()
    try:
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
        cert.verify_directly_issued_by(ca_cert)
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except Exception as exc:  # any parse/verify failure: make a new one
        log.info("re-issuing the server certificate: %s", exc)
        return False
    if set(san) != set(_san_entries(hostnames)):
        log.info("re-issuing the server certificate: host names changed")
        return False
    if cert.not_valid_after_utc - _now() < datetime.timedelta(days=RENEW_BEFORE_DAYS):
        log.info("re-issuing the server certificate: it expires on %s", cert.not_valid_after_utc.date())
        return False
    return True


def _check_own_certificate(tls_cert, tls_key, ca) -> tuple[bytes, bytes, bytes | None]:
    """Load the user's certificate, key and CA; refuse a pair that does not match or has expired."""
    x509, hashes, serialization, *_ = _x509()
    if not tls_key:
        raise UsageError("--tls-cert needs --tls-key (the server certificate's private key)",
                         fix="give both --tls-cert FILE and --tls-key FILE")
    cert_pem = _read_pem(tls_cert, "server certificate", "--tls-cert")
    key_pem = _read_pem(tls_key, "server key", "--tls-key")
    ca_pem = _read_pem(ca, "CA certificate", "--ca") if ca else None
    try:
        cert = x509.load_pem_x509_certificate(cert_pem)
    except ValueError as exc:
        raise UsageError(f"{tls_cert} is not a PEM certificate ({exc})", fix="give the PEM (BEGIN CERTIFICATE) file")
    try:
        key = serialization.load_pem_private_key(key_pem, password=None)
    except (ValueError, TypeError) as exc:
        raise UsageError(f"{tls_key} is not an unencrypted PEM private key ({exc})",
                         fix="Mosquitto cannot ask for a passphrase: give it an unencrypted key "
                             "(openssl pkey -in KEY -out plain.key)")
    pub = serialization.PublicFormat.SubjectPublicKeyInfo
    enc = serialization.Encoding.DER
    if key.public_key().public_bytes(enc, pub) != cert.public_key().public_bytes(enc, pub):
        raise UsageError(f"the key {tls_key} does not belong to the certificate {tls_cert}",
                         fix="give the private key the certificate was issued for")
    if cert.not_valid_after_utc <= _now():
        raise UsageError(f"the certificate {tls_cert} expired on {cert.not_valid_after_utc:%Y-%m-%d}",
                         fix="renew it, or leave --tls-cert out to have edgesplit make one")
    if ca_pem is not None:
        try:
            cert.verify_directly_issued_by(x509.load_pem_x509_certificate(ca_pem))
        except Exception:
            # an intermediate may sit in between; say so but do not refuse
            log.warning("%s was not signed directly by %s; make sure devices can build the chain", tls_cert, ca)
    return cert_pem, key_pem, ca_pem


# ----------------------------------------------------------------- ACL and conf

def _results_filter(fleet: str) -> str:
    # protocol.topics has all_features/all_dead_letters; results follow the same layout.
    base = topics.all_features(fleet)
    return base[: -len(topics.FEATURES)] + topics.RESULTS


def render_acl(fleet: str, devices: Sequence[str], cloud_users: Sequence[str], gateways: Sequence[str] = (),
               operators: Sequence[str] = ()) -> str:
    """The ACL file: one ``user`` block per device, cloud user, gateway and operator; all else denied."""
    out = [f"# edgesplit ACL for fleet {fleet!r}: written by `edgesplit broker config`; re-run it, do not edit.",
           "# Mosquitto denies whatever no line below allows. A $share/<group>/<filter> subscription",
           "# is checked against <filter>; every delivered message against the reader's read rights.",
           ""]
    for d in devices:
        out += [f"user {d}",
                f"topic write {topics.features(fleet, d)}",
                f"topic write {topics.status(fleet, d)}",
                f"topic read {topics.results(fleet, d)}",
                *fleet_config.acl_lines(fleet, "device", d),
                ""]
    for c in cloud_users:
        out += [f"user {c}",
                f"topic read {topics.all_features(fleet)}",
                f"topic write {_results_filter(fleet)}",
                f"topic write {topics.all_dead_letters(fleet)}",
                *fleet_config.acl_lines(fleet, "cloud", c),
                ""]
    for g in gateways:          # an edge broker's bridge speaks for every device behind it
        out += [f"user {g}",
                f"topic write {topics.all_features(fleet)}",
                f"topic write {topics.PREFIX}/{fleet}/+/{topics.STATUS}",
                f"topic read {_results_filter(fleet)}",
                *fleet_config.acl_lines(fleet, "gateway", g),
                ""]
    for o in operators:
        out += [f"user {o}", *fleet_config.acl_lines(fleet, "operator", o), ""]
    return "\n".join(out)


def render_conf(installed: Path, *, fleet: str, port: int, bind: str | None, has_ca: bool,
                broker_user: str | None, max_packet_size: int, max_queued_messages: int) -> str:
    """mosquitto.conf for Mosquitto 2.x: one TLS listener, password file, ACL, persistence."""
    d = installed
    lines = [f"# Mosquitto 2.x configuration for edgesplit fleet {fleet!r}.",
             "# Written by `edgesplit broker config`; re-run it rather than editing this file.",
             "# Only the TLS listener below exists: Mosquitto opens no plain-TCP port when a listener is set.",
             "per_listener_settings false",
             "allow_anonymous false",
             f"password_file {d / 'passwd'}",
             f"acl_file {d / 'acl'}"]
    if broker_user:
        lines.append(f"# started as root, Mosquitto drops to this user (it must be able to read {d})")
        lines.append(f"user {broker_user}")
    lines += ["# persistent sessions and queued QoS 1 messages survive a broker restart",
              "persistence true",
              f"persistence_location {d / 'data'}/",
              "autosave_interval 60",
              f"max_queued_messages {max_queued_messages}",
              "set_tcp_nodelay true",
              f"max_packet_size {max_packet_size}",
              "log_dest stderr",
              "log_type error",
              "log_type warning",
              "log_type notice",
              "log_type information",
              "connection_messages true",
              "log_timestamp_format %Y-%m-%dT%H:%M:%S",
              "",
              f"listener {port}" + (f" {bind}" if bind else ""),
              "protocol mqtt",
              f"certfile {d / 'server.crt'}",
              f"keyfile {d / 'server.key'}"]
    if has_ca:
        lines.append(f"cafile {d / 'ca.crt'}")
    lines += ["tls_version tlsv1.2",
              "require_certificate false",
              ""]
    return "\n".join(lines)


def _chown_for_broker(broker_dir: Path, broker_user: str | None) -> None:
    """As root, hand the broker's files to the user Mosquitto drops to, so it can read them."""
    if not broker_user or os.geteuid() != 0 or broker_user == "root":
        return
    try:
        pw = pwd.getpwnam(broker_user)
    except KeyError:
        log.warning("user %r does not exist here: chown %s to it on the broker host", broker_user, broker_dir)
        return
    for path in [broker_dir, *broker_dir.rglob("*")]:
        os.chown(path, pw.pw_uid, pw.pw_gid)
    # Mosquitto must also be able to walk down to the directory (e.g. not under a 0700 home).
    for parent in broker_dir.parents:
        st = parent.stat()
        if not (st.st_mode & stat.S_IXOTH or (st.st_mode & stat.S_IXGRP and st.st_gid == pw.pw_gid)
                or st.st_uid == pw.pw_uid):
            log.warning("Mosquitto drops to user %r, which cannot enter %s: it will not find its files. "
                        "Put the configuration elsewhere (e.g. /etc/mosquitto/edgesplit) or chmod o+x %s",
                        broker_user, parent, parent)
            break


# ----------------------------------------------------------------- the job

def write_broker_config(out_dir, devices: Iterable[str], fleet: str = "default",
                        cloud_users: Sequence[str] = ("cloud",), tls_cert=None, tls_key=None, ca=None,
                        hostnames: Sequence[str] = ("localhost",), port: int = 8883, *, bind: str | None = None,
                        broker_dir=None, broker_user: str | None = "mosquitto", rotate: bool = False,
                        max_packet_size: int = DEFAULT_MAX_PACKET,
                        max_queued_messages: int = 10000, gateways: Sequence[str] = (),
                        operators: Sequence[str] = ("operator",)) -> BrokerConfig:
    """Write a production Mosquitto configuration for ``devices`` of ``fleet`` into ``out_dir``.

    ``tls_cert``/``tls_key`` (and optionally ``ca``) use your own certificate instead of
    a generated CA.  ``broker_dir`` is where the files will live on the broker host
    (default: ``out_dir/broker`` itself).  ``bind`` limits the listener to one address.
    """
    fleet = topics.check_id(fleet, "fleet id")
    devs, cloud = _check_users(list(devices), list(cloud_users))
    gws = tuple(topics.check_id(g, "gateway name") for g in gateways)
    if set(gws) & (set(devs) | set(cloud)) or len(set(gws)) != len(gws):
        raise UsageError(f"gateway names {', '.join(gws)} repeat or clash with a device or cloud user",
                         fix="give every broker user (device, cloud user, gateway) its own name")
    ops = tuple(topics.check_id(o, "operator name") for o in operators)
    if set(ops) & (set(devs) | set(cloud) | set(gws)) or len(set(ops)) != len(ops):
        raise UsageError(f"operator names {', '.join(ops)} repeat or clash with another broker user",
                         fix="give every broker user (device, cloud user, gateway, operator) its own name")
    hostnames = tuple(hostnames)
    if not hostnames or not all(isinstance(h, str) and h and not any(c.isspace() for c in h) for h in hostnames):
        raise UsageError(f"host names {hostnames!r} are not usable", fix="give the names devices dial, e.g. "
                         "--hostname broker.example.org --hostname 192.168.1.10")
    if not isinstance(port, int) or not 0 < port < 65536:
        raise UsageError(f"port {port!r} is not a TCP port", fix="use 1..65535, normally 8883 for MQTT over TLS")
    if ca and not tls_cert:
        raise UsageError("--ca is only used with your own --tls-cert/--tls-key",
                         fix="leave --ca out to have edgesplit make a CA, or give --tls-cert and --tls-key too")
    out = Path(out_dir).absolute()
    if out.exists() and not out.is_dir():
        raise UsageError(f"{out} exists and is not a directory", fix="give --out a directory")
    bdir = out / "broker"
    installed = Path(broker_dir).absolute() if broker_dir else bdir
    created: list[str] = []

    # --- TLS material
    ca_pem: bytes | None
    if tls_cert:
        cert_pem, key_pem, ca_pem = _check_own_certificate(tls_cert, tls_key, ca)
        _write(bdir / "server.crt", cert_pem)
        _write(bdir / "server.key", key_pem, 0o600)
        if ca_pem is not None:
            _write(bdir / "ca.crt", ca_pem)
        elif (bdir / "ca.crt").exists():
            (bdir / "ca.crt").unlink()
        own = True
    else:
        x509, _, serialization, *_ = _x509()
        ca_key_path, ca_crt_path = out / "ca" / "ca.key", bdir / "ca.crt"
        if not rotate and ca_key_path.is_file() and ca_crt_path.is_file():
            try:
                ca_key = serialization.load_pem_private_key(ca_key_path.read_bytes(), password=None)
                ca_cert = x509.load_pem_x509_certificate(ca_crt_path.read_bytes())
            except (ValueError, TypeError) as exc:
                raise ConfigError(f"the existing CA in {out} cannot be read ({exc})",
                                  fix="restore ca/ca.key and broker/ca.crt, or re-run with --rotate "
                                      "(every device then needs its new credentials)") from None
        else:
            ca_key, ca_cert = _make_ca(fleet)
            _write(ca_key_path, _key_pem(ca_key), 0o600)
            _write(ca_crt_path, ca_cert.public_bytes(serialization.Encoding.PEM))
            created.append("CA")
        srv = bdir / "server.crt"
        if rotate or "CA" in created or not (bdir / "server.key").is_file() \
                or not _server_cert_still_good(srv, ca_cert, hostnames):
            key, cert = _make_server_cert(ca_key, ca_cert, hostnames)
            _write(bdir / "server.key", _key_pem(key), 0o600)
            _write(srv, cert.public_bytes(serialization.Encoding.PEM))
            created.append("server certificate")
        ca_pem = ca_crt_path.read_bytes()
        own = False

    # --- the fleet's signing key for bundle announcements (every user gets its public half)
    fleet_priv, fleet_pub, made = fleet_config.write_fleet_keys(out, rotate=rotate)
    if made:
        created.append("fleet signing key")

    # --- passwords: the plain text lives in each user's credential directory
    old_hashes: dict[str, str] = {}
    if (bdir / "passwd").is_file():
        for line in (bdir / "passwd").read_text().splitlines():
            user, sep, h = line.partition(":")
            if sep:
                old_hashes[user] = h
    host = hostnames[0]
    url = f"mqtts://{'[' + host + ']' if ':' in host else host}:{port}"
    passwd_lines, new_pw = [], []
    for role, users in (("device", devs), ("cloud", cloud), ("gateway", gws), ("operator", ops)):
        for user in users:
            cdir = out / {"device": "devices", "cloud": "cloud", "gateway": "gateways", "operator": "operator"}[role] \
                / user
            pw_file = cdir / "password"
            password = pw_file.read_text().strip() if pw_file.is_file() and not rotate else ""
            if not password:
                password = _new_password()
                _write(pw_file, password, 0o600)
                new_pw.append(user)
            h = old_hashes.get(user)
            passwd_lines.append(f"{user}:{h if h and verify_password(password, h) else hash_password(password)}")
            if ca_pem is not None:
                _write(cdir / "ca.crt", ca_pem)
            elif (cdir / "ca.crt").exists():
                (cdir / "ca.crt").unlink()
            _write(cdir / fleet_pub.name, fleet_pub.read_bytes())
            info = {"role": role, "fleet": fleet, "username": user, "broker_url": url,
                    "password_file": "password", "ca_file": "ca.crt" if ca_pem is not None else None,
                    "fleet_key": fleet_pub.name}
            if role == "device":
                info.update(device_id=user, client_id=f"edgesplit-{fleet}-{user}",
                            topics={"features": topics.features(fleet, user), "status": topics.status(fleet, user),
                                    "results": topics.results(fleet, user)})
            elif role == "gateway":
                info.update(topics={"features": topics.all_features(fleet), "results": _results_filter(fleet)})
            elif role == "operator":
                info.update(signing_key=str(fleet_priv), client_id=f"edgesplit-{fleet}-operator-{user}")
            else:
                info.update(topics={"features": topics.all_features(fleet),
                                    "results": _results_filter(fleet),
                                    "dead_letter": topics.all_dead_letters(fleet)})
            _write(cdir / "broker.json", json.dumps(info, indent=2) + "\n")
    if new_pw:
        created.append(f"passwords for {_short_list(new_pw)}")
    _write(bdir / "passwd", "\n".join(passwd_lines) + "\n", 0o600)
    _write(bdir / "acl", render_acl(fleet, devs, cloud, gws, ops))
    (bdir / "data").mkdir(parents=True, exist_ok=True)
    conf = render_conf(installed, fleet=fleet, port=port, bind=bind, has_ca=ca_pem is not None,
                       broker_user=broker_user, max_packet_size=max_packet_size,
                       max_queued_messages=max_queued_messages)
    _write(bdir / CONF_NAME, conf)
    _chown_for_broker(bdir, broker_user)

    stale = tuple(sorted(p.name for kind, keep in (("devices", devs), ("cloud", cloud), ("gateways", gws),
                                                   ("operator", ops))
                         if (out / kind).is_dir() for p in (out / kind).iterdir()
                         if p.is_dir() and p.name not in keep))
    result = BrokerConfig(out_dir=out, broker_dir=bdir, installed_dir=installed, conf_path=bdir / CONF_NAME,
                          fleet=fleet, port=port, hostnames=hostnames, broker_url=url, devices=devs,
                          cloud_users=cloud, ca_path=(bdir / "ca.crt") if ca_pem is not None else None,
                          own_certificate=own, created=tuple(created), stale=stale, gateways=gws, operators=ops,
                          fleet_key=fleet_priv)
    log.info("wrote %s", result.conf_path)
    return result


def _short_list(names: Sequence[str], limit: int = 6) -> str:
    return ", ".join(names) if len(names) <= limit else f"{', '.join(names[:limit])} and {len(names) - limit} more"


def find_conf(config_dir) -> Path:
    """The mosquitto.conf in ``config_dir`` (the ``--out`` directory or its ``broker/``), for ``--config DIR``."""
    d = Path(config_dir)
    if d.is_file() and d.name.endswith(".conf"):
        return d
    for cand in (d / CONF_NAME, d / "broker" / CONF_NAME, d / "edge" / CONF_NAME):
        if cand.is_file():
            return cand
    raise UsageError(f"no {CONF_NAME} in {d}",
                     fix="write one first: edgesplit broker config --out DIR --devices N, then --config DIR")


def conf_listener(conf_path) -> tuple[int, str | None, bool]:
    """(port, bind address or None, TLS?) of the first ``listener`` in a mosquitto.conf.

    ``edgesplit broker --mosquitto --config DIR`` needs the port to wait for and to print.
    """
    port, bind, tls = None, None, False
    for raw in Path(conf_path).read_text().splitlines():
        words = raw.split()
        if not words or words[0].startswith("#"):
            continue
        if words[0] == "listener":
            if port is not None:
                break
            port = int(words[1])
            bind = words[2] if len(words) > 2 else None
        elif port is not None and words[0] in ("certfile", "psk_hint"):
            tls = True
    if port is None:
        raise UsageError(f"{conf_path} has no listener line", fix="write it with `edgesplit broker config`")
    return port, bind, tls
