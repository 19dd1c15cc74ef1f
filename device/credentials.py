"""The one reader of a device's credentials directory: broker password, broker CA, frame key, broker.json.

Two kinds of directory hold them, and both are read here:

* what ``edgesplit broker config`` writes for a device (``devices/<id>/``): ``broker.json``
  (broker URL, device id, fleet, user, client id), ``password``, ``ca.crt``;
* what the device package installs (``/etc/edgesplit/credentials``, root only):
  ``password``, ``ca.crt``, ``frame.key``.  Under systemd the service reads systemd's
  private copies in ``$CREDENTIALS_DIRECTORY`` first (``LoadCredential=``, names in
  :data:`CREDENTIAL_NAMES`).

The agent (``edgesplit device run``), the service, the doctor and ``edgesplit bundle
device`` all call :func:`read_credentials` (or :func:`resolve_credentials` for a
:class:`~device.config.DeviceConfig`), so a directory means the same thing to each.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
from pathlib import Path

log = logging.getLogger(__name__)

__all__ = ["Credentials", "read_credentials", "resolve_credentials", "directory_facts", "find_device_dir",
           "fleet_key_path", "CREDENTIAL_NAMES"]

#: the names ``LoadCredential=`` gives the files the service reads from ``$CREDENTIALS_DIRECTORY``
CREDENTIAL_NAMES = {"password": "broker-password", "ca": "broker-ca", "key": "frame-key", "fleet": "fleet-key"}
BROKER_JSON = "broker.json"


def _errors(error):
    if error is None:
        from protocol.errors import ConfigError

        return ConfigError
    return error


@dataclasses.dataclass(frozen=True)
class Credentials:
    """What a device authenticates with; ``source`` says where it came from.  Secrets stay out of repr."""

    username: str | None = None
    password: str | None = dataclasses.field(repr=False, default=None)
    ca_path: str | None = None
    key: bytes | None = dataclasses.field(repr=False, default=None)
    source: str = "none"


def _is_file(p: Path) -> bool | None:
    """Is ``p`` a file?  None when its directory cannot be looked into: the device package's root-only
    ``/etc/edgesplit/credentials`` seen by the service's user, whose secrets come through LoadCredential=."""
    try:
        return p.is_file()
    except PermissionError:
        return None


def directory_facts(directory: str | os.PathLike, *, error=None) -> dict:
    """What ``broker.json`` says (broker_url, device_id, fleet, username, client_id, password_file, ca_file);
    ``{}`` when the directory has none (or cannot be looked into).  A cloud user's directory is refused."""
    error = _errors(error)
    d = Path(directory)
    p = d / BROKER_JSON
    if not _is_file(p):
        return {}
    try:
        info = json.loads(p.read_text())
    except (OSError, ValueError) as exc:
        raise error(f"cannot read {p}: {exc}", fix="write it again with `edgesplit broker config`") from None
    if not isinstance(info, dict):
        raise error(f"{p} does not hold a JSON object", fix="write it again with `edgesplit broker config`")
    if info.get("role", "device") != "device":
        raise error(f"{d} holds the credentials of a {info.get('role')} user, not of a device",
                    fix="give the device's directory (devices/<device-id>/)")
    return {k: info[k] for k in ("broker_url", "device_id", "fleet", "username", "client_id", "password_file",
                                 "ca_file") if info.get(k) is not None}


def find_device_dir(credentials: str | os.PathLike, device_id: str | None = None) -> Path:
    """A device's credential directory, given it or ``edgesplit broker config``'s ``--out`` plus the device id."""
    from protocol.errors import UsageError

    c = Path(credentials)
    if not c.is_dir():
        raise UsageError(f"credentials directory {c} does not exist",
                         fix="write them with `edgesplit broker config --out DIR --device ID`, then pass "
                             "--credentials DIR/devices/ID")
    if (c / BROKER_JSON).is_file() or (c / "password").is_file():
        return c
    if device_id and (c / "devices" / device_id).is_dir():
        return c / "devices" / device_id
    if (c / "devices").is_dir():
        known = sorted(p.name for p in (c / "devices").iterdir() if p.is_dir())
        raise UsageError(f"{c} is a broker configuration; which device?",
                         fix=f"add --device-id (one of {', '.join(known) or 'none'}) or pass "
                             f"--credentials {c}/devices/<id>")
    raise UsageError(f"{c} holds no broker.json or password", fix="pass a devices/<id>/ directory of "
                                                                    "`edgesplit broker config`")


def _read_secret(path: Path, what: str, error) -> bytes:
    try:
        return path.read_bytes()
    except PermissionError:
        raise error(f"cannot read the {what} {path} (permission denied)",
                    fix="run as root (sudo) or as the service's user; systemd hands the service a "
                        "private copy through LoadCredential=") from None
    except OSError as exc:
        raise error(f"cannot read the {what} {path}: {exc}", fix="check the file") from None


def read_credentials(directory: str | os.PathLike | None, *, password_file: str | None = None,
                     ca_file: str | None = None, key_file: str = "", systemd_dir: str | os.PathLike | None = None,
                     error=None) -> tuple[Credentials, dict]:
    """Read a credentials directory: (what it authenticates with, what its broker.json says).

    File names are relative to ``directory`` unless absolute; ``None`` takes
    broker.json's name, else ``password`` / ``ca.crt``; ``""`` means none.  A missing
    password file that was asked for, an empty one, a missing CA other than the
    default ``ca.crt`` (missing: the system trust store) and a missing key are
    errors (``error``, default ConfigError: exit 78).  Files in ``systemd_dir``
    (``$CREDENTIALS_DIRECTORY``) win over the directory's.
    """
    error = _errors(error)
    cdir = Path(directory) if directory else None
    sd = Path(systemd_dir) if systemd_dir else None
    if cdir is not None and not cdir.is_dir() and sd is None:
        raise error(f"the credentials directory {cdir} does not exist",
                    fix="install the device package again, or correct `broker.credentials`")
    facts = directory_facts(cdir, error=error) if cdir is not None else {}
    password_file = facts.get("password_file", "password") if password_file is None else password_file
    ca_file = facts.get("ca_file", "ca.crt") if ca_file is None else ca_file
    where: list[str] = []

    def pick(credential: str, name: str) -> Path | None:
        if sd is not None and (sd / credential).is_file():
            return sd / credential
        if name and os.path.isabs(name):
            return Path(name)
        if cdir is not None and name:
            return cdir / name
        return None

    password = ca = key = None
    p = pick(CREDENTIAL_NAMES["password"], password_file)
    if p is not None:
        if _is_file(p) is False:
            if password_file:
                raise error(f"the broker password file {p} does not exist",
                            fix="copy devices/<id>/password from `edgesplit broker config` there, or set "
                                "`broker.password_file = \"\"` for a broker without passwords")
        else:
            password = _read_secret(p, "broker password file", error).decode("utf-8").strip()
            where.append(str(p.parent))
            if not password:
                raise error(f"the broker password file {p} is empty", fix="put the device's password in it")
    p = pick(CREDENTIAL_NAMES["ca"], ca_file)
    ca_there = _is_file(p) if p is not None else False
    if ca_there is None and ca_file in ("", "ca.crt"):
        ca_there = False                 # the default CA, not shipped (so not handed over): the system store
    if p is not None and ca_there is not False:
        _read_secret(p, "broker CA certificate", error)   # readable?
        ca = str(p)
        where.append(str(p.parent))
    elif p is not None and ca_file not in ("", "ca.crt"):
        raise error(f"the broker CA certificate {p} does not exist",
                    fix="copy ca.crt from `edgesplit broker config` there, or remove `broker.ca_file`")
    kp = pick(CREDENTIAL_NAMES["key"], key_file)
    if kp is None and key_file:          # a key named without a credentials directory: from here
        kp = Path(key_file)
    if kp is not None:
        if _is_file(kp) is False:
            raise error(f"the frame key file {kp} does not exist",
                        fix="copy the device's key there (edgesplit keys), or set `agent.key_file = \"\"`")
        _read_secret(kp, "frame key file", error)
        from protocol import signing

        key = signing.load_key(str(kp))
    source = "systemd credentials" if sd is not None and any(w == str(sd) for w in where) else \
        (str(cdir) if cdir is not None and where else ", ".join(dict.fromkeys(where)) or "none")
    return Credentials(username=facts.get("username"), password=password, ca_path=ca, key=key,
                       source=source), facts


def resolve_credentials(cfg, env: dict | None = None, *, error=None) -> Credentials:
    """The credentials of a :class:`~device.config.DeviceConfig`: systemd's ``$CREDENTIALS_DIRECTORY``
    first, then ``broker.credentials``; the user name defaults to the device id once a password is found."""
    env = os.environ if env is None else env
    creds, facts = read_credentials(cfg.credentials, password_file=cfg.password_file, ca_file=cfg.ca_file,
                                    key_file=cfg.key_file, systemd_dir=env.get("CREDENTIALS_DIRECTORY") or None,
                                    error=error)
    ca = creds.ca_path
    if ca is not None and not cfg.broker_url.startswith("mqtts://"):
        log.warning("a CA certificate is configured but the broker URL %s is not mqtts://: TLS is off", cfg.broker_url)
        ca = None
    username = cfg.username or facts.get("username") or (cfg.device_id if creds.password is not None else None)
    return dataclasses.replace(creds, username=username, ca_path=ca)


def fleet_key_path(cfg, env: dict | None = None, *, error=None) -> Path | None:
    """The fleet's public key of a :class:`~device.config.DeviceConfig` (systemd's copy first), or None
    when there is none to be had: the device then takes no bundle updates.  A key named other than
    the default ``fleet.pub`` must exist."""
    name = cfg.fleet_key
    if not name:
        return None
    env = os.environ if env is None else env
    sd = env.get("CREDENTIALS_DIRECTORY")
    if sd and (Path(sd) / CREDENTIAL_NAMES["fleet"]).is_file():
        return Path(sd) / CREDENTIAL_NAMES["fleet"]
    path = Path(name) if os.path.isabs(name) else (cfg.credentials / name if cfg.credentials else Path(name))
    if path.is_file():
        return path
    if name != "fleet.pub":
        raise _errors(error)(f"the fleet key {path} does not exist",
                             fix="copy fleet.pub from `edgesplit broker config` there, or set "
                                 "`update.fleet_key = \"\"` for a device that takes no updates")
    log.debug("no fleet key at %s: this device takes no bundle updates", path)
    return None
