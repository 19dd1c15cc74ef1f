"""The device config file (device.toml), its credentials, and the systemd notify protocol of the service."""
from __future__ import annotations

import os
import socket

import pytest

from device.config import dump_config, load_config, parse_config
from device.credentials import CREDENTIAL_NAMES, resolve_credentials
from device.systemd import Notifier
from protocol.errors import ConfigError

GOOD = """\
device_id = "pi-001"
fleet = "lab"
bundle = "bundle"
state_dir = "state"

[broker]
url = "mqtts://broker.example.org:8883"
credentials = "creds"

[inputs]
sources = ["inbox", "/srv/more"]

[agent]
batch = 8
"""


def _write(tmp_path, text, name="device.toml"):
    p = tmp_path / name
    p.write_text(text)
    return p


def test_a_valid_config_resolves_paths_against_its_folder(tmp_path):
    cfg = load_config(_write(tmp_path, GOOD))
    assert (cfg.device_id, cfg.fleet, cfg.batch, cfg.max_in_flight) == ("pi-001", "lab", 8, 64)
    assert cfg.bundle == tmp_path / "bundle" and cfg.state_dir == tmp_path / "state"
    assert cfg.credentials == tmp_path / "creds"
    assert cfg.inputs == (str(tmp_path / "inbox"), "/srv/more")
    assert cfg.outbox_path == tmp_path / "state" / "outbox.sqlite"
    # the writer's output reads back to the same configuration
    again = load_config(_write(tmp_path, dump_config(cfg), "again.toml"))
    assert again.to_dict() == cfg.to_dict()


def test_json_config_works_too(tmp_path):
    p = _write(tmp_path, '{"device_id": "d1", "bundle": "/b", "broker": {"url": "mqtt://h:1883"}}', "device.json")
    cfg = load_config(p)
    assert cfg.device_id == "d1" and cfg.inputs == ("/var/lib/edgesplit/inbox",)


@pytest.mark.parametrize("text, words", [
    (GOOD.replace("batch = 8", "bacth = 8"), ["`agent.bacth` (line 14)", "did you mean `agent.batch`"]),
    (GOOD.replace('fleet = "lab"', 'flet = "lab"'), ["unknown key `flet` (line 2)", "did you mean `fleet`"]),
    (GOOD + 'url = "x"\n', ["`agent.url`", "it belongs in [broker]"]),
    (GOOD.replace('device_id = "pi-001"\n', ""), ["missing key `device_id`"]),
    (GOOD.replace("batch = 8", "batch = \"8\""), ["`agent.batch` (line 14) must be an integer"]),
    (GOOD.replace("batch = 8", "batch = 0"), ["must be at least 1"]),
    (GOOD.replace("[agent]", "[agent]\nafter = \"moev\""), ["it belongs in [inputs]"]),
    (GOOD.replace("[inputs]", "[inputs]\nafter = \"moev\""), ["`inputs.after`", "did you mean 'move'"]),
    (GOOD.replace("mqtts://broker", "mqtts://pi:pw@broker"), ["holds a password"]),
    (GOOD.replace("mqtts://", "http://"), ["`broker.url`", "scheme"]),
    (GOOD.replace('"pi-001"', '"pi/001"'), ["`device_id`"]),
    (GOOD.replace('sources = ["inbox", "/srv/more"]', 'sources = ["camera", "/srv/more"]'), ["mixes a camera"]),
])
def test_mistakes_are_reported_with_key_line_and_hint(tmp_path, text, words):
    with pytest.raises(ConfigError) as e:
        load_config(_write(tmp_path, text))
    assert e.value.exit_code == 78
    for w in words:
        assert w in e.value.message, e.value.message
    assert e.value.fix


def test_every_problem_is_reported_at_once(tmp_path):
    text = GOOD.replace("batch = 8", "bacth = 8").replace('fleet = "lab"', 'flet = "lab"')
    with pytest.raises(ConfigError) as e:
        load_config(_write(tmp_path, text))
    assert "bacth" in e.value.message and "flet" in e.value.message


def test_unreadable_and_broken_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.toml")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(_write(tmp_path, "device_id = \n"))


def test_credentials_come_from_systemd_first_then_the_folder(tmp_path):
    creds = tmp_path / "creds"
    creds.mkdir()
    (creds / "password").write_text("folder-pw\n")
    (creds / "ca.crt").write_text("-----BEGIN CERTIFICATE-----\n")
    cfg = load_config(_write(tmp_path, GOOD))
    c = resolve_credentials(cfg, env={})
    assert (c.username, c.password, c.ca_path) == ("pi-001", "folder-pw", str(creds / "ca.crt"))

    sd = tmp_path / "sd"
    sd.mkdir()
    (sd / CREDENTIAL_NAMES["password"]).write_text("systemd-pw")
    (sd / CREDENTIAL_NAMES["ca"]).write_text("x")
    c = resolve_credentials(cfg, env={"CREDENTIALS_DIRECTORY": str(sd)})
    assert c.password == "systemd-pw" and c.ca_path == str(sd / CREDENTIAL_NAMES["ca"])
    assert c.source == "systemd credentials"
    assert "systemd-pw" not in repr(c)

    (creds / "password").unlink()
    with pytest.raises(ConfigError, match="password file .* does not exist"):
        resolve_credentials(cfg, env={})
    if os.geteuid() != 0:   # root reads anything
        (creds / "password").write_text("x")
        (creds / "password").chmod(0)
        with pytest.raises(ConfigError, match="permission denied"):
            resolve_credentials(cfg, env={})


_READ_AS_SERVICE = """
import json, sys
from device.credentials import read_credentials
from protocol.errors import ConfigError
try:
    c, _ = read_credentials(sys.argv[1], password_file="password", ca_file="ca.crt", systemd_dir=sys.argv[2] or None)
    print(json.dumps({"password": c.password, "ca": c.ca_path, "source": c.source}))
except ConfigError as exc:
    print(json.dumps({"error": exc.message}))
"""


def test_the_service_user_reads_a_root_only_folder_through_systemd(open_dir):
    """The installed layout: /etc/edgesplit/credentials is root's alone (0700), so the service's own user
    cannot even look into it; its password comes from $CREDENTIALS_DIRECTORY (LoadCredential=)."""
    import json
    import shutil
    import subprocess
    from pathlib import Path

    python = shutil.which("python3", path="/usr/bin:/bin")
    if python is None:
        pytest.skip("needs /usr/bin/python3 (run as another user, who cannot use this venv)")
    creds, sd = open_dir / "credentials", open_dir / "sd"
    creds.mkdir()
    (creds / "password").write_text("on-disk-pw\n")
    sd.mkdir()
    (sd / CREDENTIAL_NAMES["password"]).write_text("handed-over-pw")
    if os.geteuid() == 0:      # the service's user: nobody, against root's 0700 folder
        creds.chmod(0o700)
        def as_service():
            os.setgid(65534)
            os.setuid(65534)
    else:                      # no root: a folder its owner cannot look into either
        creds.chmod(0)
        as_service = None
    try:
        def read(systemd_dir: str) -> dict:
            out = subprocess.run([python, "-I", "-c", f"import sys; sys.path.insert(0, {str(Path.cwd())!r})\n"
                                  + _READ_AS_SERVICE, str(creds), systemd_dir], capture_output=True, text=True,
                                 preexec_fn=as_service, cwd="/")
            assert out.returncode == 0, out.stderr[-2000:]
            return json.loads(out.stdout)
        assert read(str(sd)) == {"password": "handed-over-pw", "ca": None, "source": "systemd credentials"}
        # run by hand by another user: one clear error, no traceback
        assert "permission denied" in read("")["error"]
    finally:
        creds.chmod(0o700)


def test_anonymous_broker_needs_no_credentials(tmp_path):
    cfg = parse_config({"device_id": "d", "bundle": "/b", "broker": {"url": "mqtt://h:1883"}})
    c = resolve_credentials(cfg, env={})
    assert c.username is None and c.password is None and c.ca_path is None


def test_notifier_speaks_the_sd_notify_datagram_protocol(tmp_path):
    path = str(tmp_path / "notify")
    server = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    server.bind(path)
    server.settimeout(2)
    n = Notifier({"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "4000000", "WATCHDOG_PID": str(os.getpid())})
    assert n.enabled and n.watchdog_seconds == 4.0
    assert n.ready("up")
    assert server.recv(100) == b"READY=1\nSTATUS=up"
    n.watchdog()
    assert server.recv(100) == b"WATCHDOG=1"
    n.stopping()
    assert server.recv(100) == b"STOPPING=1"
    n.close()
    server.close()
    # another process's watchdog, or no socket at all: nothing is sent and nothing fails
    assert Notifier({"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "1", "WATCHDOG_PID": "1"}).watchdog_seconds is None
    assert not Notifier({}).ready()


def test_abstract_socket_names(tmp_path):
    name = f"edgesplit-test-{os.getpid()}"
    server = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    server.bind("\0" + name)
    server.settimeout(2)
    assert Notifier({"NOTIFY_SOCKET": "@" + name}).status("hello")
    assert server.recv(100) == b"STATUS=hello"
    server.close()


def test_the_command_line_builds_the_same_config_and_names_its_flags(tmp_path, monkeypatch):
    import json

    from device.config import DeviceConfig
    from device.flags import flags, from_flags
    from protocol.errors import UsageError

    monkeypatch.chdir(tmp_path)
    dev = tmp_path / "devices" / "pi-001"
    dev.mkdir(parents=True)
    (dev / "broker.json").write_text(json.dumps({"role": "device", "device_id": "pi-001", "fleet": "lab",
                                                 "username": "pi-001", "broker_url": "mqtts://b.example:8883"}))
    none = {name: None for _, name, _, _ in flags()}
    # the broker config's --out directory and a device id: URL and fleet come from its broker.json
    cfg = from_flags(none | {"bundle": "b", "credentials": str(tmp_path), "device_id": "pi-001",
                             "outbox": "box.sqlite", "sources": ["imgs"]})
    assert (cfg.broker_url, cfg.fleet, cfg.credentials) == ("mqtts://b.example:8883", "lab", dev)
    assert cfg.bundle == tmp_path / "b" and cfg.outbox_path == tmp_path / "box.sqlite"
    assert (cfg.timeout, cfg.results, cfg.persistent_session) == (30.0, "", True)   # a one-off run's defaults
    assert isinstance(cfg, DeviceConfig) and cfg.sources == ("imgs",)
    for given, words in [({"batch": 0}, "--batch is 0"), ({"device_id": "pi/1"}, "--device-id"),
                         ({"device_id": "pi-002"}, "does not match the credentials of pi-001")]:
        with pytest.raises(UsageError) as e:
            from_flags(none | {"bundle": "b", "credentials": str(dev), "sources": []} | given)
        assert words in e.value.message and e.value.exit_code == 2
    with pytest.raises(UsageError, match="no broker given"):
        from_flags(none | {"bundle": "b", "device_id": "d", "sources": []})


def test_a_config_built_in_code_is_checked_too():
    from device.config import DeviceConfig
    from protocol.errors import UsageError

    with pytest.raises(UsageError, match="`max_in_flight` is 0"):
        DeviceConfig(device_id="d", bundle="b", broker_url="mqtt://h:1883", max_in_flight=0)
    cfg = DeviceConfig(device_id="d", bundle="b", broker_url="mqtt://u:secret@h:1883")
    assert "secret" not in repr(cfg) and cfg.mqtt_client_id == "edgesplit-default-d"
