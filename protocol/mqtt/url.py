"""Broker addresses and password files: what a user writes, checked before any connection.

No paho here: the command, the device package and the service check a URL (and say what is
wrong with it) on a machine that does not have paho installed.
"""
from __future__ import annotations

import dataclasses
import difflib
import os
import urllib.parse
from pathlib import Path

from protocol.errors import ConfigError, UsageError

__all__ = ["BrokerUrl", "parse_url", "read_password_file"]

_URL_OPTIONS = ("ca", "cert", "key", "protocol")
# names other tools use for the same things (mosquitto_sub --cafile, paho's ca_certs, ...)
_URL_ALIASES = {"cafile": "ca", "ca_file": "ca", "ca_certs": "ca", "capath": "ca", "certfile": "cert",
                "keyfile": "key", "version": "protocol", "v": "protocol", "mqtt_version": "protocol"}
# how users spell an MQTT version -> the two the client speaks
_PROTOCOLS = {"3.1.1": "3.1.1", "311": "3.1.1", "4": "3.1.1", "5": "5", "5.0": "5"}


@dataclasses.dataclass(frozen=True)
class BrokerUrl:
    """A parsed ``mqtt://`` / ``mqtts://`` broker address.  ``str()`` hides the password."""

    host: str
    port: int
    tls: bool = False
    username: str | None = None
    password: str | None = dataclasses.field(default=None, repr=False)
    ca: str | None = None
    cert: str | None = None
    key: str | None = None
    protocol: str = "3.1.1"

    def __str__(self) -> str:
        auth = ""
        if self.username is not None:
            auth = urllib.parse.quote(self.username, safe="") + (":***" if self.password is not None else "") + "@"
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{'mqtts' if self.tls else 'mqtt'}://{auth}{host}:{self.port}"


def parse_url(url: str, *, username: str | None = None, password: str | None = None,
              tls_ca: str | None = None, tls_cert: str | None = None, tls_key: str | None = None,
              protocol: str | int | None = None) -> BrokerUrl:
    """Parse ``mqtt[s]://[user[:pass]@]host[:port][?ca=..&cert=..&key=..&protocol=5]``.

    Explicit arguments win over what the URL says.  Raises UsageError with the fix.
    """
    example = "mqtt://127.0.0.1:1883 or mqtts://user:pass@broker.example:8883?ca=/etc/edgesplit/ca.pem"
    if not isinstance(url, str) or "://" not in url:
        raise UsageError(f"broker address {url!r} is not a URL", fix=f"write it like {example}")
    parts = urllib.parse.urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme not in ("mqtt", "mqtts"):
        raise UsageError(f"broker URL scheme {parts.scheme!r} is not supported",
                         fix=f"use mqtt:// (plain TCP) or mqtts:// (TLS), e.g. {example}")
    tls = scheme == "mqtts"
    try:
        port = parts.port or (8883 if tls else 1883)
    except ValueError:
        raise UsageError(f"broker URL {url!r} has an invalid port", fix=f"write it like {example}") from None
    host = parts.hostname
    if not host:
        raise UsageError(f"broker URL {url!r} has no host", fix=f"write it like {example}")
    if parts.path not in ("", "/"):
        raise UsageError(f"broker URL {url!r} has a path ({parts.path!r}); MQTT over TCP takes none",
                         fix=f"write it like {example}")
    opts: dict[str, str] = {}
    for name, value in urllib.parse.parse_qsl(parts.query, keep_blank_values=True):
        if name not in _URL_OPTIONS:
            near = ([_URL_ALIASES[name]] if name in _URL_ALIASES
                    else difflib.get_close_matches(name, _URL_OPTIONS, n=1))
            raise UsageError(f"unknown broker URL option {name!r}",
                             fix=(f"did you mean {near[0]!r}? " if near else "")
                             + f"known options: {', '.join(_URL_OPTIONS)}")
        opts[name] = value
    user = urllib.parse.unquote(parts.username) if parts.username else None
    pw = urllib.parse.unquote(parts.password) if parts.password is not None else None
    if username is not None:
        user = username
    if password is not None:
        pw = password
    if pw is not None and user is None:
        raise UsageError("a broker password was given without a user name",
                         fix="give both, e.g. mqtt://USER:PASS@host:1883")
    proto = str(protocol if protocol is not None else opts.get("protocol", "3.1.1"))
    if proto not in _PROTOCOLS:
        raise UsageError(f"unknown MQTT protocol version {proto!r}", fix="use 3.1.1 (default) or 5")
    proto = _PROTOCOLS[proto]
    ca, cert, key = (tls_ca or opts.get("ca") or None, tls_cert or opts.get("cert") or None,
                     tls_key or opts.get("key") or None)
    if (ca or cert or key) and not tls:
        raise UsageError(f"TLS files were given for a plain mqtt:// broker ({url})",
                         fix="use mqtts://host:8883 to connect with TLS")
    for what, path in (("CA certificate", ca), ("client certificate", cert), ("client key", key)):
        if path and not os.path.isfile(path):
            raise ConfigError(f"the {what} file {path} does not exist",
                              fix="point ?ca=/ --tls-ca at the PEM file the broker's certificate was signed with")
    if bool(cert) != bool(key):
        raise UsageError("a TLS client certificate needs both cert and key", fix="give ?cert=...&key=...")
    return BrokerUrl(host=host, port=port, tls=tls, username=user, password=pw, ca=ca, cert=cert, key=key,
                     protocol=proto)


def read_password_file(path: str | os.PathLike) -> str:
    """The broker password kept in ``path`` (its first line), so that it never shows in the process list.

    With systemd, e.g. ``LoadCredential=broker-password:/etc/edgesplit/cloud/password`` and
    ``--password-file ${CREDENTIALS_DIRECTORY}/broker-password``.  UsageError (exit 2) when the
    file is missing, unreadable or empty.
    """
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UsageError(f"password file {p} does not exist",
                         fix="give the file holding the broker password (the password file of the user's "
                             "directory from `edgesplit broker config`)") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"cannot read the password file {p}: {exc}",
                         fix="make it a readable UTF-8 text file holding the password on its first line") from None
    lines = text.splitlines()
    password = lines[0] if lines else ""
    if not password:
        raise UsageError(f"password file {p} is empty", fix="write the broker password on its first line")
    return password
