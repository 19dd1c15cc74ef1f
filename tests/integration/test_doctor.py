"""`edgesplit doctor` as a user runs it: a real Mosquitto, a real bundle, a real LiteRT interpreter."""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from deploy.broker import free_port

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.timeout(600)


def doctor(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "edgesplit", "doctor", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout)


def line(out: str, check: str) -> str:
    """The report line of one check (and its fix line, if any)."""
    lines = out.splitlines()
    for i, text in enumerate(lines):
        parts = text.split()
        if len(parts) >= 2 and parts[1] == check:
            nxt = lines[i + 1] if i + 1 < len(lines) and lines[i + 1].strip().startswith("fix:") else ""
            return text + "\n" + nxt
    raise AssertionError(f"no {check!r} line in:\n{out}")


def test_passes_against_a_real_broker_with_a_good_bundle(mosquitto_broker, tiny_bundle_dir):
    proc = doctor("--bundle", str(tiny_bundle_dir), "--broker", mosquitto_broker.url)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    for check in ("python", "architecture", "numpy", "Pillow", "paho-mqtt", "interpreter", "bundle", "head", "broker"):
        assert line(out, check).split()[0] == "ok", line(out, check)
    assert "ai_edge_litert" in line(out, "interpreter")
    assert "MQTT connect accepted" in line(out, "broker")
    assert "0 FAIL" in out and "ready" in out


def test_a_closed_port_fails_with_the_fix(tiny_bundle_dir):
    port = free_port()
    proc = doctor("--bundle", str(tiny_bundle_dir), "--broker", f"mqtt://127.0.0.1:{port}")
    assert proc.returncode == 1
    b = line(proc.stdout, "broker")
    assert b.startswith("  FAIL") and "connection refused" in b and "fix:" in b and "start the broker" in b
    assert line(proc.stdout, "bundle").split()[0] == "ok"       # the rest is still checked
    assert "NOT ready" in proc.stdout


def test_a_tampered_bundle_fails_naming_the_file(tiny_bundle_dir, tmp_path):
    bad = tmp_path / "bundle"
    shutil.copytree(tiny_bundle_dir, bad)
    data = bytearray((bad / "head.tflite").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (bad / "head.tflite").write_bytes(bytes(data))
    proc = doctor("--bundle", str(bad), "--skip", "broker")
    assert proc.returncode == 1
    b = line(proc.stdout, "bundle")
    assert b.startswith("  FAIL") and "head.tflite" in b and "sha256" in b and "fix:" in b
    assert line(proc.stdout, "head").split()[0] == "skip"


def test_refused_credentials_are_told_apart_from_an_unreachable_broker(make_mosquitto, tiny_bundle_dir, tmp_path):
    from device.config import dump_config

    broker = make_mosquitto(users={"pi-001": "right-password"})
    creds = tmp_path / "creds"
    creds.mkdir()
    (creds / "password").write_text("wrong-password")
    conf = tmp_path / "device.toml"
    conf.write_text(dump_config({"device_id": "pi-001", "bundle": str(tiny_bundle_dir),
                                 "state_dir": str(tmp_path / "state"),
                                 "broker": {"url": broker.url, "credentials": str(creds)}}))

    proc = doctor("--config", str(conf))
    assert proc.returncode == 1
    b = line(proc.stdout, "broker")
    # Mosquitto answers a wrong password over MQTT 3.1.1 with CONNACK 5 "not authorised"
    assert b.startswith("  FAIL") and "refused the connection" in b
    assert "not authorised" in b or "bad user name or password" in b
    assert "connection refused" not in b and "fix:" in b and "password" in b.split("fix:")[1]
    assert line(proc.stdout, "credentials").split()[0] == "ok"

    (creds / "password").write_text("right-password")
    proc = doctor("--config", str(conf))
    assert proc.returncode == 0, proc.stdout
    assert "accepted as 'pi-001'" in line(proc.stdout, "broker")
    assert line(proc.stdout, "config").split()[0] == "ok"


def test_a_missing_password_file_fails_the_credentials_check(tiny_bundle_dir, tmp_path):
    from device.config import dump_config

    conf = tmp_path / "device.toml"
    (tmp_path / "creds").mkdir()
    conf.write_text(dump_config({"device_id": "pi-001", "bundle": str(tiny_bundle_dir),
                                 "broker": {"url": "mqtt://127.0.0.1:1", "credentials": str(tmp_path / "creds")}}))
    proc = doctor("--config", str(conf), "--skip", "broker")
    assert proc.returncode == 1
    c = line(proc.stdout, "credentials")
    assert c.startswith("  FAIL") and "password file" in c and "fix:" in c


def test_a_bad_config_fails_with_did_you_mean(tmp_path):
    conf = tmp_path / "device.toml"
    conf.write_text('device_id = "pi-1"\nbundle = "/b"\n[broker]\nurl = "mqtt://h:1883"\nusernme = "x"\n')
    proc = doctor("--config", str(conf))
    assert proc.returncode == 1
    c = line(proc.stdout, "config")
    assert c.startswith("  FAIL") and "broker.usernme" in c and "did you mean `broker.username`" in c


def test_json_output_and_the_module_entry_point(mosquitto_broker, tiny_bundle_dir):
    import json

    proc = doctor("--bundle", str(tiny_bundle_dir), "--broker", mosquitto_broker.url, "--json")
    report = json.loads(proc.stdout)
    assert report["ok"] and {c["name"] for c in report["checks"]} >= {"interpreter", "bundle", "head", "broker"}
    # `python -m device.doctor`: the same command where the `edgesplit` script is not on the PATH
    proc = subprocess.run([sys.executable, "-m", "device.doctor", "--bundle", str(tiny_bundle_dir), "--skip", "broker"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_the_generated_tls_broker_and_device_credentials_pass_and_a_wrong_ca_fails(tiny_bundle_dir, open_dir,
                                                                                   make_mosquitto, tmp_path):
    """The production path: `edgesplit broker config` (TLS only, passwords, ACL) and a device's credentials."""
    from deploy.broker_config import write_broker_config
    from device.config import dump_config

    cfg = write_broker_config(open_dir / "bc", ["pi-001"], fleet="lab", hostnames=["localhost"], port=free_port())
    make_mosquitto(config_path=cfg.conf_path)
    conf = tmp_path / "device.toml"
    conf.write_text(dump_config({"device_id": "pi-001", "fleet": "lab", "bundle": str(tiny_bundle_dir),
                                 "broker": {"url": cfg.broker_url,
                                            "credentials": str(cfg.credentials_dir("pi-001"))}}))
    proc = doctor("--config", str(conf))
    assert proc.returncode == 0, proc.stdout
    assert "over TLS" in line(proc.stdout, "broker") and "CA " in line(proc.stdout, "credentials")

    # a CA that did not sign the broker's certificate: TLS verification fails, and the doctor says so
    other = write_broker_config(tmp_path / "other", ["pi-001"], hostnames=["localhost"])
    shutil.copy(other.credentials_dir("pi-001") / "ca.crt", cfg.credentials_dir("pi-001") / "ca.crt")
    proc = doctor("--config", str(conf))
    assert proc.returncode == 1
    b = line(proc.stdout, "broker")
    assert b.startswith("  FAIL") and "TLS verification" in b and "fix:" in b
