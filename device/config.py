"""The device's settings: one definition (:class:`DeviceConfig`), read from a file or built from flags.

Every setting is spelled once, as a field of :class:`DeviceConfig` that carries
its section in ``device.toml``, its description, its checks and its command-line
flag.  From that one list come:

* :func:`load_config` / :func:`parse_config`: ``device.toml`` (or JSON on Python
  3.10), every problem at once with its key path, the file line and a "did you
  mean" (:class:`ConfigError`, exit 78: a service cannot run with it);
* :func:`dump_config`: the file again, each key with its description;
* ``device.flags``: the options of ``edgesplit device run`` (:class:`UsageError`,
  exit 2), filled from ``edgesplit broker config``'s ``broker.json`` where a flag is
  not given.

Two kinds of run want different defaults, said here once: a service (the file)
waits for ever, keeps an outbox and a result log in its state directory and reads
a camera once a second; a one-off ``device run`` (and a config built in Python)
waits 30 s, keeps nothing on disk unless asked, and reads the camera at its pace.
Only the standard library at module level: the command line's parser is built
from this on a Raspberry Pi too.
"""
from __future__ import annotations

import dataclasses
import difflib
import json
import os
import re
from pathlib import Path
from typing import Any

__all__ = ["DeviceConfig", "load_config", "parse_config", "dump_config", "CONFIG_KEYS", "DEFAULT_CONFIG",
           "DEFAULT_STATE_DIR", "Setting", "SETTINGS"]

DEFAULT_CONFIG = "/etc/edgesplit/device.toml"
DEFAULT_STATE_DIR = "/var/lib/edgesplit"
INTERPRETERS = ("", "ai_edge_litert", "tflite_runtime", "tensorflow")
SECTIONS = ("", "broker", "inputs", "agent", "update")      # "" is the top level of the file
_SAME = object()


@dataclasses.dataclass(frozen=True)
class Setting:
    """What the file, the checks and the command line know about one field of :class:`DeviceConfig`."""

    section: str
    key: str                  # its name in the file (the field's name unless told)
    kind: str                 # "str" | "path" | "int" | "float" | "bool" | "list"
    doc: str
    required: bool = False
    choices: tuple = ()
    minimum: float | None = None
    service_default: Any = _SAME   # the file's default where a service wants another than code does
    flag: str | None = None   # its `edgesplit device run` option (None: only in the file)
    metavar: str | None = None


def _setting(default, section: str, kind: str, doc: str, *, key: str | None = None, repr: bool = True, **kw):
    return dataclasses.field(default=default, repr=repr, metadata={"setting": (section, key, kind, doc, kw)})


_REQUIRED = dataclasses.MISSING      # no default: must be given


@dataclasses.dataclass(frozen=True, kw_only=True)
class DeviceConfig:
    """A validated device configuration; paths are absolute (see the module docstring)."""

    device_id: str = _setting(_REQUIRED, "", "str", "this device's id: its broker user name and its topics' "
                              "device part", required=True, flag="--device-id", metavar="ID")
    fleet: str = _setting("default", "", "str", "fleet id (the topic level above the device)", flag="--fleet")
    bundle: Path = _setting(_REQUIRED, "", "path", "bundle directory or .tar.gz made by `edgesplit convert`",
                            required=True, flag="--bundle", metavar="BUNDLE")
    state_dir: Path = _setting(Path(DEFAULT_STATE_DIR), "", "path",
                               "where the outbox, results, processed images and updated bundles go",
                               flag="--state-dir", metavar="DIR")

    broker_url: str = _setting(_REQUIRED, "broker", "str", "mqtt://host:1883 or mqtts://host:8883 (no password "
                               "in a file: see credentials)", key="url", required=True, flag="--broker",
                               metavar="URL", repr=False)     # a command line's URL may hold a password
    username: str = _setting("", "broker", "str", "broker user name (default: the device id when a password "
                             "is found)", flag="--username")
    client_id: str = _setting("", "broker", "str", "MQTT client id (default edgesplit-<fleet>-<device>)",
                              flag="--client-id")
    credentials: Path | None = _setting(None, "broker", "path", "directory with the password and CA files "
                                        "(systemd's $CREDENTIALS_DIRECTORY wins when set; `edgesplit broker "
                                        "config`'s devices/<id>/ also gives broker URL, device id and fleet)",
                                        flag="--credentials", metavar="DIR")
    password_file: str = _setting("password", "broker", "str", "password file name inside credentials "
                                  "(or a path; '' for none)", flag="--password-file", metavar="FILE")
    ca_file: str = _setting("ca.crt", "broker", "str", "CA certificate file name inside credentials (or a path; "
                            "missing: system trust)", flag="--ca", metavar="FILE")
    protocol: str = _setting("3.1.1", "broker", "str", "MQTT protocol version", choices=("3.1.1", "5"))
    persistent_session: bool = _setting(False, "broker", "bool", "keep the broker session (results queued while "
                                        "offline)", service_default=True)

    sources: tuple[str, ...] = _setting((), "inputs", "list", "folders, files, globs, or 'camera' / 'camera:N' "
                                        "(default: <state_dir>/inbox)")
    watch: bool = _setting(True, "inputs", "bool", "keep watching folders and globs for new images (false: send "
                           "once, exit)")
    poll_interval: float = _setting(1.0, "inputs", "float", "seconds between scans of watched folders",
                                    minimum=0.01)
    settle: float = _setting(1.0, "inputs", "float", "seconds a new file must be left unchanged before it is "
                             "read", minimum=0.0)
    after: str = _setting("move", "inputs", "str", "what to do with a processed image", choices=("move", "delete"))
    camera_interval: float = _setting(0.0, "inputs", "float", "seconds between camera frames (0: as fast as the "
                                      "camera goes)", minimum=0.0, service_default=1.0, flag="--camera-interval",
                                      metavar="S")

    timeout: float = _setting(30.0, "agent", "float", "seconds an input may wait for its answer (0: for ever; "
                              "the outbox keeps it)", minimum=0.0, service_default=0.0, flag="--timeout",
                              metavar="S")
    resend_after: float = _setting(10.0, "agent", "float", "seconds after which an unanswered request is sent "
                                   "again (a worker died holding it; the cloud answers each request once; 0: "
                                   "never)", minimum=0.0, flag="--resend-after", metavar="S")
    max_in_flight: int = _setting(64, "agent", "int", "unanswered requests allowed at once", minimum=1,
                                  flag="--max-in-flight", metavar="N")
    batch: int = _setting(32, "agent", "int", "inputs per head invocation", minimum=1, flag="--batch",
                          metavar="N")
    threads: int = _setting(0, "agent", "int", "interpreter threads (0: the interpreter's default)", minimum=0,
                            flag="--threads", metavar="N")
    interpreter: str = _setting("", "agent", "str", "force one TFLite interpreter ('' picks the first "
                                "installed)", choices=INTERPRETERS, flag="--interpreter")
    outbox: str = _setting("", "agent", "str", "SQLite outbox inside state_dir, for inputs that must survive a "
                           "restart ('' for none)", service_default="outbox.sqlite", flag="--outbox",
                           metavar="FILE")
    results: str = _setting("", "agent", "str", "JSON-lines result log inside state_dir ('' for none)",
                            service_default="results.jsonl")
    key_file: str = _setting("", "agent", "str", "frame MAC key file (relative: inside credentials; '' for "
                             "unsigned): sign every frame, accept only signed results", flag="--key",
                             metavar="FILE")
    report_interval: float = _setting(10.0, "agent", "float", "seconds between the reports on the retained "
                                      "report topic (bundle, update state, counters)", minimum=0.1,
                                      flag="--report-interval", metavar="S")
    metrics_port: int = _setting(0, "agent", "int", "serve Prometheus metrics on this port (0: off)", minimum=0,
                                 flag="--metrics-port", metavar="PORT")
    metrics_host: str = _setting("127.0.0.1", "agent", "str", "address the metrics port listens on (0.0.0.0 opens "
                                 "it to the network)", flag="--metrics-host", metavar="ADDR")

    fleet_key: str = _setting("", "update", "str", "the fleet's public key (relative: inside credentials): take "
                              "signed bundle updates into state_dir/bundles; missing or '': never update",
                              service_default="fleet.pub", flag="--fleet-key", metavar="FILE")
    probation: int = _setting(10, "update", "int", "good answers a new bundle must get before it is kept", minimum=1)
    max_errors: int = _setting(3, "update", "int", "failed answers (errors, dead letters, timeouts) that roll a new "
                               "bundle back during its probation", minimum=1)
    probation_seconds: float = _setting(120.0, "update", "float", "a probation without a failure ends after this "
                                        "long even without traffic", minimum=1.0)
    download_stall: float = _setting(120.0, "update", "float", "seconds without a new chunk (while connected) "
                                     "after which a download is refused as truncated", minimum=1.0)

    path: Path | None = None          # the file it was read from

    def __post_init__(self):
        # a config built in code is held to the same rules as one read from a file or the flags
        for name in ("bundle", "state_dir"):
            object.__setattr__(self, name, Path(getattr(self, name)))
        object.__setattr__(self, "credentials", Path(self.credentials) if self.credentials else None)
        object.__setattr__(self, "sources", tuple(str(x) for x in self.sources))
        problems = [p for name, s in SETTINGS.items() if s.kind != "path"
                    for p in [_check(s, getattr(self, name), f"`{name}`")[1]] if p]
        if not problems:
            problems = _cross_problems(vars(self), lambda n: f"`{n}`", file=False)
        if problems:
            from protocol.errors import UsageError

            raise UsageError("DeviceConfig: " + "; ".join(problems), fix="see device.config for every setting")

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

    @property
    def mqtt_client_id(self) -> str:
        # stable, as persistent sessions and broker ACLs want
        return self.client_id or f"edgesplit-{self.fleet}-{self.device_id}"

    def to_dict(self) -> dict:
        """Nested like the file (sections ``broker``, ``inputs``, ``agent``)."""
        out: dict[str, Any] = {}
        for name, s in SETTINGS.items():
            value = getattr(self, name)
            if isinstance(value, Path):
                value = str(value)
            elif value is None:
                value = ""
            elif isinstance(value, tuple):
                value = list(value)
            (out if not s.section else out.setdefault(s.section, {}))[s.key] = value
        return out


def _settings() -> dict[str, Setting]:
    out = {}
    for f in dataclasses.fields(DeviceConfig):
        if "setting" not in f.metadata:
            continue
        section, key, kind, doc, kw = f.metadata["setting"]
        out[f.name] = Setting(section, key or f.name, kind, doc, **kw)
    return out


#: field name -> :class:`Setting`, in the file's order
SETTINGS: dict[str, Setting] = _settings()
_BY_KEY = {(s.section, s.key): name for name, s in SETTINGS.items()}
#: section -> keys in the file ("" is the top level); a view of SETTINGS for messages and docs
CONFIG_KEYS: dict[str, dict[str, Setting]] = {
    sec: {s.key: s for s in SETTINGS.values() if s.section == sec} for sec in SECTIONS}


def _default(name: str, *, service: bool) -> Any:
    s = SETTINGS[name]
    if service and s.service_default is not _SAME:
        return s.service_default
    f = DeviceConfig.__dataclass_fields__[name]
    return None if f.default is dataclasses.MISSING else f.default


def _config_error(message: str, fix: str | None = None):
    from protocol.errors import ConfigError

    return ConfigError(message, fix=fix)


# --------------------------------------------------------------------------- checks shared by file and flags

_WANT = {"str": "a string", "path": "a path (string)", "bool": "true or false", "int": "an integer",
         "float": "a number", "list": "a list of strings"}


def _check(s: Setting, value: Any, name: str) -> tuple[Any, str | None]:
    """(the value, normalised; a problem or None) for one setting; ``name`` is how the user spelled it."""
    ok = True
    if s.kind in ("str", "path"):
        ok = isinstance(value, str)
    elif s.kind == "bool":
        ok = isinstance(value, bool)
    elif s.kind == "int":
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif s.kind == "float":
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        value = float(value) if ok else value
    elif s.kind == "list":
        if isinstance(value, str):
            value = [value]
        ok = isinstance(value, (list, tuple)) and all(isinstance(v, str) and v for v in value)
    if not ok:
        return value, f"{name} must be {_WANT[s.kind]}, found {value!r}"
    if s.choices and value not in s.choices:
        near = difflib.get_close_matches(str(value), [c for c in s.choices if c], n=1)
        return value, (f"{name} is {value!r}; it must be one of {', '.join(repr(c) for c in s.choices)}"
                       + (f" (did you mean {near[0]!r}?)" if near else ""))
    if s.minimum is not None and value < s.minimum:
        return value, f"{name} is {value}; it must be at least {s.minimum:g}"
    return value, None


def _cross_problems(values: dict, name, *, file: bool) -> list[str]:
    """What single values cannot show: ids, the URL, camera inputs.  ``name(field)`` spells a key."""
    from protocol import topics
    from protocol.errors import EdgesplitError

    problems = []
    for key, what in (("device_id", "device id"), ("fleet", "fleet id")):
        try:
            topics.check_id(values[key], what)
        except EdgesplitError as exc:
            problems.append(f"{name(key)}: {exc.message}")
    try:
        from protocol.mqtt.url import parse_url     # no paho: a config is checked where paho is missing

        parsed = parse_url(values["broker_url"])
        if file and parsed.password is not None:
            problems.append(f"{name('broker_url')} holds a password: the config file is readable by every user; "
                            f"put the password in the credentials directory")
    except EdgesplitError as exc:
        problems.append(f"{name('broker_url')}: {exc.message}")
    srcs = [str(s) for s in values["sources"] or ()]
    cams = [s for s in srcs if s == "camera" or s.startswith("camera:")]
    for c in cams:
        tail = c[len("camera:"):] if c != "camera" else ""
        if c != "camera" and not (tail.isdigit() and int(tail) > 0):
            problems.append(f"{name('sources')} has {c!r}: write 'camera' or 'camera:N' (N frames)")
    if file and cams and len(cams) != len(srcs) and values["watch"]:
        problems.append("`inputs.sources` mixes a camera with folders while `inputs.watch` is true: "
                        "a service watches either folders or a camera")
    return problems


# --------------------------------------------------------------------------- the file

def _line_of(text: str | None, key: str) -> str:
    """' (line N)' for the first line that sets ``key`` in TOML/JSON text, '' if not found."""
    if not text:
        return ""
    pat = re.compile(rf'^\s*"?{re.escape(key)}"?\s*[=:]')
    for i, line in enumerate(text.splitlines(), start=1):
        if pat.match(line):
            return f" (line {i})"
    return ""


def _unknown_keys(raw: dict, text: str | None) -> list[str]:
    problems = []
    sections = [s for s in SECTIONS if s]
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
                    others = [s for s in sections if s != key and sub in CONFIG_KEYS[s]]
                    hint = (f"; did you mean `{key}.{near[0]}`?" if near else
                            f"; it belongs in [{others[0]}]" if others else
                            f"; known keys in [{key}]: {', '.join(CONFIG_KEYS[key])}")
                    problems.append(f"unknown key `{key}.{sub}`{_line_of(text, sub)}{hint}")
            continue
        everything = list(CONFIG_KEYS[""]) + sections + [k for s in sections for k in CONFIG_KEYS[s]]
        near = difflib.get_close_matches(key, everything, n=1)
        home = next((s for s in sections if key in CONFIG_KEYS[s]), None)
        hint = (f"; it belongs in the [{home}] section" if home else
                f"; did you mean `{near[0]}`?" if near else f"; known keys: {', '.join(everything)}")
        problems.append(f"unknown key `{key}`{_line_of(text, key)}{hint}")
    return problems


def parse_config(raw: dict, *, where: str = "device config", base_dir: Path | None = None,
                 text: str | None = None) -> DeviceConfig:
    """Validate a configuration mapping (as read from the file) and return a :class:`DeviceConfig`.

    Every problem is collected and reported at once (ConfigError, exit 78), each with
    its key path, the file line when known, and a "did you mean" for unknown keys.
    Relative paths are resolved against ``base_dir`` (the file's folder).
    """
    base = Path(base_dir) if base_dir is not None else Path.cwd()
    if not isinstance(raw, dict):
        raise _config_error(f"{where} must hold a table of keys, found {type(raw).__name__}",
                            fix="write it like the example in docs/deploy.md")
    problems = _unknown_keys(raw, text)

    def spelled(name: str) -> str:
        s = SETTINGS[name]
        return f"`{s.section}.{s.key}`" if s.section else f"`{s.key}`"

    values: dict[str, Any] = {}
    for name, s in SETTINGS.items():
        table = raw if not s.section else raw.get(s.section, {})
        if not isinstance(table, dict):
            continue
        if s.key not in table:
            if s.required:
                problems.append(f"missing key {spelled(name)}: {s.doc}")
            values[name] = _default(name, service=True)
            continue
        value, problem = _check(s, table[s.key], spelled(name) + _line_of(text, s.key))
        if problem:
            problems.append(problem)
        values[name] = value

    if not problems:
        problems += _cross_problems(values, lambda n: spelled(n) + _line_of(text, SETTINGS[n].key), file=True)
        for key in ("outbox", "results"):
            v = values[key]
            if v and (Path(v).is_absolute() or ".." in Path(v).parts):
                problems.append(f"`agent.{key}` must be a file name inside state_dir, found {v!r}")
    if problems:
        raise _config_error(f"{where} is not valid:\n    " + "\n    ".join(problems),
                            fix="correct the keys named above (every key is described in docs/deploy.md)")

    def path(v: str) -> Path:
        p = Path(os.path.expanduser(v))
        return p if p.is_absolute() else (base / p)

    sources = []
    for src in values["sources"] or ():
        if src == "camera" or src.startswith("camera:") or os.path.isabs(os.path.expanduser(src)):
            sources.append(os.path.expanduser(src))
        else:
            sources.append(str(base / src))
    values.update(bundle=path(values["bundle"]), state_dir=path(values["state_dir"]),
                  credentials=path(values["credentials"]) if values["credentials"] else None,
                  sources=tuple(sources))
    return DeviceConfig(**values)


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
    for section in SECTIONS:
        table = d if not section else d.get(section, {})
        if section:
            lines += ["", f"[{section}]"]
        for key, s in CONFIG_KEYS[section].items():
            if key not in table:
                continue
            value = table[key]
            if section == "inputs" and key == "sources" and not value:
                continue
            lines.append(f"# {s.doc}")
            lines.append(f"{key} = {_toml_value(value)}")
    return "\n".join(lines) + "\n"
