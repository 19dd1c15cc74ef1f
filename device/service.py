"""The device as a long-running service: config file, systemd notify/watchdog, the agent in a loop.

``python -m device.service --config /etc/edgesplit/device.toml`` is what the
``edgesplit-device.service`` unit runs.  It

* reads and validates the device configuration (TOML, or JSON on Python 3.10;
  unknown keys are refused with a "did you mean"), see :func:`load_config`;
* takes the broker password, the broker's CA and the frame key from systemd's
  ``$CREDENTIALS_DIRECTORY`` (``LoadCredential=``) when it runs under systemd,
  otherwise from the configured credentials directory;
* talks to systemd over ``$NOTIFY_SOCKET`` (``READY=1`` once the head is loaded and
  the broker asked, ``WATCHDOG=1`` while the loop makes progress, ``STATUS=``,
  ``STOPPING=1``) with a few lines of :mod:`socket`, no dependency;
* runs :class:`device.agent.DeviceAgent`: watched folders are scanned for new images
  and sent in bursts (a processed image is moved to ``<state_dir>/done/`` or
  deleted, a failed one moved to ``<state_dir>/failed/``), a camera is read
  frame by frame, or a fixed list of inputs is sent once;
* exits 0 on SIGTERM after a clean ``stopped``, 78 on a configuration the service
  cannot run with (refused credentials, a bad bundle, a bad config: systemd's
  ``RestartPreventExitStatus=78`` then leaves it stopped), 1 on anything else.

Never imports TensorFlow.
"""
from __future__ import annotations

import argparse
import dataclasses
import difflib
import json
import logging
import os
import re
import signal
import socket
import sys
import threading
import time
from pathlib import Path
from typing import Any, Iterable

# a fixed name: under `python -m device.service` __name__ is "__main__"
log = logging.getLogger("device.service")

__all__ = ["DeviceConfig", "load_config", "parse_config", "dump_config", "Credentials", "resolve_credentials",
           "Notifier", "DeviceService", "main", "DEFAULT_CONFIG", "CONFIG_KEYS", "CREDENTIAL_NAMES"]

DEFAULT_CONFIG = "/etc/edgesplit/device.toml"
DEFAULT_STATE_DIR = "/var/lib/edgesplit"
EX_CONFIG = 78
#: the names ``LoadCredential=`` gives the files the service reads from ``$CREDENTIALS_DIRECTORY``
CREDENTIAL_NAMES = {"password": "broker-password", "ca": "broker-ca", "key": "frame-key"}
RESULTS_MAX_BYTES = 16 << 20
_INTERPRETERS = ("", "ai_edge_litert", "tflite_runtime", "tensorflow")


def _config_error(message: str, fix: str | None = None):
    from protocol.errors import ConfigError

    return ConfigError(message, fix=fix)


# --------------------------------------------------------------------------- the configuration

@dataclasses.dataclass(frozen=True)
class _Key:
    kind: str                 # "str" | "path" | "int" | "float" | "bool" | "list"
    default: Any
    doc: str
    choices: tuple = ()
    minimum: float | None = None


#: Every key of the device configuration: section -> key -> spec ("" is the top level).
CONFIG_KEYS: dict[str, dict[str, _Key]] = {
    "": {
        "device_id": _Key("str", None, "this device's id: its broker user name and its topics' device part"),
        "fleet": _Key("str", "default", "fleet id (the topic level above the device)"),
        "bundle": _Key("path", None, "bundle directory or .tar.gz made by `edgesplit convert`"),
        "state_dir": _Key("path", DEFAULT_STATE_DIR, "where the outbox, results and processed images go"),
    },
    "broker": {
        "url": _Key("str", None, "mqtt://host:1883 or mqtts://host:8883 (no password here: see credentials)"),
        "username": _Key("str", "", "broker user name (default: the device id when a password is found)"),
        "client_id": _Key("str", "", "MQTT client id (default edgesplit-<fleet>-<device>)"),
        "credentials": _Key("path", "", "directory with the password and CA files (systemd's "
                                        "$CREDENTIALS_DIRECTORY wins when set)"),
        "password_file": _Key("str", "password", "password file name inside credentials ('' for none)"),
        "ca_file": _Key("str", "ca.crt", "CA certificate file name inside credentials (missing: system trust)"),
        "protocol": _Key("str", "3.1.1", "MQTT protocol version", choices=("3.1.1", "5")),
        "persistent_session": _Key("bool", True, "keep the broker session (results queued while offline)"),
    },
    "inputs": {
        "sources": _Key("list", None, "folders, files, globs, or 'camera' / 'camera:N' "
                                      "(default: <state_dir>/inbox)"),
        "watch": _Key("bool", True, "keep watching folders and globs for new images (false: send once, exit)"),
        "poll_interval": _Key("float", 1.0, "seconds between scans of watched folders", minimum=0.01),
        "settle": _Key("float", 1.0, "seconds a new file must be left unchanged before it is read", minimum=0.0),
        "after": _Key("str", "move", "what to do with a processed image", choices=("move", "delete")),
        "camera_interval": _Key("float", 1.0, "seconds between camera frames", minimum=0.0),
    },
    "agent": {
        "timeout": _Key("float", 0.0, "seconds an input may wait for its answer (0: for ever; the outbox "
                                      "keeps it)", minimum=0.0),
        "resend_after": _Key("float", 10.0, "seconds after which an unanswered request is sent again",
                             minimum=0.1),
        "max_in_flight": _Key("int", 64, "unanswered requests allowed at once", minimum=1),
        "batch": _Key("int", 32, "inputs per head invocation", minimum=1),
        "threads": _Key("int", 0, "interpreter threads (0: the interpreter's default)", minimum=0),
        "interpreter": _Key("str", "", "force one TFLite interpreter ('' picks the first installed)",
                            choices=_INTERPRETERS),
        "outbox": _Key("str", "outbox.sqlite", "SQLite outbox inside state_dir ('' for none)"),
        "results": _Key("str", "results.jsonl", "JSON-lines result log inside state_dir ('' for none)"),
        "key_file": _Key("str", "", "frame MAC key file (relative: inside credentials; '' for unsigned)"),
    },
}


@dataclasses.dataclass(frozen=True)
class DeviceConfig:
    """A validated device configuration; paths are absolute."""

    device_id: str
    bundle: Path
    broker_url: str
    fleet: str = "default"
    state_dir: Path = Path(DEFAULT_STATE_DIR)
    username: str = ""
    client_id: str = ""
    credentials: Path | None = None
    password_file: str = "password"
    ca_file: str = "ca.crt"
    protocol: str = "3.1.1"
    persistent_session: bool = True
    sources: tuple[str, ...] = ()
    watch: bool = True
    poll_interval: float = 1.0
    settle: float = 1.0
    after: str = "move"
    camera_interval: float = 1.0
    timeout: float = 0.0
    resend_after: float = 10.0
    max_in_flight: int = 64
    batch: int = 32
    threads: int = 0
    interpreter: str = ""
    outbox: str = "outbox.sqlite"
    results: str = "results.jsonl"
    key_file: str = ""
    path: Path | None = None          # the file it was read from

    # ------------------------------------------------------------- derived
    @property
    def inputs(self) -> tuple[str, ...]:
        return self.sources or (str(self.state_dir / "inbox"),)

    @property
    def outbox_path(self) -> Path | None:
        return (self.state_dir / self.outbox) if self.outbox else None

    @property
    def results_path(self) -> Path | None:
        return (self.state_dir / self.results) if self.results else None

    @property
    def cameras(self) -> list[str]:
        return [s for s in self.inputs if s == "camera" or s.startswith("camera:")]

    def to_dict(self) -> dict:
        """Nested like the file (sections ``broker``, ``inputs``, ``agent``)."""
        flat = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "path"}
        flat["url"] = flat.pop("broker_url")
        out: dict[str, Any] = {}
        for section, keys in CONFIG_KEYS.items():
            target = out if not section else out.setdefault(section, {})
            for key in keys:
                value = flat[key]
                if isinstance(value, Path):
                    value = str(value)
                elif value is None:
                    value = ""
                elif isinstance(value, tuple):
                    value = list(value)
                target[key] = value
        return out


def _line_of(text: str | None, key: str) -> str:
    """' (line N)' for the first line that sets ``key`` in TOML/JSON text, '' if not found."""
    if not text:
        return ""
    pat = re.compile(rf'^\s*"?{re.escape(key)}"?\s*[=:]')
    for i, line in enumerate(text.splitlines(), start=1):
        if pat.match(line):
            return f" (line {i})"
    return ""


def parse_config(raw: dict, *, where: str = "device config", base_dir: Path | None = None,
                 text: str | None = None) -> DeviceConfig:
    """Validate a configuration mapping (as read from the file) and return a :class:`DeviceConfig`.

    Every problem is collected and reported at once (ConfigError, exit 78), each with
    its key path, the file line when known, and a "did you mean" for unknown keys.
    """
    base = Path(base_dir) if base_dir is not None else Path.cwd()
    problems: list[str] = []
    values: dict[str, Any] = {}
    if not isinstance(raw, dict):
        raise _config_error(f"{where} must hold a table of keys, found {type(raw).__name__}",
                            fix="write it like the example in docs/deploy.md")
    sections = [s for s in CONFIG_KEYS if s]
    for key, value in raw.items():
        if key in CONFIG_KEYS[""]:
            continue
        if key in sections:
            if not isinstance(value, dict):
                problems.append(f"`{key}` must be a section ([{key}]), found {type(value).__name__}")
                continue
            for sub in value:
                if sub not in CONFIG_KEYS[key]:
                    near = difflib.get_close_matches(sub, list(CONFIG_KEYS[key]), n=1)
                    others = [f"{s}.{sub}" for s in sections if s != key and sub in CONFIG_KEYS[s]]
                    hint = (f"; did you mean `{key}.{near[0]}`?" if near else
                            f"; it belongs in [{others[0].split('.')[0]}]" if others else
                            f"; known keys in [{key}]: {', '.join(CONFIG_KEYS[key])}")
                    problems.append(f"unknown key `{key}.{sub}`{_line_of(text, sub)}{hint}")
            continue
        everything = list(CONFIG_KEYS[""]) + sections + [k for s in sections for k in CONFIG_KEYS[s]]
        near = difflib.get_close_matches(key, everything, n=1)
        home = next((s for s in sections if key in CONFIG_KEYS[s]), None)
        hint = (f"; it belongs in the [{home}] section" if home else
                f"; did you mean `{near[0]}`?" if near else f"; known keys: {', '.join(everything)}")
        problems.append(f"unknown key `{key}`{_line_of(text, key)}{hint}")

    for section, keys in CONFIG_KEYS.items():
        table = raw if not section else raw.get(section, {})
        if not isinstance(table, dict):
            continue
        for key, spec in keys.items():
            name = f"{section}.{key}" if section else key
            if key not in table:
                if spec.default is None and not (section == "inputs" and key == "sources"):
                    problems.append(f"missing key `{name}`: {spec.doc}")
                values[key] = spec.default
                continue
            value = table[key]
            line = _line_of(text, key)
            ok = True
            if spec.kind in ("str", "path"):
                ok = isinstance(value, str)
            elif spec.kind == "bool":
                ok = isinstance(value, bool)
            elif spec.kind == "int":
                ok = isinstance(value, int) and not isinstance(value, bool)
            elif spec.kind == "float":
                ok = isinstance(value, (int, float)) and not isinstance(value, bool)
                value = float(value) if ok else value
            elif spec.kind == "list":
                if isinstance(value, str):
                    value = [value]
                ok = isinstance(value, list) and all(isinstance(v, str) and v for v in value)
            if not ok:
                want = {"str": "a string", "path": "a path (string)", "bool": "true or false", "int": "an integer",
                        "float": "a number", "list": "a list of strings"}[spec.kind]
                problems.append(f"`{name}`{line} must be {want}, found {value!r}")
                continue
            if spec.choices and value not in spec.choices:
                near = difflib.get_close_matches(str(value), [c for c in spec.choices if c], n=1)
                problems.append(f"`{name}`{line} is {value!r}; it must be one of "
                                f"{', '.join(repr(c) for c in spec.choices)}"
                                + (f" (did you mean {near[0]!r}?)" if near else ""))
                continue
            if spec.minimum is not None and value < spec.minimum:
                problems.append(f"`{name}`{line} is {value}; it must be at least {spec.minimum:g}")
                continue
            values[key] = value

    if not problems:
        from protocol import topics
        from protocol.errors import EdgesplitError

        for key, what in (("device_id", "device id"), ("fleet", "fleet id")):
            try:
                topics.check_id(values[key], what)
            except EdgesplitError as exc:
                problems.append(f"`{key}`{_line_of(text, key)}: {exc.message}")
        url = values["url"]
        try:
            from protocol.mqtt import parse_url

            parsed = parse_url(url)
            if parsed.password is not None:
                problems.append(f"`broker.url`{_line_of(text, 'url')} holds a password: the config file is "
                                f"readable by every user; put the password in the credentials directory")
        except EdgesplitError as exc:
            problems.append(f"`broker.url`{_line_of(text, 'url')}: {exc.message}")
        except ImportError:   # paho missing: the doctor says so; the URL is checked when it is used
            pass
        for key in ("outbox", "results"):
            v = values[key]
            if v and (Path(v).is_absolute() or ".." in Path(v).parts):
                problems.append(f"`agent.{key}` must be a file name inside state_dir, found {v!r}")
        if values["sources"]:
            srcs = [str(s) for s in values["sources"]]
            cams = [s for s in srcs if s == "camera" or s.startswith("camera:")]
            for c in cams:
                tail = c[len("camera:"):] if c != "camera" else ""
                if c != "camera" and not (tail.isdigit() and int(tail) > 0):
                    problems.append(f"`inputs.sources` has {c!r}: write 'camera' or 'camera:N' (N frames)")
            if cams and len(cams) != len(srcs) and values["watch"]:
                problems.append("`inputs.sources` mixes a camera with folders while `inputs.watch` is true: "
                                "a service watches either folders or a camera")

    if problems:
        raise _config_error(f"{where} is not valid:\n    " + "\n    ".join(problems),
                            fix="correct the keys named above (every key is described in docs/deploy.md)")

    def path(v: str) -> Path:
        p = Path(os.path.expanduser(v))
        return p if p.is_absolute() else (base / p)

    sources = []
    for s in values["sources"] or ():
        if s == "camera" or s.startswith("camera:") or os.path.isabs(os.path.expanduser(s)):
            sources.append(os.path.expanduser(s))
        else:
            sources.append(str(base / s))
    return DeviceConfig(
        device_id=values["device_id"], fleet=values["fleet"], bundle=path(values["bundle"]),
        state_dir=path(values["state_dir"]), broker_url=values["url"], username=values["username"],
        client_id=values["client_id"], credentials=path(values["credentials"]) if values["credentials"] else None,
        password_file=values["password_file"], ca_file=values["ca_file"], protocol=values["protocol"],
        persistent_session=values["persistent_session"], sources=tuple(sources), watch=values["watch"],
        poll_interval=values["poll_interval"], settle=values["settle"], after=values["after"],
        camera_interval=values["camera_interval"], timeout=values["timeout"], resend_after=values["resend_after"],
        max_in_flight=values["max_in_flight"], batch=values["batch"], threads=values["threads"],
        interpreter=values["interpreter"], outbox=values["outbox"], results=values["results"],
        key_file=values["key_file"], path=None)


def load_config(path: str | os.PathLike) -> DeviceConfig:
    """Read a ``.toml`` (or ``.json``) device configuration file and validate it (ConfigError, exit 78)."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise _config_error(f"device config {p} does not exist",
                            fix="install the device package (its install.sh writes /etc/edgesplit/device.toml) "
                                "or pass --config FILE") from None
    except (PermissionError, UnicodeDecodeError) as exc:
        raise _config_error(f"cannot read device config {p}: {exc}", fix="check its permissions") from None
    if p.suffix.lower() == ".json":
        try:
            raw = json.loads(text)
        except ValueError as exc:
            raise _config_error(f"{p} is not valid JSON: {exc}", fix="check the syntax at the place named") from None
    else:
        try:
            import tomllib
        except ImportError:   # Python 3.10
            raise _config_error(f"reading {p} needs Python 3.11 or newer (tomllib)",
                                fix="use a JSON device config (device.json) on this Python") from None
        try:
            raw = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise _config_error(f"{p} is not valid TOML: {exc}", fix="check the syntax at the place named") from None
    cfg = parse_config(raw, where=str(p), base_dir=p.resolve().parent, text=text)
    return dataclasses.replace(cfg, path=p)


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    # JSON string escapes are valid TOML basic-string escapes
    return json.dumps(str(v), ensure_ascii=False)


def dump_config(cfg: DeviceConfig | dict, *, header: str = "") -> str:
    """The configuration as TOML text, every key with its description as a comment."""
    d = cfg.to_dict() if isinstance(cfg, DeviceConfig) else cfg
    lines = [f"# {h}" if h else "#" for h in header.splitlines()] if header else []
    for section, keys in CONFIG_KEYS.items():
        table = d if not section else d.get(section, {})
        if section:
            lines += ["", f"[{section}]"]
        for key, spec in keys.items():
            if key not in table:
                continue
            value = table[key]
            if section == "inputs" and key == "sources" and not value:
                continue
            lines.append(f"# {spec.doc}")
            lines.append(f"{key} = {_toml_value(value)}")
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- credentials

@dataclasses.dataclass(frozen=True)
class Credentials:
    """What the service authenticates with; ``source`` says where it came from."""

    username: str | None
    password: str | None = dataclasses.field(repr=False, default=None)
    ca_path: str | None = None
    key: bytes | None = dataclasses.field(repr=False, default=None)
    source: str = "none"


def _read_secret(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except PermissionError:
        raise _config_error(f"cannot read the {what} {path} (permission denied)",
                            fix="run as root (sudo) or as the service's user; systemd hands the service a "
                                "private copy through LoadCredential=") from None
    except OSError as exc:
        raise _config_error(f"cannot read the {what} {path}: {exc}", fix="check the file") from None


def resolve_credentials(cfg: DeviceConfig, env: dict | None = None) -> Credentials:
    """Password, CA and frame key: systemd's ``$CREDENTIALS_DIRECTORY`` first, then ``broker.credentials``."""
    env = os.environ if env is None else env
    sd = Path(env["CREDENTIALS_DIRECTORY"]) if env.get("CREDENTIALS_DIRECTORY") else None
    cdir = cfg.credentials
    where = []
    password = ca = None
    key = None

    def pick(credential: str, name: str) -> Path | None:
        if sd is not None and (sd / credential).is_file():
            return sd / credential
        if cdir is not None and name:
            p = Path(name) if os.path.isabs(name) else cdir / name
            return p
        return None

    if cdir is not None and not cdir.is_dir() and sd is None:
        raise _config_error(f"the credentials directory {cdir} does not exist",
                            fix="install the device package again, or correct `broker.credentials`")
    p = pick(CREDENTIAL_NAMES["password"], cfg.password_file)
    if p is not None:
        if not p.is_file():
            if cfg.password_file:
                raise _config_error(f"the broker password file {p} does not exist",
                                    fix="copy devices/<id>/password from `edgesplit broker config` there, or set "
                                        "`broker.password_file = \"\"` for a broker without passwords")
        else:
            password = _read_secret(p, "broker password file").decode("utf-8").strip()
            where.append(str(p.parent))
            if not password:
                raise _config_error(f"the broker password file {p} is empty", fix="put the device's password in it")
    p = pick(CREDENTIAL_NAMES["ca"], cfg.ca_file)
    if p is not None and p.is_file():
        _read_secret(p, "broker CA certificate")   # readable?
        ca = str(p)
        where.append(str(p.parent))
    elif p is not None and cfg.ca_file not in ("", "ca.crt"):
        raise _config_error(f"the broker CA certificate {p} does not exist",
                            fix="copy ca.crt from `edgesplit broker config` there, or remove `broker.ca_file`")
    if sd is not None and (sd / CREDENTIAL_NAMES["key"]).is_file():
        kp: Path | None = sd / CREDENTIAL_NAMES["key"]
    elif cfg.key_file:
        kp = Path(cfg.key_file) if os.path.isabs(cfg.key_file) or cdir is None else cdir / cfg.key_file
        if not kp.is_file():
            raise _config_error(f"the frame key file {kp} does not exist",
                                fix="copy the device's key there (edgesplit keys), or set `agent.key_file = \"\"`")
    else:
        kp = None
    if kp is not None:
        _read_secret(kp, "frame key file")
        from protocol import signing

        key = signing.load_key(str(kp))
    if ca is not None and not cfg.broker_url.startswith("mqtts://"):
        log.warning("a CA certificate is configured but the broker URL %s is not mqtts://: TLS is off", cfg.broker_url)
        ca = None
    username = cfg.username or (cfg.device_id if password is not None else None)
    source = "systemd credentials" if sd is not None and any(w == str(sd) for w in where) else \
        (str(cdir) if where else "none")
    return Credentials(username=username, password=password, ca_path=ca, key=key, source=source)


# --------------------------------------------------------------------------- systemd notify

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
        return self.notify("READY=1", *( [f"STATUS={status}"] if status else []))

    def status(self, status: str) -> bool:
        return self.notify(f"STATUS={status}")

    def watchdog(self) -> bool:
        return self.notify("WATCHDOG=1")

    def stopping(self, status: str = "") -> bool:
        return self.notify("STOPPING=1", *([f"STATUS={status}"] if status else []))

    def close(self) -> None:
        with self._lock:
            if self._sock is not None:
                self._sock.close()
                self._sock = None


# --------------------------------------------------------------------------- the service

class DeviceService:
    """Runs the agent for one configuration until stopped; ``run()`` returns the exit code."""

    def __init__(self, config: DeviceConfig, *, notifier: Notifier | None = None, env: dict | None = None):
        self.config = config
        self.env = os.environ if env is None else env
        self.notifier = notifier or Notifier(self.env)
        self.agent = None
        self._stop = threading.Event()
        self._beats = 0                      # bumped by the main loop whenever it does something
        self._progress: tuple = ()
        self._last_change = time.monotonic()
        self._ready = False
        self._in_flight_names: set[str] = set()
        self._results_file = None
        self.stall_limit = max(60.0, 3 * config.resend_after)
        self.done_dir = config.state_dir / "done"
        self.failed_dir = config.state_dir / "failed"

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

    # ------------------------------------------------------------- signals
    def request_stop(self, *_args) -> None:
        """Stop taking inputs, answer what is in flight briefly, exit cleanly (signal-safe)."""
        self._stop.set()
        if self.agent is not None:
            self.agent.request_stop()

    # ------------------------------------------------------------- set-up
    def _build_agent(self):
        from device.agent import DeviceAgent

        cfg = self.config
        creds = resolve_credentials(cfg, self.env)
        log.info("device %s (fleet %s), broker %s, credentials from %s", cfg.device_id, cfg.fleet,
                 cfg.broker_url, creds.source)
        cfg.state_dir.mkdir(parents=True, exist_ok=True)
        for src in cfg.inputs:
            if cfg.watch and not src.startswith("camera") and not any(c in src for c in "*?["):
                p = Path(src)
                if not p.exists() and (p.parent == cfg.state_dir or cfg.state_dir in p.parents):
                    p.mkdir(parents=True, exist_ok=True)
        client_id = cfg.client_id or f"edgesplit-{cfg.fleet}-{cfg.device_id}"
        return DeviceAgent(
            str(cfg.bundle), cfg.broker_url, cfg.device_id, cfg.fleet, max_in_flight=cfg.max_in_flight,
            batch_size=cfg.batch, timeout=cfg.timeout or None, resend_after=cfg.resend_after,
            num_threads=cfg.threads or None, interpreter=cfg.interpreter or None, key=creds.key,
            outbox=str(cfg.outbox_path) if cfg.outbox_path else None, client_id=client_id,
            clean_session=not cfg.persistent_session, protocol=cfg.protocol, username=creds.username,
            password=creds.password, tls_ca=creds.ca_path)

    # ------------------------------------------------------------- results
    def _record(self, r) -> None:
        self._beat()
        self._in_flight_names.discard(r.input)
        if r.ok:
            # every result is in results.jsonl; the journal gets one line per burst (see _watch)
            log.debug("%s -> %s (%.3f) in %.1f ms", r.input, r.label, r.probability or 0.0, r.latency_ms or 0.0)
        else:
            log.warning("%s: %s", r.input, r.error)
        path = self.config.results_path
        if path is not None:
            try:
                if self._results_file is None:
                    self._results_file = open(path, "a", encoding="utf-8")
                d = {"time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "device_id": self.config.device_id, **r.to_dict()}
                self._results_file.write(json.dumps(d, ensure_ascii=False) + "\n")
                self._results_file.flush()
                if self._results_file.tell() > RESULTS_MAX_BYTES:
                    self._results_file.close()
                    self._results_file = None
                    os.replace(path, str(path) + ".1")
            except OSError as exc:
                log.warning("cannot write the result log %s: %s", path, exc)

    def _file_done(self, r, roots: list[Path]) -> None:
        """Move or delete a processed image (a failed one goes to failed/ so it is not retried for ever)."""
        src = Path(r.input)
        if not src.is_file():
            return
        if r.ok and self.config.after == "delete":
            src.unlink(missing_ok=True)
            return
        target_root = self.done_dir if r.ok else self.failed_dir
        rel = Path(src.name)
        for root in roots:
            try:
                rel = src.resolve().relative_to(root.resolve())
                break
            except ValueError:
                continue
        dest = target_root / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        n = 1
        while dest.exists():
            dest = dest.with_name(f"{src.stem}.{n}{src.suffix}")
            n += 1
        try:
            os.replace(src, dest)
        except OSError as exc:
            log.warning("cannot move %s to %s: %s", src, dest, exc)

    def _consume(self, results: Iterable, roots: list[Path] | None = None) -> None:
        for r in results:
            self._record(r)
            if roots is not None:
                self._file_done(r, roots)

    # ------------------------------------------------------------- inputs
    def _scan(self, specs: list[str]) -> list[Path]:
        """New images in the watched folders/globs: settled, not hidden, not already in flight."""
        from device.sources import IMAGE_SUFFIXES
        import glob

        now = time.time()
        skip = {self.done_dir.resolve(), self.failed_dir.resolve()}
        found: dict[str, Path] = {}
        for spec in specs:
            if any(c in spec for c in "*?["):
                candidates = [Path(m) for m in sorted(glob.glob(spec, recursive=True))]
            elif Path(spec).is_dir():
                root = Path(spec)
                candidates = []
                for dirpath, dirnames, filenames in os.walk(root):
                    d = Path(dirpath)
                    dirnames[:] = sorted(n for n in dirnames if not n.startswith(".")
                                         and (d / n).resolve() not in skip)
                    candidates += [d / f for f in sorted(filenames)]
            else:
                candidates = [Path(spec)]
            for p in candidates:
                if p.name.startswith(".") or p.suffix.lower() not in IMAGE_SUFFIXES or str(p) in found:
                    continue
                if str(p) in self._in_flight_names:
                    continue
                try:
                    st = p.stat()
                except OSError:
                    continue
                if not p.is_file() or now - st.st_mtime < self.config.settle:
                    continue
                found[str(p)] = p
        return list(found.values())

    def _watch(self, specs: list[str]) -> None:
        agent = self.agent
        roots = [Path(s) for s in specs if Path(s).is_dir()]
        while not self._stop.is_set():
            self._beat()
            burst = self._scan(specs)
            if not burst:
                self._stop.wait(self.config.poll_interval)
                continue
            log.debug("%d new image(s)", len(burst))
            from device.sources import Sample

            self._in_flight_names.update(str(p) for p in burst)
            st = agent.stats
            before = (st.answered - st.worker_errors, st.worker_errors + st.failed_inputs + st.timeouts)
            t0 = time.monotonic()
            self._consume(agent.run_samples([Sample(str(p), p) for p in burst]), roots)
            ok = st.answered - st.worker_errors - before[0]
            bad = st.worker_errors + st.failed_inputs + st.timeouts - before[1]
            log.info("%d new image(s): %d answered, %d failed in %.2f s; %s", len(burst), ok, bad,
                     time.monotonic() - t0, self.status_line())

    # ------------------------------------------------------------- run
    def run(self) -> int:
        """Run until SIGTERM; returns the exit code (0, 78 or 1)."""
        from protocol.errors import ConfigError, EdgesplitError

        cfg = self.config
        watchdog = threading.Thread(target=self._watchdog_loop, name="edgesplit-watchdog", daemon=True)
        if self.notifier.enabled:
            watchdog.start()
        previous = {}
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                previous[sig] = signal.signal(sig, self.request_stop)
        code = 0
        try:
            try:
                self.agent = self._build_agent()
                if self._stop.is_set():          # SIGTERM while the head was loading
                    self.agent.request_stop()
                self.agent.start()
            except EdgesplitError as exc:
                # a bad bundle, config or refused login does not get better by restarting
                log.error("cannot start: %s", exc.message)
                if exc.fix:
                    log.error("  fix: %s", exc.fix)
                self.notifier.notify(f"STATUS=cannot start: {exc.message}", f"EXIT_STATUS={EX_CONFIG}")
                return EX_CONFIG
            agent = self.agent
            if agent.outbox is not None:
                self._in_flight_names.update(e.name for e in agent.outbox.pending())
            self._ready = True
            self.notifier.ready(self.status_line())
            log.info("ready: bundle %s on %s; inputs %s", agent.bundle.bundle_id, agent.stats.interpreter,
                     ", ".join(cfg.inputs))
            specs = list(cfg.inputs)
            file_specs = [s for s in specs if s not in cfg.cameras]
            roots = [Path(s) for s in file_specs if Path(s).is_dir()]
            # answers for what the outbox re-sent after a restart come first
            self._consume(agent.run_samples([]), roots)
            if not cfg.watch:
                from device.sources import open_inputs

                self._consume(agent.run_samples(open_inputs(specs, camera_interval=cfg.camera_interval)))
            elif cfg.cameras:
                from device.sources import camera_samples, parse_camera_spec

                count = parse_camera_spec(cfg.cameras[0])
                self._consume(agent.run_samples(camera_samples(count=count, interval=cfg.camera_interval),
                                                batch_size=1))
            else:
                self._watch(file_specs)
            log.info("stopping: %s", self.status_line())
        except ConfigError as exc:
            log.error("%s", exc.message)
            if exc.fix:
                log.error("  fix: %s", exc.fix)
            code = EX_CONFIG
        except EdgesplitError as exc:
            log.error("%s", exc.message)
            code = 1
        finally:
            self._stop.set()
            self.notifier.stopping("stopping")
            if self.agent is not None:
                try:
                    self.agent.stop()
                    log.info("%s", self.agent.stats.summary())
                except Exception:   # never hide the real exit reason behind a failing clean-up
                    log.exception("error while stopping the agent")
            if self._results_file is not None:
                self._results_file.close()
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            self.notifier.close()
        return code


# --------------------------------------------------------------------------- entry point

def main(argv: list[str] | None = None) -> int:
    """``python -m device.service --config FILE [--check]``."""
    parser = argparse.ArgumentParser(prog="python -m device.service",
                                     description="the edgesplit device service (run by edgesplit-device.service)")
    parser.add_argument("--config", default=os.environ.get("EDGESPLIT_CONFIG", DEFAULT_CONFIG),
                        help=f"device configuration file (default {DEFAULT_CONFIG}, or $EDGESPLIT_CONFIG)")
    parser.add_argument("--check", action="store_true",
                        help="validate the configuration and credentials, print them, and exit (0 or 78)")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    args = parser.parse_args(argv)
    # journald adds time stamps; a terminal gets them too when not under systemd
    fmt = "%(levelname)s %(name)s: %(message)s" if os.environ.get("INVOCATION_ID") or os.environ.get(
        "JOURNAL_STREAM") else "%(asctime)s %(levelname)s %(name)s: %(message)s"
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format=fmt, stream=sys.stderr)
    from protocol.errors import EdgesplitError

    try:
        cfg = load_config(args.config)
        if args.check:
            creds = resolve_credentials(cfg)
            print(dump_config(cfg, header=f"{cfg.path}: valid"), end="")
            print(f"# credentials: user {creds.username!r}, password {'yes' if creds.password else 'no'}, "
                  f"CA {creds.ca_path or 'system trust store' if cfg.broker_url.startswith('mqtts') else 'n/a'}, "
                  f"frame key {'yes' if creds.key else 'no'} (from {creds.source})")
            return 0
    except EdgesplitError as exc:
        print(f"edgesplit device service: error: {exc.message}", file=sys.stderr)
        if exc.fix:
            print(f"  fix: {exc.fix}", file=sys.stderr)
        Notifier().notify(f"STATUS=bad configuration: {exc.message.splitlines()[0]}", f"EXIT_STATUS={EX_CONFIG}")
        return EX_CONFIG
    return DeviceService(cfg).run()


if __name__ == "__main__":
    raise SystemExit(main())
